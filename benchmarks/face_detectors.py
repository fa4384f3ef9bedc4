"""Face detectors compared on this machine: faces found, people, milliseconds per frame, folder scans.

    python3 benchmarks/face_detectors.py [--output=FILE.json]

* Frames with a face: the 32 sampled frames of every ../shared/dev_videos video, per detector, and the
  number of people each scan judges (data_pipelines.people); 300 face crops each of the DFDC and FF++
  validation splits (close-ups, where a detector must still find the face).
* Milliseconds per frame: every 8th of the dev videos' sampled frames resized to 1280x720 and 1920x1080 (the 720p
  portrait DFDC video turned to landscape size the same way), each detector on one thread.
* Folder of 1080p videos: the dev videos re-encoded at 1920x1080 (written to a temp dir), scanned by
  predict_main.py with each detector as a user runs it; wall time, times real time, and CPU use
  ((user + system) / (wall x cores): 1.0 = every core busy all the time).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import resource
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from data_pipelines import faces, people, preprocessing, video  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
DETECTORS = ("blazeface", "haar")


def dev_video_frames(root: pathlib.Path, frames: int) -> dict[str, list[np.ndarray]]:
    """Sampled RGB frames of every video under ``root``."""
    paths = sorted(p for p in root.rglob("*") if preprocessing.media_kind(p) == "video")
    return {str(p.relative_to(root)): [frame for _, frame in video.sample_video_frames(str(p), frames)] for p in paths}


def found_in_videos(frames_by_video: dict[str, list[np.ndarray]], detector: faces.FaceDetector) -> dict:
    """Frames with a face and people judged, per video and in all."""
    per_video = {}
    for name, frames in frames_by_video.items():
        boxes = [detector.detect_faces(frame) for frame in frames]
        judged = people.people_to_judge(people.link_people(boxes))
        per_video[name] = {"frames": len(frames), "frames_with_a_face": sum(1 for b in boxes if b),
                           "people": len(judged), "faces": sum(len(b) for b in boxes)}
    return {"frames": sum(v["frames"] for v in per_video.values()),
            "frames_with_a_face": sum(v["frames_with_a_face"] for v in per_video.values()),
            "videos_with_no_face": sum(1 for v in per_video.values() if not v["frames_with_a_face"]),
            "per_video": per_video}


def found_in_crops(split_dir: pathlib.Path, count: int, detector: faces.FaceDetector) -> dict:
    """Share of ``count`` random face crops (seeded) in which the detector finds a face."""
    files = sorted(str(p) for p in split_dir.rglob("*") if preprocessing.media_kind(p) == "image")
    random.Random(0).shuffle(files)
    files = files[:count]
    hits = sum(1 for f in files if detector.detect_faces(preprocessing.read_image_rgb(f)))
    return {"crops": len(files), "with_a_face": hits}


def ms_per_frame(frames: list[np.ndarray], detector: faces.FaceDetector, width: int, height: int) -> float:
    """Mean ms per frame of ``detector`` on every 8th of ``frames`` resized to width x height (best of 3
    passes)."""
    resized = [cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR) for frame in frames[::8]]
    passes = []
    for _ in range(3):
        t0 = time.perf_counter()
        for frame in resized:
            detector.detect_faces(frame)
        passes.append((time.perf_counter() - t0) / len(resized) * 1000)
    return min(passes)


def write_1080p_copies(root: pathlib.Path, out_dir: pathlib.Path) -> float:
    """The videos under ``root`` re-encoded at 1920x1080 (mp4v) into ``out_dir``; total seconds of video."""
    duration = 0.0
    for path in sorted(p for p in root.rglob("*") if preprocessing.media_kind(p) == "video"):
        capture = cv2.VideoCapture(str(path))
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        writer = cv2.VideoWriter(str(out_dir / path.name), cv2.VideoWriter_fourcc(*"mp4v"), fps, (1920, 1080))
        frames = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            writer.write(cv2.resize(frame, (1920, 1080), interpolation=cv2.INTER_LINEAR))
            frames += 1
        writer.release()
        capture.release()
        duration += frames / fps
    return duration


def scan_folder(folder: pathlib.Path, detector: str) -> dict:
    """predict_main.py on ``folder`` as a separate process: wall seconds and CPU use."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "predict_main.py", f"--path={folder}", f"--face_detector={detector}",
                           "--noprogress", "--format=json"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"returncode": done.returncode, "wall_s": wall, "cpu_s": cpu,
            "cpu_use": cpu / (wall * (os.cpu_count() or 1)), "records": len(done.stdout.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video_dir", default=str(SHARED / "dev_videos"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    detectors = {name: faces.make_face_detector(name) for name in DETECTORS}
    frames_by_video = dev_video_frames(pathlib.Path(args.video_dir), args.frames)
    all_frames = [frame for frames in frames_by_video.values() for frame in frames]
    result: dict = {"machine": common.machine_info(), "detectors": {}}
    for name, detector in detectors.items():
        entry = {"dev_videos": found_in_videos(frames_by_video, detector),
                 "ms_per_frame_720p": ms_per_frame(all_frames, detector, 1280, 720),
                 "ms_per_frame_1080p": ms_per_frame(all_frames, detector, 1920, 1080)}
        for dataset in ("dfdc_faces", "ffpp_faces"):
            if (SHARED / dataset / "val").is_dir():
                entry[f"{dataset}_val"] = found_in_crops(SHARED / dataset / "val", args.crops, detector)
        result["detectors"][name] = entry
        print(name, {k: v for k, v in entry.items() if k != "dev_videos"},
              {k: v for k, v in entry["dev_videos"].items() if k != "per_video"}, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        duration = write_1080p_copies(pathlib.Path(args.video_dir), folder)
        result["folder_1080p"] = {"videos": len(list(folder.iterdir())), "duration_s": duration}
        scan_folder(folder, "blazeface")  # warm the compilation cache
        for name in DETECTORS:
            scan = scan_folder(folder, name)
            scan["x_real_time"] = duration / scan["wall_s"]
            result["folder_1080p"][name] = scan
            print("1080p folder", name, scan, flush=True)
    output = args.output or common.default_output("face_detectors")
    print("wrote", common.write_json(output, result))


if __name__ == "__main__":
    main()
