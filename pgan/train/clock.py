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
    """The current log tick's per-step scalars summed on the device, each with the number of good steps that
    reported it, and the tick's step count (checkpointed, so that a resumed run logs the same averages as an
    uninterrupted one). A scalar only some steps report (lazy regularisation's `Loss/gp`) averages over those."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # key -> good steps that reported it (`Guard/good_steps`: all)
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor], guard: Guard) -> None:
        """Add one step's scalars; a skipped (non-finite) step counts for the guard and adds nothing else."""
        bad = torch.maximum(stats.pop("Guard/skipped_D"), stats.pop("Guard/skipped_G"))
        guard.record(bad)
        good = 1.0 - bad
        for k, v in (stats | {"Guard/good_steps": good}).items():
            v = torch.where(bad > 0, 0.0, v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts[k] + good if k in self.counts else good
        self.steps += 1

    def take_means(self, guard: Guard) -> dict[str, float]:
        """The tick's averages, each over the good steps that reported it (and over the ranks, which skip the
        same steps), and the guard's counts, then empty (the tick's one host sync)."""
        keys = list(self.sums)  # add() puts Guard/good_steps in at every step; a tick follows at least one
        both = dist.mean_across_ranks(self.sums | {f"{k}#count": c for k, c in self.counts.items()})
        values = torch.stack([*(both[k] for k in keys), *(both[f"{k}#count"] for k in keys)]).tolist()
        totals, reported = dict(zip(keys, values[: len(keys)])), dict(zip(keys, values[len(keys) :]))
        good = round(totals.pop("Guard/good_steps"))
        skipped = self.steps - good
        guard.total_bad_steps += skipped
        means = {k: v / reported[k] for k, v in totals.items() if round(reported[k])}
        self.sums, self.counts, self.steps = {}, {}, 0
        return means | {"Guard/skipped_steps": skipped, "Guard/skipped_total": guard.total_bad_steps}

    def state_dict(self) -> dict:
        """For the checkpoint: the sums and their counts (on the device they live on) and the step count."""
        return {"sums": self.sums, "counts": self.counts, "steps": self.steps}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Continue a partial tick from `state_dict()` (a checkpoint from before the counts: every scalar was
        reported by every good step)."""
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        every = self.sums.get("Guard/good_steps")
        self.counts = {k: v.to(device) for k, v in state.get("counts", dict.fromkeys(self.sums, every)).items()}
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
