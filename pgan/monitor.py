"""What a researcher watches: TensorBoard events, a `stats.jsonl` line per tick, a progress bar per stage.

TensorBoard's step is the number of real images shown to D over the whole run (kimg x 1000): one
continuous axis across stages and resumes (TensorBoard steps must be integers, so not kimg itself).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pgan.report import jsonl_record


def current_rss_mb() -> float | None:
    """The process's resident memory now, in MB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def resource_stats(device: torch.device) -> dict[str, float]:
    """Memory in MB: process RSS now and at its peak, and CUDA's peak allocated/reserved when on CUDA."""
    # ru_maxrss is in KiB on Linux.
    stats = {"Resources/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    rss = current_rss_mb()
    if rss is not None:
        stats["Resources/rss_mb"] = rss
    if device.type == "cuda":
        stats["Resources/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        stats["Resources/cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return stats


# The jsonl logs in a run directory: stats.jsonl (one line per tick), collapse.jsonl (one per diversity evaluation),
# metrics.jsonl (one per quality-metrics evaluation).
JSONL_FILES = ("stats", "collapse", "metrics")


class Monitor:
    """TensorBoard writer + jsonl log for one run directory.

    `purge_step`: events and jsonl lines at this step or later are dropped - what an interrupted
    attempt logged after the point the run continues from (it would otherwise be shown twice).
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._jsonl: dict[str, Any] = {}
        self._open(purge_step)

    def _open(self, purge_step: int | None) -> None:
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        for name in JSONL_FILES:
            path = self.run_dir / f"{name}.jsonl"
            if purge_step is not None and path.is_file():
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                steps = [row["step"] if (row := jsonl_record(line)) is not None else None for line in lines]
                if None in steps:
                    print(
                        f"warning: {path}: dropped {steps.count(None)} line(s) that are not whole records "
                        "(a write cut short when the run was killed?)",
                        file=sys.stderr,
                        flush=True,
                    )
                kept = [line for line, step in zip(lines, steps) if step is not None and step < purge_step]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self._jsonl[name] = open(path, "a", encoding="utf-8")

    def restart(self, purge_step: int) -> None:
        """Drop everything logged at `purge_step` or later and go on logging from there (after a rollback)."""
        self.close()
        self._open(purge_step)

    def scalars(self, values: Mapping[str, float], step: int, jsonl: str | None = "stats") -> None:
        """Log scalars to TensorBoard and, unless `jsonl` is None, as one line of `<jsonl>.jsonl`."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if jsonl is not None:
            self.record(jsonl, {"step": step, **values})

    def record(self, name: str, row: Mapping[str, Any]) -> None:
        """Append `row` (which has a "step") as one line of `<name>.jsonl` in the run directory."""
        self._jsonl[name].write(json.dumps(dict(row)) + "\n")
        self._jsonl[name].flush()

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """Log a CHW image grid with values in [0, 1]."""
        self.writer.add_image(tag, grid, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Log a markdown text entry."""
        self.writer.add_text(tag, text, step)

    def hparams(self, run_name: str, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Log an hparams session (one per stage, in a sub-run named `run_name`)."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, dict(metrics), run_name=run_name)

    def flush(self) -> None:
        """Push pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer and the jsonl file."""
        self.writer.close()
        for f in self._jsonl.values():
            f.close()


class NullMonitor:
    """What ranks other than 0 log under torchrun: nothing (rank 0's Monitor is the run's one writer)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def progress_bar(total_img: int, done_img: int, description: str, enabled: bool = True) -> tqdm:
    """A per-stage progress bar counted in images (tqdm shows img/s and the ETA)."""
    return tqdm(
        total=total_img,
        initial=done_img,
        desc=description,
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not enabled,
    )


def warn(message: str) -> None:
    """A `warning: ...` line on stderr that does not break the progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
