"""Images from a folder tree, checked once, converted by fixed rules, centre-cropped and resized; plus the PIL
helpers all sources share.

A hostile folder does not stop a run. At construction every file is classified (the scan), and anything that
cannot be used is skipped and counted by reason; `FolderDataset.report` holds the counts with a few example
paths. Skip reasons:

- not_image: the extension is not one of IMAGE_EXTENSIONS (png, jpg, jpeg, webp, bmp, gif, tif, tiff).
- empty: a zero-byte file.
- corrupt: PIL cannot open it or cannot decode it to the end (truncated files only fail there), or it is not
  one of the formats PNG, JPEG (or MPO), WebP, BMP, GIF, TIFF whatever its extension says.
- too_large: PIL refuses it as a decompression bomb (more than 2 x Image.MAX_IMAGE_PIXELS pixels).
- unreadable: the file or a folder cannot be read (permissions, a dangling symlink, an I/O error).
- not_a_file: a FIFO, socket or device that carries an image extension (reading it could block forever).
- symlink_loop: a symlink to a folder that contains it; it is not followed.
- duplicate_dir: a second path (through a symlink) to a folder already walked; it is walked once.
- too_small: the shorter side is below the resolution and small_images="skip" (the default).

Conversion rules, applied in this order to every image that is kept (each counted by its name in the report):

- first_frame: a multi-frame file (animated GIF, multi-page TIFF, MPO) gives its first frame only.
- exif_rotated: an EXIF orientation tag (2-8) is applied, so the image is upright as a viewer shows it.
- 16bit_scaled: 16-bit images (PIL modes I;16, I;16B, I;16L and I) become 8-bit by the full 16-bit range:
  round(value / 257), so 65535 is white (PIL's convert("L") would clip everything above 255 to white).
  Mode I values outside 0..65535 are clipped first. A transparency key on a 16-bit image is ignored.
  16-bit colour PNGs (RGB, RGBA) need no rule: PIL keeps the top byte of each sample when it opens them.
- palette: palette images (P, PA) are expanded to RGB, or to RGBA when they have transparency.
- alpha_composited: images with an alpha channel or a transparency key (RGBA, LA, PA, and P, L or RGB with
  tRNS/GIF transparency) are composited onto a white background; dropping the alpha instead would show whatever
  colour the encoder left under transparent pixels. Grayscale stays grayscale.
- cmyk: CMYK is converted to RGB by PIL's formula (no ICC colour management).
- other_mode: any other mode (YCbCr, LAB, HSV, F, ...) goes through PIL's convert("RGB"); bilevel (1) becomes
  grayscale L without a rule of its own.
- grayscale_to_rgb: with channels=3, a grayscale image becomes RGB by repeating its luma in R, G and B.
- rgb_to_luma: with channels=1, a colour image becomes grayscale by ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B).
- cropped_non_square: a non-square image is centre-cropped to a square (on its shorter side).
- upscaled: with small_images="upscale", an image whose shorter side is below the resolution is kept and
  enlarged (LANCZOS) instead of skipped.
Every image is then resized to resolution x resolution px with LANCZOS (see square_resize). ICC profiles are
not applied (pixel values are taken as sRGB).

The scan decodes each file once (JPEGs at 1/8 scale, which still reads every byte): in a process pool when
there are many files, remembered in-process for later stages (keyed by the folder's real path), and optionally
in a JSON cache file keyed by each file's relative path, size and mtime, so a resumed run decodes only what
changed.
"""

import json
import os
import stat
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from pgan.data.labels import ClassLabels, labels_from_names
from pgan.data.prepared import CACHE_DIRNAME, uint8_to_signed
from pgan.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Only the decoders for those extensions: a hostile file named *.png must not reach e.g. the EPS plugin, which
# runs Ghostscript. "JPEG" also opens MPO (camera JPEGs with extra frames): PIL registers no opener for "MPO".
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

# PIL mode for each supported channel count: "L" is ITU-R 601 luma.
PIL_MODES = {1: "L", 3: "RGB"}

