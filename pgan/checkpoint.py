"""Checkpoints: atomic save, safe and validated load (`weights_only=True`), rotation, where a run left off, RNG.

Each stage directory holds `ckpt-<nimg>.pt` snapshots (nimg: images shown in the stage, zero-padded so names
sort by age; the newest `checkpoint.keep` are kept), `latest.pt` (a hard link to the newest snapshot),
`final.pt` when the stage finished and `ok.pt` (see below). A resume tries final.pt, then the snapshots newest
first; a damaged one (truncated, corrupt, wrong shapes, non-finite values) is reported, renamed to
`<name>.damaged` (kept for inspection, out of the way of rotation) and the next older one used.

A checkpoint is a dict of tensors and plain Python values only:
  format, version, stage (index), resolution (px), nimg (images shown in this stage), total_nimg (images
  shown over the whole run), done (True for a stage's final.pt), G, D, G_ema (state dicts), opt_G, opt_D
  (optimizer state dicts), rng (torch CPU + CUDA generator states), tick (the partial log tick's sums, how many
  steps reported each, and its step count), collapse (the collapse detector's state), guard (skipped steps,
  rollbacks, lr scale), augment (the adaptive augmentation's p and its partial interval, or None:
  pgan.augment.AugmentPipe.state_dict), config (the resolved run config), stage_info (the stage's schedule
  entry).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from pgan.errors import UserError, first_line
from pgan.networks import Generator, generator_from_config, networks_from
from pgan.schedule import Stage, alpha_at

FORMAT = "pgan-checkpoint"
VERSION = 1
REQUIRED_KEYS = (
    "stage",
    "resolution",
    "nimg",
    "total_nimg",
    "done",
    "G",
    "D",
    "G_ema",
    "opt_G",
    "opt_D",
    "rng",
    "tick",
    "config",
)
LATEST = "latest.pt"
FINAL = "final.pt"
OK = "ok.pt"  # the stage's last checkpoint written while the collapse detector said ok (for rollbacks)
DAMAGED_SUFFIX = ".damaged"
_SNAPSHOT = re.compile(r"ckpt-(\d{10})\.pt")


def snapshot_name(nimg: int) -> str:
    """The file name of the snapshot taken after `nimg` images of a stage (sorts by age)."""
    return f"ckpt-{nimg:010d}.pt"


class CheckpointDamaged(UserError):
    """A checkpoint file that exists but is not usable: truncated, corrupt, pickled code, wrong shapes, NaN."""


def snapshot_nimg(path: Path) -> int:
    """The image count in a snapshot's file name."""
    return int(_SNAPSHOT.fullmatch(Path(path).name).group(1))


