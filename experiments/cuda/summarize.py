"""The table of experiments/cuda/run.sh's bench step: python experiments/cuda/summarize.py OUT_DIR

One row per bench_<name>.jsonl (img/s, ms/step, MFU against the measured bf16 matmul ceiling, peak memory, the
prepared loader's img/s), then the paper schedule's projected wall-clock (bench_paper_projection.jsonl).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    print("| run | px | batch | img/s | ms/step | MFU | ceiling GFLOP/s | peak MB | loader img/s | first step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    projection = None
    for path in sorted(out.glob("bench_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "projection" in row:
                projection = row["projection"]
                continue
            if path.stem == "bench_paper_projection":
                continue
            print(
                f"| {path.stem.removeprefix('bench_')} | {row['resolution']} | {row['batch_size']} | "
                f"{row['img_per_s']:.1f} | {row['step_ms']:.1f} | {100 * row['mfu']:.1f}% | "
                f"{row['ceiling_gflops']:.0f} | {row['peak_mem_mb']:.0f} | {row['loader_img_per_s']:.0f} | "
                f"{row['first_step_s']:.1f} |"
            )
    if projection is not None:
        stages = ", ".join(f"{s['resolution']} px {s['hours']:.2f} h" for s in projection["stages"])
        batch, total = projection["measured_batch"], projection["total_h"]
        print(f"\nProjected `schedule={projection['schedule']}` at batch {batch}: {total} h ({stages})")
        if projection["missing"]:
            print(f"not measured: {projection['missing']}")


if __name__ == "__main__":
    main()