SMALL_IMAGES = ("skip", "upscale")

# Report names, in the order the report lists them.
SKIP_REASONS = (
    "not_image",
    "empty",
    "corrupt",
    "too_large",
    "unreadable",
    "not_a_file",
    "symlink_loop",
    "duplicate_dir",
    "too_small",
)
CONVERSION_RULES = (
    "first_frame",
    "exif_rotated",
    "16bit_scaled",
    "palette",
    "alpha_composited",
    "cmyk",
    "other_mode",
    "grayscale_to_rgb",
    "rgb_to_luma",
    "cropped_non_square",
    "upscaled",
)

# Resize first by an integer box reduction down to at most 3x the target, then LANCZOS the rest:
# PIL documents reducing_gap=3 as indistinguishable from fair resampling in most cases, and it is much faster
# when a large photo goes to a tiny early-stage resolution.
_REDUCING_GAP = 3.0

_EXAMPLES = 3  # example paths kept per reason / rule
_POOL_MIN_FILES = 256  # fewer files to decode than this: decode in-process (fast, deterministic small tests)
_CACHE_VERSION = 1  # bump when the probe's output changes meaning, so old cache files are ignored
_MEMO_ROOTS = 4  # folders whose scan stays in memory (training uses one; pgan-eval two)
_ORIENTATION = 0x0112  # EXIF tag

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_GREY_MODES = frozenset({"1", "L", "LA"})


def pil_mode(channels: int) -> str:
    """The PIL mode ("L" or "RGB") that gives `channels` channels."""
    if channels not in PIL_MODES:
        raise UserError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return PIL_MODES[channels]


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop `image` to a square and resize it to `resolution` x `resolution` px."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop before resizing: resize(box=...) would let the filter read pixels outside the square,
    # leaking the cropped-away borders into the edge pixels.
    square = image.crop((left, top, left + side, top + side))
    # LANCZOS is the sharpest of PIL's filters and antialiases properly when downscaling.
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float32 CHW tensor in [-1, 1]."""
    return uint8_to_signed(F.pil_to_tensor(image))


def find_images(root: Path) -> list[Path]:
    """Every non-empty regular file with an image extension under `root`, recursively, in sorted order."""
    candidates, _ = _walk(Path(root))
    return [Path(root) / rel for rel, _size, _mtime in candidates]


# ---------------------------------------------------------------- conversion (shared by the scan and load)


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1-8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF blocks raise anything from struct.error to KeyError; the pixels are fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _scale_16bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit L by round(value / 257); PIL's convert("L") clips at 255 instead."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def _to_base(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """`image` as "L" or "RGB" by the module's colour rules, and the names of the rules applied."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _scale_16bit(image), ["16bit_scaled"]
    rules = ["palette"] if mode in ("P", "PA") else []
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rules.append("alpha_composited")
        # convert("RGBA") honours palette transparency and tRNS colour keys; alpha_composite needs RGBA.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        # R = G = B for grey input, so ITU-R 601 luma gives back the grey exactly.
        return (flat.convert("L") if mode in _GREY_MODES else flat), rules
    if mode in ("L", "RGB"):
        return image, rules
    if mode in ("1", "P"):
        return image.convert("L" if mode == "1" else "RGB"), rules
    rules.append("cmyk" if mode == "CMYK" else "other_mode")
    return image.convert("RGB"), rules


def _upright(image: Image.Image) -> tuple[Image.Image, int]:
    """`image` with its EXIF orientation applied, and that orientation."""
    orientation = _orientation(image)
    return (ImageOps.exif_transpose(image) if orientation != 1 else image), orientation


def _read(path: Path | str, resolution: int, mode: str) -> Image.Image:
    """Decode `path` and apply every conversion rule: a `mode` image of `resolution` x `resolution` px."""
    with Image.open(path, formats=PIL_FORMATS) as image:
        # JPEGs can decode straight at 1/2, 1/4 or 1/8 scale; keep >= 3x the target like reducing_gap.
        image.draft(None, (resolution * 3, resolution * 3))
        upright, _ = _upright(image)
        base, _ = _to_base(upright)
        return square_resize(base.convert(mode), resolution)


