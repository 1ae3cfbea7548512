"""pgan-export: safetensors + config.json round trips bit-exactly without the training code, ONNX matches
PyTorch, one loader for checkpoints / export directories / Hub repo ids, one-line errors. No network."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import WAIT_TIMEOUT_S, compose_config

from pgan.checkpoint import generator_from_checkpoint, load_checkpoint
from pgan.cli.export import export
from pgan.errors import UserError
from pgan.export import (
    CONFIG,
    FORMAT,
    VERSION,
    WEIGHTS,
    check_onnx,
    export_onnx,
    export_safetensors,
    load_generator,
)
from pgan.networks import Generator
from pgan.sample import seeded_latents

PGAN_EXPORT = str(Path(sys.executable).with_name("pgan-export"))
TINY_G = dict(latent_dim=16, image_channels=3, fmap_base=64, fmap_max=16, fmap_min=4)


@pytest.fixture
def checkpoint(tiny_checkpoint_8px: Path) -> Path:
    """A tiny 8 px run's final.pt, trained for a few steps (the session's)."""
    return tiny_checkpoint_8px


def _export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PGAN_EXPORT, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _images(G: Generator, alpha: float, seed: int = 0, n: int = 6) -> torch.Tensor:
    with torch.no_grad():
        return G(seeded_latents(seed, n, G.latent_dim), alpha)


def _fading_generator() -> Generator:
    """A 16 px generator with random weights, to be used mid-fade (both toRGB paths in the output)."""
    torch.manual_seed(0)
    return Generator(16, **TINY_G).eval().requires_grad_(False)


def test_safetensors_round_trip_is_bit_exact(tmp_path: Path) -> None:
    G = _fading_generator()
    export_safetensors(G, 0.3, tmp_path / "x")
    H, alpha = load_generator(tmp_path / "x")
    assert alpha == 0.3 and not H.training
    assert G.state_dict().keys() == H.state_dict().keys()
    assert all(torch.equal(v, H.state_dict()[k]) for k, v in G.state_dict().items())
    assert torch.equal(_images(G, 0.3), _images(H, alpha))
    assert not list((tmp_path / "x").glob(".*"))  # no temporary files left behind


@pytest.mark.subprocess
def test_the_config_describes_the_generator_and_where_it_came_from(checkpoint: Path, tmp_path: Path) -> None:
    state = load_checkpoint(checkpoint)
    result = _export(f"ckpt={checkpoint}", f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "format": "safetensors",
        "out": str(tmp_path / "x"),
        "resolution": 8,
        "alpha": 1.0,
        "files": [str(tmp_path / "x" / WEIGHTS), str(tmp_path / "x" / CONFIG)],
        "max_abs_diff": None,
    }
    config = json.loads((tmp_path / "x" / CONFIG).read_text())
    assert {k: config[k] for k in ("format", "version", "resolution", "latent_dim", "image_channels", "alpha")} == {
        "format": FORMAT,
        "version": VERSION,
        "resolution": 8,
        "latent_dim": 16,
        "image_channels": 3,
        "alpha": 1.0,
    }
    assert config["channels"] == {"4": 16, "8": 16}  # min(64 / 2**stage, 16) at 4 and 8 px
    source = config["source"]
    assert source["checkpoint"] == str(checkpoint.resolve()) and source["which"] == "G_ema"
    assert (source["stage"], source["nimg"], source["kimg"]) == (state["stage"], state["nimg"], state["nimg"] / 1000)
    assert source["pgan_version"] == __import__("pgan").__version__
    # The checkpoint's G_ema, bit for bit.
    G, _ = generator_from_checkpoint(state)
    H, _ = load_generator(tmp_path / "x")
    assert all(torch.equal(v, H.state_dict()[k]) for k, v in G.state_dict().items())


def test_a_checkpoint_and_its_export_give_the_same_images(checkpoint: Path, tmp_path: Path) -> None:
    G, alpha = load_generator(checkpoint)
    export_safetensors(G, alpha, tmp_path / "x")
    H, beta = load_generator(tmp_path / "x")
    assert alpha == beta == 1.0
    assert torch.equal(_images(G, alpha, seed=5), _images(H, beta, seed=5))
    assert torch.equal(load_generator(tmp_path / "x" / CONFIG)[0].state_dict()["to_rgb.8.bias"], H.to_rgb["8"].bias)
    G_raw, _ = load_generator(checkpoint, "G")  # the other network of the checkpoint
    assert not torch.equal(G_raw.to_rgb["8"].weight, G.to_rgb["8"].weight)


_REBUILD = """
import sys, torch
from pgan.export import load_generator
from pgan.sample import seeded_latents
G, alpha = load_generator(sys.argv[1])
torch.save(G(seeded_latents(0, 6, G.latent_dim), alpha), sys.argv[2])
assert not [m for m in sys.modules if m.startswith(("pgan.train", "pgan.checkpoint"))], "loaded training code"
"""


@pytest.mark.subprocess
def test_an_export_rebuilds_without_its_checkpoint_or_the_training_code(checkpoint: Path, tmp_path: Path) -> None:
    own = tmp_path / "final.pt"
    shutil.copy(checkpoint, own)
    G, alpha = load_generator(own)
    export_safetensors(G, alpha, tmp_path / "x", source_info={"checkpoint": str(own)})
    own.unlink()
    result = subprocess.run(
        [sys.executable, "-c", _REBUILD, str(tmp_path / "x"), str(tmp_path / "images.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "images.pt", weights_only=True), _images(G, alpha))


@pytest.mark.subprocess
def test_pgan_export_onnx_matches_pytorch_mid_fade_for_any_batch_size(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    G = _fading_generator()
    export_safetensors(G, 0.3, tmp_path / "x", source_info={"which": "G_ema", "stage": 1})
    # Re-exported from the export directory, into it: the directory then holds both formats.
    result = _export("ckpt=x", "format=onnx", "out=x", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["files"] == ["x/generator.onnx", "x/config.json"] and summary["alpha"] == 0.3
    assert 0 <= summary["max_abs_diff"] < 1e-4
    assert lines[-2].startswith("onnx check passed: max abs difference to PyTorch")
    config = json.loads((tmp_path / "x" / CONFIG).read_text())
    assert config["onnx"]["input"] == "latent" and config["onnx"]["opset"] >= 18
    assert config["alpha"] == 0.3 and config["source"]["stage"] == 1  # the provenance is carried over
    path = tmp_path / "x" / "generator.onnx"
    diff = check_onnx(G, 0.3, path, atol=1e-4)
    assert diff is not None and diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.run(None, {"latent": seeded_latents(9, 3, 16).numpy()})
    assert images.shape == (3, 3, 16, 16)  # a batch size the export never saw
    torch.testing.assert_close(torch.from_numpy(images), _images(G, 0.3, seed=9, n=3), atol=1e-4, rtol=0)
    # alpha is baked in: the graph is not the one of another alpha.
    assert (torch.from_numpy(images) - _images(G, 1.0, seed=9, n=3)).abs().max() > 1e-2
    with pytest.raises(UserError, match=r"ONNX check failed .* > atol=1e-12"):
        check_onnx(G, 0.3, path, atol=1e-12)
    assert torch.equal(_images(load_generator(tmp_path / "x")[0], 0.3), _images(G, 0.3))
    (tmp_path / "x" / WEIGHTS).unlink()
    with pytest.raises(UserError, match="no generator.safetensors .an ONNX export"):
        load_generator(tmp_path / "x")


def test_missing_onnx_packages_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    G = _fading_generator()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert check_onnx(G, 1.0, tmp_path / "never-read.onnx") is None  # skipped, not failed
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match=r"onnxscript is missing\): pip install 'pgan\[onnx\]'"):
        export_onnx(G, 1.0, tmp_path / "generator.onnx")


def _broken(tmp_path: Path, **changes) -> Path:
    """An export directory of the tiny 16 px generator with config.json entries changed (None: removed)."""
    directory = tmp_path / "broken"
    export_safetensors(_fading_generator(), 1.0, directory)
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "something-else"}, "format 'something-else' is not 'pgan-generator'"),
        ({"version": 99}, "pgan-generator version 99 is not supported"),
        ({"latent_dim": None}, "missing 'latent_dim'"),
        ({"resolution": 12}, "bad value (resolution must be a power of two"),
        ({"latent_dim": 32}, "blocks.4.dense.weight has shape (256, 16), config.json implies (256, 32)"),
        ({"channels": {"4": 16, "8": 16, "16": 8, "32": 4}, "resolution": 32}, "lacks blocks.32.conv1.bias"),
        ({"alpha": 2.0}, "alpha must be in [0, 1], got 2.0"),
    ],
)
def test_a_bad_export_is_a_one_line_error_naming_the_culprit(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(UserError) as info:
        load_generator(_broken(tmp_path, **changes))
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_damaged_files_in_an_export_are_named(tmp_path: Path) -> None:
    directory = _broken(tmp_path)
    (directory / WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=f"cannot read {directory / WEIGHTS}"):
        load_generator(directory)
    (directory / CONFIG).write_text("{not json")
    with pytest.raises(UserError, match=f"cannot read {directory / CONFIG}"):
        load_generator(directory)
    (directory / WEIGHTS).unlink()
    (directory / CONFIG).unlink()
    with pytest.raises(UserError, match="not a pgan export directory .no config.json."):
        load_generator(directory)


@pytest.mark.parametrize("bad", ["dir", "ckpt"])
@pytest.mark.subprocess
def test_pgan_export_of_a_bad_source_exits_2_with_one_line(tmp_path: Path, bad: str) -> None:
    source = tmp_path / ("empty" if bad == "dir" else "other.pt")
    if bad == "dir":
        source.mkdir()
    else:
        torch.save({"G": {}}, source)  # a torch file, not a pgan checkpoint
    result = _export(f"ckpt={source}", "out=x", cwd=tmp_path)
    expected = (
        f"error: {source}: not a pgan export directory (no config.json)"
        if bad == "dir"
        else f"error: not a pgan checkpoint: {source}"
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["atol=abc"], "atol must be a finite number > 0, got 'abc'"),
        (["format=onnx", "opset=abc"], "opset must be an integer >= 1, got 'abc'"),
        (["format=onnx", "opset=13"], "opset=13: torch.onnx's exporter writes opset 18 and newer"),
        (["out="], "out= is empty: name the export directory"),
    ],
)
def test_bad_export_settings_are_refused_before_anything_is_written(
    checkpoint: Path, tmp_path: Path, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atol=abc and opset=abc were tracebacks, opset=13 printed the converter's traceback and exported at 18 with
    exit 0, out= (empty) wrote into the current directory."""
    monkeypatch.chdir(tmp_path)
    out = [] if any(a.startswith("out=") for a in args) else [f"out={tmp_path / 'x'}"]
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        export(compose_config(f"ckpt={checkpoint}", *out, *args, config_name="export"))
    assert list(tmp_path.iterdir()) == []


