"""Input pipeline and video scan throughput, stage by stage.

    python3 benchmarks/pipeline_throughput.py [--images=2048] [--video=FILE.mp4] [--output=FILE.json]

Images: face crops (default ../shared/dfdc_faces/val) read + decoded and resized to 256x256 (uint8,
what predict_main hands to the model, which scales on the device), single-threaded and with a thread
pool; host-side scaling to float32 (what extract_samples adds) is timed separately. Video: a clip's
32 evenly sampled frames decoded (skipping non-reference frames, as the scan does, and for
comparison decoding every frame), faces found by each detector (BlazeFace, Viola-Jones), crops
resized, and Meso-4 (fast path and plain Flax) run on the crops, each stage alone; then the whole scan
as predict_main does it with each detector (samples.extract_face_crops, which overlaps face detection
with decoding, links people, and the fast path), given as a multiple of real time (clip duration /
scan seconds). Video folder (``--video_dir``, default ../shared/dev_videos): every video's face
extraction as the scan does it (decode, detection, people, crops; no model), best of ``--rounds``, with
each detector, alternating. Training (``--train_dir``, default ../shared/dfdc_faces):
train_main's default tf.data pipeline alone (decode, resize, flip augmentation, batches of 32), images/s,
alternating rounds with its files decoded and samples augmented one per Python call
(``input_pipeline.SAMPLES_PER_CALL`` = 1) and ``SAMPLES_PER_CALL`` at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from data_pipelines import faces, preprocessing, samples, video  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"


def image_files(root: pathlib.Path, count: int) -> list[str]:
    paths = sorted(str(p) for p in root.rglob("*") if preprocessing.media_kind(p) == "image")
    return paths[:count]


def image_stages(paths: list[str], workers: int) -> dict:
    prep = preprocessing.Preprocessing(face_detector="none")
    t0 = time.perf_counter()
    decoded = [preprocessing.read_image_rgb(p) for p in paths]
    t1 = time.perf_counter()
    resized = [preprocessing.resize_image(im, prep) for im in decoded]
    t2 = time.perf_counter()
    _ = [preprocessing.scale_to_unit(r) for r in resized]
    t3 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        t4 = time.perf_counter()
        _ = list(pool.map(lambda p: samples.extract_face_crops(p, prep).crops_bhwc, paths))
        t5 = time.perf_counter()
    n = len(paths)
    sizes = np.array([im.shape[:2] for im in decoded])
    return {"images": n, "mean_source_size_hw": sizes.mean(axis=0).round(1).tolist(),
            "decode_images_per_s": n / (t1 - t0), "resize_images_per_s": n / (t2 - t1),
            "host_scale_to_float_images_per_s": n / (t3 - t2), "serial_decode_resize_images_per_s": n / (t2 - t0),
            f"extract_face_crops_{workers}_threads_images_per_s": n / (t5 - t4)}


def video_stages(path: str, frames: int, rounds: int) -> dict:
    import jax
    from meso_jax import models
    from meso_jax.cpu import fast_inference
    from meso_jax.keras_import import load_keras_weights

    capture = cv2.VideoCapture(path)
    fps = capture.get(cv2.CAP_PROP_FPS)
    frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    capture.release()
    duration = frame_count / fps if fps else float("nan")
    detectors = {name: faces.make_face_detector(name) for name in ("blazeface", "haar")}
    preps = {name: preprocessing.Preprocessing(frames_per_video=frames, face_detector=name) for name in detectors}

    weights = SHARED / "mesonet" / "Meso4_DF.h5"
    if weights.is_file():
        _, variables = load_keras_weights(weights)
    else:
        shapes = jax.eval_shape(lambda: models.init_variables(models.get_model("meso4"), 0))
        variables = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
    device = jax.devices()[0]
    v_dev = jax.device_put(variables, device)
    module = models.get_model("meso4").module
    plain = jax.jit(lambda v, x: module.apply(v, preprocessing.as_model_input(x), train=False))
    batch_size = 4 * frames  # room for several people
    batch = np.zeros((batch_size, 256, 256, 3), np.uint8)
    compile_t0 = time.perf_counter()
    fast_inference.meso4_logits(v_dev, jax.device_put(batch, device)).block_until_ready()
    fast_compile = time.perf_counter() - compile_t0
    plain(v_dev, jax.device_put(batch, device)).block_until_ready()

    stage_names = ["decode", "decode_every_frame", "crop_resize", "model_fast", "model_plain"]
    stage_names += [f"detect_{name}" for name in detectors] + [f"scan_fast_{name}" for name in detectors]
    stage_times: dict[str, list[float]] = {k: [] for k in stage_names}
    found: dict[str, int] = {}
    for _ in range(rounds):
        t_every = time.perf_counter()  # for comparison: without skipping non-reference frames
        video.sample_video_frames(path, frames, skip_nonreference=False)
        stage_times["decode_every_frame"].append(time.perf_counter() - t_every)
        t0 = time.perf_counter()
        sampled = video.sample_video_frames(path, frames)
        stage_times["decode"].append(time.perf_counter() - t0)
        for name, detector in detectors.items():
            t1 = time.perf_counter()
            boxes = [detector.detect_faces(frame) for _, frame in sampled]
            stage_times[f"detect_{name}"].append(time.perf_counter() - t1)
            found[name] = sum(1 for frame_boxes in boxes if frame_boxes)
        t2 = time.perf_counter()
        prep = preps["blazeface"]
        crops = [preprocessing.resize_image(faces.crop_face(f, b[0], prep.face_margin), prep)
                 for (_, f), b in zip(sampled, boxes) if b]
        t3 = time.perf_counter()
        batch[:] = 0
        if crops:
            batch[:len(crops)] = np.stack(crops)
        np.asarray(fast_inference.meso4_logits(v_dev, jax.device_put(batch, device)))
        t4 = time.perf_counter()
        np.asarray(plain(v_dev, jax.device_put(batch, device)))
        t5 = time.perf_counter()
        stage_times["crop_resize"].append(t3 - t2)
        stage_times["model_fast"].append(t4 - t3)
        stage_times["model_plain"].append(t5 - t4)
        for name, prep in preps.items():
            t_scan = time.perf_counter()  # what predict_main does per video: every person's faces
            scan_crops = samples.extract_face_crops(path, prep).crops_bhwc[:batch_size]
            batch[:] = 0
            batch[:len(scan_crops)] = scan_crops
            np.asarray(fast_inference.meso4_logits(v_dev, jax.device_put(batch, device)))
            stage_times[f"scan_fast_{name}"].append(time.perf_counter() - t_scan)
    med = {k: float(np.median(v)) for k, v in stage_times.items()}
    return {"video": path, "width": width, "height": height, "fps": fps, "frame_count": frame_count,
            "duration_s": duration, "sampled_frames": frames, "frames_with_a_face": found,
            "fast_path_compile_s": fast_compile,
            "stage_seconds_median": med,
            "frames_per_s": {k: frames / v for k, v in med.items()},
            "x_real_time_fast": {name: duration / med[f"scan_fast_{name}"] for name in detectors}}


def video_folder(root: pathlib.Path, frames: int, rounds: int) -> dict:
    """Face extraction time of every video under ``root`` with each face detector."""
    paths = sorted(str(p) for p in root.rglob("*") if preprocessing.media_kind(p) == "video")
    settings = {name: preprocessing.Preprocessing(frames_per_video=frames, face_detector=name)
                for name in ("blazeface", "haar")}
    seconds: dict[str, dict[str, list[float]]] = {name: {p: [] for p in paths} for name in settings}
    crops: dict[str, dict[str, int]] = {name: {} for name in settings}
    people: dict[str, dict[str, int]] = {name: {} for name in settings}
    for round_index in range(rounds):
        order = list(settings) if round_index % 2 == 0 else list(settings)[::-1]
        for name in order:
            for path in paths:
                t0 = time.perf_counter()
                face_crops = samples.extract_face_crops(path, settings[name])
                seconds[name][path].append(time.perf_counter() - t0)
                crops[name][path] = len(face_crops.frame_indices)
                people[name][path] = len(face_crops.person_boxes)
    videos = []
    for path in paths:
        capture = cv2.VideoCapture(path)
        fps, frame_count = capture.get(cv2.CAP_PROP_FPS), capture.get(cv2.CAP_PROP_FRAME_COUNT)
        width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
        capture.release()
        videos.append({"video": os.path.relpath(path, root), "width": int(width), "height": int(height),
                       "duration_s": frame_count / fps if fps else float("nan"),
                       **{f"{name}_s": min(seconds[name][path]) for name in settings},
                       **{f"{name}_crops": crops[name][path] for name in settings},
                       **{f"{name}_people": people[name][path] for name in settings}})
    duration = sum(v["duration_s"] for v in videos)
    totals = {name: sum(v[f"{name}_s"] for v in videos) for name in settings}
    return {"videos": videos, "total_duration_s": duration, "total_seconds": totals,
            "x_real_time": {name: duration / t for name, t in totals.items()}}


def training_pipeline(data_dir: str, batches: int, rounds: int, augment: str = "flip") -> dict:
    """The tf.data training pipeline alone (no model), images/s per SAMPLES_PER_CALL setting, best of rounds."""
    from data_pipelines import input_pipeline
    prep = preprocessing.Preprocessing(face_detector="none")
    default = input_pipeline.SAMPLES_PER_CALL
    best: dict = {}
    try:
        for _ in range(rounds):
            for per_call in (1, default):
                input_pipeline.SAMPLES_PER_CALL = per_call
                data = input_pipeline.create_datasets(data_dir, "image", prep, batch_size=32, seed=0, augment=augment)
                iterator = data.train.as_numpy_iterator()
                for _ in range(10):  # the pipeline's threads and buffers warm up
                    next(iterator)
                start, images = time.perf_counter(), 0
                for _ in range(batches):
                    images += len(next(iterator)["image"])
                rate = images / (time.perf_counter() - start)
                key = f"samples_per_call_{per_call}_images_per_s"
                best[key] = max(best.get(key, 0.0), rate)
    finally:
        input_pipeline.SAMPLES_PER_CALL = default
    return {"augment": augment, "batch_size": 32, "batches_timed": batches, **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image_dir", default=str(SHARED / "dfdc_faces" / "val"))
    parser.add_argument("--video", default=str(SHARED / "dev_videos" / "fake" / "dfdc_yhffcuhhjy.mp4"))
    parser.add_argument("--video_dir", default=str(SHARED / "dev_videos"),
                        help="videos whose face extraction is timed one by one ('' to skip)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train_dir", default=str(SHARED / "dfdc_faces"),
                        help="labelled folder whose tf.data training pipeline is timed ('' to skip)")
    parser.add_argument("--train_batches", type=int, default=200)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    info = common.machine_info()
    info["busy_processes_at_start"] = common.other_busy_processes()
    info["opencv"] = cv2.__version__
    result: dict = {"machine": info}
    paths = image_files(pathlib.Path(args.image_dir), args.images)
    if paths:
        result["images"] = image_stages(paths, args.workers)
        print("images:", {k: round(v, 1) if isinstance(v, float) else v for k, v in result["images"].items()},
              flush=True)
    if os.path.isfile(args.video):
        result["video"] = video_stages(args.video, args.frames, args.rounds)
        v = result["video"]
        print(f"video {v['width']}x{v['height']} {v['duration_s']:.1f} s, frames with a face "
              f"{v['frames_with_a_face']} of {v['sampled_frames']}; frames/s: "
              + ", ".join(f"{k} {x:.1f}" for k, x in v["frames_per_s"].items())
              + "; x real time (fast path): " + ", ".join(f"{k} {x:.1f}" for k, x in v["x_real_time_fast"].items()),
              flush=True)
    if args.video_dir and os.path.isdir(args.video_dir):
        result["video_folder"] = folder = video_folder(pathlib.Path(args.video_dir), args.frames, args.rounds)
        print("| video | size | duration s | face extraction s (blazeface) | x real time | people | s (haar) | people |"
              "\n|---|---|---|---|---|---|---|---|")
        for v in folder["videos"]:
            print(f"| {v['video']} | {v['width']}x{v['height']} | {v['duration_s']:.1f} | {v['blazeface_s']:.2f} | "
                  f"{v['duration_s'] / v['blazeface_s']:.1f} | {v['blazeface_people']} | {v['haar_s']:.2f} | "
                  f"{v['haar_people']} |")
        print("all videos, x real time: " + ", ".join(f"{k} {x:.1f}" for k, x in folder["x_real_time"].items()),
              flush=True)
    if args.train_dir and os.path.isdir(args.train_dir):
        result["training_pipeline"] = training_pipeline(args.train_dir, args.train_batches, args.rounds)
        print("training pipeline (tf.data, alone):",
              {k: round(v, 1) if isinstance(v, float) else v for k, v in result["training_pipeline"].items()},
              flush=True)
    info["load_average_at_end"] = list(os.getloadavg())
    out = common.write_json(args.output or common.default_output("pipeline_throughput"), result)
    print(f"load average start {info['load_average_at_start']} end {info['load_average_at_end']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
