"""Prepared stores: every image of a dataset at one resolution, decoded and resized once into a uint8 array on
disk, memory-mapped for training (the role of the multi-resolution TFRecords of the original ProGAN code).

Loading a batch is then one slice of the array (`PreparedImages.batch`, uint8 NHWC) and one conversion on the
device (`uint8_to_signed`), instead of decoding and resizing every image every epoch. An image is stored as
the source gives it, rounded to 8 bits: the image sources (folder, torchvision, shapes) come from 8-bit pixels,
so their prepared images equal the unprepared ones bit for bit; the digits, resized in floating point, are
rounded to the nearest of 256 levels like any image file.

A store is two files under the cache folder: `<source>-<resolution>px-<key>.npy` (an .npy array
[count, resolution, resolution, channels], readable by `numpy.load(mmap_mode="r")`) and a `.json` beside it.
`key` hashes everything the pixels depend on: the data config (not its loader settings), the pgan version and,
for a folder, every usable file's relative path, size and mtime; so a changed file or setting prepares a new
store instead of training on stale pixels. The .npy is written under a temporary name, flushed and renamed,
then the .json: a store with a .json is complete, and an interrupted preparation leaves nothing that is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from pgan import __version__
from pgan.data.labels import ClassLabels, class_labels
from pgan.errors import UserError, first_line

CACHE_DIRNAME = ".pgan-prepared"  # the folder created next to a folder/torchvision dataset (the scan skips it)
FORMAT_VERSION = 1
PREPARE_CHOICES = ("auto", "true", "false")
# Sources that decode and resize image files: preparing them pays on every device. The procedural sources
# (shapes, digits) render fast enough for a CPU run, and only need a store to keep up with a GPU.
FILE_SOURCES = ("folder", "torchvision")
# Data settings that do not change the pixels: left out of the store's key.
_NOT_PIXELS = ("num_workers", "prepare", "cache_dir")
_PREPARE_BATCH = 64


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any layout, any device) as float32 in [-1, 1]: u / 255 * 2 - 1, keeping the memory format."""
    return F.to_dtype(images, torch.float32, scale=True) * 2.0 - 1.0


