"""`pgan-export ckpt=PATH format=safetensors|onnx out=DIR`: a generator as safetensors weights + config.json
(rebuilt by `pgan.load.load_generator` without the training code), or as an ONNX graph checked against
PyTorch with onnxruntime when it is installed. The last line of stdout is one JSON object naming what was
written; exit 2 with one line `error: ...` on a bad checkpoint, path or setting, or a failed ONNX check."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pgan.cli import CONFIG_DIR, exit_on_bad_overrides, exit_with_user_error
from pgan.errors import UserError, check_int, check_number

FORMATS = ("safetensors", "onnx")
MIN_OPSET = 18  # torch.onnx.export(dynamo=True)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export what cfg asks for; returns the summary printed as JSON."""
    from pgan.export import export_safetensors
    from pgan.load import load_generator_with_source

    out, atol, opset = _checked(cfg)
    G, alpha, source_info = load_generator_with_source(str(cfg.ckpt), None if cfg.which is None else str(cfg.which))
    summary: dict[str, Any] = {"format": str(cfg.format), "out": str(out), "resolution": G.resolution, "alpha": alpha}
    if cfg.format == "onnx":
        return {**summary, **_export_onnx(G, alpha, source_info, out, opset, atol)}
    try:
        weights, config = export_safetensors(G, alpha, out, source_info=source_info)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc}") from exc
    _drop_stale_weights(out, "safetensors", G, alpha)
    return {**summary, "files": [str(weights), str(config)], "max_abs_diff": None}


def _checked(cfg: DictConfig) -> tuple[Path, float, int | None]:
    """The export directory, the ONNX check's atol and the asked-for opset, after checking every option."""
    from omegaconf import OmegaConf

    for key in ("ckpt", "out"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key}= is required, e.g. pgan-export ckpt=runs/x/stage-0256/final.pt out=exports/x")
    if cfg.format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.which not in (None, "G_ema", "G"):
        raise UserError(f"which must be G_ema or G, got {cfg.which!r}")
    check_number("atol", cfg.atol, low=0.0, strict=True, error=UserError)
    opset = None if cfg.opset is None else check_int("opset", cfg.opset, low=1)
    if opset is not None and opset < MIN_OPSET:  # the version converter fails on this graph (and prints its traceback)
        raise UserError(f"opset={opset}: torch.onnx's exporter writes opset {MIN_OPSET} and newer; leave opset unset")
    if not str(cfg.out).strip():
        raise UserError("out= is empty: name the export directory, e.g. out=exports/x")
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out={cfg.out}: exists and is not a directory")
    return out, float(cfg.atol), opset


def _export_onnx(G, alpha: float, source_info: dict, out: Path, opset: int | None, atol: float) -> dict[str, Any]:
    """Write G as out/generator.onnx with its config.json and check the graph against PyTorch (onnxruntime). A
    graph that fails its check is removed and an earlier export's config.json put back. Returns files and diff."""
    from pgan.export import (
        ONNX_INPUT,
        ONNX_LABELS,
        ONNX_OUTPUT,
        check_onnx,
        export_config,
        export_onnx,
        onnx_opset,
        write_config,
    )
    from pgan.load import CONFIG, ONNX

    try:
        previous_config = (out / CONFIG).read_bytes() if (out / CONFIG).is_file() else None
        onnx_path = export_onnx(G, alpha, out / ONNX, opset=opset)
        written = onnx_opset(onnx_path)
        if opset is not None and written != opset:
            onnx_path.unlink()
            raise UserError(
                f"opset={opset}: torch.onnx wrote this generator at opset {written} and could not convert it; "
                f"leave opset unset (null) or ask for {written}"
            )
        onnx_info = {"file": ONNX, "input": ONNX_INPUT, "output": ONNX_OUTPUT, "opset": written}
        if G.num_classes:  # a conditional graph takes the class indices too
            onnx_info["labels"] = ONNX_LABELS
        config = write_config(out, export_config(G, alpha, source_info, onnx=onnx_info))
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc}") from exc
    try:
        diff = check_onnx(G, alpha, onnx_path, atol=atol)
    except UserError:
        onnx_path.unlink(missing_ok=True)
        if previous_config is None:
            (out / CONFIG).unlink(missing_ok=True)
        else:
            (out / CONFIG).write_bytes(previous_config)
        raise
    _drop_stale_weights(out, "onnx", G, alpha)  # only now, after the check
    if diff is None:
        print("onnx check skipped: onnxruntime is not installed (pip install 'pgan[onnx]')", flush=True)
    else:
        print(f"onnx check passed: max abs difference to PyTorch {diff:.3g} (atol {atol:g})", flush=True)
    return {"files": [str(onnx_path), str(config)], "max_abs_diff": diff}


def _drop_stale_weights(out: Path, fmt: str, G, alpha: float) -> None:
    """After an export into `out`: remove the other format's file of an earlier export unless it holds this very
    generator, since the new config.json describes only the new one (a stale generator.safetensors made every
    reader of the folder fail). A safetensors export's config.json has no ONNX section: an ONNX file goes."""
    import torch

    from pgan.load import ONNX, WEIGHTS, load_generator

    other = out / (ONNX if fmt == "safetensors" else WEIGHTS)
    if not other.is_file():
        return
    if fmt == "onnx":
        try:
            old, old_alpha = load_generator(out)
            theirs, ours = old.state_dict(), G.state_dict()
            same = old_alpha == alpha and theirs.keys() == ours.keys()
            if same and all(torch.equal(theirs[k], ours[k]) for k in ours):
                return
        except UserError:
            pass  # unreadable, or of another architecture: stale
    other.unlink()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = export(cfg)
    except UserError as exc:
        exit_with_user_error(exc)
    print(json.dumps(summary), flush=True)


def main() -> None:
    """Console entry point of `pgan-export`."""
    exit_on_bad_overrides("export", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
