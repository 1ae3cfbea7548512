"""Prepared stores (pgan.data.prepared): the same images as the source, made once, remade when stale or damaged,
never half-used; the loader's uint8 fast path; training on a store; pgan-prepare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_state, compose_config
from PIL import Image

from pgan.checkpoint import load_checkpoint
from pgan.data import FolderDataset, InfiniteSampler, PreparedImages, ShapesDataset, make_dataset, wants_prepared
from pgan.data import prepared as prepared_module
from pgan.data.prepared import CACHE_DIRNAME, prepare, signed_to_uint8, uint8_to_signed
from pgan.errors import UserError
from pgan.train.feed import make_loader, to_device_images
from pgan.train.loop import train

PGAN_PREPARE = str(Path(sys.executable).with_name("pgan-prepare"))
CPU = torch.device("cpu")


def shapes_cfg(cache: Path, **extra) -> dict:
    return {"source": "shapes", "size": 96, "seed": 3, "channels": 3, "cache_dir": str(cache), **extra}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Twelve differently coloured 24 x 20 px PNGs (non-square: cropped and resized by the folder rules)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_uint8_round_trip_is_exact() -> None:
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(signed_to_uint8(uint8_to_signed(levels)), levels)
    assert uint8_to_signed(levels)[[0, -1]].tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("channels", [1, 3])
def test_prepared_items_and_batches_equal_the_source_bit_for_bit(tmp_path: Path, channels: int) -> None:
    cfg = shapes_cfg(tmp_path, channels=channels)
    source = make_dataset(cfg, 16)
    store = make_dataset(cfg, 16, prepared=True)
    assert isinstance(store, PreparedImages) and store.info["built"] and len(store) == len(source)
    for i in (0, 1, 50, 95):
        assert torch.equal(store[i], source[i]), i
    assert torch.equal(store[-1], store[95])
    # Through the training loader: the same batches, in the same order, as float NCHW channels_last.
    plain = make_loader(source, InfiniteSampler(len(source), seed=7, start=40), 8, 0, CPU, worker_seed=0)
    fast = make_loader(store, InfiniteSampler(len(store), seed=7, start=40), 8, 0, CPU, worker_seed=0)
    for _ in range(14):  # across an epoch boundary (96 items)
        raw = next(fast)
        assert raw.dtype == torch.uint8 and raw.shape == (8, 16, 16, channels)
        images = to_device_images(raw, CPU)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, to_device_images(next(plain), CPU))


def test_a_store_is_made_once_and_reused(tmp_path: Path) -> None:
    cfg = shapes_cfg(tmp_path)
    first = make_dataset(cfg, 8, prepared=True)
    stamp = Path(first.info["path"]).stat().st_mtime_ns
    again = make_dataset(cfg, 8, prepared=True)
    assert not again.info["built"] and again.info["path"] == first.info["path"]
    assert Path(again.info["path"]).stat().st_mtime_ns == stamp
    # Loader settings do not change the pixels; the data settings and the resolution do.
    assert not make_dataset({**cfg, "num_workers": 3}, 8, prepared=True).info["built"]
    other = make_dataset({**cfg, "seed": 4}, 8, prepared=True)
    assert other.info["built"] and other.info["path"] != first.info["path"]
    assert make_dataset(cfg, 16, prepared=True).info["path"] != first.info["path"]
    meta = json.loads(Path(first.info["path"]).with_suffix(".json").read_text())
    assert meta["shape"] == [96, 8, 8, 3]


def test_folder_store_lives_next_to_the_data_and_is_not_scanned_as_data(image_folder: Path) -> None:
    cfg = {"source": "folder", "path": str(image_folder), "channels": 3}
    store = make_dataset(cfg, 16, prepared=True)
    assert Path(store.info["path"]).parent == image_folder / CACHE_DIRNAME
    # The report travels with the store, and a new scan does not count the store's files.
    assert store.report is not None and store.report.usable == 12
    rescanned = FolderDataset(image_folder, 16)
    assert rescanned.report.files == 12 and not rescanned.report.skipped
    assert torch.equal(store[5], rescanned[5])


def test_a_changed_file_makes_a_new_store(image_folder: Path) -> None:
    cfg = {"source": "folder", "path": str(image_folder), "channels": 3}
    before = make_dataset(cfg, 16, prepared=True)
    Image.new("RGB", (24, 20), (255, 0, 0)).save(image_folder / "03.png")
    os.utime(image_folder / "03.png", ns=(1, 1))  # a new mtime whatever the clock's resolution
    after = make_dataset(cfg, 16, prepared=True)
    assert after.info["built"] and after.info["path"] != before.info["path"]
    assert torch.equal(after[3], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))


def test_a_damaged_store_is_reported_and_made_again(tmp_path: Path, capsys) -> None:
    cfg = shapes_cfg(tmp_path)
    store = make_dataset(cfg, 8, prepared=True)
    path = Path(store.info["path"])
    expected = store[10].clone()
    del store
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    again = make_dataset(cfg, 8, prepared=True)
    assert again.info["built"] and "is damaged" in capsys.readouterr().err
    assert torch.equal(again[10], expected)


class _FailsAt(ShapesDataset):
    """Shapes whose item `fail_at` raises, like a file that disappears mid-preparation."""

    fail_at = 70

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.fail_at:
            raise RuntimeError("the renderer failed")
        return super().__getitem__(index)


def test_an_interrupted_preparation_leaves_nothing_that_is_used(tmp_path: Path) -> None:
    cfg = shapes_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="the renderer failed"):
        prepare(cfg, 8, _FailsAt(8, size=96, seed=3), workers=0)
    assert list(tmp_path.iterdir()) == []  # no temporary file, no description, no array
    assert make_dataset(cfg, 8, prepared=True).info["built"]


def test_not_enough_disk_space_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    usage = prepared_module.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(prepared_module.shutil, "disk_usage", lambda _path: usage._replace(free=1000))
    with pytest.raises(UserError, match=r"not enough space .* needs 0 MiB, 0 MiB are free; set data.cache_dir"):
        make_dataset(shapes_cfg(tmp_path), 8, prepared=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "device", "num_images", "expected"),
    [
        ({"source": "folder"}, "cpu", 10, True),
        ({"source": "torchvision"}, "cpu", None, True),
        ({"source": "shapes"}, "cpu", None, False),
        ({"source": "digits"}, "cuda", None, True),
        # On CUDA a procedural source is prepared when the stage reads all its items (a store costs a full pass).
        ({"source": "shapes", "size": 50000}, "cuda", 2048, False),
        ({"source": "digits", "size": 1797}, "cuda", 2048, True),
        ({"source": "shapes", "prepare": True}, "cpu", 1, True),
        ({"source": "folder", "prepare": False}, "cuda", None, False),
    ],
)
def test_when_training_reads_a_store(data: dict, device: str, num_images: int | None, expected: bool) -> None:
    assert wants_prepared(data, torch.device(device), num_images) is expected


def test_a_bad_prepare_setting_is_a_user_error() -> None:
    with pytest.raises(UserError, match="data.prepare must be auto, true or false, got 'sometimes'"):
        wants_prepared({"source": "shapes", "prepare": "sometimes"}, CPU)


def test_training_on_a_store_equals_training_on_the_fly(tmp_path: Path, capsys) -> None:
    """Same images, same order: the final weights are bit-identical, and the run says which store it read."""
    cache = tmp_path / "cache"
    on_the_fly = train(compose_config(*TINY, "data.size=64", "data.prepare=false"), tmp_path / "a")
    from_store = train(
        compose_config(*TINY, "data.size=64", "data.prepare=true", f"data.cache_dir={cache}"), tmp_path / "b"
    )
    assert_same_state(load_checkpoint(on_the_fly), load_checkpoint(from_store))
    out = capsys.readouterr().out
    assert "data at 8 px: " in out and "data at 16 px: " in out and "MiB, prepared in" in out
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".json", ".npy", ".npy"]


@pytest.mark.subprocess
def test_pgan_prepare_makes_every_resolution_then_finds_them_up_to_date(image_folder: Path) -> None:
    args = [PGAN_PREPARE, "data=folder", f"data.path={image_folder}", "resolutions=[8,16]"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("8 px: 12 images") and "prepared in" in lines[0]
    assert lines[1].startswith("16 px: 12 images")
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert second.stdout.count("already up to date") == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.path={missing}", "error: data.path does not exist: "),
        ("resolutions=[12]", "error: resolutions: resolution must be a power of two"),
    ],
)
@pytest.mark.subprocess
def test_pgan_prepare_user_errors_are_one_line(tmp_path: Path, image_folder: Path, override: str, message: str) -> None:
    args = [PGAN_PREPARE, "data=folder", f"data.path={image_folder}", override.format(missing=tmp_path / "nope")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1