def test_an_export_of_another_generator_into_the_same_folder_leaves_no_stale_weights(tmp_path: Path) -> None:
    """A 16 px safetensors export, then an 8 px ONNX one into the same folder: the 16 px weights went with the new
    config.json of 8 px, and every reader of the folder failed. The same generator's weights stay."""
    pytest.importorskip("onnxscript")
    G = _fading_generator()
    export_safetensors(G, 0.3, tmp_path / "x", source_info={"which": "G_ema", "stage": 1})
    export_safetensors(G, 0.3, tmp_path / "y", source_info={"which": "G_ema", "stage": 1})
    torch.manual_seed(1)
    other = tmp_path / "other"
    export_safetensors(Generator(8, **TINY_G).eval(), 1.0, other, source_info={"which": "G_ema", "stage": 0})
    for source, out in ((other, "x"), (tmp_path / "y", "y")):
        export(compose_config(f"ckpt={source}", f"out={tmp_path / out}", "format=onnx", config_name="export"))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [CONFIG, "generator.onnx"]
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == [CONFIG, "generator.onnx", WEIGHTS]
    # ... and a safetensors export drops an ONNX file its config.json no longer describes.
    export(compose_config(f"ckpt={other}", f"out={tmp_path / 'y'}", config_name="export"))
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == [CONFIG, WEIGHTS]
    assert load_generator(tmp_path / "y")[0].resolution == 8


