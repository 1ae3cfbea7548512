"""The folder scan: every file under a folder classified once (usable image, or skipped for a reason), with
what the dataset needs to know about each usable one (upright size, conversion rules, grey or colour).

Skip reasons found here (a FolderDataset adds too_small, which depends on the resolution):

- not_image: the extension is not one of IMAGE_EXTENSIONS (png, jpg, jpeg, webp, bmp, gif, tif, tiff).
- empty: a zero-byte file.
- corrupt: PIL cannot open it or cannot decode it to the end (truncated files only fail there), or it is not
  one of the formats PNG, JPEG (or MPO), WebP, BMP, GIF, TIFF whatever its extension says.
- too_large: PIL refuses it as a decompression bomb (more than 2 x Image.MAX_IMAGE_PIXELS pixels).
- unreadable: the file or a folder cannot be read (permissions, a dangling symlink, an I/O error).
- not_a_file: a FIFO, socket or device that carries an image extension (reading it could block forever).
- symlink_loop: a symlink to a folder that contains it; it is not followed.
- duplicate_dir: a second path (through a symlink) to a folder already walked; it is walked once.

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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pgan.data.pil import PIL_FORMATS, to_base, upright
from pgan.data.prepared import CACHE_DIRNAME

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_POOL_MIN_FILES = 256  # fewer files to decode than this: decode in-process (fast, deterministic small tests)
_CACHE_VERSION = 2  # bump when the probe's output changes meaning, so old cache files are ignored
_MEMO_ROOTS = 4  # folders whose scan stays in memory (training uses one; pgan-eval two)


def find_images(root: Path) -> list[Path]:
    """Every non-empty regular file with an image extension under `root`, recursively, in sorted order."""
    candidates, _ = _walk(Path(root))
    return [Path(root) / rel for rel, _size, _mtime in candidates]


def _probe(path: str) -> tuple[str, int, int, list[str], bool, str]:
    """Fully decode one file: (status, upright width, height, channel-independent rules, is grey, error)."""
    try:
        with Image.open(path, formats=PIL_FORMATS) as image:
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
            # The smallest JPEG draft (1/8 scale) is cheapest and still reads every byte, so truncation shows.
            image.draft(None, (1, 1))
            image.load()
            turned, orientation = upright(image)
            base, rules = to_base(turned)
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
class Scan:
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


def scan_folder(root: Path, scan_cache: Path | None, workers: int) -> Scan:
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
    return Scan(real_root, entries, walk_skips, len(todo), len(candidates) - len(todo), dirty)
