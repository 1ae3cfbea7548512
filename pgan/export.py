"""Exported generators: G's weights as safetensors plus a JSON config (no training code needed to rebuild it),
the generator as an ONNX graph checked against PyTorch, and one loader for checkpoints, export directories
and Hugging Face Hub repositories with the same layout. What `pgan-export` does, as functions.

An export directory holds:
  config.json            format, version, the exact Generator arguments (resolution in px, latent_dim,
                         image_channels, the per-resolution width table, num_classes: 0 unconditional), the class
                         names of a conditional generator (`classes`), the fade
                         alpha the generator was at, and where it came from (checkpoint path, stage, nimg / kimg,
                         pgan version)
  generator.safetensors  the generator's state dict (format=safetensors)
  generator.onnx         the generator with alpha baked in, input `latent` [N, latent_dim] and, for a
                         class-conditional generator, `labels` [N] int64 class indices (format=onnx)

The width table is read off the weights themselves, so a directory rebuilds exactly whatever model
preset (fmap_base / fmap_max / fmap_min or an explicit table) trained it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pgan.errors import UserError, first_line
from pgan.networks import Generator, check_resolution, cycle_labels, resolutions_up_to

FORMAT = "pgan-generator"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "generator.safetensors"
ONNX = "generator.onnx"
ONNX_INPUT = "latent"
ONNX_LABELS = "labels"  # the second input of a class-conditional generator's graph
ONNX_OUTPUT = "images"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
# owner/name as the Hub spells repo ids; anything else that is not an existing path is simply "not found".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def generator_kwargs(G: Generator) -> dict[str, Any]:
    """The Generator arguments that rebuild `G` exactly: resolution, latent_dim, image_channels, the width
    of every resolution (read off the weights, so the preset that trained it does not matter) and num_classes."""
    state = G.state_dict()
    widths = {4: int(state["blocks.4.conv.weight"].shape[0])}
    for res in G.resolutions[1:]:
        widths[res] = int(state[f"blocks.{res}.conv2.weight"].shape[0])
    return dict(
        resolution=int(G.resolution),
        latent_dim=int(G.latent_dim),
        image_channels=int(G.image_channels),
        channels=widths,
        num_classes=int(G.num_classes),
    )


def _class_names(G: Generator) -> dict[str, Any]:
    """config.json's `classes` entry of a conditional G (its class names), nothing for an unconditional one."""
    return {"classes": list(G.class_names)} if G.num_classes else {}