def test_an_onnx_export_that_fails_its_check_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    G = _fading_generator()
    export_safetensors(G, 0.3, tmp_path / "x", source_info={"which": "G_ema", "stage": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    with pytest.raises(UserError, match="ONNX check failed"):
        export(
            compose_config(
                f"ckpt={tmp_path / 'x'}", f"out={tmp_path / 'x'}", "format=onnx", "atol=1e-30", config_name="export"
            )
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == before


def test_a_hub_repo_id_offline_and_not_cached_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # so that the repo id is not also a path here
    # Fast means: no look-up, no connection, no retry (not a number of seconds, which a busy machine can exceed).
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test allows no network access")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        load_generator("pgan-tests/no-such-generator")
    assert not attempts, f"the offline look-up tried the network: {attempts}"
    assert time.monotonic() - start < WAIT_TIMEOUT_S  # and no waiting on a time-out of its own
    assert str(info.value) == (
        "pgan-tests/no-such-generator: no such file or directory, and not in the Hugging Face Hub cache "
        "(HF_HUB_OFFLINE is set)"
    )


def test_a_hub_repo_id_without_huggingface_hub_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UserError, match=r"pip install 'pgan\[hub\]'"):
        load_generator("pgan-tests/no-such-generator")
    with pytest.raises(UserError, match="not found: no-such-thing .expected a checkpoint file"):
        load_generator("no-such-thing")  # not a repo id: not sent to the Hub at all
    with pytest.raises(UserError, match="checkpoint not found: /no/such.pt"):
        load_generator("/no/such.pt")
