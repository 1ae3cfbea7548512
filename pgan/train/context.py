"""What every stage of a run shares: the options, where it runs, the logs, the watches, the stop flag."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pgan import dist
from pgan.monitor import Monitor, progress_bar
from pgan.schedule import Stage
from pgan.train.clock import TickTimer
from pgan.train.guard import Guard
from pgan.train.interrupt import StopFlag
from pgan.train.metrics_watch import MetricsWatch
from pgan.train.options import TrainOptions
from pgan.train.plateau import PlateauWatch
from pgan.train.watch import CollapseWatch


@dataclass
class RunContext:
    """The run-level services a stage uses (built once by `pgan.train.loop.train`)."""

    options: TrainOptions
    run_dir: Path
    device: torch.device
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or a no-op
    monitor: Monitor  # TensorBoard + jsonl (rank 0; the other ranks' logs nothing)
    guard: Guard  # the non-finite guard, across stages
    watch: CollapseWatch | None  # the collapse detector (diversity.enabled)
    metrics: MetricsWatch | None  # quality metrics (metrics.every_kimg, rank 0 only)
    plateau: PlateauWatch | None  # the metric that ends stable phases (schedule.advance=plateau)
    stop: StopFlag  # set by SIGINT / SIGTERM / SIGUSR1
    ranks: dist.Ranks

    def lr_scale(self) -> float:
        """The product of what rollbacks did to the learning rates (collapse and guard)."""
        return self.guard.lr_scale * (self.watch.lr_scale if self.watch is not None else 1.0)

    def rollbacks(self) -> int:
        """Rollbacks so far in this stage (guard) and run (collapse)."""
        return self.guard.rollbacks + (self.watch.rollbacks if self.watch is not None else 0)


class Progress:
    """The stage's console progress bar, in images, and the tick's timer."""

    def __init__(self, stage: Stage, nimg: int, enabled: bool) -> None:
        self.stage = stage
        self.bar = progress_bar(stage.num_images, nimg, f"{stage.resolution}px", enabled=enabled)
        self.timer = TickTimer(nimg)

    def update(self, images: int) -> None:
        """`images` more were shown."""
        self.bar.update(images)

    def end_at(self, nimg: int) -> None:
        """The stage ends after `nimg` images (a plateau ended its stable phase early)."""
        self.bar.total = nimg
        self.bar.refresh()

    def restart(self, nimg: int) -> None:
        """Back to `nimg` images (after a rollback)."""
        self.bar.reset(self.stage.num_images)
        self.bar.update(nimg)
        self.timer.restart(nimg)

    def show(self, values: dict[str, float]) -> None:
        """The tick's losses and alpha beside the bar."""
        self.bar.set_postfix(
            D=f"{values.get('Loss/D', float('nan')):.3f}",
            G=f"{values.get('Loss/G', float('nan')):.3f}",
            alpha=f"{values['Progress/alpha']:.2f}",
        )

    def write(self, line: str) -> None:
        """A console line that does not break the bar."""
        self.bar.write(line)

    def close(self) -> None:
        """Done with the stage (or interrupted)."""
        self.bar.close()