def export_config(
    G: Generator, alpha: float, source_info: Mapping[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """The config.json of an export of `G` at fade `alpha` (`extra`: more top-level entries, e.g. `onnx`)."""
    from pgan import __version__

    kwargs = generator_kwargs(G)
    return {
        "format": FORMAT,
        "version": VERSION,
        **kwargs,
        "channels": {str(k): v for k, v in kwargs["channels"].items()},  # JSON keys are strings
        "alpha": float(alpha),
        **_class_names(G),
        **extra,
        "source": {**(source_info or {}), "pgan_version": __version__},
    }


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


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary file next to `path`, then rename it over `path`: a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the suffix, which some writers check
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def write_config(out_dir: Path | str, config: Mapping[str, Any]) -> Path:
    """Write `config` as `out_dir/config.json` (atomically)."""
    text = json.dumps(config, indent=2) + "\n"
    return _write_atomically(Path(out_dir) / CONFIG, _write_bytes(text.encode()))


def export_safetensors(
    G: Generator, alpha: float, out_dir: Path | str, *, source_info: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write `G`'s state dict to `out_dir/generator.safetensors` and its config to `out_dir/config.json`;
    returns the two paths. The weights are written first, so a config.json always has its weights."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    data = save(tensors, metadata={"format": "pt", "pgan_format": FORMAT})
    weights = _write_atomically(out_dir / WEIGHTS, _write_bytes(data))
    return weights, write_config(out_dir, export_config(G, alpha, source_info))


def _cpu_copy(G: Generator) -> Generator:
    """A copy of `G` in float32 on the CPU in eval mode (the caller's module keeps its device and mode)."""
    return copy.deepcopy(G).cpu().float().eval().requires_grad_(False)


class _FixedAlpha(torch.nn.Module):
    """G with alpha as a constant: an ONNX graph takes tensors, and alpha also picks the graph's branches."""

    def __init__(self, G: Generator, alpha: float) -> None:
        super().__init__()
        self.G, self.alpha = G, float(alpha)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.G(z, self.alpha, labels)


def export_onnx(G: Generator, alpha: float, path: Path | str, *, opset: int | None = None) -> Path:
    """Export `G` at fade `alpha` as an ONNX graph `latent` [N, latent_dim] (and `labels` [N] int64 when G is
    class-conditional) -> `images` [N, C, R, R] (N dynamic), with torch's torch.export-based exporter; the
    weights are stored inside the file."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"ONNX export needs onnx and onnxscript ({exc.name} is missing): pip install 'pgan[onnx]'"
        ) from exc
    model = _FixedAlpha(_cpu_copy(G), alpha).eval()
    example = torch.zeros(2, G.latent_dim)  # batch 2, not 1: a size-1 dimension would be specialised
    batch = torch.export.Dim("batch", min=1)
    args: tuple[torch.Tensor, ...] = (example,)
    names, dynamic = [ONNX_INPUT], {"z": {0: batch}}
    if G.num_classes:  # a second input: the class indices, batch-sized like the latents
        args += (cycle_labels(2, G.num_classes),)
        names.append(ONNX_LABELS)
        dynamic["labels"] = {0: batch}

    def write(tmp: Path) -> None:
        # dynamo=True is the supported exporter (the TorchScript one is deprecated since torch 2.9); the graph
        # of a ProGAN generator is static apart from the batch size. external_data=False: one self-contained
        # file (a generator is far below ONNX's 2 GB limit: about 90 MB at 1024 px with the paper's widths).
        with warnings.catch_warnings():
            # latent and labels share the one batch dimension on purpose; torch warns that it names it once.
            warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=True,
                input_names=names,
                output_names=[ONNX_OUTPUT],
                dynamic_shapes=dynamic,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomically(path, write)


def onnx_opset(path: Path | str) -> int | None:
    """The default-domain opset an ONNX file was written with (None if onnx cannot tell)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_onnx(
    G: Generator, alpha: float, path: Path | str, *, atol: float = 1e-3, n: int = 4, seed: int = 0
) -> float | None:
    """Run the ONNX file with onnxruntime on `n` seeded latents (and on a batch of one; a conditional G gets the
    labels of `cycle_labels`) and compare with `G(z, alpha, labels)` in float32 on the CPU; returns the max
    abs difference, or None when onnxruntime is not installed (the check is skipped). A difference above
    `atol` is a UserError."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import numpy as np

    from pgan.sample import seeded_latents

    G = _cpu_copy(G)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail, NoSuchFile, ...)
        raise UserError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc
    worst = 0.0
    for z in (seeded_latents(seed, n, G.latent_dim), seeded_latents(seed + 1, 1, G.latent_dim)):
        labels = cycle_labels(len(z), G.num_classes)
        with torch.no_grad():
            expected = G(z, alpha, labels).numpy()
        feed = {ONNX_INPUT: z.numpy()} if labels is None else {ONNX_INPUT: z.numpy(), ONNX_LABELS: labels.numpy()}
        (got,) = session.run([ONNX_OUTPUT], feed)
        if got.shape != expected.shape:
            raise UserError(f"ONNX check failed for {path}: output shape {got.shape}, PyTorch gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= atol:  # also catches NaN
        raise UserError(f"ONNX check failed for {path}: max abs difference to PyTorch {worst:.3g} > atol={atol:g}")
    return worst


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
    G, alpha = _generator_from_config(config, config_path)
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


def _generator_from_config(config: dict[str, Any], config_path: Path) -> tuple[Generator, float]:
    """An untrained Generator with the architecture config.json describes, and its alpha."""
    try:
        resolution = int(config["resolution"])
        check_resolution(resolution)
        kwargs = dict(
            latent_dim=int(config["latent_dim"]),
            image_channels=int(config["image_channels"]),
            channels={int(k): int(v) for k, v in config["channels"].items()},
            # Absent from exports written before conditional models: those were unconditional.
            num_classes=int(config.get("num_classes") or 0),
        )
        alpha = float(config["alpha"])
    except KeyError as exc:
        raise UserError(f"{config_path}: missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{config_path}: bad value ({first_line(exc)})") from exc
    missing = [r for r in resolutions_up_to(resolution) if r not in kwargs["channels"]]
    if missing:
        raise UserError(f"{config_path}: channels has no width for resolution {missing[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"{config_path}: alpha must be in [0, 1], got {alpha}")
    if kwargs["num_classes"] < 0:
        raise UserError(f"{config_path}: num_classes must be >= 0 (0: unconditional), got {kwargs['num_classes']}")
    G = Generator(resolution, **kwargs)
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
