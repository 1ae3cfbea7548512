"""Two memory-layout fixes to pgan's default CPU step, measured against it in one process, interleaved.

    python experiments/throughput/layouts.py 64 7     # resolution, rounds of 8 steps per variant

- A: today's layers.
- B: minibatch_stddev's output kept channels-last. Today its torch.cat returns NCHW (the appended [N, 1, H, W]
  map is ambiguous), so D's gradients flow back NCHW beside channels-last activations, and the element-wise ops
  that mix the two take a slow path (a mixed-layout leaky_relu_backward measured 10x a matched one).
- C: B, and G's pixel norm as torch's rms_norm over the NHWC view (bf16's broadcast of the [N, 1, H, W] factor
  across the innermost, channel dimension measured 20x slower than fp32's).

Each variant swaps the functions pgan.networks calls; the steps are experiments/throughput/run.py's `default`.
Prints the median img/s of each. Findings in README.md ("Layout and compile on the bf16 EPYC").
"""

from __future__ import annotations

import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from run import our_iteration  # noqa: E402

import pgan.layers as layers  # noqa: E402
import pgan.networks as networks  # noqa: E402
from pgan.bench import interleaved_step_seconds  # noqa: E402


def stddev_channels_last(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    out = layers.minibatch_stddev(x, group_size, eps)
    return (
        out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else out
    )


def pixel_norm_rms(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    if x.dim() != 4:
        return layers.pixel_norm(x, eps)
    return F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)


VARIANTS = {
    "A": (layers.minibatch_stddev, layers.pixel_norm),
    "B": (stddev_channels_last, layers.pixel_norm),
    "C": (stddev_channels_last, pixel_norm_rms),
}


def use(name: str) -> None:
    networks.minibatch_stddev, networks.pixel_norm = VARIANTS[name]


def main() -> None:
    resolution, rounds = int(sys.argv[1]), int(sys.argv[2])
    steps = {}
    for name in VARIANTS:
        use(name)
        step, *_ = our_iteration(resolution, 16, 1.0, torch.device("cpu"), "default")
        steps[name] = partial(in_variant, name, step)
    seconds = interleaved_step_seconds(steps, torch.device("cpu"), warmup=4, rounds=rounds, calls=8)
    for name, values in seconds.items():
        print(
            f"{resolution} px {name}: {16 / statistics.median(values):.1f} img/s (ms/step: "
            + " ".join(f"{1000 * v:.0f}" for v in values)
            + ")"
        )


def in_variant(name: str, step) -> None:
    """One step with variant `name`'s functions in place."""
    use(name)
    step()


if __name__ == "__main__":
    main()
