"""The thread budget (`threads=auto`), measured: a short pgan-train run on a quiet machine and on one where
another job keeps a core busy.

    python experiments/throughput/threads.py [--repeats 2]

The run: `pgan-train` 16 -> 32 px on the shapes (0.512 kimg fade-in and 0.512 kimg stable per stage, batch 16,
the collapse watch off), as a subprocess, timed end to end. Settings: threads=auto, 1 and 2 (2 is what torch
took by itself before the budget: one thread per core). "Busy": a Python busy loop pinned to the last of this
process's CPUs for the whole run. Prints one JSON line per measurement, then a markdown table (median wall s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = [
    "schedule.resolutions=[16,32]",
    "schedule.fade_kimg=0.512",
    "schedule.stable_kimg=0.512",
    "schedule.batch_size=16",
    "diversity.enabled=false",
    "log.progress_bar=false",
]
SETTINGS = ("auto", "1", "2")


def timed_run(threads: str) -> tuple[float, str]:
    """Wall seconds of one run, and the line where it says what it chose."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as run_dir:
        args = [sys.executable, "-m", "pgan.cli.train", *TRAIN, f"threads={threads}", f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    said = next(line for line in done.stdout.splitlines() if line.startswith("device "))
    return seconds, said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    rows = []
    for load in ("quiet", "busy"):
        hog = None
        if load == "busy":
            hog = subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, {cpus[-1]})
            )
            time.sleep(1.0)
        try:
            for threads in SETTINGS:
                for repeat in range(args.repeats):
                    seconds, said = timed_run(threads)
                    row = {
                        "load": load,
                        "threads": threads,
                        "repeat": repeat,
                        "wall_s": round(seconds, 1),
                        "said": said,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    out = Path(__file__).parent / "results" / "threads_cpu.json"
    out.write_text(json.dumps({"cpus": len(cpus), "train": TRAIN, "rows": rows}, indent=1) + "\n")
    print(f"\n{len(cpus)} usable CPUs\n\n| machine | threads=auto | threads=1 | threads=2 |\n|---|---|---|---|")
    for load in ("quiet", "busy"):
        cells = [
            statistics.median(r["wall_s"] for r in rows if r["load"] == load and r["threads"] == t) for t in SETTINGS
        ]
        print(f"| {load} | " + " | ".join(f"{c:.1f} s" for c in cells) + " |")


if __name__ == "__main__":
    main()
