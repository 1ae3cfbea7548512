"""pgan-demo: the app's grid is pgan-sample's grid; the real server, called through gradio_client; one-line errors."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import WAIT_TIMEOUT_S, compose_config
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from pgan.checkpoint import generator_from_checkpoint, load_checkpoint  # noqa: E402
from pgan.cli.demo import serve  # noqa: E402
from pgan.demo import grid_for  # noqa: E402
from pgan.errors import UserError  # noqa: E402

BIN = Path(sys.executable).parent
PGAN_DEMO, PGAN_SAMPLE = str(BIN / "pgan-demo"), str(BIN / "pgan-sample")
# Nothing may reach the network: gradio's telemetry and version check, huggingface_hub's telemetry.
OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture
def checkpoint(tiny_checkpoint_8px: Path) -> Path:
    """A tiny 8 px generator, trained for a few steps (the session's)."""
    return tiny_checkpoint_8px


def _pixels(path_or_image: Path | str | Image.Image) -> np.ndarray:
    if isinstance(path_or_image, Image.Image):
        return np.asarray(path_or_image.convert("RGB"))
    with Image.open(path_or_image) as image:
        return np.asarray(image.convert("RGB"))


def _pgan_sample_grid(checkpoint: Path, out: Path, *args: str) -> np.ndarray:
    result = subprocess.run(
        [PGAN_SAMPLE, f"ckpt={checkpoint}", "device=cpu", f"out={out}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return _pixels(out)


def _grid_size(n: int, resolution: int, padding: int = 2) -> tuple[int, int]:
    """(width, height) of make_grid's layout: about sqrt(n) per row, `padding` px around every image (one
    image: no padding)."""
    if n == 1:
        return resolution, resolution
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * resolution + (cols + 1) * padding, rows * resolution + (rows + 1) * padding


@pytest.mark.subprocess
def test_the_apps_grid_is_pgan_samples_grid(checkpoint: Path, tmp_path: Path) -> None:
    G, alpha = generator_from_checkpoint(load_checkpoint(checkpoint))
    grid = grid_for(G, alpha, seed=3, n=5, psi=0.7)
    assert grid.mode == "RGB" and grid.size == _grid_size(5, 8)
    expected = _pgan_sample_grid(checkpoint, tmp_path / "grid.png", "seed=3", "n=5", "psi=0.7")
    assert np.array_equal(_pixels(grid), expected)  # the same latents, layout and rounding
    # psi 0 is the app's "off": pgan-sample's psi=null.
    assert np.array_equal(_pixels(grid_for(G, alpha, 3, 5, 0.0)), _pixels(grid_for(G, alpha, 3, 5, None)))
    assert not np.array_equal(_pixels(grid_for(G, alpha, 3, 5, 0.0)), expected)
    # Image 0 of a seed is the same whatever n is, with and without truncation (the top-left tile, inside
    # the padding; a grid of one image has none).
    for psi in (0.0, 0.7):
        one, five = _pixels(grid_for(G, alpha, 3, 1, psi)), _pixels(grid_for(G, alpha, 3, 5, psi))
        assert one.shape == (8, 8, 3) and np.array_equal(one, five[2:10, 2:10])


def _wait_for_url(proc: subprocess.Popen, stdout: Path, stderr: Path) -> str:
    deadline = time.monotonic() + WAIT_TIMEOUT_S  # importing torch + gradio on a busy 2-core machine
    while time.monotonic() < deadline:
        match = re.search(r"serving .* on (http://\S+)", stdout.read_text())
        if match:
            return match.group(1)
        if proc.poll() is not None:
            pytest.fail(f"pgan-demo exited with {proc.returncode}: {stderr.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"pgan-demo printed no URL within {WAIT_TIMEOUT_S} s: {stderr.read_text()}")


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses (dotted) with a socket listening on `port`, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture(scope="module")
def server(tiny_checkpoint_8px: Path, tmp_path_factory) -> Iterator[str]:
    """A real `pgan-demo` on a free port of 127.0.0.1 (port=0): its URL. Killed however the tests end."""
    logs = tmp_path_factory.mktemp("server")
    env = {**os.environ, **OFFLINE, "GRADIO_TEMP_DIR": str(logs / "gradio")}
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(
            [PGAN_DEMO, f"ckpt={tiny_checkpoint_8px}", "port=0", "device=cpu", "max_images=16"],
            stdout=out,
            stderr=err,
            env=env,
            cwd=logs,
        )
    try:
        yield _wait_for_url(proc, stdout, stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def client(server: str, tmp_path: Path) -> Iterator[gradio_client.Client]:
    """A gradio_client on the server, telemetry off (Client's own flag is or-ed with the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        client = gradio_client.Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    try:
        yield client
    finally:
        client.close()


@pytest.mark.server
def test_the_server_answers_through_gradio_client(server: str, client, checkpoint: Path) -> None:
    assert server.startswith("http://127.0.0.1:")  # the default host: this machine only
    port = int(re.search(r":(\d+)/?$", server).group(1))
    if Path("/proc/net/tcp").is_file():
        assert _listening_addresses(port) == {"127.0.0.1"}

    first = _pixels(client.predict(seed=1, n=4, psi=0.0, api_name="/generate"))
    assert (first.shape[1], first.shape[0]) == _grid_size(4, 8)  # 2 x 2 images of 8 px, 2 px padding
    assert not np.array_equal(first, _pixels(client.predict(seed=2, n=4, psi=0.0, api_name="/generate")))
    assert np.array_equal(first, _pixels(client.predict(seed=1, n=4, psi=0.0, api_name="/generate")))
    # The pixels of grid_for (pgan-sample's grid, see above): PNG, not gradio's default (lossy) WebP.
    G, alpha = generator_from_checkpoint(load_checkpoint(checkpoint))
    assert np.array_equal(first, _pixels(grid_for(G, alpha, 1, 4)))

    truncated = _pixels(client.predict(1, 4, 0.5, api_name="/generate"))  # positional: seed, n, psi
    assert truncated.shape == first.shape and not np.array_equal(truncated, first)
    with pytest.raises(Exception, match="maximum"):  # n beyond max_images=16: refused by the slider
        client.predict(1, 17, 0.0, api_name="/generate")


@pytest.mark.subprocess
def test_a_missing_checkpoint_is_one_line_before_gradio_is_imported(tmp_path: Path) -> None:
    # With gradio unimportable: an error about gradio instead would mean it was imported first.
    (tmp_path / "gradio").mkdir()
    (tmp_path / "gradio" / "__init__.py").write_text("raise ImportError('test stub')\n")
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [PGAN_DEMO, "ckpt=/no/such.pt"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: checkpoint not found: /no/such.pt"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "ckpt= is required"),
        (["which=D"], "which must be G_ema or G"),
        (["max_images=0"], "max_images must be an integer >= 1, got 0"),
        (["port=70000"], r"port must be an integer in 0..65535 \(0 or null: any free port\), got 70000"),
        # Tracebacks before (abc; 1.5: gradio's slider), or served on port 1 (port=1.5).
        (["max_images=abc"], "max_images must be an integer >= 1, got 'abc'"),
        (["max_images=1.5"], "max_images must be an integer >= 1, got 1.5"),
        (["port=abc"], "port must be an integer in 0..65535 .*, got 'abc'"),
        (["port=1.5"], "port must be an integer in 0..65535 .*, got 1.5"),
    ],
)
def test_bad_settings_are_user_errors(checkpoint: Path, args: list[str], message: str) -> None:
    ckpt = [f"ckpt={checkpoint}"] if args else []
    with pytest.raises(UserError, match=message):
        serve(compose_config(*ckpt, *args, config_name="demo"))


def test_without_gradio_a_hint_to_install_the_extra(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(UserError, match=re.escape("pgan-demo needs gradio: pip install 'pgan[demo]'")):
        serve(compose_config(f"ckpt={checkpoint}", "device=cpu", config_name="demo"))


def test_a_port_in_use_is_a_user_error(checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}: the port is in use"):
            serve(compose_config(f"ckpt={checkpoint}", "device=cpu", f"port={port}", config_name="demo"))
