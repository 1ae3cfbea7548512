"""FolderDataset on a hostile folder: every bad file skipped and counted, every odd one converted by its rule."""

import io
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pgan.data.folder as folder
import pgan.data.scan as scan
from pgan.data import FolderDataset, make_dataset
from pgan.data.folder import CONVERSION_RULES, SKIP_REASONS, forget_scans
from pgan.errors import UserError

RED, BLUE = (255, 0, 0), (0, 0, 255)
RES = 16  # the target resolution of most tests: 32 px images are kept, the 8 px one is too small


def _bypasses_permissions() -> bool:
    """Whether this process reads a chmod 000 file anyway (root, or CAP_DAC_OVERRIDE): then it is not unreadable."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return False
        return True


BYPASSES_PERMISSIONS = _bypasses_permissions()


@pytest.fixture(autouse=True)
def fresh_memo():
    """Each test starts without scans remembered by earlier tests (the memo is per process)."""
    forget_scans()
    yield
    forget_scans()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB noise image: it compresses badly, so half of its file is surely missing pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    """`image` encoded as `fmt`, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def two_colour_palette(transparent: bool) -> Image.Image:
    """A 32 px P image: left half palette index 0 (red), right half index 1 (blue)."""
    image = Image.new("P", (32, 32), 1)
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, 16, 32))
    if transparent:
        image.info["transparency"] = 0  # saved as a tRNS chunk: index 0 fully transparent
    return image


