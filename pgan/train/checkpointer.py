"""Writing a stage's checkpoints: snapshots, the latest.pt / ok.pt links, pruning, final.pt; rank 0 writes.

What a checkpoint holds is `pgan.train.state.TrainState.state_dict()`; the file format, atomic writes and the
links are pgan/checkpoint.py's.
"""

from __future__ import annotations

from pathlib import Path

from pgan import dist
from pgan.checkpoint import FINAL, LATEST, OK, link_checkpoint, prune_snapshots, save_checkpoint, snapshot_name
from pgan.errors import UserError
from pgan.monitor import Monitor, warn
from pgan.train.state import TrainState


class Checkpointer:
    """The checkpoints of one stage directory."""

    def __init__(self, stage_dir: Path, keep: int, monitor: Monitor) -> None:
        self.stage_dir, self.keep, self.monitor = Path(stage_dir), keep, monitor
        self.ranks = dist.current()

    def save(self, state: TrainState, name: str, done: bool = False) -> Path:
        """Rank 0 writes the checkpoint; all ranks return once it is on disk (or the write failed). Under
        torchrun the ranks' weights are compared first: what rank 0 saves is what every rank holds."""
        path = self.stage_dir / name
        dist.check_in_sync(state.G, state.D, state.G_ema)
        if not self.ranks.is_main:
            dist.barrier()
            return path
        try:
            save_checkpoint(path, state.state_dict(done))
        finally:
            dist.barrier()  # also after a failed write: rank 0 goes on (a warning), so must the others
        return path

    def snapshot(self, state: TrainState) -> Path | None:
        """A snapshot; latest.pt (and ok.pt while the collapse detector says ok) made to point at it; snapshots
        beyond checkpoint.keep deleted. A write error (a full disk) is a warning: the previous snapshot is
        intact and the next checkpoint tries again."""
        watch = state.watches["collapse"]
        detector_ok = watch is not None and watch.state == "ok"
        try:
            path = self.save(state, snapshot_name(state.nimg))
            if self.ranks.is_main:
                link_checkpoint(path, self.stage_dir / LATEST)
                if detector_ok:
                    link_checkpoint(path, self.stage_dir / OK)
        except OSError as exc:
            warn(
                f"cannot write a checkpoint in {self.stage_dir}: {exc}; training goes on and the next checkpoint "
                "retries"
            )
            return None
        if self.ranks.is_main:
            prune_snapshots(self.stage_dir, self.keep)
        self.monitor.flush()
        return path

    def final(self, state: TrainState) -> Path:
        """The stage's final.pt; a write error is a user error (the stage resumes from its newest snapshot)."""
        try:
            return self.save(state, FINAL, done=True)
        except OSError as exc:
            raise UserError(
                f"cannot write {self.stage_dir / FINAL}: {exc}; free the space and resume: the stage continues "
                "from its newest snapshot"
            ) from exc