# ---------------------------------------------------------------- the scan


def _probe(path: str) -> tuple[str, int, int, list[str], bool, str]:
    """Fully decode one file: (status, upright width, height, channel-independent rules, is grey, error)."""
    try:
        with Image.open(path, formats=PIL_FORMATS) as image:
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
            # The smallest JPEG draft (1/8 scale) is cheapest and still reads every byte, so truncation shows.
            image.draft(None, (1, 1))
            image.load()
            upright, orientation = _upright(image)
            base, rules = _to_base(upright)
    except PermissionError as error:
        return "unreadable", 0, 0, [], False, str(error)
    except Image.DecompressionBombError as error:
        return "too_large", 0, 0, [], False, str(error)
    except Exception as error:  # PIL's decoders raise a zoo of types on hostile input: all mean "corrupt"
        return "corrupt", 0, 0, [], False, f"{type(error).__name__}: {error}"
    if orientation >= 5:  # orientations 5-8 turn the image by 90 degrees
        width, height = height, width
    head = (["first_frame"] if frames > 1 else []) + (["exif_rotated"] if orientation != 1 else [])
    return "ok", width, height, head + rules, base.mode == "L", ""


def _probe_all(paths: Sequence[str], workers: int) -> list[tuple]:
    """_probe over `paths` in order: in a process pool when there are many, else in this process."""
    if workers <= 1 or len(paths) < _POOL_MIN_FILES:
        return [_probe(path) for path in paths]
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_probe, paths, chunksize=chunksize)
        bar = tqdm(results, total=len(paths), desc="data: checking images", unit="img", file=sys.stderr, mininterval=5)
        return list(bar)


def _walk(root: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """Image candidates (relative path, size, mtime_ns) and walk-level skips (relative path, reason) under root.

    Follows symlinks, but walks each folder (by device and inode) once: a link back to one of its own ancestors
    is a symlink_loop, any other second path to a folder a duplicate_dir.
    """
    candidates: list[tuple[str, int, int]] = []
    skipped: list[tuple[str, str]] = []
    visited: set[tuple[int, int]] = set()
    # Folders to walk: (path, relative prefix, (dev, ino), its ancestors' keys). Real folders are walked before
    # symlinked ones so that a link, not the real folder it points to, is the one reported as duplicate_dir;
    # a stack rather than recursion so a pathologically deep tree cannot hit the recursion limit.
    top = os.stat(root)
    real: list[tuple[str, str, tuple[int, int], frozenset]] = [(str(root), "", (top.st_dev, top.st_ino), frozenset())]
    linked: deque[tuple[str, str, tuple[int, int], frozenset]] = deque()
    while real or linked:
        folder, prefix, key, ancestors = real.pop() if real else linked.popleft()
        if key in ancestors or key in visited:
            skipped.append((prefix.rstrip("/"), "symlink_loop" if key in ancestors else "duplicate_dir"))
            continue
        visited.add(key)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)  # a deterministic walk
        except OSError:
            skipped.append((prefix.rstrip("/") or ".", "unreadable"))
            continue
        for entry in reversed(entries):  # the stack pops them back in sorted order
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir and entry.name == CACHE_DIRNAME:
                continue  # pgan's own prepared stores, not images
            if is_dir:
                try:
                    info = os.stat(entry.path)
                    is_link = entry.is_symlink()
                except OSError:
                    skipped.append((rel, "unreadable"))
                    continue
                item = (entry.path, rel + "/", (info.st_dev, info.st_ino), ancestors | {key})
                (linked.append if is_link else real.append)(item)
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                skipped.append((rel, "not_image"))
                continue
            try:
                info = os.stat(entry.path)  # follows symlinks: a dangling one raises
            except OSError:
                skipped.append((rel, "unreadable"))
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append((rel, "not_a_file"))
            elif info.st_size == 0:
                skipped.append((rel, "empty"))
            else:
                candidates.append((rel, info.st_size, info.st_mtime_ns))
    # Sort on the POSIX relative path so the order (and thus the sampler's indices) is the same on every OS.
    candidates.sort()
    skipped.sort()
    return candidates, skipped


