"""Measure the collapse flag's error rates: controlled positives, healthy and collapsing training runs.

    python experiments/collapse_detection/run.py all        # everything (about 40 min on 2 CPU cores)
    python experiments/collapse_detection/run.py controlled # only the synthetic conditions (~8 min)
    python experiments/collapse_detection/run.py training   # only the training runs (the 2026-11 recipe's kinds)
    python experiments/collapse_detection/run.py recipe     # only today's default recipe, 8 -> 32 px (6 runs)
    python experiments/collapse_detection/run.py recipe_collapsing  # the recipe made to collapse (6 runs)
    python experiments/collapse_detection/run.py report     # tables (markdown) and plot from results/

Results go to experiments/collapse_detection/results/ (JSON) and the report prints the tables that
README.md holds. Everything is seeded; CPU only (device=cpu), no downloads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgan.data import make_dataset
from pgan.metrics.collapse import Thresholds, severity
from pgan.metrics.diversity import RandomEmbedding, diversity_metrics, real_reference
from pgan.train.loop import train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONF_DIR = str(HERE.parents[1] / "conf")

RESOLUTION = 32
N = 512  # samples per evaluation, as in training
REPEATS = 20
DATASETS = {"shapes": 16, "digits": 10, "stacked_digits": 1000}  # name -> number of modes


def config(*overrides: str):
    """The pgan-train config for these overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def thresholds() -> Thresholds:
    """The default detector thresholds (conf/diversity/default.yaml)."""
    return Thresholds(**OmegaConf.to_container(config().diversity.thresholds))


