"""Load a trained generator: from a pgan checkpoint file, an export directory (config.json +
generator.safetensors, as `pgan.export` writes it) or a Hugging Face Hub repository with the same layout.

This module defines the export directory's layout (the file names, FORMAT and VERSION of config.json), which
`pgan.export` writes; see there for what each file holds. The generator is rebuilt with pgan.networks only
(`generator_from_config`), so an export loads without the training code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgan.errors import UserError, first_line
from pgan.networks import (
    G_ARCHITECTURES,
    Generator,
    check_resolution,
    g_architecture_of,
    generator_from_config,
    resolutions_up_to,
)

FORMAT = "pgan-generator"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "generator.safetensors"
ONNX = "generator.onnx"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
# owner/name as the Hub spells repo ids; anything else that is not an existing path is simply "not found".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def checkpoint_source_info(state: Mapping[str, Any], path: Path | str, which: str = "G_ema") -> dict[str, Any]:
    """Provenance of a generator taken from a loaded checkpoint: its path, which network, stage, images shown."""
    nimg, total = int(state["nimg"]), int(state["total_nimg"])
    model = state.get("config", {}).get("model", {})
    return {
        "checkpoint": str(Path(path).expanduser().resolve()),
        "which": which,
        "stage": int(state["stage"]),
        "nimg": nimg,
        "kimg": nimg / 1000,
        "total_nimg": total,
        "total_kimg": total / 1000,
        "done": bool(state["done"]),
        # The training preset, for the record only (the rebuild uses the width table above).
        "model": {k: model[k] for k in ("name", "fmap_base", "fmap_max", "fmap_min", "mbstd_group_size") if k in model},
    }


def load_generator(source: Path | str, which: str | None = None) -> tuple[Generator, float]:
    """A generator in eval mode on the CPU and the fade alpha it was at, from a pgan checkpoint file, an export
    directory (config.json + generator.safetensors) or a Hugging Face Hub repo id `owner/name` with that layout.

    `which` (G_ema or G) picks the network of a checkpoint (default G_ema); an export holds one network, and
    asking for the other one is an error."""
    G, alpha, _ = load_generator_with_source(source, which)
    return G, alpha


def load_generator_with_source(source: Path | str, which: str | None = None) -> tuple[Generator, float, dict[str, Any]]:
    """`load_generator`, plus the provenance an export of it records (`source` in config.json)."""
    if which not in (None, "G_ema", "G"):
        raise UserError(f"which must be G_ema or G, got {which!r}")
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent  # a file of an export directory stands for the directory
    if path.is_dir():
        return _load_export_dir(path, which)
    if not path.exists() and path.suffix not in CHECKPOINT_SUFFIXES and not _REPO_ID.fullmatch(text):
        raise UserError(
            f"not found: {path} (expected a checkpoint file, an export directory or a Hub repo id owner/name)"
        )
    if path.exists() or path.suffix in CHECKPOINT_SUFFIXES:
        from pgan.checkpoint import generator_from_checkpoint, load_checkpoint

        state = load_checkpoint(path)  # "checkpoint not found: ..." when it does not exist
        which = which or "G_ema"
        G, alpha = generator_from_checkpoint(state, which)
        return G, alpha, checkpoint_source_info(state, path, which)
    return _load_from_hub(text, which)


def _load_export_dir(directory: Path, which: str | None) -> tuple[Generator, float, dict[str, Any]]:
    """Rebuild the generator of an export directory with pgan.networks only; every problem is a UserError."""
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise UserError(f"{directory}: not a pgan export directory (no {CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {config_path}: {first_line(exc)}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"{config_path}: format {found!r} is not {FORMAT!r}")
    if config.get("version") != VERSION:
        raise UserError(
            f"{config_path}: {FORMAT} version {config.get('version')!r} is not supported "
            f"(this pgan reads version {VERSION}; a newer pgan wrote it?)"
        )
    G, alpha = _generator_from_export_config(config, config_path)
    source = config.get("source") if isinstance(config.get("source"), dict) else {}
    exported = source.get("which", "G_ema")
    if which is not None and which != exported:
        raise UserError(f"{directory} holds {exported}, not {which} (an export holds one generator)")
    weights = directory / WEIGHTS
    if not weights.is_file():
        onnx_only = " (an ONNX export: run it with onnxruntime)" if (directory / ONNX).is_file() else ""
        raise UserError(f"{directory}: no {WEIGHTS}{onnx_only}")
    _load_weights(G, weights)
    return G.eval().requires_grad_(False), alpha, source


def _generator_from_export_config(config: dict[str, Any], config_path: Path) -> tuple[Generator, float]:
    """An untrained Generator with the architecture config.json describes, and its alpha; every problem is a
    UserError naming config.json."""
    try:
        resolution = int(config["resolution"])
        check_resolution(resolution)
        model = dict(
            latent_dim=int(config["latent_dim"]),
            image_channels=int(config["image_channels"]),
            channels={int(k): int(v) for k, v in config["channels"].items()},
            # Absent from exports written before conditional models: those were unconditional.
            num_classes=int(config.get("num_classes") or 0),
            g_architecture=g_architecture_of(config),
        )
        alpha = float(config["alpha"])
    except KeyError as exc:
        raise UserError(f"{config_path}: missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{config_path}: bad value ({first_line(exc)})") from exc
    missing = [r for r in resolutions_up_to(resolution) if r not in model["channels"]]
    if missing:
        raise UserError(f"{config_path}: channels has no width for resolution {missing[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"{config_path}: alpha must be in [0, 1], got {alpha}")
    if model["g_architecture"] not in G_ARCHITECTURES:
        raise UserError(f"{config_path}: g_architecture must be one of {', '.join(G_ARCHITECTURES)}")
    if model["num_classes"] < 0:
        raise UserError(f"{config_path}: num_classes must be >= 0 (0: unconditional), got {model['num_classes']}")
    G = generator_from_config(model, resolution)
    names = config.get("classes")
    if names is not None:
        if not isinstance(names, list) or len(names) != G.num_classes:
            raise UserError(f"{config_path}: classes must list num_classes={G.num_classes} names")
        G.class_names = tuple(str(name) for name in names)
    return G, alpha


def _load_weights(G: Generator, weights: Path) -> None:
    """Fill `G` from a safetensors file that must hold exactly its parameters, with its shapes, all finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {weights}: {first_line(exc)}") from exc
    own = G.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which"
        raise UserError(
            f"{weights} {what} the generator of {CONFIG} {'needs' if missing else 'does not have'} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise UserError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, {CONFIG} implies {tuple(own[name].shape)}"
            )
        if not tensor.is_floating_point() or not tensor.isfinite().all():
            raise UserError(f"{weights}: {name} is not a finite floating-point tensor")
    G.load_state_dict(state)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_from_hub(repo_id: str, which: str | None) -> tuple[Generator, float, dict[str, Any]]:
    """Download config.json and generator.safetensors of a Hub repo (or find them in the cache) and load them."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError as exc:
        raise UserError(
            f"{repo_id}: no such file or directory; to load it from the Hugging Face Hub install huggingface_hub: "
            "pip install 'pgan[hub]'"
        ) from exc
    offline = _hub_offline()
    try:
        local = snapshot_download(repo_id, allow_patterns=[CONFIG, WEIGHTS], local_files_only=offline)
    except RepositoryNotFoundError as exc:
        raise UserError(
            f"{repo_id}: no such file or directory, nor a Hugging Face Hub repository you can read"
        ) from exc
    except Exception as exc:  # no connection, Hub down, bad repo id: huggingface_hub has many error types
        if offline:
            raise UserError(
                f"{repo_id}: no such file or directory, and not in the Hugging Face Hub cache (HF_HUB_OFFLINE is set)"
            ) from exc
        raise UserError(
            f"{repo_id}: no such file or directory, and the Hugging Face Hub failed: {first_line(exc)}"
        ) from exc
    try:
        G, alpha, source = _load_export_dir(Path(local), which)
    except UserError as exc:
        raise UserError(f"{repo_id} (Hugging Face Hub): {exc}") from exc
    return G, alpha, {**source, "hub_repo_id": repo_id}
