"""Checkpoints: atomic save, safe load (`weights_only=True`), finding where a run left off, RNG state.

A checkpoint is a dict of tensors and plain Python values only:
  format, version, stage (index), resolution (px), nimg (images shown in this stage), total_nimg (images
  shown over the whole run), done (True for a stage's final.pt), G, D, G_ema (state dicts), opt_G, opt_D
  (optimizer state dicts), rng (torch CPU + CUDA generator states), tick (the partial log tick's sums and
  step count), config (the resolved run config), stage_info (the stage's schedule entry).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pgan.errors import UserError
from pgan.networks import Generator, model_kwargs_from
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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file, flushed and fsynced, then renamed over `path`.

    A reader (or a resume after a crash mid-write) sees either the old file or the new one, never half.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # fsync the directory so the rename itself survives a power loss.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a pgan checkpoint with `torch.load(weights_only=True)`; a user-facing error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, or unsafe pickled objects
        raise UserError(f"cannot load checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"not a pgan checkpoint: {path}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def stage_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint to continue a stage from: final.pt if the stage finished, else latest.pt, else None."""
    for name in (FINAL, LATEST):
        if (Path(stage_dir) / name).is_file():
            return Path(stage_dir) / name
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


def generator_from_checkpoint(state: dict[str, Any], which: str = "G_ema") -> tuple[Generator, float]:
    """The generator `which` (G_ema or G) of a loaded checkpoint, in eval mode on the CPU, and the alpha it was
    at (1.0 unless the checkpoint was written during a fade-in)."""
    m = state["config"]["model"]
    G = Generator(int(state["resolution"]), latent_dim=int(m["latent_dim"]), **model_kwargs_from(m))
    G.load_state_dict(state[which])
    info = state.get("stage_info")
    alpha = alpha_at(Stage(**info), int(state["nimg"])) if info else 1.0
    return G.eval().requires_grad_(False), alpha