# --- controlled positives -------------------------------------------------------------------------------
def _perturb(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small within-mode variation: a shift of up to 1 px and smooth noise of amplitude 0.05."""
    out = torch.empty_like(images)
    shifts = torch.randint(-1, 2, (len(images), 2), generator=gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = torch.roll(images[i], shifts=(dy, dx), dims=(1, 2))
    noise = torch.randn(images.shape[0], images.shape[1], 8, 8, generator=gen)
    noise = F.interpolate(noise, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return (out + 0.05 * noise).clamp(-1, 1)


class Pool:
    """Real images of one dataset with their modes; the reference set and the candidate pool are disjoint."""

    def __init__(self, name: str, size: int = 4000) -> None:
        cfg = {"source": name, "channels": 3, "seed": 0}
        if (
            name != "digits"
        ):  # the bundled digits are 1797 images: no repeats, so the pool is disjoint from the reference
            cfg["size"] = 50000
        self.dataset = make_dataset(cfg, RESOLUTION)
        n = min(size, len(self.dataset))
        self.images = torch.stack([self.dataset[i] for i in range(n)])
        self.modes = torch.tensor([self.dataset.mode_of(i) for i in range(n)])
        self.ref_index = torch.arange(N)  # the first N items are the real reference
        self.pool_index = torch.arange(N, n)

    def draw(self, count: int, gen: torch.Generator, keep_modes: torch.Tensor | None = None) -> torch.Tensor:
        """`count` pool images (with replacement if the pool is smaller), optionally only of `keep_modes`."""
        index = self.pool_index
        if keep_modes is not None:
            index = index[torch.isin(self.modes[index], keep_modes)]
        pick = (
            torch.randint(len(index), (count,), generator=gen)
            if len(index) < count
            else torch.randperm(len(index), generator=gen)[:count]
        )
        return self.images[index[pick]]


def conditions(pool: Pool, num_modes: int):
    """(family, severity parameter, sampler(gen) -> fakes) for every controlled condition."""
    yield "healthy", 0, lambda g: pool.draw(N, g)
    for k in (1, 2, 4, 8, 16, 32):
        yield "k_prototypes", k, lambda g, k=k: _perturb(pool.draw(k, g)[torch.randint(k, (N,), generator=g)], g)
    for m in sorted({1, 2, num_modes // 4, num_modes // 2, (3 * num_modes) // 4} - {0}):
        yield "kept_modes", m, lambda g, m=m: pool.draw(N, g, keep_modes=torch.randperm(num_modes, generator=g)[:m])
    for psi in (0.75, 0.5, 0.25, 0.0):

        def shrink(g, psi=psi):
            protos = pool.draw(8, g)
            x = pool.draw(N, g)
            nearest = torch.cdist(x.flatten(1), protos.flatten(1)).argmin(dim=1)
            p = protos[nearest]
            return _perturb(p + psi * (x - p), g)

        yield "truncation_psi", psi, shrink


def controlled() -> list[dict]:
    """One-shot detector levels for every condition x dataset x repeat."""
    t = thresholds()
    embedding = RandomEmbedding()
    rows = []
    for name, num_modes in DATASETS.items():
        pool = Pool(name)
        ref = real_reference(pool.images[pool.ref_index], embedding)
        for family, param, sampler in conditions(pool, num_modes):
            start = time.perf_counter()
            for r in range(REPEATS):
                gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{family}/{param}/{r}".encode()))
                m = diversity_metrics(sampler(gen), ref, embedding, seed=r)
                rows.append(
                    {"dataset": name, "family": family, "param": param, "repeat": r, "level": severity(m, t), **m}
                )
            print(f"{name:15s} {family:15s} {param!s:5s} {time.perf_counter() - start:5.1f}s", flush=True)
    return rows


# --- training runs --------------------------------------------------------------------------------------
TRAIN_COMMON = [
    "device=cpu",
    "model=small",
    "loss=wgan_gp",  # the defaults these kinds were first measured with (2026-11)
    "precision=fp32",
    "schedule.batch_size=16",
    "schedule.lr=0.001",
    "schedule.fade_kimg=1.024",
    "schedule.stable_kimg=1.024",
    "diversity.every_kimg=0.256",
    "diversity.mode_coverage=true",
    "checkpoint.every_kimg=1.024",
    "log.progress_bar=false",
    "log.image_every_kimg=1.024",
    "data.num_workers=0",
]
# The healthy runs train long enough to learn every mode (measured: all 10 digits, mode KL 0.2 nats at the end);
# the short schedule above leaves G_ema undertrained, with genuinely low variety after each fade-in.
HEALTHY = [
    "schedule.fade_kimg={8: 2.048, 16: 2.048, 32: 1.024}",
    "schedule.stable_kimg={8: 4.096, 16: 4.096, 32: 2.048}",
    "diversity.every_kimg=0.512",
]
# Settings that collapse: the non-saturating logistic loss with no gradient penalty, a 10x learning rate,
# no minibatch-stddev, tiny batches.
COLLAPSING = [
    "loss=logistic",
    "loss.r1_gamma=0",
    "schedule.lr=0.01",
    "model.mbstd_group_size=1",
    "schedule.batch_size=4",
]


# The recipe chosen in experiments/quality (issue 17), as `pgan-train` runs it by default: the quick schedule's
# 8 -> 16 -> 32 px stages (15.4 kimg), rpgan, bf16 where the CPU has it; only the logging differs.
RECIPE = [
    "device=cpu",
    "diversity.every_kimg=0.512",
    "diversity.mode_coverage=true",
    "checkpoint.every_kimg=4.096",
    "log.progress_bar=false",
    "log.image_every_kimg=2.048",
    "data.num_workers=0",
]


# Today's recipe without what keeps its modes: rpgan without R1 / R2, no minibatch-stddev, batches of 4 (its lr
# 0.004 kept). The positives for the detector's delay on the recipe's own loss and schedule (a probe: 6 modes and
# mode KL 1.7 at 0.5 kimg, 2 modes at 1 kimg).
RECIPE_COLLAPSING = ["loss.r1_gamma=0", "loss.r2_gamma=0", "model.mbstd_group_size=1", "schedule.batch_size=4"]


def training_runs(kind: str, finals: tuple[int, ...] = (16,), seeds: int = 5) -> list[dict]:
    """`seeds` seeds x 2 datasets x the final resolutions `finals` (8 -> final px) of one kind of run:
    healthy (the 2026-11 default recipe, trained long), undertrained (the same recipe, short), collapsing,
    or recipe (today's defaults)."""
    rows = []
    for name in ("shapes", "digits"):
        for final in finals:
            resolutions = [r for r in (8, 16, 32) if r <= final]
            for seed in range(seeds):
                run_dir = RESULTS / "runs" / f"{kind}-{name}-{final}-seed{seed}"
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                common = RECIPE if kind.startswith("recipe") else TRAIN_COMMON
                overrides = [*common, f"data={name}", f"seed={seed}", f"schedule.resolutions={resolutions}"]
                overrides += {
                    "collapsing": COLLAPSING,
                    "healthy": HEALTHY,
                    "undertrained": [],
                    "recipe": [],
                    "recipe_collapsing": RECIPE_COLLAPSING,
                }[kind]
                start = time.perf_counter()
                train(config(*overrides), run_dir)
                evals = [json.loads(line) for line in (run_dir / "collapse.jsonl").read_text().splitlines()]
                rows.append(
                    {
                        "kind": kind,
                        "dataset": name,
                        "final_resolution": final,
                        "seed": seed,
                        "evaluations": evals,
                        "seconds": time.perf_counter() - start,
                        "modes": DATASETS[name],
                    }
                )
                print(
                    f"{kind} {name} {final}px seed {seed}: {time.perf_counter() - start:.0f}s, "
                    f"states {[e['state'][0] for e in evals]}",
                    flush=True,
                )
                for ckpt in run_dir.rglob("*.pt"):
                    ckpt.unlink()  # keep the logs, not 20 x the weights
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["all", "controlled", "training", "recipe", "recipe_collapsing", "report"])
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.part in ("all", "controlled"):
        (RESULTS / "controlled.json").write_text(json.dumps(controlled()))
    if args.part in ("all", "training"):
        rows = (
            training_runs("healthy", finals=(16, 32))
            + training_runs("collapsing")
            + training_runs("undertrained", finals=(16, 32))
        )
        (RESULTS / "training.json").write_text(json.dumps(rows))
    for kind in ("recipe", "recipe_collapsing"):  # today's default recipe, beside the runs above
        if args.part in ("all", kind):
            path = RESULTS / "training.json"
            earlier = json.loads(path.read_text()) if path.is_file() else []
            rows = [r for r in earlier if r["kind"] != kind] + training_runs(kind, finals=(32,), seeds=3)
            path.write_text(json.dumps(rows))
    from report import report  # noqa: E402 (the report lives beside this script)

    report(RESULTS)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
