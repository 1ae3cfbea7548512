"""Images from a folder tree as a dataset: checked once, converted by fixed rules, centre-cropped and resized.

A hostile folder does not stop a run. At construction every file is classified by the scan (pgan.data.scan:
the skip reasons, the scan cache), and anything that cannot be used is skipped and counted by reason;
`FolderDataset.report` holds the counts with a few example paths. The scan's reasons apply at every
resolution; one depends on it:

- too_small: the shorter side is below the resolution and small_images="skip" (the default);
  small_images="upscale" keeps it (conversion rule `upscaled`).

Every image kept is decoded and converted by the rules of pgan.data.pil (each counted by its name in the
report), then resized to resolution x resolution px.
"""

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pgan.data.labels import ClassLabels, labels_from_names
from pgan.data.pil import PIL_FORMATS, PIL_MODES, pil_mode, read_image, square_resize, to_signed_tensor
from pgan.data.scan import _CACHE_VERSION as _CACHE_VERSION  # the scan cache's version, which tests read
from pgan.data.scan import IMAGE_EXTENSIONS, Scan, find_images, forget_scans, scan_folder
from pgan.errors import UserError

# The PIL helpers and the scan lived in this module before they had modules of their own; their public names
# are still importable from here.
__all__ = [
    "CONVERSION_RULES",
    "IMAGE_EXTENSIONS",
    "PIL_FORMATS",
    "PIL_MODES",
    "SKIP_REASONS",
    "SMALL_IMAGES",
    "FolderDataset",
    "FolderReport",
    "Tally",
    "find_images",
    "forget_scans",
    "pil_mode",
    "square_resize",
    "to_signed_tensor",
]

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
    "float_scaled",
    "palette",
    "alpha_composited",
    "cmyk",
    "other_mode",
    "grayscale_to_rgb",
    "rgb_to_luma",
    "cropped_non_square",
    "upscaled",
)
_EXAMPLES = 3  # example paths kept per reason / rule
_EXTENSIONS = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)  # for messages


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


def _folder_root(path: str | Path, key: str) -> Path:
    """`path` as a folder that exists, else a UserError naming it (as the setting `key`)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{key} does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"{key} is not a folder: {root} (expected a folder of {_EXTENSIONS} images)")
    return root


def _rules_at(entry: list, report: FolderReport) -> list[str] | None:
    """The conversion rules of a decodable scanned file at the report's settings; None when it is too small to
    keep (small_images="skip")."""
    _size, _mtime, _status, width, height, rules, grey, _error = entry
    small = min(width, height) < report.resolution
    if small and report.small_images == "skip":
        return None
    rules = list(rules)
    if grey and report.channels == 3:
        rules.append("grayscale_to_rgb")
    if not grey and report.channels == 1:
        rules.append("rgb_to_luma")
    if width != height:
        rules.append("cropped_non_square")
    if small:
        rules.append("upscaled")
    return rules


def _select(scan: Scan, report: FolderReport) -> list[tuple[str, int, int]]:
    """The usable files of `scan` (relative path, size, mtime_ns) at the report's settings, in sorted order;
    fills `report` with what was kept, skipped and converted."""
    usable: list[tuple[str, int, int]] = []
    for rel, entry in sorted([*scan.entries.items(), *scan.walk_skips], key=lambda item: item[0]):
        if isinstance(entry, str):  # a walk-level skip reason
            report.skip(rel, entry)
            continue
        status = entry[2]
        if status != "ok":
            report.skip(rel, status)
            continue
        rules = _rules_at(entry, report)
        if rules is None:
            report.skip(rel, "too_small")
            continue
        report.convert(rel, rules)
        usable.append((rel, entry[0], entry[1]))
    report.usable = len(usable)
    return usable


def _check_enough(report: FolderReport, root: Path, min_images: int, key: str) -> None:
    """A UserError saying why when the report's usable images are none or fewer than `min_images`."""
    if not report.usable:
        found = f"{report.files} files, {report.skipped_summary()}" if report.files else "no files"
        hint = ""
        if "too_small" in report.skipped:
            hint = f"; data.small_images=upscale keeps the images smaller than {report.resolution} px"
        raise UserError(f"no usable images under {key} {root}: {found} (looked recursively for {_EXTENSIONS}){hint}")
    if report.usable < min_images:
        skipped = f"; skipped {report.skipped_summary()}" if report.skipped else ""
        raise UserError(
            f"only {report.usable} usable images under {key} {root}, fewer than the {min_images} needed{skipped}"
        )


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
        key: str = "data.path",
    ) -> None:
        """`key`: the setting that named `path`, as the errors name it (pgan-eval's real= and fake=)."""
        self.mode = pil_mode(channels)
        if small_images not in SMALL_IMAGES:
            raise UserError(f"data.small_images must be skip or upscale, got {small_images!r}")
        root = _folder_root(path, key)
        workers = scan_workers if scan_workers is not None else min(os.cpu_count() or 1, 8)
        cache = Path(scan_cache).expanduser() if scan_cache is not None else None
        scan = scan_folder(root, cache, max(1, workers))
        report = FolderReport(str(root), resolution, channels, small_images, decoded=scan.decoded, cached=scan.cached)
        usable = _select(scan, report)
        _check_enough(report, root, min_images, key)
        if cache is not None:
            scan.save(cache)  # only now: a dataset that fails its checks writes nothing

        self.root = root
        self.key = key
        self.files = [root / rel for rel, _size, _mtime in usable]
        self.resolution = resolution
        self.channels = channels
        self.small_images = small_images
        self.report = report
        self._stats = usable

    def content_key(self) -> dict[str, Any]:
        """What the images depend on besides the settings (the key of a prepared store): the folder's real path
        and every usable file's relative path, size and mtime, and the conversion rules' names (a store made before
        a rule was added is not reused)."""
        return {"root": os.path.realpath(self.root), "files": self._stats, "rules": list(CONVERSION_RULES)}

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
                return to_signed_tensor(read_image(self.files[current], self.resolution, self.mode))
            except Exception as error:  # any decoder failure on a changed file; see scan._probe
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                print(
                    f"warning: {self.files[current]} no longer decodes ({reason}); using the next image instead",
                    file=sys.stderr,
                    flush=True,
                )
        raise UserError(f"no image under {self.key} {self.root} decodes any more")

    def load(self, index: int) -> Image.Image:
        """The PIL image at `index`, converted by pgan.data.pil's rules, cropped and resized."""
        path = self.files[index]
        try:
            return read_image(path, self.resolution, self.mode)
        except Exception as error:  # see scan._probe: PIL raises many types on malformed files
            raise UserError(f"cannot read image {path}: {error}") from error
