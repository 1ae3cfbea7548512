"""The penalty's double backward: pgan's convolution (`pgan.layers.same_conv2d`) against PyTorch's own F.conv2d.

    python experiments/throughput/double_backward.py --resolutions 32 64 128 --variants default every_step wgan_gp
    python experiments/throughput/double_backward.py --device cuda --model paper --resolutions 256 --batch 32

`same_conv2d` gives the input's gradient as a transposed convolution, whose own backward is the library's
first-order kernel; F.conv2d's double backward computes the weight's part as a convolution with a kernel the
size of the feature map. Both compute the same gradients (tests/test_layers.py); this times them in turns
(`pgan.bench.interleaved_step_seconds`), in one process:
- `penalty`: the R1 penalty's pass on D alone (forward on reals, the gradient w.r.t. them, its squared norm's
  backward), fresh D at alpha 1;
- each of `run.py`'s variants: pgan's whole training iteration with that variant's settings.
A ratio is the median over rounds of F.conv2d's time over same_conv2d's, with the rounds' lowest and highest.
A markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import pgan.layers
from pgan.bench import interleaved_step_seconds, ratio_per_round
from pgan.losses import r1_penalty
from pgan.runtime import autocast_for, resolve_precision
from pgan.train.state import build_models

sys.path.insert(0, str(Path(__file__).parent))
from run import VARIANTS, check_steps, our_iteration, train_config  # noqa: E402

OURS = pgan.layers.same_conv2d


@contextlib.contextmanager
def library_convolution() -> Iterator[None]:
    """Inside it, pgan's convolutions run as plain F.conv2d (PyTorch's own double backward)."""
    pgan.layers.same_conv2d = lambda x, w, b, p: F.conv2d(x, w, b, padding=p)
    try:
        yield
    finally:
        pgan.layers.same_conv2d = OURS


def penalty_pass(resolution: int, batch: int, device: torch.device, model: str) -> Callable[[], None]:
    """R1 on a fresh D of `model` at `resolution`: forward (as the trainer's penalty pass, in
    `differentiated_twice`), the images' gradient, the backward of its squared norm, in the precision pgan-train's
    `precision=auto` picks on `device` (bf16 autocast on GPUs)."""
    cfg = train_config(model=model)
    autocast = autocast_for(device, resolve_precision(cfg.precision, device))
    torch.manual_seed(0)
    _, D = build_models(OmegaConf.to_container(cfg.model, resolve=True), resolution, device)
    reals = (torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )

    def step() -> None:
        x = reals.detach().requires_grad_(True)
        with autocast, pgan.layers.differentiated_twice():
            scores = D(x, 1.0)
        r1_penalty(scores, x, 1.0).backward()

    return step


def both(step: Callable[[], None]) -> dict[str, Callable[[], None]]:
    """`step` with F.conv2d and with same_conv2d, as interleaved_step_seconds' steps."""

    def library() -> None:
        with library_convolution():
            step()

    return {"F.conv2d": library, "same_conv2d": step}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small", help="a conf/model preset (small: run.py's, the peer's widths)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8, help="iterations per round (a multiple of the lazy period)")
    args = parser.parse_args(argv)
    check_steps(args.steps, args.variants)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, model {args.model}, batch {args.batch}, {args.rounds} rounds\n")
    print("| px | what | F.conv2d ms | same_conv2d ms | speedup (rounds' range) |")
    print("|---|---|---|---|---|")
    for res in args.resolutions:
        cases = {"R1 pass on D": penalty_pass(res, args.batch, device, args.model)}
        for variant in args.variants:
            cases[f"iteration, `{variant}`"] = our_iteration(res, args.batch, 1.0, device, variant, args.model)[0]
        for name, step in cases.items():
            seconds = interleaved_step_seconds(both(step), device, args.warmup, args.rounds, args.steps)
            median, low, high = ratio_per_round(seconds["F.conv2d"], seconds["same_conv2d"])
            library_ms, ours_ms = (1000 * statistics.median(seconds[k]) for k in ("F.conv2d", "same_conv2d"))
            print(
                f"| {res} | {name} | {library_ms:.1f} | {ours_ms:.1f} | **{median:.2f}×** ({low:.2f}–{high:.2f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