# relative path -> [size, mtime_ns, status, width, height, rules, grey, error], per folder real path
_MEMO: dict[str, dict[str, list]] = {}


def forget_scans() -> None:
    """Drop the in-process scan memo: the next FolderDataset re-reads its scan cache file or decodes again."""
    _MEMO.clear()


def _read_cache(path: Path, real_root: str) -> dict[str, list]:
    """The entries of a scan cache file for `real_root`; empty when it is missing, stale or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or data.get("root") != real_root:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


@dataclass
class _Scan:
    """One scan of a folder: its files' probe entries, the walk's skips, and how many were decoded."""

    real_root: str
    entries: dict[str, list]
    walk_skips: list[tuple[str, str]]
    decoded: int
    cached: int
    cache_dirty: bool

    def save(self, path: Path) -> None:
        """Write the entries as a scan cache file (atomically); a failure is a warning, not an error."""
        if not self.cache_dirty and path.exists():
            return
        remembered = {rel: entry for rel, entry in self.entries.items() if entry[2] != "unreadable"}
        data = {"version": _CACHE_VERSION, "root": self.real_root, "entries": remembered}
        temporary = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(temporary, path)
        except OSError as error:
            print(f"warning: cannot write the data scan cache {path}: {error}", file=sys.stderr, flush=True)


def _scan(root: Path, scan_cache: Path | None, workers: int) -> _Scan:
    """Classify every file under `root`, decoding only files not already known (same size and mtime)."""
    candidates, walk_skips = _walk(root)
    real_root = os.path.realpath(root)
    from_memo = real_root in _MEMO
    known = _MEMO.pop(real_root) if from_memo else _read_cache(scan_cache, real_root) if scan_cache else {}
    entries: dict[str, list] = {}
    todo: list[tuple[str, int, int]] = []
    for rel, size, mtime in candidates:
        entry = known.get(rel)
        # An unreadable file is always retried: fixing permissions changes neither size nor mtime. The length
        # check keeps a hand-edited cache file from crashing the run.
        if isinstance(entry, list) and len(entry) == 8 and entry[:2] == [size, mtime] and entry[2] != "unreadable":
            entries[rel] = entry
        else:
            todo.append((rel, size, mtime))
    probes = _probe_all([os.path.join(root, rel) for rel, _, _ in todo], workers)
    for (rel, size, mtime), (status, width, height, rules, grey, error) in zip(todo, probes):
        entries[rel] = [size, mtime, status, width, height, rules, grey, error]
    _MEMO[real_root] = entries  # re-inserted last: the dict's order is the eviction order
    while len(_MEMO) > _MEMO_ROOTS:
        del _MEMO[next(iter(_MEMO))]
    # Rewrite a cache file when anything was decoded or vanished (save() also writes a missing one).
    dirty = bool(todo) or len(entries) != len(known)
    return _Scan(real_root, entries, walk_skips, len(todo), len(candidates) - len(todo), dirty)


# ---------------------------------------------------------------- the report


@dataclass
class Tally:
    """How many files a skip reason or conversion rule applied to, and the first few (relative paths)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, rel: str) -> None:
        """Count one more file."""
        self.count += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(rel)


def _ranked(tallies: dict[str, Tally], order: Sequence[str]) -> list[str]:
    """The names in `tallies`, largest count first (ties in `order`)."""
    return sorted(tallies, key=lambda name: (-tallies[name].count, order.index(name)))


def _summary(tallies: dict[str, Tally], order: Sequence[str]) -> str:
    """ "3 corrupt, 2 too_small": the non-zero tallies, largest first."""
    return ", ".join(f"{tallies[name].count} {name}" for name in _ranked(tallies, order))


