"""Where pgan's default training iteration spends its time, op by op, timed without a profiler.

    python experiments/throughput/op_times.py 64        # resolution; --batch 16 --iterations 8 --rows 25

Three tables on stdout, for `run.py`'s `default` iteration at alpha 1:
- each aten op's time per iteration and its share of the time spent in ops;
- each convolution shape's time and GFLOP/s (forward, or backward with the gradients it computes: input, weight,
  bias), FLOPs by torch.utils.flop_counter's formulas;
- the iteration's time by its index modulo the lazy penalty's period (the iteration that takes R1 / R2 first).

Each op is timed around its own call by a `TorchDispatchMode` (on the CPU, where ops run synchronously). Not
torch.profiler: on 2 EPYC cores its per-op self times put a 2-million-element `leaky_relu` at 9.8 ms, which
timed alone, and by this mode inside the step, took 0.3-0.7 ms. Findings in README.md ("In turns, on the AVX2
EPYC again").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))
from run import our_iteration  # noqa: E402

CONVOLUTIONS = ("aten.convolution", "aten.convolution_backward")


def conv_key(op: str, args: tuple) -> str:
    """A convolution call's shape: `fwd` input x weight, or `bwd` input x weight and the gradients it computes."""
    if op == "aten.convolution":
        return f"fwd {tuple(args[0].shape)} x {tuple(args[1].shape)}"
    grads = "".join(name for name, wanted in zip(("input", " weight", " bias"), args[-1]) if wanted)
    return f"bwd {tuple(args[1].shape)} x {tuple(args[2].shape)} -> {grads.strip()}"


class OpTimes(TorchDispatchMode):
    """Seconds and calls of every aten op run under it, and seconds and FLOPs of every convolution shape."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds, self.calls = Counter(), Counter()
        self.conv_seconds, self.conv_flops = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - start
        op = str(func.overloadpacket)
        self.seconds[op] += elapsed
        self.calls[op] += 1
        if op in CONVOLUTIONS:
            key = conv_key(op, args)
            self.conv_seconds[key] += elapsed
            self.conv_flops[key] += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def time_ops(step: Callable[[], None], iterations: int) -> tuple[OpTimes, float]:
    """`step` run `iterations` times under OpTimes; the tally and the wall seconds per iteration."""
    times = OpTimes()
    start = time.perf_counter()
    with times:
        for _ in range(iterations):
            step()
    return times, (time.perf_counter() - start) / iterations


def seconds_by_phase(step: Callable[[], None], period: int, cycles: int) -> list[float]:
    """The median seconds of the iterations at each index modulo `period` (index 0: the lazy penalty's)."""
    seconds: list[list[float]] = [[] for _ in range(period)]
    for i in range(period * cycles):
        start = time.perf_counter()
        step()
        seconds[i % period].append(time.perf_counter() - start)
    return [statistics.median(s) for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("resolution", type=int)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=8, help="a multiple of the lazy penalty's period")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    step, _, _, loss, _ = our_iteration(args.resolution, args.batch, 1.0, torch.device("cpu"), "default")
    if args.iterations % loss.penalty_every:
        parser.error(f"--iterations must be a multiple of the lazy penalty's period, {loss.penalty_every}")
    for _ in range(loss.penalty_every * 2):  # warm-up, and the penalty's phase back at 0
        step()
    times, wall_s = time_ops(step, args.iterations)
    per = 1000 / args.iterations
    in_ops = sum(times.seconds.values())
    print(f"{args.resolution} px, batch {args.batch}: {wall_s * 1000:.0f} ms an iteration, {in_ops * per:.0f} in ops\n")
    print("| op | ms an iteration | share of op time | calls an iteration |\n|---|---|---|---|")
    for op, s in times.seconds.most_common(args.rows):
        print(f"| `{op}` | {s * per:.1f} | {100 * s / in_ops:.1f} % | {times.calls[op] / args.iterations:.1f} |")
    print("\n| convolution | ms an iteration | GFLOP/s |\n|---|---|---|")
    for key, s in times.conv_seconds.most_common(args.rows):
        print(f"| {key} | {s * per:.1f} | {times.conv_flops[key] / s / 1e9:.0f} |")
    phases = seconds_by_phase(step, loss.penalty_every, cycles=4)
    print(f"\nms an iteration by its index modulo {loss.penalty_every} (0 takes the lazy R1 / R2): ", end="")
    print(" ".join(f"{1000 * s:.0f}" for s in phases))


if __name__ == "__main__":
    main()
