"""Exported generators: G's weights as safetensors plus a JSON config (no training code needed to rebuild it),
and the generator as an ONNX graph checked against PyTorch. What `pgan-export` writes, as functions; reading
an export back (and a checkpoint, or a Hub repo) is `pgan.load`, whose `load_generator` is re-exported here.

An export directory holds:
  config.json            format, version, the exact Generator arguments (resolution in px, latent_dim,
                         image_channels, the per-resolution width table, num_classes: 0 unconditional,
                         g_architecture: progan or skip), the class
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
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pgan.errors import UserError, first_line
from pgan.load import (
    CONFIG,
    FORMAT,
    ONNX,
    VERSION,
    WEIGHTS,
    checkpoint_source_info,
    load_generator,
    load_generator_with_source,
)
from pgan.networks import Generator, cycle_labels

# The layout's names (defined in pgan.load, which reads what this module writes) and the loader, for callers
# that import everything about exports from here.
__all__ = [
    "CONFIG",
    "FORMAT",
    "ONNX",
    "ONNX_INPUT",
    "ONNX_LABELS",
    "ONNX_OUTPUT",
    "VERSION",
    "WEIGHTS",
    "check_onnx",
    "checkpoint_source_info",
    "export_config",
    "export_onnx",
    "export_safetensors",
    "generator_kwargs",
    "load_generator",
    "load_generator_with_source",
    "onnx_opset",
    "write_config",
]

ONNX_INPUT = "latent"
ONNX_LABELS = "labels"  # the second input of a class-conditional generator's graph
ONNX_OUTPUT = "images"


def generator_kwargs(G: Generator) -> dict[str, Any]:
    """The Generator arguments that rebuild `G` exactly: resolution, latent_dim, image_channels, the width
    of every resolution (read off the weights, so the preset that trained it does not matter), num_classes and
    the architecture."""
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
        g_architecture=G.architecture,
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
