"""What a visual report adds to a scan: predict_main.py with and without --report, alternating.

    python3 benchmarks/report_cost.py [--path=../shared/dev_videos] [--rounds=2] [--output=FILE.json]

Each run is a separate process as a user starts it (wall time including start-up; the compilation
cache warmed first). The report computes SmoothGrad heatmaps of the shown faces only (each person's
most fake and most real face) and writes thumbnails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"


def scan_seconds(path: str, report: str | None) -> float:
    """Wall seconds of one predict_main run."""
    command = [sys.executable, "predict_main.py", f"--path={path}", "--noprogress", "--format=json"]
    if report:
        command.append(f"--report={report}")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=str(SHARED / "dev_videos"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    result = {"machine": common.machine_info(), "path": args.path, "scan_s": [], "scan_with_report_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.html")
        scan_seconds(args.path, report)  # warms the compilation cache of both programs
        for round_index in range(args.rounds):
            order = [None, report] if round_index % 2 == 0 else [report, None]
            for target in order:
                seconds = scan_seconds(args.path, target)
                result["scan_with_report_s" if target else "scan_s"].append(seconds)
                print("with report" if target else "scan alone", f"{seconds:.1f} s", flush=True)
    plain, with_report = statistics.median(result["scan_s"]), statistics.median(result["scan_with_report_s"])
    result["report_overhead"] = with_report / plain - 1
    print(f"scan {plain:.1f} s, with report {with_report:.1f} s: +{100 * result['report_overhead']:.0f}%")
    print("wrote", common.write_json(args.output or common.default_output("report_cost"), result))


if __name__ == "__main__":
    main()