@dataclass
class FolderReport:
    """What a FolderDataset kept, skipped (by reason) and converted (by rule), with example relative paths."""

    root: str
    resolution: int
    channels: int
    small_images: str
    usable: int = 0
    skipped: dict[str, Tally] = field(default_factory=dict)
    converted: dict[str, Tally] = field(default_factory=dict)
    converted_files: int = 0  # files with at least one conversion rule (a file can count under several)
    decoded: int = 0  # files decoded by this construction's scan
    cached: int = 0  # files whose scan result came from memory or the scan cache file

    @property
    def skipped_files(self) -> int:
        """How many files were skipped, all reasons together."""
        return sum(tally.count for tally in self.skipped.values())

    @property
    def files(self) -> int:
        """Every file (and skipped folder link) the scan saw."""
        return self.usable + self.skipped_files

    def skip(self, rel: str, reason: str) -> None:
        """Count `rel` as skipped for `reason`."""
        self.skipped.setdefault(reason, Tally()).add(rel)

    def convert(self, rel: str, rules: Iterable[str]) -> None:
        """Count `rel` as converted by each of `rules` (none: nothing to count)."""
        rules = list(rules)
        for rule in rules:
            self.converted.setdefault(rule, Tally()).add(rel)
        self.converted_files += bool(rules)

    def skipped_summary(self) -> str:
        """ "3 corrupt, 2 too_small": the skip counts by reason."""
        return _summary(self.skipped, SKIP_REASONS)

    def lines(self) -> list[str]:
        """A short human summary: one headline, then one line per reason / rule with example paths."""
        head = f"data: {self.usable} usable images at {self.resolution} px under {self.root}"
        if self.skipped:
            head += f"; skipped {self.skipped_files} ({self.skipped_summary()})"
        if self.converted:
            head += f"; converted {self.converted_files} ({_summary(self.converted, CONVERSION_RULES)})"
        lines = [head]
        groups = (("skipped", self.skipped, SKIP_REASONS), ("converted", self.converted, CONVERSION_RULES))
        for verb, tallies, order in groups:
            for name in _ranked(tallies, order):
                tally = tallies[name]
                more = ", ..." if tally.count > len(tally.examples) else ""
                lines.append(f"  {verb} {tally.count} {name}: e.g. {', '.join(tally.examples)}{more}")
        lines.append(f"  scan: {self.decoded} files decoded, {self.cached} known from an earlier scan")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable values (example paths are relative to `root`)."""
        return {
            "root": self.root,
            "resolution": self.resolution,
            "channels": self.channels,
            "small_images": self.small_images,
            "usable": self.usable,
            "skipped_files": self.skipped_files,
            "converted_files": self.converted_files,
            "skipped": {name: {"count": t.count, "examples": list(t.examples)} for name, t in self.skipped.items()},
            "converted": {name: {"count": t.count, "examples": list(t.examples)} for name, t in self.converted.items()},
            "decoded": self.decoded,
            "cached": self.cached,
        }


# ---------------------------------------------------------------- the dataset


class FolderDataset(Dataset):
    """Every usable image under a folder (recursively), as [channels, resolution, resolution] tensors in [-1, 1]."""

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        channels: int = 3,
        *,
        small_images: str = "skip",
        min_images: int = 1,
        scan_cache: str | Path | None = None,
        scan_workers: int | None = None,
    ) -> None:
        self.mode = pil_mode(channels)
        if small_images not in SMALL_IMAGES:
            raise UserError(f"data.small_images must be skip or upscale, got {small_images!r}")
        root = Path(path).expanduser()
        if not root.exists():
            raise UserError(f"data.path does not exist: {root}")
        extensions = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        if not root.is_dir():
            raise UserError(f"data.path is not a folder: {root} (expected a folder of {extensions} images)")
        workers = scan_workers if scan_workers is not None else min(os.cpu_count() or 1, 8)
        cache = Path(scan_cache).expanduser() if scan_cache is not None else None
        scan = _scan(root, cache, max(1, workers))

        report = FolderReport(str(root), resolution, channels, small_images, decoded=scan.decoded, cached=scan.cached)
        usable: list[str] = []
        stats: list[tuple[str, int, int]] = []
        ordered = sorted([*scan.entries.items(), *scan.walk_skips], key=lambda item: item[0])
        for rel, entry in ordered:
            if isinstance(entry, str):  # a walk-level skip reason
                report.skip(rel, entry)
                continue
            _size, _mtime, status, width, height, rules, grey, _error = entry
            if status != "ok":
                report.skip(rel, status)
                continue
            small = min(width, height) < resolution
            if small and small_images == "skip":
                report.skip(rel, "too_small")
                continue
            rules = list(rules)
            if grey and channels == 3:
                rules.append("grayscale_to_rgb")
            if not grey and channels == 1:
                rules.append("rgb_to_luma")
            if width != height:
                rules.append("cropped_non_square")
            if small:
                rules.append("upscaled")
            report.convert(rel, rules)
            usable.append(rel)
            stats.append((rel, _size, _mtime))
        report.usable = len(usable)

        if not usable:
            found = f"{report.files} files, {report.skipped_summary()}" if report.files else "no files"
            hint = ""
            if "too_small" in report.skipped:
                hint = f"; data.small_images=upscale keeps the images smaller than {resolution} px"
            raise UserError(
                f"no usable images under data.path {root}: {found} (looked recursively for {extensions}){hint}"
            )
        if len(usable) < min_images:
            skipped = f"; skipped {report.skipped_summary()}" if report.skipped else ""
            raise UserError(
                f"only {len(usable)} usable images under data.path {root}, fewer than the {min_images} needed{skipped}"
            )
        if cache is not None:
            scan.save(cache)  # only now: a dataset that fails its checks writes nothing

        self.root = root
        self.files = [root / rel for rel in usable]
        self.resolution = resolution
        self.channels = channels
        self.small_images = small_images
        self.report = report
        self._stats = stats

    def content_key(self) -> dict[str, Any]:
        """What the images depend on besides the settings (the key of a prepared store): the folder's real path
        and every usable file's relative path, size and mtime."""
        return {"root": os.path.realpath(self.root), "files": self._stats}

    def class_labels(self) -> ClassLabels:
        """The first-level sub-folders of the root as classes (model.conditional=true), in sorted order; an
        image deeper down counts for its first-level folder."""
        parts = [path.relative_to(self.root).parts for path in self.files]
        loose = [name[0] for name in parts if len(name) == 1]
        if loose:
            raise UserError(
                f"model.conditional=true takes the classes from the sub-folders of data.path {self.root}, but "
                f"{len(loose)} images lie directly in it (e.g. {loose[0]}): move them into a class sub-folder"
            )
        return labels_from_names([name[0] for name in parts])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        count = len(self.files)
        index = range(count)[index]  # IndexError past the end, as a Dataset should; negative indices wrap
        # A file that passed the scan can still change on disk during a long run: warn and use the next one
        # (deterministically) rather than kill hours of training over one image.
        for step in range(count):
            current = (index + step) % count
            try:
                return to_signed_tensor(_read(self.files[current], self.resolution, self.mode))
            except Exception as error:  # any decoder failure on a changed file; see _probe
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                print(
                    f"warning: {self.files[current]} no longer decodes ({reason}); using the next image instead",
                    file=sys.stderr,
                    flush=True,
                )
        raise UserError(f"no image under data.path {self.root} decodes any more")

    def load(self, index: int) -> Image.Image:
        """The PIL image at `index`, converted by the module's rules, cropped and resized."""
        path = self.files[index]
        try:
            return _read(path, self.resolution, self.mode)
        except Exception as error:  # see _probe: PIL raises many types on malformed files
            raise UserError(f"cannot read image {path}: {error}") from error