def signed_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] as uint8, rounded to the nearest level (the inverse of uint8_to_signed on its range)."""
    return ((images + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def wants_prepared(data_cfg: Mapping, device: torch.device, num_images: int | None = None) -> bool:
    """Whether training reads the data from a prepared store: data.prepare=true/false, or for `auto` when the
    source decodes files, or when training on CUDA (where rendering on the fly can starve the GPU) a stage that
    shows `num_images` images, at least as many as the procedural source has items (None: assume so).

    Rendering every item into a store costs about what rendering it on the fly costs, so a store of a
    procedural source pays only when its items are read more than once. The default run shows each stage 2,048
    or fewer of 50,000 shapes; preparing all 50,000 took the GPU machine minutes per resolution."""
    choice = str(data_cfg.get("prepare", "auto")).lower()
    if choice not in PREPARE_CHOICES:
        raise UserError(f"data.prepare must be auto, true or false, got {data_cfg.get('prepare')!r}")
    if choice != "auto":
        return choice == "true"
    if str(data_cfg.get("source")) in FILE_SOURCES:
        return True
    size = data_cfg.get("size")
    return device.type == "cuda" and (num_images is None or size is None or num_images >= int(size))


def cache_root(data_cfg: Mapping) -> Path:
    """Where stores go: data.cache_dir if set; else `<data.path>/.pgan-prepared` for a folder or torchvision
    dataset whose folder is writable; else $XDG_CACHE_HOME/pgan/prepared (~/.cache/pgan/prepared)."""
    if data_cfg.get("cache_dir"):
        return Path(str(data_cfg["cache_dir"])).expanduser()
    if str(data_cfg.get("source")) in FILE_SOURCES and data_cfg.get("path"):
        data_dir = Path(str(data_cfg["path"])).expanduser()
        if os.access(data_dir, os.W_OK | os.X_OK):
            return data_dir / CACHE_DIRNAME
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "pgan" / "prepared"


def store_key(data_cfg: Mapping, resolution: int, source: Dataset) -> str:
    """The hash naming a store: the pixel-relevant data settings, the resolution, pgan's version and the
    source's own content description (`content_key()`, e.g. a folder's file sizes and mtimes)."""
    settings = {k: v for k, v in dict(data_cfg).items() if k not in _NOT_PIXELS}
    content = source.content_key() if hasattr(source, "content_key") else None
    described = {
        "format": FORMAT_VERSION,
        "pgan": __version__,
        "data": settings,
        "resolution": resolution,
        "count": len(source),
        "content": content,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PreparedImages(Dataset):
    """One resolution of a prepared store, memory-mapped: items like the source's (float CHW in [-1, 1]), and
    `batch(indices)` as one uint8 NHWC tensor, the loader's fast path."""

    def __init__(self, path: Path, source: Dataset | None = None, info: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.info = info or {}  # what prepare() did: path, count, MiB, seconds, built
        self.array = np.load(self.path, mmap_mode="r")
        self.source = source  # the dataset it was prepared from (its report, its known modes)
        self.report = getattr(source, "report", None)
        _count, self.resolution, _, self.channels = self.array.shape

    def __len__(self) -> int:
        return self.array.shape[0]

    def class_labels(self) -> ClassLabels:
        """The source's class labels: the store holds the source's items in the source's order."""
        if self.source is None:
            raise UserError(f"the prepared store {self.path} was opened without its source: it has no class labels")
        return class_labels(self.source)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Images `indices` as a uint8 tensor [len(indices), resolution, resolution, channels] (one copy)."""
        return torch.from_numpy(self.array[np.asarray(indices, dtype=np.int64)])

    def __getitem__(self, index: int) -> torch.Tensor:
        index = range(len(self))[index]  # IndexError past the end; negative indices wrap
        return uint8_to_signed(torch.from_numpy(np.array(self.array[index])).permute(2, 0, 1))


class PreparedBatches(Dataset):
    """A PreparedImages indexed by lists of indices (a BatchSampler's), one uint8 NHWC batch per index list;
    with `labels` (ClassLabels of the same items), (the batch, its int64 class indices)."""

    def __init__(self, images: PreparedImages, labels: ClassLabels | None = None) -> None:
        self.images = images
        self.labels = None if labels is None else torch.from_numpy(labels.labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch = self.images.batch(indices)
        return batch if self.labels is None else (batch, self.labels[torch.as_tensor(indices)])


def _valid_store(npy: Path, meta: Path, key: str, shape: tuple[int, ...]) -> bool:
    """Whether a complete, undamaged store with this key and shape is at `npy` (a damaged one is reported)."""
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        print(f"warning: prepared store {npy} is damaged ({first_line(exc)}); preparing it again", file=sys.stderr)
        return False
    if info.get("key") != key or tuple(array.shape) != shape or array.dtype != np.uint8:
        print(f"warning: prepared store {npy} does not match its description; preparing it again", file=sys.stderr)
        return False
    return True


def _write_store(source: Dataset, npy: Path, shape: tuple[int, ...], workers: int, label: str) -> None:
    """Decode every item of `source` into a new .npy at `npy` (temporary file, flush, fsync, rename)."""
    tmp = npy.with_name(f"{npy.name}.tmp-{os.getpid()}")
    array = None
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        # A private generator: a DataLoader otherwise seeds its workers from the global RNG, and a store made
        # between two stages would change the training run's random stream.
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(source, batch_size=_PREPARE_BATCH, num_workers=workers, generator=generator)
        done = 0
        with tqdm(total=shape[0], desc=f"preparing {label}", unit="img", file=sys.stderr, leave=False) as bar:
            for images in loader:
                array[done : done + len(images)] = signed_to_uint8(images).permute(0, 2, 3, 1).numpy()
                done += len(images)
                bar.update(len(images))
        array.flush()
        del array
        array = None
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, npy)
    except BaseException:
        del array
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class StorePlan:
    """Where the store of one source at one resolution goes, and whether it has to be built (it is missing,
    stale or damaged, or a rebuild was forced)."""

    npy: Path
    meta: Path
    key: str
    shape: tuple[int, ...]  # [count, resolution, resolution, channels]
    label: str  # "folder at 64 px (1200 images)", for messages
    build: bool

    @property
    def nbytes(self) -> int:
        """The size of the store's array."""
        return int(np.prod(self.shape))


def plan_store(data_cfg: Mapping, resolution: int, source: Dataset, force: bool = False) -> StorePlan:
    """The store of `source` (the dataset `data_cfg` builds at `resolution`): where, and whether to build it.
    Writes nothing."""
    count = len(source)
    shape = (count, resolution, resolution, int(source[0].shape[0]))
    key = store_key(data_cfg, resolution, source)
    name = f"{data_cfg.get('source')}-{resolution}px-{key}"
    root = cache_root(data_cfg)
    npy, meta = root / f"{name}.npy", root / f"{name}.json"
    label = f"{data_cfg.get('source')} at {resolution} px ({count} images)"
    return StorePlan(npy, meta, key, shape, label, force or not _valid_store(npy, meta, key, shape))


def _disk_usage(folder: Path) -> Any:
    """shutil.disk_usage where `folder` is (or would be created: its nearest existing ancestor)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder)


def check_space(plans: Sequence[StorePlan]) -> None:
    """A UserError when the stores `plans` would build need more space than is free where they go."""
    by_folder: dict[Path, list[StorePlan]] = {}
    for plan in plans:
        if plan.build:
            by_folder.setdefault(plan.npy.parent, []).append(plan)
    for folder, builds in by_folder.items():
        needed, usage = sum(plan.nbytes for plan in builds), _disk_usage(folder)
        free = usage.free
        if usage.total == 0:  # /proc, /sys: a file system that stores nothing ("0 MiB free" said too little)
            raise UserError(
                f"cannot keep the prepared stores in {folder}: its file system stores no files (like /proc); "
                "set data.cache_dir=DIR elsewhere or data.prepare=false"
            )
        if needed > free:
            raise UserError(
                f"not enough space for the prepared {' and '.join(plan.label for plan in builds)} in {folder}: "
                f"it needs {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; set data.cache_dir=DIR "
                "elsewhere or data.prepare=false"
            )


def build_store(data_cfg: Mapping, plan: StorePlan, source: Dataset, workers: int | None = None) -> PreparedImages:
    """The store `plan` describes, built first if `plan.build`; its `info` says where it is, its size and
    whether it was built just now."""
    start = time.perf_counter()
    if plan.build:
        check_space([plan])
        root = plan.npy.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
            plan.meta.unlink(missing_ok=True)  # the store is incomplete from here until the new .json is written
            workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
            _write_store(source, plan.npy, plan.shape, workers, plan.label)
            info = {"key": plan.key, "format": FORMAT_VERSION, "shape": list(plan.shape)}
            info["seconds"] = round(time.perf_counter() - start, 2)
            info["data"] = {k: v for k, v in dict(data_cfg).items() if k not in _NOT_PIXELS}
            tmp_meta = plan.meta.with_name(f"{plan.meta.name}.tmp-{os.getpid()}")
            tmp_meta.write_text(json.dumps(info, indent=2, default=str) + "\n")
            os.replace(tmp_meta, plan.meta)
        except OSError as exc:
            raise UserError(
                f"cannot write the prepared {plan.label} under {root}: {first_line(exc)}; set data.cache_dir=DIR "
                "to a writable folder, or data.prepare=false"
            ) from exc
    info = {
        "path": str(plan.npy),
        "resolution": plan.shape[1],
        "count": plan.shape[0],
        "mib": round(plan.npy.stat().st_size / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 2),
        "built": plan.build,
    }
    return PreparedImages(plan.npy, source, info)


def prepare(
    data_cfg: Mapping, resolution: int, source: Dataset, workers: int | None = None, force: bool = False
) -> PreparedImages:
    """The prepared store of `source` (the dataset `data_cfg` builds at `resolution`), made if it is missing,
    stale or damaged (or `force`); its `info` says where it is, its size and whether it was built just now."""
    return build_store(data_cfg, plan_store(data_cfg, resolution, source, force), source, workers)