def snapshots(stage_dir: Path) -> list[Path]:
    """The stage's snapshot files, newest first."""
    found = [(int(m.group(1)), p) for p in Path(stage_dir).glob("ckpt-*.pt") if (m := _SNAPSHOT.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune_snapshots(stage_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` snapshots (latest.pt and ok.pt are hard links: they keep their data)."""
    for old in snapshots(stage_dir)[max(1, keep) :]:
        old.unlink(missing_ok=True)


def resume_candidates(stage_dir: Path) -> list[Path]:
    """The checkpoints a stage can continue from, best first: final.pt, the snapshots newest first, and
    latest.pt when it is not one of them (runs written before snapshots existed)."""
    stage_dir = Path(stage_dir)
    found = [p for p in (stage_dir / FINAL, *snapshots(stage_dir)) if p.is_file()]
    latest = stage_dir / LATEST
    if latest.is_file() and not any(os.path.samefile(latest, p) for p in found):
        found.append(latest)
    return found


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged` so that it is kept but never tried or rotated again;
    latest.pt and ok.pt, when they are hard links to it, go too (they would hand out the same damage)."""
    path = Path(path)
    for link in (path.with_name(LATEST), path.with_name(OK)):
        if link != path and link.is_file() and os.path.samefile(link, path):
            link.unlink()
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    os.replace(path, aside)
    return aside


def damaged_files(stage_dir: Path) -> list[Path]:
    """The checkpoints of a stage that were set aside as damaged."""
    return sorted(Path(stage_dir).glob(f"*{DAMAGED_SUFFIX}"))


def rewind_snapshots(stage_dir: Path, restored: Path, nimg: int) -> None:
    """After a rollback to the checkpoint `restored` (taken after `nimg` images): delete the snapshots of the
    abandoned branch (newer than `nimg`), make sure a snapshot of the restored point exists, and point
    latest.pt at it, so that a resume, a rotation or a later rollback never picks the abandoned branch."""
    stage_dir = Path(stage_dir)
    for path in snapshots(stage_dir):
        if snapshot_nimg(path) > nimg:
            path.unlink()
    own = stage_dir / snapshot_name(nimg)
    if not own.is_file():
        link_checkpoint(restored, own)
    link_checkpoint(own, stage_dir / LATEST)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file, flushed and fsynced, then renamed over `path`.

    A reader (or a resume after a crash mid-write) sees either the old file or the new one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        # A full disk (or a signal) mid-write: drop the partial file, the previous checkpoint is untouched.
        tmp.unlink(missing_ok=True)
        os_error = _os_error_in(exc)
        if os_error is not None and os_error is not exc:
            # torch's zip writer reports a failed write as a RuntimeError raised while handling the OSError.
            raise os_error from exc
        raise
    os.replace(tmp, path)
    # fsync the directory so the rename itself survives a power loss.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that `exc` is, or was raised while handling, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make `dst` a copy of the checkpoint `src` atomically: a hard link (no second write) where the file
    system allows it, a copy otherwise, under a temporary name renamed over `dst`."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive starts as every zip file does


def _reads_whole(path: Path) -> bool:
    """Whether every byte of `path` reads without an OSError (then an OSError of torch.load was about its content)."""
    try:
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
    except OSError:
        return False
    return True


def _unreadable(path: Path, why: str) -> CheckpointDamaged:
    """The error for a file torch.load could not read: a damaged checkpoint if it starts as torch.save's archive
    does (e.g. truncated), else not a checkpoint at all (torch's own message would suggest an unsafe load)."""
    with path.open("rb") as f:
        archive = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if archive:
        return CheckpointDamaged(f"cannot load checkpoint {path}: damaged file ({why})")
    return CheckpointDamaged(f"not a pgan checkpoint: {path} (not a torch.save archive)")


def load_checkpoint(
    path: Path | str, map_location: str | torch.device = "cpu", validate: bool = True
) -> dict[str, Any]:
    """Load a pgan checkpoint with `torch.load(weights_only=True)`; a user-facing error if it is not one, or
    (with `validate`) if its networks do not have the shapes its own config implies or hold non-finite values."""
    path = Path(path)
    if path.is_dir():
        inside = next((path / name for name in ("final.pt", "latest.pt") if (path / name).is_file()), None)
        hint = f": did you mean {inside}?" if inside else " (a .pt file such as <run>/stage-0064/final.pt)"
        raise UserError(f"not a checkpoint: {path} is a folder{hint}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except OSError as exc:
        if _reads_whole(path):  # its bytes read fine: torch's reader choked on them (a truncated archive: EINVAL)
            raise _unreadable(path, f"{type(exc).__name__}: {first_line(exc)}") from exc
        # The file system (permissions, I/O), not the file: never a reason to set it aside.
        raise UserError(f"cannot read checkpoint {path}: {exc}") from exc
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses anything but tensors and plain values: a checkpoint that would run code.
        first = first_line(exc)
        # torch names the refused global ("Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y").
        culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
        # Random bytes fail the same check ("Unsupported operand"): only a torch.save archive (a zip) or a named
        # global is evidence of pickled objects; anything else is a damaged file.
        if culprit or ("Weights only load failed" in first and zipfile.is_zipfile(path)):
            what = f" ({culprit.group(1)})" if culprit else ""
            raise CheckpointDamaged(
                f"refusing to load {path}: it holds pickled Python objects{what}, which could run code; pgan "
                "checkpoints hold tensors and plain values only"
            ) from exc
        raise _unreadable(path, first or type(exc).__name__) from exc
    except Exception as exc:  # a truncated or corrupt file: torch's zip reader raises RuntimeError, EOFError, ...
        first = first_line(exc)
        if "DataLoader" in first:
            raise  # torch's SIGCHLD handler fired during the load: a worker's failure, not the file's
        raise _unreadable(path, f"{type(exc).__name__}: {first}" if first else type(exc).__name__) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointDamaged(f"not a pgan checkpoint: {path}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointDamaged(f"checkpoint {path} lacks {', '.join(missing)}")
    if validate:
        problem = checkpoint_problem(state)
        if problem:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {problem}")
    return state


def checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a loaded checkpoint's networks, or None: G, G_ema and D must have exactly the
    parameters and shapes of the networks its config builds at its resolution, and every floating-point
    tensor of the networks and optimizers must be finite."""
    try:
        with torch.device("meta"):  # shapes only, no memory, no RNG
            G, D = networks_from(state["config"]["model"], int(state["resolution"]), len(checkpoint_classes(state)))
    except (KeyError, TypeError, ValueError) as exc:
        return f"its config does not describe a model ({type(exc).__name__}: {exc})"
    for key, net in (("G", G), ("G_ema", G), ("D", D)):
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        got = state[key]
        if not isinstance(got, dict):
            return f"{key} is not a state dict"
        if set(got) != set(expected):
            odd = sorted(set(got) ^ set(expected))
            return f"{key} has different parameters than its config implies ({', '.join(odd[:3])})"
        wrong = [k for k, shape in expected.items() if tuple(got[k].shape) != shape]
        if wrong:
            return f"{key}.{wrong[0]} has shape {tuple(got[wrong[0]].shape)}, expected {expected[wrong[0]]}"
    for key in ("G", "G_ema", "D", "opt_G", "opt_D"):
        bad = next((name for name, t in _tensors(state[key]) if t.is_floating_point() and not t.isfinite().all()), None)
        if bad is not None:
            return f"{key}.{bad} holds non-finite values"
    augment = state.get("augment")
    if augment is not None:
        p = augment.get("p") if isinstance(augment, dict) else None
        if not isinstance(p, torch.Tensor) or p.numel() != 1 or not 0 <= float(p) <= 1:  # NaN fails too
            return f"augment.p is not a probability ({p!r})"
    return None


def _tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list, with its dotted path."""
    if isinstance(tree, torch.Tensor):
        return [(prefix.rstrip("."), tree)]
    if isinstance(tree, dict):
        return [t for k, v in tree.items() for t in _tensors(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [t for i, v in enumerate(tree) for t in _tensors(v, f"{prefix}{i}.")]
    return []


def load_newest_usable(candidates: list[Path]) -> tuple[dict[str, Any], Path] | None:
    """The first of `candidates` that loads and validates; each damaged one before it is reported on stderr
    and set aside (renamed to `<name>.damaged`). None when none is usable."""
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except CheckpointDamaged as exc:
            if not path.exists():  # removed by someone else meanwhile: nothing to set aside
                continue
            aside = set_aside(path)
            print(f"warning: {exc}; moved it to {aside.name} and trying the previous checkpoint", file=sys.stderr)
    return None


def get_rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and every CUDA device) as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` saved; CUDA states only when this process has the same devices."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def checkpoint_classes(state: dict[str, Any]) -> tuple[str, ...]:
    """The class names of a class-conditional run's checkpoint (the data's classes when it was trained); empty
    for an unconditional one (and for checkpoints written before conditional training)."""
    return tuple(str(name) for name in state.get("classes") or ())


def generator_from_checkpoint(state: dict[str, Any], which: str = "G_ema") -> tuple[Generator, float]:
    """The generator `which` (G_ema or G) of a loaded checkpoint, in eval mode on the CPU, and the alpha it was
    at (1.0 unless the checkpoint was written during a fade-in)."""
    classes = checkpoint_classes(state)
    G = generator_from_config(state["config"]["model"], int(state["resolution"]), len(classes))
    G.load_state_dict(state[which])
    G.class_names = classes
    info = state.get("stage_info")
    alpha = alpha_at(Stage(**info), int(state["nimg"])) if info else 1.0
    return G.eval().requires_grad_(False), alpha
