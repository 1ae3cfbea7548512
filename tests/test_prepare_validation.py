"""pgan-prepare checks every resolution before it writes anything: images too small for one resolution, a class
lost at one resolution, or too little disk space for all the stores end in one line, exit 2, and no store."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_config
from PIL import Image

from pgan.cli.prepare import prepare_all
from pgan.data import prepared as prepared_module
from pgan.data.prepared import CACHE_DIRNAME
from pgan.data.scan import forget_scans
from pgan.errors import UserError

PGAN_PREPARE = str(Path(sys.executable).with_name("pgan-prepare"))


def write_images(folder: Path, count: int, side: int) -> None:
    """`count` noise PNGs of `side` x `side` px in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(side)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def listing(root: Path) -> list[str]:
    """Every path under `root`, hidden ones included, relative and sorted."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def run_prepare(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([PGAN_PREPARE, "data=folder", *overrides], capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def _fresh_scans():
    """In-process scans are remembered per folder; each test starts without them."""
    forget_scans()
    yield
    forget_scans()


@pytest.mark.subprocess
def test_images_too_small_for_the_largest_resolution_write_nothing(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 5, 80)
    before = listing(tmp_path)
    result = run_prepare(f"data.path={tmp_path / 'images'}", "resolutions=[32,64,128]")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: 128 px: no usable images under data.path {tmp_path / 'images'}: ")
    assert "5 too_small" in lines[0] and "64 px keeps 5 images" in lines[0] and "nothing was prepared" in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "images" / CACHE_DIRNAME).exists()
    assert listing(tmp_path) == before


@pytest.mark.subprocess
def test_a_class_lost_at_one_resolution_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "classes"
    write_images(data / "big", 2, 140)
    write_images(data / "small", 2, 80)
    before = listing(tmp_path)
    result = run_prepare(f"data.path={data}", "resolutions=[32,128]", "model.conditional=true")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: model.conditional=true needs every class at every resolution, but at 128 px 1 of the 2 classes "
        "have no usable image (small: smaller than 128 px); data.small_images=upscale keeps them; nothing was prepared"
    )
    assert listing(tmp_path) == before
    # Unconditional, the same folder prepares: 4 images at 32 px, the 2 big ones at 128 px.
    assert run_prepare(f"data.path={data}", "resolutions=[32,128]").returncode == 0


def test_one_class_is_refused_for_a_conditional_model(tmp_path: Path) -> None:
    write_images(tmp_path / "classes" / "only", 2, 40)
    before = listing(tmp_path)
    result = run_prepare(f"data.path={tmp_path / 'classes'}", "resolutions=[32]", "model.conditional=true")
    assert result.returncode == 2 and result.stderr.startswith(
        "error: model.conditional=true needs at least two classes, and the data at 32 px has one ('only')"
    )
    assert listing(tmp_path) == before


def test_resolutions_are_checked_smallest_first_whatever_their_order(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 3, 40)
    cfg = compose_config(f"data.path={tmp_path / 'images'}", "resolutions=[64,16,32]", config_name="prepare")
    with pytest.raises(UserError, match=r"^64 px: no usable images .* 32 px keeps 3 images; nothing was prepared$"):
        prepare_all(cfg)
    assert not (tmp_path / "images" / CACHE_DIRNAME).exists()


def test_too_little_space_for_all_the_stores_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_images(tmp_path / "images", 4, 32)
    cache = tmp_path / "cache"
    cfg = compose_config(
        f"data.path={tmp_path / 'images'}", f"data.cache_dir={cache}", "resolutions=[16,32]", config_name="prepare"
    )
    usage = prepared_module.shutil.disk_usage(tmp_path)
    # Room for the 32 px store alone (4 x 32 x 32 x 3 bytes), not for both.
    monkeypatch.setattr(prepared_module.shutil, "disk_usage", lambda _path: usage._replace(free=4 * 32 * 32 * 3))
    with pytest.raises(UserError, match=r"not enough space for the prepared folder at 16 px .* and folder at 32 px"):
        prepare_all(cfg)
    assert not cache.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resolutions=8", "resolutions must be a list of resolutions in px, e.g. [32,64], got 8"),
        ("resolutions=null", "resolutions must be a list of resolutions in px, e.g. [32,64], got None"),
        ("resolutions=[8.5]", "each of resolutions must be an integer, got 8.5"),
        ("force=maybe", "force must be true or false, got 'maybe'"),
        ("model.conditional=maybe", "model.conditional must be true or false, got 'maybe'"),
        ("workers=-1", "workers must be an integer >= 0, got -1"),
        ("workers=abc", "workers must be an integer >= 0, got 'abc'"),
    ],
)
def test_settings_that_were_tracebacks_or_truthy_strings_are_refused(tmp_path: Path, override: str, message: str):
    """resolutions=8 was a traceback, force=maybe rebuilt the stores, workers=-1 ran: now one line each, and
    nothing is written."""
    write_images(tmp_path / "images", 4, 16)
    cfg = compose_config("data=folder", f"data.path={tmp_path / 'images'}", override, config_name="prepare")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        prepare_all(cfg)
    assert listing(tmp_path / "images") == [f"{i}.png" for i in range(4)]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_cache_dir_on_a_file_system_that_stores_nothing_is_named(tmp_path: Path) -> None:
    """data.cache_dir=/proc/x said "it needs 0 MiB, 0 MiB are free"."""
    write_images(tmp_path / "images", 4, 16)
    cfg = compose_config(
        "data=folder",
        f"data.path={tmp_path / 'images'}",
        "data.cache_dir=/proc/pgan-x",
        "resolutions=[8]",
        config_name="prepare",
    )
    with pytest.raises(UserError, match=r"^cannot keep the prepared stores in /proc/pgan-x.*: its file system stores"):
        prepare_all(cfg)
