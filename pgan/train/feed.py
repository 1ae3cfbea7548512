"""The training data of a stage: its dataset, the loader that feeds the steps, and the sample grids' inputs.

The data order is a pure function of (seed, stage, images seen): `Feed.restart(nimg)` after a resume or a
rollback continues it exactly. Under torchrun each rank takes its share of every global batch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torchvision.utils import make_grid

from pgan import dist
from pgan.data import InfiniteSampler, PreparedImages, make_dataset, wants_prepared
from pgan.data.labels import ClassLabels, LabelledDataset, class_labels, grid_classes
from pgan.data.prepared import PreparedBatches, uint8_to_signed
from pgan.errors import UserError
from pgan.schedule import Stage
from pgan.train.interrupt import ignore_stop_signals
from pgan.train.options import TrainOptions
from pgan.train.rundir import SCAN_CACHE


def make_loader(
    dataset: Dataset,
    sampler: InfiniteSampler,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    worker_seed: int,
    timeout_s: float = 0.0,
    labels: ClassLabels | None = None,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The training DataLoader's iterator (also what pgan-bench times). A prepared store is read a whole batch
    at a time (one slice of the memory map, uint8); the other datasets item by item, stacked by the loader.
    With `labels` (a conditional run), each batch is (images, int64 class indices)."""
    batched = isinstance(dataset, PreparedImages)
    if batched:
        items = PreparedBatches(dataset, labels)
    else:
        items = dataset if labels is None else LabelledDataset(dataset, labels)
    return iter(
        DataLoader(
            items,
            batch_size=None if batched else batch_size,
            sampler=BatchSampler(sampler, batch_size, drop_last=True) if batched else sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            drop_last=not batched,
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
            generator=_private_generator(worker_seed),
            worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
            # A hung worker (a stuck network file system) becomes an error, and a restart, instead of a silent hang.
            timeout=timeout_s if num_workers > 0 else 0,
        )
    )