def red_top_blue_bottom() -> Image.Image:
    """A 32 px RGB image, red above blue."""
    image = Image.new("RGB", (32, 32), RED)
    image.paste(BLUE, (0, 16, 32, 32))
    return image


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A folder with every kind of hostile file the issue lists, next to five good images."""
    root = tmp_path / "data"
    for sub in ("good", "bad", "modes", "loop"):
        (root / sub).mkdir(parents=True)
    # good: five plain RGB images in five formats
    for ext in ("jpg", "png", "tif", "webp", "bmp"):
        noise((32, 32), seed=len(ext)).save(root / "good" / f"rgb.{ext}")
    # bad: skipped, each for its reason
    (root / "bad" / "truncated.jpg").write_bytes((data := encoded(noise((64, 64)), "JPEG"))[: len(data) // 2])
    (root / "bad" / "truncated.png").write_bytes((data := encoded(noise((64, 64)), "PNG"))[: len(data) // 2])
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "text.jpg").write_text("this is not a jpeg")
    (root / "bad" / "README.txt").write_text("a note, not an image")
    (root / "bad" / "dangling.png").symlink_to("nowhere.png")
    os.mkfifo(root / "bad" / "pipe.png")
    noise((32, 32)).save(root / "bad" / "locked.png")
    (root / "bad" / "locked.png").chmod(0)
    # modes: kept and converted (or too small)
    Image.new("RGB", (8, 8), RED).save(root / "modes" / "small.png")
    wide = Image.new("RGB", (48, 32), RED)
    wide.paste(BLUE, (8, 0, 40, 32))
    wide.save(root / "modes" / "wide.png")
    Image.new("L", (32, 32), 100).save(root / "modes" / "grey.png")
    two_colour_palette(transparent=False).save(root / "modes" / "palette.png")
    two_colour_palette(transparent=True).save(root / "modes" / "palette_t.png")
    # Transparent on the left over red RGB values: a composite shows white there, dropping alpha would show red.
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (16, 0, 32, 32))
    rgba.save(root / "modes" / "rgba.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(root / "modes" / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    red_top_blue_bottom().save(root / "modes" / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (32, 32), colour).convert("P") for colour in (BLUE, RED)]
    frames[0].save(root / "modes" / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "modes" / "cmyk.jpg")  # red
    # loop: a link back to the root (a loop) and, at the root, a second path to modes/ (a duplicate)
    (root / "loop" / "back").symlink_to("..")
    (root / "alias").symlink_to("modes")
    return root


def expected_counts() -> tuple[int, dict[str, int], dict[str, int]]:
    """Usable images, skips by reason and conversions by rule of `hostile` at RES px, 3 channels."""
    skipped = {
        "not_image": 1,
        "empty": 1,
        "corrupt": 3,
        "unreadable": 1 if BYPASSES_PERMISSIONS else 2,
        "not_a_file": 1,
        "symlink_loop": 1,
        "duplicate_dir": 1,
        "too_small": 1,
    }
    converted = {
        "first_frame": 1,
        "exif_rotated": 1,
        "16bit_scaled": 1,
        "palette": 3,
        "alpha_composited": 2,
        "cmyk": 1,
        "grayscale_to_rgb": 2,
        "cropped_non_square": 1,
    }
    return (15 if BYPASSES_PERMISSIONS else 14), skipped, converted


def item_of(dataset: FolderDataset, name: str) -> torch.Tensor:
    """The item of the file named `name`."""
    return dataset[[path.name for path in dataset.files].index(name)]


def test_hostile_folder_counts_every_reason_and_rule(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES)
    report = dataset.report
    usable, skipped, converted = expected_counts()
    assert len(dataset) == report.usable == usable
    assert {name: tally.count for name, tally in report.skipped.items()} == skipped
    assert {name: tally.count for name, tally in report.converted.items()} == converted
    assert report.converted_files == 9  # wide, grey, palette, palette_t, rgba, deep, rotated, anim, cmyk
    assert report.skipped["corrupt"].examples == ["bad/text.jpg", "bad/truncated.jpg", "bad/truncated.png"]
    assert report.skipped["symlink_loop"].examples == ["loop/back"]
    assert report.skipped["duplicate_dir"].examples == ["alias"]
    assert report.skipped["unreadable"].examples[0] == "bad/dangling.png"
    assert report.skipped["not_a_file"].examples == ["bad/pipe.png"]
    assert report.skipped["too_small"].examples == ["modes/small.png"]
    assert report.converted["grayscale_to_rgb"].examples == ["modes/deep.png", "modes/grey.png"]
    assert report.converted["alpha_composited"].examples == ["modes/palette_t.png", "modes/rgba.png"]
    assert set(report.skipped) <= set(SKIP_REASONS) and set(report.converted) <= set(CONVERSION_RULES)
    # The files kept, in sorted relative-path order, never through the loop or the duplicate.
    relative = [path.relative_to(hostile).as_posix() for path in dataset.files]
    assert relative == sorted(relative)
    assert [rel for rel in relative if rel.startswith("good/")] == [
        f"good/rgb.{e}" for e in ("bmp", "jpg", "png", "tif", "webp")
    ]
    assert not any(rel.startswith(("alias/", "loop/")) for rel in relative)


@pytest.mark.skipif(BYPASSES_PERMISSIONS, reason="root can read a chmod 000 file")
def test_unreadable_file_and_folder_are_counted(hostile: Path) -> None:
    (hostile / "closed").mkdir()
    noise((32, 32)).save(hostile / "closed" / "inside.png")
    (hostile / "closed").chmod(0)
    try:
        report = FolderDataset(hostile, RES).report
    finally:
        (hostile / "closed").chmod(0o755)
    assert report.skipped["unreadable"].examples == ["bad/dangling.png", "bad/locked.png", "closed"]


def test_report_lines_and_dict(hostile: Path) -> None:
    report = FolderDataset(hostile, RES).report
    lines = report.lines()
    usable, skipped, _ = expected_counts()
    assert lines[0].startswith(
        f"data: {usable} usable images at {RES} px under {hostile}; skipped {sum(skipped.values())} ("
    )
    assert "3 corrupt" in lines[0] and "converted 9 (" in lines[0] and "1 16bit_scaled" in lines[0]
    assert "  skipped 3 corrupt: e.g. bad/text.jpg, bad/truncated.jpg, bad/truncated.png" in lines
    assert "  converted 3 palette: e.g. modes/anim.gif, modes/palette.png, modes/palette_t.png" in lines
    assert all("\n" not in line for line in lines)
    data = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable as it is
    assert data["usable"] == usable and data["resolution"] == RES and data["root"] == str(hostile)
    assert data["skipped"]["empty"] == {"count": 1, "examples": ["bad/empty.png"]}
    assert data["converted"]["cmyk"] == {"count": 1, "examples": ["modes/cmyk.jpg"]}
    assert data["skipped_files"] == sum(skipped.values()) and data["converted_files"] == 9


def test_every_item_is_an_image_in_range(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item.shape == (3, RES, RES) and item.dtype == torch.float32
        assert item.min() >= -1.0 and item.max() <= 1.0


def test_alpha_is_composited_onto_white(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES)
    for name in ("rgba.png", "palette_t.png"):
        item = item_of(dataset, name)
        # Left (transparent, red underneath): white, not red. Right: opaque blue. Away from the LANCZOS seam.
        assert item[:, :, : RES // 2 - 2].min() > 0.99, name
        assert item[2, :, RES // 2 + 2 :].min() > 0.99 and item[0, :, RES // 2 + 2 :].max() < -0.99, name
    opaque = item_of(dataset, "palette.png")  # same palette, no transparency: red stays red
    assert opaque[0, :, : RES // 2 - 2].min() > 0.99 and opaque[1, :, : RES // 2 - 2].max() < -0.99


def test_16bit_is_scaled_by_its_full_range(hostile: Path) -> None:
    item = item_of(FolderDataset(hostile, RES), "deep.png")
    expected = round(40000 / 257) / 255 * 2 - 1  # 156/255 -> ~0.22; PIL's convert("L") would clip it to 1.0
    assert torch.allclose(item, torch.full_like(item, expected), atol=2 / 255)


def test_float_images_are_scaled_by_their_convention(tmp_path: Path) -> None:
    """A float TIFF in [0, 1] takes 1.0 as white (PIL's convert made it black); any other takes 255.0; NaN is black."""
    unit = np.full((32, 32), 0.5, np.float32)
    unit[:, :8] = np.nan
    wide = np.full((32, 32), 200.0, np.float32)
    wide[:, :8] = 1000.0  # clipped to white
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    dataset = FolderDataset(tmp_path, RES)
    assert dataset.report.converted["float_scaled"].count == 2 and "other_mode" not in dataset.report.converted
    # Away from the column where the NaN / clipped stripe meets the rest (LANCZOS mixes them there).
    for name, left, right in (("unit.tif", 0, 128), ("wide.tif", 255, 200)):
        item = (item_of(dataset, name) + 1) / 2 * 255
        assert torch.allclose(item[:, :, : RES // 4 - 1], torch.full_like(item[:, :, : RES // 4 - 1], left), atol=2)
        assert torch.allclose(item[:, :, RES // 4 + 1 :], torch.full_like(item[:, :, RES // 4 + 1 :], right), atol=2)


def test_grey_palette_cmyk_gif_are_converted(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES)
    grey = item_of(dataset, "grey.png")
    assert torch.allclose(grey, torch.full_like(grey, 100 / 255 * 2 - 1), atol=1e-6)  # luma repeated
    cmyk = item_of(dataset, "cmyk.jpg")
    assert cmyk[0].min() > 0.9 and cmyk[1:].max() < -0.9  # red
    anim = item_of(dataset, "anim.gif")
    assert anim[2].min() > 0.9 and anim[0].max() < -0.9  # the first frame (blue), not the second (red)
    wide = item_of(dataset, "wide.png")
    assert wide[0].max() < -0.99 and wide[2].min() > 0.99  # only the blue centre survives the crop


def test_exif_rotated_jpeg_is_upright(hostile: Path) -> None:
    item = item_of(FolderDataset(hostile, RES), "rotated.jpg")
    # Red on top, blue at the bottom as stored; orientation 6 turns it clockwise: blue left, red right.
    assert item[2, :, 0].min() > 0.8 and item[0, :, 0].max() < -0.8
    assert item[0, :, -1].min() > 0.8 and item[2, :, -1].max() < -0.8


def test_one_channel_counts_rgb_to_luma(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES, channels=1)
    converted = {name: tally.count for name, tally in dataset.report.converted.items()}
    assert "grayscale_to_rgb" not in converted
    assert converted["rgb_to_luma"] == len(dataset) - 2  # all but grey.png and deep.png
    deep = item_of(dataset, "deep.png")
    assert deep.shape == (1, RES, RES) and abs(deep.mean().item() - (156 / 255 * 2 - 1)) < 2 / 255
    rgba = item_of(dataset, "rgba.png")
    assert rgba[:, :, : RES // 2 - 2].min() > 0.99  # white, also as luma


def test_small_images_upscale_keeps_them(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES, small_images="upscale")
    usable, _, _ = expected_counts()
    assert len(dataset) == usable + 1 and "too_small" not in dataset.report.skipped
    assert dataset.report.converted["upscaled"].count == 1
    assert dataset.report.converted["upscaled"].examples == ["modes/small.png"]
    small = item_of(dataset, "small.png")
    assert small.shape == (3, RES, RES) and small[0].min() > 0.99 and small[1:].max() < -0.99
    # At a resolution it reaches, the small image is simply kept.
    assert "too_small" not in FolderDataset(hostile, 8).report.skipped


def test_small_images_from_the_config(hostile: Path) -> None:
    cfg = {"source": "folder", "path": str(hostile), "channels": 3, "small_images": "upscale"}
    assert "upscaled" in make_dataset(cfg, RES).report.converted
    with pytest.raises(UserError, match="small_images"):
        make_dataset({**cfg, "small_images": "stretch"}, RES)


def test_dataset_with_a_report_pickles(hostile: Path) -> None:
    dataset = FolderDataset(hostile, RES)
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[3], dataset[3]) and copy.report == dataset.report


def test_process_pool_scan_gives_the_same_report(hostile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = FolderDataset(hostile, RES).report.to_dict()
    forget_scans()
    monkeypatch.setattr(scan, "_POOL_MIN_FILES", 0)
    pooled = FolderDataset(hostile, RES, scan_workers=2).report.to_dict()
    assert pooled == serial


# ---------------------------------------------------------------- the scan is remembered


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """Three good images and a corrupt one."""
    root = tmp_path / "small"
    root.mkdir()
    for i in range(3):
        noise((16, 16), seed=i).save(root / f"{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_scan_cache_file_is_written_and_reused(small_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "run" / "scan.json"
    first = FolderDataset(small_folder, 8, scan_cache=cache).report
    assert (first.decoded, first.cached) == (4, 0)
    entries = json.loads(cache.read_text())["entries"]
    assert sorted(entries) == ["0.png", "1.png", "2.png", "broken.png"]
    # The next stage of the same process: remembered in memory, nothing decoded.
    second = FolderDataset(small_folder, 4, scan_cache=cache).report
    assert (second.decoded, second.cached) == (0, 4)
    # A resumed run (a fresh process): read back from the file, nothing decoded, same counts.
    forget_scans()
    resumed = FolderDataset(small_folder, 8, scan_cache=cache).report
    assert (resumed.decoded, resumed.cached) == (0, 4)
    assert resumed.skipped["corrupt"].examples == ["broken.png"] and resumed.usable == 3
    # Without the file the fresh process decodes everything again.
    forget_scans()
    assert FolderDataset(small_folder, 8).report.decoded == 4


def test_scan_cache_redecodes_only_changed_files(small_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    FolderDataset(small_folder, 8, scan_cache=cache)
    noise((16, 16), seed=9).save(small_folder / "0.png")  # same size, new pixels: the mtime tells
    stamp = (small_folder / "0.png").stat().st_mtime_ns + 10**9
    os.utime(small_folder / "0.png", ns=(stamp, stamp))
    noise((16, 16)).save(small_folder / "broken.png")  # repaired
    (small_folder / "1.png").unlink()
    forget_scans()
    report = FolderDataset(small_folder, 8, scan_cache=cache).report
    assert (report.decoded, report.cached, report.usable) == (2, 1, 3)
    assert sorted(json.loads(cache.read_text())["entries"]) == ["0.png", "2.png", "broken.png"]


def test_garbage_scan_cache_is_ignored_and_rewritten(small_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    cache.write_text("{ not json")
    assert FolderDataset(small_folder, 8, scan_cache=cache).report.decoded == 4
    assert json.loads(cache.read_text())["version"] == folder._CACHE_VERSION


def test_failed_dataset_writes_no_cache(small_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "run" / "scan.json"
    with pytest.raises(UserError):
        FolderDataset(small_folder, 8, min_images=8, scan_cache=cache)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a file that changes during training


def test_file_broken_after_the_scan_warns_and_gives_the_next(small_folder: Path, capsys) -> None:
    dataset = FolderDataset(small_folder, 8)
    expected = dataset[1]
    (small_folder / "0.png").write_bytes(b"overwritten mid-run")
    item = dataset[0]
    assert torch.equal(item, expected)
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1 and str(small_folder / "0.png") in warning
    with pytest.raises(UserError, match="0.png"):
        dataset.load(0)  # load() itself still says which file failed
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_last_file_broken_wraps_to_the_first(small_folder: Path) -> None:
    dataset = FolderDataset(small_folder, 8)
    (small_folder / "2.png").unlink()
    assert torch.equal(dataset[2], dataset[0])


# ---------------------------------------------------------------- folders that stop before training


def one_line_error(*args: object, **kwargs: object) -> str:
    """The message of the UserError FolderDataset(*args, **kwargs) raises; it must be one line."""
    with pytest.raises(UserError) as error:
        FolderDataset(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_path_and_file_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert one_line_error(missing, RES) == f"data.path does not exist: {missing}"
    file = tmp_path / "image.png"
    noise((32, 32)).save(file)
    assert str(file) in one_line_error(file, RES)


def test_empty_folder(tmp_path: Path) -> None:
    message = one_line_error(tmp_path, RES)
    assert message.startswith(f"no usable images under data.path {tmp_path}: no files")


def test_folder_of_only_bad_files_says_why(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("garbage")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "notes.txt").write_text("text")
    message = one_line_error(tmp_path, RES)
    assert message.startswith(f"no usable images under data.path {tmp_path}: 3 files, 2 corrupt, 1 not_image")


def test_folder_of_only_small_images_suggests_upscale(tmp_path: Path) -> None:
    noise((8, 8)).save(tmp_path / "tiny.png")
    message = one_line_error(tmp_path, RES)
    assert "1 too_small" in message and "data.small_images=upscale" in message


def test_fewer_images_than_min_images(hostile: Path, tmp_path: Path) -> None:
    usable, _, _ = expected_counts()
    message = one_line_error(hostile, RES, min_images=64)
    assert message.startswith(f"only {usable} usable images under data.path {hostile}, fewer than the 64 needed")
    assert "3 corrupt" in message
    cfg = {"source": "folder", "path": str(hostile), "channels": 3}
    with pytest.raises(UserError, match="fewer than the 64 needed"):
        make_dataset(cfg, RES, min_images=64)
    assert len(make_dataset(cfg, RES, min_images=usable)) == usable
