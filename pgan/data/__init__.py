"""Datasets (procedural shapes, bundled digits, an image folder, torchvision) and the resumable sampler."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf.errors import MissingMandatoryValue
from torch.utils.data import Dataset

from pgan.data.digits import NUM_DIGITS, DigitsDataset, StackedDigitsDataset
from pgan.data.folder import FolderDataset
from pgan.data.labels import ClassLabels, LabelledDataset, class_labels
from pgan.data.prepared import PreparedImages, prepare, wants_prepared
from pgan.data.sampler import InfiniteSampler
from pgan.data.shapes import ShapesDataset
from pgan.data.torchvision_source import TorchvisionDataset
from pgan.errors import UserError, check_int

__all__ = [
    "ClassLabels",
    "LabelledDataset",
    "class_labels",
    "DigitsDataset",
    "FolderDataset",
    "InfiniteSampler",
    "PreparedImages",
    "ShapesDataset",
    "StackedDigitsDataset",
    "TorchvisionDataset",
    "make_dataset",
    "wants_prepared",
]

SOURCES = ("shapes", "digits", "stacked_digits", "folder", "torchvision")


def _required(cfg: Mapping, key: str) -> Any:
    """cfg[key], or a UserError telling the user to set data.<key> when it is absent or still `???`."""
    try:
        value = cfg[key]
    except (KeyError, MissingMandatoryValue):
        value = None
    if value is None or value == "???":
        context = "" if key == "source" else f" for data.source={cfg.get('source')}"
        raise UserError(f"data.{key} is required{context}: add data.{key}=... to the command line")
    return value


def make_dataset(
    cfg: Mapping,
    resolution: int,
    scan_cache: str | Path | None = None,
    min_images: int = 1,
    prepared: bool = False,
) -> Dataset:
    """Build the dataset named by cfg["source"] at `resolution` px; with `prepared`, its prepared store
    (PreparedImages, made on first use: see pgan.data.prepared).

    Each item is a float32 tensor [channels, resolution, resolution] in [-1, 1]. `scan_cache` (a JSON file) and
    `min_images` (fewer usable images is a UserError) apply to the folder source; the other sources ignore them.
    """
    source = _make_source(cfg, resolution, scan_cache, min_images)
    return prepare(cfg, resolution, source) if prepared else source


def _make_source(cfg: Mapping, resolution: int, scan_cache: str | Path | None, min_images: int) -> Dataset:
    """The dataset cfg["source"] names, decoding or rendering every item when it is read."""
    source = _required(cfg, "source")
    channels = check_int("data.channels", cfg.get("channels", 3))
    if source in ("shapes", "digits", "stacked_digits"):
        size = check_int("data.size", cfg.get("size", NUM_DIGITS if source == "digits" else 50000), low=1)
        seed = check_int("data.seed", cfg.get("seed", 0), low=0)
        procedural = {"shapes": ShapesDataset, "digits": DigitsDataset, "stacked_digits": StackedDigitsDataset}
        return procedural[source](resolution, size=size, seed=seed, channels=channels)
    if source == "folder":
        return FolderDataset(
            str(_required(cfg, "path")),
            resolution,
            channels=channels,
            small_images=str(cfg.get("small_images", "skip")),
            min_images=min_images,
            scan_cache=scan_cache,
        )
    if source == "torchvision":
        return TorchvisionDataset(
            str(_required(cfg, "name")),
            str(_required(cfg, "path")),
            resolution,
            channels=channels,
            split=str(cfg.get("split", "train")),
        )
    raise UserError(f"unknown data.source={source!r}: choose one of {', '.join(SOURCES)} (e.g. data=shapes)")