def to_device_images(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loader batch on `device` as float32 NCHW (channels_last) in [-1, 1]. A prepared store's uint8 NHWC batch
    is converted on the device (a quarter of the bytes to move; NHWC permuted is channels_last already)."""
    if batch.dtype == torch.uint8:
        return uint8_to_signed(batch.to(device, non_blocking=True).permute(0, 3, 1, 2))
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def to_device_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader batch on `device`: the images (see to_device_images) and, for a conditional run, the labels."""
    images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
    return to_device_images(images, device), None if labels is None else labels.to(device, non_blocking=True)


def _private_generator(seed: int) -> torch.Generator:
    """A generator for DataLoader's worker seeds: without one it draws them from the global RNG, and a
    resumed run, which creates its loader mid-stage, would then diverge from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def stage_dataset(options: TrainOptions, stage: Stage, run_dir: Path, device: torch.device) -> Dataset:
    """The dataset at the stage's resolution (its prepared store when data.prepare asks for one), with at least
    one batch of images."""
    # A folder's scan (which files decode, their sizes) is cached in the run directory: a resumed run over
    # many files does not decode them all again.
    # Rank 0 first: it writes the scan cache and the prepared store, which the other ranks then only read.
    dataset = dist.main_first(
        lambda: make_dataset(
            options.data,
            stage.resolution,
            scan_cache=run_dir / SCAN_CACHE,
            min_images=stage.batch_size,
            prepared=wants_prepared(options.data, device, stage.num_images),
        )
    )
    if isinstance(dataset, PreparedImages):
        info = dataset.info
        done = f"prepared in {info['seconds']:.1f} s" if info["built"] else "already prepared"
        print(f"data at {stage.resolution} px: {info['path']} ({info['count']} images, {info['mib']} MiB, {done})")
    if len(dataset) < stage.batch_size:
        raise UserError(
            f"the dataset has {len(dataset)} images at {stage.resolution} px, fewer than one batch "
            f"({stage.batch_size})" + (f": {options.data.path}" if options.data.get("path") else "")
        )
    return dataset


def stage_classes(options: TrainOptions, dataset: Dataset) -> ClassLabels | None:
    """The dataset's classes when the model is class-conditional (a UserError when it has none), else None."""
    if not options.conditional:
        return None
    return class_labels(dataset)


def write_data_report(run_dir: Path, stage: Stage, dataset: Dataset) -> None:
    """Print what a folder dataset skipped or converted and keep it in `data-report.json` (one entry per stage)."""
    report = getattr(dataset, "report", None)
    if report is None:
        return
    for line in report.lines():
        print(line, flush=True)
    path = run_dir / "data-report.json"
    reports = json.loads(path.read_text()) if path.is_file() else {}
    reports[stage.name] = report.to_dict()
    path.write_text(json.dumps(reports, indent=2) + "\n")


def sample_grid_inputs(
    options: TrainOptions, classes: ClassLabels | None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The sample grids' fixed latents, their classes and the grid's number of columns.

    Unconditional: log.grid_size latents in a square-ish grid. Conditional: one class per row (every class, or
    log.grid_classes of them evenly spread) and round(sqrt(grid_size)) columns, each column one latent shared
    by all the rows, so a row shows its class and a column what the class changes for one latent.
    """
    generator = torch.Generator().manual_seed(options.seed)
    size, latent_dim = options.grid_size, options.latent_dim
    columns = max(1, round(size**0.5))
    if classes is None:
        return torch.randn(size, latent_dim, generator=generator), None, columns
    rows = grid_classes(classes.num_classes, options.grid_classes)
    z = torch.randn(columns, latent_dim, generator=generator).repeat(len(rows), 1)
    return z, rows.repeat_interleave(columns), columns


def real_grid_images(
    dataset: Dataset, size: int, classes: ClassLabels | None, grid_labels: torch.Tensor | None, columns: int
) -> torch.Tensor:
    """The real images shown at a stage's start: the first `size` items, or for a conditional run, row by row
    the first `columns` items of each grid row's class (mid-grey where a class has fewer)."""
    if classes is None:
        return next(iter(DataLoader(dataset, batch_size=size, generator=_private_generator(0))))
    blank = torch.zeros_like(dataset[0])
    images = []
    for c in grid_labels.cpu()[::columns].tolist():
        row = [dataset[i] for i in np.flatnonzero(classes.labels == c)[:columns].tolist()]
        images += row + [blank] * (columns - len(row))
    return torch.stack(images)


def to_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[-1, 1] NCHW images -> one [0, 1] CHW grid of `columns` columns on the CPU."""
    return make_grid(images.detach().float().cpu(), nrow=columns, normalize=True, value_range=(-1, 1))


class Feed:
    """The stage's batches on the device, in the order a pure function of (seed, stage, images seen) gives."""

    def __init__(
        self, options: TrainOptions, stage: Stage, dataset: Dataset, classes: ClassLabels | None, device: torch.device
    ) -> None:
        self.options, self.stage, self.dataset, self.classes, self.device = options, stage, dataset, classes, device
        self.ranks = dist.current()
        self.rank_batch = stage.batch_size // self.ranks.world_size
        self.batches: Iterator[Any] = iter(())

    def restart(self, nimg: int) -> None:
        """Continue the data order at `nimg` images of the stage (a new loader: new workers)."""
        o, st = self.options, self.stage
        sampler = InfiniteSampler(
            len(self.dataset), o.seed * 1000 + st.index, nimg, self.ranks.rank, self.ranks.world_size, self.rank_batch
        )
        self.batches = make_loader(
            self.dataset, sampler, self.rank_batch, o.num_workers, self.device, o.seed, o.loader_timeout_s, self.classes
        )

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch on the device: images in [-1, 1] (channels_last) and the labels of a conditional run."""
        return to_device_batch(next(self.batches), self.device)


class SampleGrid:
    """The run's fixed latents (and classes) for the sample grids, drawn without touching the training RNG."""

    def __init__(self, options: TrainOptions, classes: ClassLabels | None, device: torch.device) -> None:
        z, labels, self.columns = sample_grid_inputs(options, classes)
        self.z, self.labels = z.to(device), labels.to(device) if labels is not None else None
        self.size, self.classes = options.grid_size, classes

    def reals(self, dataset: Dataset) -> torch.Tensor:
        """The stage's real images as one [0, 1] grid (shown at the stage's start)."""
        return to_grid(real_grid_images(dataset, self.size, self.classes, self.labels, self.columns), self.columns)

    @torch.no_grad()
    def fakes(self, G: torch.nn.Module, alpha: float, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        """G's images for the fixed latents as one [0, 1] grid."""
        with autocast:
            return to_grid(G(self.z, alpha, self.labels).float(), self.columns)
