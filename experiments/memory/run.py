"""Is memory flat over a long run? Train thousands of steps at a small resolution and watch the RSS.

    python experiments/memory/run.py               # 5000 steps of the small model at 16 px (~5 min on 2 cores)
    python experiments/memory/run.py --steps 1000  # shorter

One `pgan-train` stage at 16 px (model=small, batch 16, one DataLoader worker) with everything a real run
does switched on: ticks every 0.128 kimg, sample grids and diversity evaluations every 0.512 kimg,
checkpoints every 1 kimg. The trainer logs its current resident memory (`Resources/rss_mb`, from
/proc/self/statm) at every tick; this script reads it from stats.jsonl and reports the RSS after warm-up
(the first 10 % of the steps), at the end, the growth between them and a least-squares slope in MB per
1000 steps. Results: results.json here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PGAN_TRAIN = str(Path(sys.executable).with_name("pgan-train"))
BATCH = 16
BOUND_MB = 50  # the growth after warm-up we accept over the whole run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "runs" / "long")
    args = parser.parse_args()
    kimg = args.steps * BATCH / 1000
    overrides = [
        "schedule.resolutions=[16]",
        f"schedule.stable_kimg={kimg}",
        f"schedule.batch_size={BATCH}",
        "schedule.lr=0.001",
        "data.num_workers=1",
        "checkpoint.every_kimg=1",
        "log.tick_kimg=0.128",
        "log.image_every_kimg=0.512",
        "log.progress_bar=false",
        "diversity.every_kimg=0.512",
        "device=cpu",
        f"hydra.run.dir={args.out}",
    ]
    subprocess.run(["rm", "-rf", str(args.out)], check=True)
    t0 = time.perf_counter()
    subprocess.run([PGAN_TRAIN, *overrides], check=True, stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - t0

    rows = [json.loads(line) for line in (args.out / "stats.jsonl").read_text().splitlines()]
    steps = [r["step"] / BATCH for r in rows]
    rss = [r["Resources/rss_mb"] for r in rows]
    warm = next(i for i, s in enumerate(steps) if s >= 0.1 * args.steps)
    xs, ys = torch.tensor(steps[warm:], dtype=torch.float64), torch.tensor(rss[warm:], dtype=torch.float64)
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()) * 1000
    result = {
        "steps": args.steps,
        "ticks": len(rows),
        "wall_s": round(wall_s, 1),
        "rss_mb_first_tick": round(rss[0], 1),
        "rss_mb_after_warmup": round(rss[warm], 1),
        "rss_mb_end": round(rss[-1], 1),
        "rss_mb_max_after_warmup": round(max(rss[warm:]), 1),
        "growth_after_warmup_mb": round(rss[-1] - rss[warm], 1),
        "slope_mb_per_1000_steps": round(slope, 3),
        "peak_rss_mb": round(rows[-1]["Resources/peak_rss_mb"], 1),
        "bound_mb": BOUND_MB,
        "within_bound": max(rss[warm:]) - rss[warm] < BOUND_MB,
        "torch": torch.__version__,
        "rss_mb_series": [[int(s), round(m, 1)] for s, m in zip(steps, rss)],
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_series"}, indent=2))


if __name__ == "__main__":
    main()
