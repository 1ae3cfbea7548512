"""The stage's kimg clock: which maintenance tasks are due after a step, and the log tick's running sums.

A task is due when the step crossed a multiple of its interval (images of the stage), and every task is due
at the stage's last step. The tick sums stay on the device between ticks: one host sync per tick.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pgan import dist
from pgan.train.guard import Guard
from pgan.train.options import Intervals


def crossed(before: int, after: int, every: int) -> bool:
    """True when a multiple of `every` lies in (before, after] (never for every = 0: off)."""
    return every > 0 and before // every != after // every


@dataclass(frozen=True)
class Due:
    """The maintenance tasks due after one step."""

    tick: bool  # log the tick's averages (and look at the guard's count)
    grid: bool  # the fixed-latent sample grid
    diversity: bool  # the collapse watch
    metrics: bool  # the quality metrics
    snapshot: bool  # a snapshot checkpoint (never at the stage's end: final.pt follows)
    finished: bool  # the stage's last step


def due_after(intervals: Intervals, before: int, after: int, num_images: int) -> Due:
    """What is due after a step took the stage from `before` to `after` images (of `num_images`)."""
    finished = after >= num_images

    def at(every: int) -> bool:
        return crossed(before, after, every) or (finished and every > 0)

    return Due(
        tick=at(intervals.tick_nimg),
        grid=at(intervals.grid_nimg),
        diversity=at(intervals.diversity_nimg),
        metrics=at(intervals.metrics_nimg),
        snapshot=crossed(before, after, intervals.snapshot_nimg) and not finished,
        finished=finished,
    )


class TickSums:
    """The current log tick's per-step scalars summed on the device, and its step count (checkpointed, so that
    a resumed run logs the same averages as an uninterrupted one)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor], guard: Guard) -> None:
        """Add one step's scalars; a skipped (non-finite) step counts for the guard and adds nothing else."""
        bad = torch.maximum(stats.pop("Guard/skipped_D"), stats.pop("Guard/skipped_G"))
        guard.record(bad)
        stats = {k: torch.where(bad > 0, 0.0, v) for k, v in stats.items()} | {"Guard/good_steps": 1.0 - bad}
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def take_means(self, guard: Guard) -> dict[str, float]:
        """The tick's averages over its good steps (and over the ranks) and the guard's counts, then empty
        (the tick's one host sync)."""
        sums = dist.mean_across_ranks(dict(self.sums))
        good_sum = sums.pop("Guard/good_steps")  # add() puts it in at every step; a tick follows at least one
        *totals, good = torch.stack([*sums.values(), good_sum]).tolist()
        good = round(good)
        skipped = self.steps - good
        guard.total_bad_steps += skipped
        values = {k: v / good for k, v in zip(sums, totals)} if good else {}
        self.sums, self.steps = {}, 0
        return values | {"Guard/skipped_steps": skipped, "Guard/skipped_total": guard.total_bad_steps}

    def state_dict(self) -> dict:
        """For the checkpoint: the sums (on the device they live on) and the step count."""
        return {"sums": self.sums, "steps": self.steps}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Continue a partial tick from `state_dict()`."""
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])


class TickTimer:
    """Images per second over the current tick (wall clock)."""

    def __init__(self, nimg: int) -> None:
        self.restart(nimg)

    def restart(self, nimg: int) -> None:
        """Start timing at `nimg` images."""
        self.start_s, self.start_nimg = time.perf_counter(), nimg

    def rate(self, nimg: int) -> float:
        """Images per second since the start, and a new start here."""
        now = time.perf_counter()
        rate = (nimg - self.start_nimg) / max(now - self.start_s, 1e-9)
        self.start_s, self.start_nimg = now, nimg
        return rate
