"""Random small training folders for train_main.py and eval_main.py: the fuzz test's generator and runner.

Run a larger sweep by hand (each case is one train_main process; the compilation cache is shared):

    python3 -m tests.fuzz_training --cases=60 --seed=1

Every case must end with exit status 0, or a non-zero status with one line naming the problem
(``train_main: ...``), and never a Python traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile

import cv2
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXTENSIONS = (".jpg", ".JPG", ".png", ".PNG", ".jpeg")


@dataclasses.dataclass
class Case:
    """One generated training input and the command to run on it."""

    description: str
    argv: list[str]


def _write_image(path: pathlib.Path, rng: np.random.Generator, reddish: bool) -> None:
    size = int(rng.integers(24, 48))
    image = rng.integers(0, 180, (size, size + int(rng.integers(0, 9)), 3), dtype=np.uint8)
    if reddish:
        image[..., 2] = np.clip(image[..., 2].astype(int) + 60, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png" if path.suffix.lower() == ".png" else ".jpg", image)
    assert ok
    path.write_bytes(encoded.tobytes())


def _write_video(path: pathlib.Path, rng: np.random.Generator, frames: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    writer.release()


def _fill_class(folder: pathlib.Path, rng: np.random.Generator, count: int, corrupt: int, reddish: bool,
                videos: bool) -> None:
    """``count`` media files below ``folder`` (some nested, mixed-case extensions), ``corrupt`` of them broken."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        nested = folder / (f"clip{index % 3}" if rng.random() < 0.3 else "")
        if videos:
            path = nested / f"v{index:03d}{'.AVI' if rng.random() < 0.3 else '.avi'}"
        else:
            path = nested / f"f{index:03d}{EXTENSIONS[int(rng.integers(len(EXTENSIONS)))]}"
        if index < corrupt:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
        elif videos:
            _write_video(path, rng, int(rng.integers(0, 6)))
        else:
            _write_image(path, rng, reddish)
    if count and rng.random() < 0.3:  # a symlink to a file of the folder, and one that leads nowhere
        first = next((p for p in sorted(folder.rglob("*")) if p.is_file()), None)
        if first is not None:
            (folder / f"link{first.suffix}").symlink_to(first)
        (folder / "dangling.jpg").symlink_to(folder / "missing.jpg")


def random_case(rng: np.random.Generator, root: pathlib.Path) -> Case:
    """A random folder under ``root`` and the train_main command for it."""
    root.mkdir(parents=True, exist_ok=True)
    kind = rng.choice(["images", "images", "images", "videos", "not a folder", "missing"])
    workdir = root / "work"
    if kind == "not a folder":
        data = root / "file.jpg"
        data.write_bytes(b"not a folder")
        return Case("--data_dir is a file", [f"--data_dir={data}", f"--workdir={workdir}"])
    if kind == "missing":
        return Case("--data_dir is missing", [f"--data_dir={root / 'nowhere'}", f"--workdir={workdir}"])
    videos = kind == "videos"
    data = root / "data"
    split = rng.random() < 0.4
    counts = {}
    for label, reddish in (("real", True), ("fake", False)):
        count = int(rng.choice([0, 1, 2, 3, 5, 8, 13, 21]))
        corrupt = int(rng.integers(0, count + 1)) if rng.random() < 0.4 else 0
        counts[label] = (count, corrupt)
        if split:
            val_count = int(rng.choice([0, 1, 2, 3]))
            _fill_class(data / "train" / label, rng, count, corrupt, reddish, videos)
            if val_count:
                _fill_class(data / "val" / label, rng, val_count, 0, reddish, videos)
        else:
            _fill_class(data / label, rng, count, corrupt, reddish, videos)
    batch_size = int(rng.choice([1, 2, 4, 8, 16]))
    argv = [f"--data_dir={data}", f"--workdir={workdir}", "--epochs=1", f"--batch_size={batch_size}",
            "--noprogress", f"--dataset={'video' if videos else 'image'}",
            f"--face_detector={'haar' if videos and rng.random() < 0.5 else 'none'}", "--frames_per_video=2",
            f"--input_pipeline={'memory' if not videos and rng.random() < 0.5 else 'tfdata'}"]
    description = (f"{kind} split={split} real={counts['real']} fake={counts['fake']} (count, corrupt) "
                   f"batch={batch_size}")
    return Case(description, argv)


def run_case(case: Case, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """train_main.py on ``case``."""
    return subprocess.run([sys.executable, "train_main.py", *case.argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def problem(result: subprocess.CompletedProcess) -> str | None:
    """What is wrong with a finished run (None: it trained, or stopped with one clear line)."""
    output = result.stdout + result.stderr
    if "Traceback" in output:
        return "a traceback"
    if result.returncode == 0:
        return None
    own_lines = [line for line in result.stderr.splitlines() if line.startswith("train_main")]
    if len(own_lines) != 1:
        return f"exit {result.returncode} with {len(own_lines)} train_main lines"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    failures = 0
    outcomes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as temporary:
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(temporary, "cache"))
        for index in range(args.cases):
            case = random_case(rng, pathlib.Path(temporary) / f"case{index:03d}")
            result = run_case(case, env)
            found = problem(result)
            last = (result.stderr.strip().splitlines() or [""])[-1]
            outcome = "trained" if result.returncode == 0 else last.split(":", 2)[-1].strip()[:60]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            print(f"{index:3d} exit {result.returncode} {'PROBLEM ' + found if found else 'ok'}: {case.description}"
                  f"\n      {last[:200]}", flush=True)
            if found:
                failures += 1
                print(result.stderr[-3000:], flush=True)
    print(f"{args.cases} cases, {failures} with a problem")
    for outcome, count in sorted(outcomes.items(), key=lambda item: -item[1]):
        print(f"  {count:3d}  {outcome}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
