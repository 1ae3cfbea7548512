"""Does lazy regularisation (loss.penalty_every=4) cost quality? Short runs with and without it.

    python experiments/lazy_regularisation/run.py   # WGAN-GP and rpgan x k in {1, 4} x 3 seeds (~25 min, 2 cores)

Each run: model=small, data=shapes (16 known modes), 16 -> 32 px, 1.5 kimg stable per stage and a 1 kimg
fade, batch 16, lr 0.001, fp32, the loss given; k = 4 is StyleGAN2's lazy scheme (a D update of the penalty
alone every 4th iteration, times 4, with D's Adam corrected). The collapse watch evaluates every 0.5 kimg
(512 G_ema samples: excess-pair, Vendi ratio, modes covered by the shapes classifier, KL to uniform).
Reported per run: wall time, and the last evaluation's metrics. Results: results.json here (the run
directories are not kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from pgan.train.loop import train

HERE = Path(__file__).resolve().parent
CONF_DIR = str(HERE.parents[1] / "conf")
OVERRIDES = [
    "model=small",
    "data=shapes",
    "precision=fp32",  # as in the first measurement (2026-11), so that only the lazy scheme differs
    "schedule.resolutions=[16,32]",
    "schedule.fade_kimg=1.0",
    "schedule.stable_kimg=1.5",
    "schedule.batch_size=16",
    "schedule.lr=0.001",
    "diversity.every_kimg=0.5",
    "log.progress_bar=false",
    "device=cpu",
]
KEYS = ("modes_covered", "mode_kl", "excess_pair", "vendi_ratio", "std_ratio", "state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--losses", nargs="+", default=["wgan_gp", "rpgan"])
    args = parser.parse_args()
    runs = HERE / "results" / "runs"
    rows = []
    for loss, every, seed in itertools.product(args.losses, args.every, args.seeds):
        overrides = [*OVERRIDES, f"loss={loss}", f"seed={seed}", f"loss.penalty_every={every}"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        run_dir = runs / f"{loss}-every{every}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        train(cfg, run_dir)
        wall = time.perf_counter() - t0
        evaluations = [json.loads(line) for line in (run_dir / "collapse.jsonl").read_text().splitlines()]
        last = [e for e in evaluations if "modes_covered" in e][-1]
        stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
        row = {"loss": loss, "penalty_every": every, "seed": seed, "wall_s": round(wall, 1)}
        row |= {k: last.get(k) for k in KEYS}
        row["Loss/gp_last_tick"] = stats[-1].get("Loss/gp")
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for loss, every in itertools.product(args.losses, args.every):
        group = [r for r in rows if r["penalty_every"] == every and r["loss"] == loss]
        summary[f"{loss} k={every}"] = {
            k: round(statistics.mean(r[k] for r in group), 3)
            for k in ("wall_s", "modes_covered", "mode_kl", "excess_pair", "vendi_ratio", "std_ratio")
        }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "results.json").write_text(json.dumps({"rows": rows, "mean": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
