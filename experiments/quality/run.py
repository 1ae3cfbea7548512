"""Sample quality of pgan's recipes, measured: each arm is a `pgan-train` run, then `pgan-eval` of its final G_ema.

    python experiments/quality/run.py digits  --out DIR [--arms A B ...] [--seeds 0 1 2] [--parallel 2]
    python experiments/quality/run.py default --out DIR [--arms ...] [--seeds ...]
    python experiments/quality/run.py real    --out DIR      # the real data's own readings (the floors)
    python experiments/quality/report.py DIR                 # README.md's tables from DIR/*/result.json

Suites:
- digits: stacked digits (1,000 modes: one bundled 8x8 digit per colour channel), to 32 px. 10,000 G_ema
  samples are read by the in-process mode classifier (modes covered, KL to uniform), as in the
  Stacked-MNIST protocol; arms differ in the loss, the batch size, the width, the length, ...
- default: `make train`'s own run (procedural shapes, 8 -> 256 px), read with 1,000 samples at 256 px
  (the 16 shape modes; SWD and precision / recall at 256 px take 6 GB and minutes in pgan-eval, so they
  are run by hand on chosen checkpoints) and the collapse verdict
  the trainer reached; arms are candidate recipes, the arm `default` is `make train` itself.

Every run writes DIR/<suite>/<arm>-s<seed>/result.json; a run whose result exists is skipped, so the
command resumes where it stopped. Arms run `--parallel` at a time as subprocesses, each on
`--threads` torch threads (2 on a 2-core machine with --parallel 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Suite:
    """A family of comparable runs: what they share, what differs per arm, and how the result is read."""

    common: list[str]  # pgan-train overrides of every arm
    arms: dict[str, list[str]]  # arm name -> the overrides that make it
    resolution: int  # px of the final stage, whose final.pt is evaluated
    metrics: str  # pgan-eval's metrics list
    num_fake: int  # G_ema samples read
    num_real: int
    data: list[str] = field(default_factory=list)  # the data overrides pgan-eval needs


LOGS = ["log.progress_bar=false", "log.image_every_kimg=1.024"]
# The fade-in before the 64 px stage's doubled to 2.048 kimg (2026-12-06).
FADE_1 = "schedule.fade_kimg={16: 1.024, 32: 1.024, 64: 1.024, 128: 1.024, 256: 0.512}"
# R1 / R2 on every D step: every row measured before lazy regularisation (every 4th) became rpgan's default.
EVERY_STEP = "loss.penalty_every=1"
# make train's schedule with the 16 px stage four times as long (arm s16x4 and the arms built on it).
S16X4 = "schedule.stable_kimg={8: 2.048, 16: 49.152, 32: 4.096, 64: 1.024, 128: 1.024, 256: 0.512}"
# A preserved stage starts from the smaller model's image nearest-upsampled (2x2 steps): every arm measured before
# model.grow_smooth became the small model's default (2026-12-07, thirteenth session).
NEAREST = "model.grow_smooth=false"
# make train's recipe before model.grow_init=preserve became the default (2026-12-06).
FRESH = ["model.grow_init=fresh", "schedule.lr={default: 0.004, 128: 0.002, 256: 0.002}", FADE_1, EVERY_STEP]
# The default schedule's first three stages, spelled out (so the suite does not move when the defaults do):
# 8 -> 16 -> 32 px, 15.4 kimg in all, batch 16, lr 0.004.
LOW_RES = [
    "schedule.resolutions=[8,16,32]",
    "schedule.fade_kimg={16: 1.024, 32: 1.024}",  # pgan-train: a map given here replaces the preset's
    "schedule.stable_kimg={8: 2.048, 16: 8.192, 32: 3.072}",
    "schedule.batch_size=16",
    "schedule.lr=0.004",
]
# Four times as long at 16 and 32 px: 51.2 kimg in all.
LONG = "schedule.stable_kimg={8: 2.048, 16: 24.576, 32: 22.528}"
# Twice small's width up to 64 px (128 channels to 16 px, 64 at 32 px): what model=wide became.
WIDE = ["model.fmap_base=1024", "model.fmap_max=128"]
B8_LONG = ["loss=rpgan", "schedule.batch_size=8", LONG]
# G_ema's half-life min(10 kimg, 0.15 x the stage's kimg so far): StyleGAN2-ADA's EMA rampup, per stage.
EMA_RAMPUP = ["schedule.ema_kimg=10", "schedule.ema_rampup=0.15"]

SUITES = {
    "digits": Suite(
        common=[
            "data=stacked_digits",
            *LOW_RES,
            # Every digits row was measured before preserve became the default (rpgan_b8_preserve overrides it)
            # and before lazy regularisation did (rpgan_lazy4 overrides that).
            "model.grow_init=fresh",
            EVERY_STEP,
            "diversity.every_kimg=2.048",
            "checkpoint.every_kimg=4.096",
            *LOGS,
        ],
        arms={
            "rpgan": ["loss=rpgan"],
            "wgan_gp": ["loss=wgan_gp"],
            "logistic_r1": ["loss=logistic", "loss.r1_gamma=1.0"],
            # R1 and R2 by central finite differences (issue 18: no double backward; experiments/penalty_modes).
            "rpgan_approx": ["loss=rpgan", "loss.penalty_mode=approx"],
            # Lazy R1 / R2 as StyleGAN2 does it: a D update of the penalties alone every 4th iteration.
            "rpgan_lazy4": ["loss=rpgan", "loss.penalty_every=4"],
            # ... and the G step on the D step's latents and G(z) (`speed.reuse_fakes`: one G forward pass fewer, as
            # PyTorch's DCGAN example trains): does G learn as well from fakes D was just updated on?
            "rpgan_lazy4_reuse": ["loss=rpgan", "loss.penalty_every=4", "speed.reuse_fakes=true"],
            # The stable phases end when SWD stops improving, at most where the fixed schedule ends them.
            "rpgan_plateau": ["loss=rpgan", "schedule.advance=plateau"],
            # ... or when the modes' KL to uniform stops improving (a metric for data with known modes).
            "rpgan_plateau_kl": ["loss=rpgan", "schedule.advance=plateau", "schedule.plateau.metric=kl_to_uniform"],
            # The same recipe four times as long at 16 and 32 px (51.2 kimg in all): what more images buy.
            "rpgan_long": ["loss=rpgan", LONG],
            # About 8x the kimg (125 kimg, 98 of them at 32 px), with the default G_ema half-life and a 10x one.
            "rpgan_xlong": ["loss=rpgan", "schedule.stable_kimg={8: 2.048, 16: 24.576, 32: 98.304}"],
            "rpgan_xlong_ema": [
                "loss=rpgan",
                "schedule.stable_kimg={8: 2.048, 16: 24.576, 32: 98.304}",
                "schedule.ema_kimg=1.0",
            ],
            # Ablations of the 15.4-kimg recipe (2026-12-06): where the KL comes from is the digits' fidelity
            # (each channel over-produces 8s and under-produces 4s and 7s), so these try what sharpens digits.
            "rpgan_ema1": ["loss=rpgan", "schedule.ema_kimg=1.0"],
            "rpgan_wide": ["loss=rpgan", *WIDE],
            "rpgan_lr2": ["loss=rpgan", "schedule.lr=0.002"],
            "rpgan_gamma01": ["loss=rpgan", "loss.r1_gamma=0.1", "loss.r2_gamma=0.1"],
            "rpgan_b32": ["loss=rpgan", "schedule.batch_size=32"],
            "rpgan_b8": ["loss=rpgan", "schedule.batch_size=8"],
            "rpgan_b4": ["loss=rpgan", "schedule.batch_size=4"],
            "rpgan_b8_long": B8_LONG,
            "rpgan_b8_skip": ["loss=rpgan", "schedule.batch_size=8", "model.g_architecture=skip"],
            # The 16 px stage starts as the 8 px model's function (the 32 px block changes the width: random).
            "rpgan_b8_preserve": ["loss=rpgan", "schedule.batch_size=8", "model.grow_init=preserve", NEAREST],
            "rpgan_b4_long": ["loss=rpgan", "schedule.batch_size=4", LONG],
            # rpgan_b8_long with R1 / R2's gamma decaying (cosine) to a tenth over the run, as R3GAN does ...
            "rpgan_b8_long_gdecay": [*B8_LONG, "loss.gamma_decay_kimg=51.2"],
            # ... and with half the learning rate in the 32 px stage (do smaller steps draw sharper digits?).
            "rpgan_b8_long_lr32": [*B8_LONG, "schedule.lr={default: 0.004, 32: 0.002}"],
            # ... and the wide model (128 channels to 16 px, 64 at 32 px) for rpgan_b8_long's 51.2 kimg.
            "rpgan_wide_b8_long": [*B8_LONG, *WIDE],
            # ... with G_ema averaging over a window that grows with the stage (StyleGAN2-ADA's EMA rampup): the
            # digits' frequencies swing from snapshot to snapshot, and an average of the last ones reads closer
            # to uniform (README).
            "rpgan_wide_b8_long_ema": [*B8_LONG, *WIDE, *EMA_RAMPUP],
            # ... and twice as long at 32 px (73.7 kimg in all): its KL was still falling when the stage ended.
            "rpgan_wide_b8_xlong_ema": [
                *B8_LONG,
                *WIDE,
                *EMA_RAMPUP,
                "schedule.stable_kimg={8: 2.048, 16: 24.576, 32: 45.056}",
            ],
            # ... and 24.6 kimg longer still at 32 px (98.3 kimg in all): xlong's KL was 0.119 and still falling.
            "rpgan_wide_b8_xxlong_ema": [
                *B8_LONG,
                *WIDE,
                *EMA_RAMPUP,
                "schedule.stable_kimg={8: 2.048, 16: 24.576, 32: 69.632}",
            ],
            # rpgan_wide_b8_xxlong_ema (experiment=stacked_digits) on today's defaults: R1 / R2 every 4th step, new
            # stages that start as the smaller model's function, smoothly upsampled.
            "rpgan_wide_b8_xxlong_ema_today": [
                *B8_LONG,
                *WIDE,
                *EMA_RAMPUP,
                "schedule.stable_kimg={8: 2.048, 16: 24.576, 32: 69.632}",
                "model.grow_init=preserve",
                "loss.penalty_every=4",
            ],
            # The wide model for rpgan_long's 51.2 kimg.
            "rpgan_wide_long": ["loss=rpgan", *WIDE, LONG],
            # Adam's betas (the default is the paper's [0, 0.99], as in StyleGAN2 and R3GAN): momentum in G and
            # D (DCGAN's beta1 0.5), and a shorter memory of the squared gradients.
            "rpgan_beta05": ["loss=rpgan", "schedule.betas=[0.5,0.99]"],
            "rpgan_beta2_09": ["loss=rpgan", "schedule.betas=[0.0,0.9]"],
            # Minibatch-stddev: off (groups of one sample have no spread), and over the whole batch of 16.
            "rpgan_mbstd_off": ["loss=rpgan", "model.mbstd_group_size=1"],
            "rpgan_mbstd16": ["loss=rpgan", "model.mbstd_group_size=16"],
        },
        resolution=32,
        metrics="[modes]",
        num_fake=10_000,
        num_real=10_000,
        data=["data=stacked_digits"],
    ),
    "default": Suite(
        common=[*LOGS],
        arms={
            "default": [],  # make train
            # make train before 2026-12-06's grow_init=preserve: fresh new layers, lr 0.002 at 256 px. Every arm
            # below up to fade2 was measured on top of it.
            "fresh": FRESH,
            # The defaults before issue 17: WGAN-GP, 32 -> 256 px, lr 0.001-0.004, 8 channels at 128-256 px, fp32.
            "before": [
                *FRESH,
                "loss=wgan_gp",
                "model.fmap_min=8",
                "schedule.resolutions=[32,64,128,256]",
                "schedule.fade_kimg={64: 1.024, 128: 0.512, 256: 0.384}",
                "schedule.stable_kimg={32: 2.048, 64: 1.024, 128: 0.512, 256: 0.384}",
                "schedule.batch_size=16",
                "schedule.lr={32: 0.001, 64: 0.002, 128: 0.004, 256: 0.004}",
                "precision=fp32",
            ],
            "wgan_gp": [*FRESH, "loss=wgan_gp"],  # the new schedule and model with the old loss
            "batch16": [*FRESH, "schedule.batch_size=16"],  # the 256 px stage at batch 16 (48 steps)
            "plateau": [*FRESH, "schedule.advance=plateau"],  # each stable phase ended by an SWD plateau
            "skip": [*FRESH, "model.g_architecture=skip"],  # StyleGAN2's skip generator: every block's toRGB summed
            "b4_128": [*FRESH, "schedule.batch_size={default: 16, 128: 4, 256: 4}"],  # batch 4 at 128 px too
            "b8_b4": [*FRESH, "schedule.batch_size={default: 8, 128: 4, 256: 4}"],  # and batch 8 below (digits: +57)
            # Twice the fade-in at 128 and 256 px (D's old path, which knows the colours, fades out more slowly):
            # the 128 px stage alone kept its 16 modes and its yellows where the default's turned green.
            "fade2": [*FRESH, "schedule.fade_kimg={default: 1.024, 128: 2.048, 256: 1.024}"],
            # Each new stage starts as the smaller model's function (identity convs, copied RGB layers), with
            # the old lr 0.002 at 256 px (where seed 3's stage broke; the default now has 0.001 there).
            "preserve": [
                "model.grow_init=preserve",
                "schedule.lr={default: 0.004, 128: 0.002, 256: 0.002}",
                FADE_1,
                EVERY_STEP,
                NEAREST,
            ],
            # preserve with lr 0.001 at 256 px: the default from then until the 64 px fade-in doubled.
            "fade1": [FADE_1, EVERY_STEP, NEAREST],
            # Twice the fade-in at 64 px, the one stage preserve cannot start as the 32 px model's function
            # (the default from 2026-12-06 until lazy regularisation).
            "fade64": ["schedule.fade_kimg={default: 1.024, 64: 2.048, 256: 0.512}", EVERY_STEP, NEAREST],
            # fade64 with lazy R1 / R2 (issue 18): a penalty-only D update every 4th iteration, StyleGAN2's
            # scheme, 1.6x the img/s at 128-256 px on an fp32 CPU (the default's own recipe since 2026-12-06).
            "lazy4": ["loss.penalty_every=4", NEAREST],
            # Batch 8 up to 128 px (16 before below 128 px): twice the optimizer steps for the same images. In the
            # 16 px stage alone it halved the CNN reading's KL (experiments/quality/shape_reading.py: 0.49 -> 0.25,
            # crosses 0.2 % -> 3.6 %).
            "b8": ["schedule.batch_size={default: 8, 256: 4}", NEAREST],
            # The 16 px stage four times as long (49.2 kimg stable): alone it drew 19 % crosses at 16 px where the
            # default draws 0.3 % (shape_reading.py); do the 32-256 px stages keep them?
            "s16x4": [S16X4, NEAREST],
            # s16x4 with 64 channels at 32 px (the small model has 32): the 32 px block keeps the width, so it starts
            # as the 16 px model's function and, in the 32 px stage alone, kept the crosses (21 % -> 22 %, against
            # 5 % for the narrowing block). Do the 64-256 px stages keep them, and at what cost?
            "s16x4_w32": [
                S16X4,
                "model.channels={4: 64, 8: 64, 16: 64, 32: 64, 64: 16, 128: 16, 256: 16}",
                NEAREST,
            ],
            # The narrowing 32 and 64 px blocks start as the smaller model's function too (model.grow_init=
            # preserve_all: the RGB directions carried through channel pairs), at the small model's widths ...
            "pall": ["model.grow_init=preserve_all", NEAREST],
            # ... and with s16x4's long 16 px stage, whose crosses the 32 px stage then has to keep.
            "s16x4_pall": [S16X4, "model.grow_init=preserve_all", NEAREST],
            # New stages that start from the smaller model's image upsampled bilinearly instead of in 2x2 steps
            # (model.grow_smooth: G's preserved conv1 as a blur): pall's and s16x4_pall's 256 px edges were blocky.
            # `smooth` is make train since it became the default (spelled out, as it was measured).
            "smooth": ["model.grow_smooth=true"],
            "pall_smooth": ["model.grow_init=preserve_all", "model.grow_smooth=true"],
            "s16x4_pall_smooth": [S16X4, "model.grow_init=preserve_all", "model.grow_smooth=true"],
            # make train with Adam's beta1 0.5 (DCGAN's) or beta2 0.9, and without minibatch-stddev (groups of one
            # sample).
            "beta05": ["schedule.betas=[0.5,0.99]"],
            "beta2_09": ["schedule.betas=[0.0,0.9]"],
            "mbstd_off": ["model.mbstd_group_size=1"],
            # make train with the G step on the D step's latents and G(z) (one G forward pass fewer a step).
            "reuse_fakes": ["speed.reuse_fakes=true"],
        },
        resolution=256,
        metrics="[modes]",
        num_fake=1000,
        num_real=1000,
        data=["data=shapes"],
    ),
}


def run_python(module: str, args: list[str], log: Path, threads: int) -> float:
    """`python -m module args` with its output in `log`; the wall time in s (raises on failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if done.returncode:
        raise RuntimeError(f"{module} exited {done.returncode}: see {log}")
    return time.perf_counter() - start


def machine(run_dir: Path) -> dict:
    """Where the run trained: the CPU's model name and the trainer's own device line (its precision and threads),
    since bf16 on a CPU with AMX and fp32 on one without are different runs."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    lines = (run_dir / "train.out").read_text().splitlines()
    device = next((line for line in lines if line.startswith("device ")), "unknown")
    return {"cpu": names[0] if names else "unknown", "device": device}


def last_verdict(run_dir: Path) -> dict:
    """The collapse watch's last record: its verdict, its own reading and the modes it counted."""
    lines = (run_dir / "collapse.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    keys = ("kimg", "state", "verdict", "reading", "modes_covered", "mode_kl", "excess_pair", "vendi_ratio")
    return {k: last.get(k) for k in keys}


def stable_kimg_per_stage(run_dir: Path) -> dict[str, float]:
    """Resolution -> the stable kimg each stage spent: the schedule's, or (schedule.advance=plateau) where its
    plateau ended it (stats.jsonl's stage_advance records)."""
    from pgan.checkpoint import load_checkpoint

    spent = {}
    for final in sorted(run_dir.glob("stage-*/final.pt")):
        info = load_checkpoint(final)["stage_info"]
        spent[str(info["resolution"])] = info["stable_kimg"]
    for line in (run_dir / "stats.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "stage_advance":
            spent[str(record["resolution"])] = record["stable_kimg"]
    return spent


def run_arm(suite: Suite, arm: str, seed: int, out: Path, extra: list[str], threads: int) -> dict:
    """Train one arm with one seed and read its final G_ema; the row also lands in run_dir/result.json."""
    run_dir = out / f"{arm}-s{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*suite.common, *suite.arms[arm], *extra, f"seed={seed}", f"hydra.run.dir={run_dir}"]
    train_s = run_python("pgan.cli.train", overrides, run_dir / "train.out", threads)
    final = run_dir / f"stage-{suite.resolution:04d}" / "final.pt"
    eval_args = [
        f"ckpt={final}",
        f"metrics={suite.metrics}",
        "features=random",
        f"num_fake={suite.num_fake}",
        f"num_real={suite.num_real}",
        *suite.data,
    ]
    run_python("pgan.cli.eval", eval_args, run_dir / "eval.out", threads)
    evaluation = json.loads((run_dir / "eval.out").read_text().strip().splitlines()[-1])
    row = {
        "arm": arm,
        "seed": seed,
        "overrides": [*suite.arms[arm], *extra],
        "train_s": round(train_s, 1),
        "threads": threads,
        "machine": machine(run_dir),
        "eval": evaluation,
        "watch": last_verdict(run_dir),
        "stable_kimg": stable_kimg_per_stage(run_dir),
    }
    result_file.write_text(json.dumps(row, indent=1) + "\n")
    return row


def real_floor(suite: Suite, out: Path, threads: int) -> dict:
    """The real data read exactly as the fakes are (same classifier, same sample count): the best a G can do."""
    result_file = out / "real" / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    result_file.parent.mkdir(parents=True, exist_ok=True)
    import torch

    from pgan.data import StackedDigitsDataset
    from pgan.metrics.modes import mode_classifier_for, mode_coverage

    torch.set_num_threads(threads)
    dataset = StackedDigitsDataset(suite.resolution, size=50_000, seed=0)  # data=stacked_digits' defaults
    images = torch.stack([dataset[i] for i in range(suite.num_fake)])
    classifier = mode_classifier_for(dataset)
    row = {
        "arm": "real",
        "num_samples": suite.num_fake,
        **mode_coverage(classifier.predict(images), classifier.num_modes),
    }
    result_file.write_text(json.dumps(row, indent=1) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*SUITES, "real"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="*", default=None, help="default: every arm of the suite")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", nargs="*", default=[], help="extra pgan-train overrides for every arm")
    parser.add_argument("--suffix", default="", help="appended to the suite's folder (e.g. a variant's name)")
    args = parser.parse_args()
    if args.suite == "real":
        print(json.dumps(real_floor(SUITES["digits"], args.out / "digits", args.threads)))
        return
    suite = SUITES[args.suite]
    out = args.out / (args.suite + args.suffix)
    arms = args.arms or list(suite.arms)
    unknown = [a for a in arms if a not in suite.arms]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; the {args.suite} suite has {list(suite.arms)}")
    jobs = [(arm, seed) for seed in args.seeds for arm in arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_arm, suite, arm, seed, out, args.set, args.threads) for arm, seed in jobs]
        for (arm, seed), future in zip(jobs, futures, strict=True):
            try:
                row = future.result()
            except RuntimeError as exc:
                print(f"{arm} seed {seed}: {exc}", flush=True)
                continue
            print(json.dumps({k: row[k] for k in ("arm", "seed", "train_s", "eval", "watch")}), flush=True)


if __name__ == "__main__":
    main()
