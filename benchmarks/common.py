"""Helpers shared by the benchmark scripts: machine description, load, interleaved timing."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Callable

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model name from lscpu (or /proc/cpuinfo)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU, cores, load average and time: written into every result file."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "engine": _engine_description(),
    }


def _engine_description() -> str:
    """The model engine the run uses (meso_jax.engine: auto unless the script selects another)."""
    from meso_jax import engine  # pylint: disable=import-outside-toplevel

    return engine.describe()


def other_busy_processes(limit: int = 5) -> list[str]:
    """The busiest other processes (so a contended run says what it competed with)."""
    try:
        lines = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                               check=False).stdout.splitlines()[1:]
    except OSError:
        return []
    me = str(os.getpid())
    busy = [" ".join(line.split()[:2] + [" ".join(line.split()[2:])[:90]]) for line in lines
            if line.split() and line.split()[0] != me and float(line.split()[1]) >= 10.0]
    return busy[:limit]


def time_call(fn: Callable[[], object], min_seconds: float, min_calls: int = 2) -> list[float]:
    """Seconds per call of ``fn`` (which must block until done), for >= min_calls and >= min_seconds."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, min_seconds: float) -> dict[str, dict]:
    """Times every contender in turn, ``rounds`` times (A B C A B C ...), so background load hits
    all of them alike. Returns per contender the median and min seconds per call over all calls."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].extend(time_call(fn, min_seconds))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "calls": len(t)} for name, t in samples.items()}


def write_json(path: str | os.PathLike, payload: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def default_output(name: str) -> pathlib.Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / f"{name}_{stamp}.json"


def package_version(distribution: str) -> str:
    """The installed version of ``distribution``, or "not installed"."""
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
