"""pgan-sample: seeded latents (stable prefixes, truncation), slerp, the CLI's grid, PNGs and walks, and the
run time-lapse as a GIF and an MP4."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import TINY, compose_config
from PIL import Image

from pgan.cli.sample import overrides_of, sample, timelapse
from pgan.errors import UserError
from pgan.sample import HOLD_LAST, mp4_codec, run_frames, save_timelapse, seeded_latents, slerp, timelapse_images
from pgan.schedule import stages_from_config
from pgan.train.loop import train

PGAN_SAMPLE = str(Path(sys.executable).with_name("pgan-sample"))


def test_the_first_images_of_a_seed_do_not_depend_on_n() -> None:
    assert torch.equal(seeded_latents(7, 3, 16), seeded_latents(7, 10, 16)[:3])
    assert not torch.equal(seeded_latents(7, 3, 16), seeded_latents(8, 3, 16))


def test_truncation_bounds_the_latents_and_is_deterministic() -> None:
    z = seeded_latents(1, 4096, 32, psi=0.5)
    assert z.abs().max() <= 0.5 and torch.equal(z, seeded_latents(1, 4096, 32, psi=0.5))
    # image i of a seed does not depend on n, with truncation too (each component is mapped on its own)
    assert torch.equal(seeded_latents(1, 3, 32, psi=0.5), z[:3])
    untouched = seeded_latents(1, 4096, 32)
    assert torch.equal(z.argsort(0), untouched.argsort(0))  # monotone: the order of the components is kept
    # the truncated normal's variance: 1 - 2 psi phi(psi) / (2 Phi(psi) - 1) = 0.0804 for psi = 0.5
    assert z.var().item() == pytest.approx(0.0804, rel=0.03)
    assert torch.allclose(seeded_latents(1, 8, 32, psi=40.0), untouched[:8])  # a huge psi truncates nothing
    assert seeded_latents(1, 2, 8, psi=1e-6).abs().max() <= 1e-6  # any psi > 0 works
    with pytest.raises(ValueError, match="psi must be > 0"):
        seeded_latents(1, 4, 8, psi=0)


def test_slerp_follows_the_great_circle_between_its_ends() -> None:
    a, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    path = slerp(a, b, torch.linspace(0, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), torch.linspace(float(a.norm()), float(b.norm()), 5, dtype=a.dtype))
    units = path / path.norm(dim=1, keepdim=True)
    angles = torch.arccos((units[:-1] * units[1:]).sum(dim=1).clamp(-1, 1))
    torch.testing.assert_close(angles, angles[0].expand(4))  # equal angular steps
    total = torch.arccos((a / a.norm() * b / b.norm()).sum())
    torch.testing.assert_close(angles.sum(), total)  # on the great circle, not a shortcut


@pytest.fixture
def checkpoint(tiny_checkpoint_8px: Path) -> Path:
    """A tiny 8 px generator, trained for a few steps (the session's)."""
    return tiny_checkpoint_8px


def _sample(checkpoint: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (exit codes, stdout, stderr)."""
    return subprocess.run(
        [PGAN_SAMPLE, f"ckpt={checkpoint}", "device=cpu", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _sample_here(checkpoint: Path, *args: str, cwd: Path) -> list[Path]:
    """What the CLI does, in this process (no interpreter start-up); relative out= paths are under `cwd`."""
    args = tuple(f"out={cwd / a[4:]}" + ("/" if a.endswith("/") else "") if a.startswith("out=") else a for a in args)
    return sample(compose_config(f"ckpt={checkpoint}", "device=cpu", *args, config_name="sample"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.subprocess
def test_a_grid_for_a_seed_and_a_count(checkpoint: Path, tmp_path: Path) -> None:
    result = _sample(checkpoint, "seed=3", "n=5", "out=a.png", cwd=tmp_path)  # the CLI itself, once
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "a.png"
    for name, seed in (("b.png", 3), ("c.png", 4)):
        assert _sample_here(checkpoint, f"seed={seed}", "n=5", f"out={name}", cwd=tmp_path) == [tmp_path / name]
    side = math.ceil(math.sqrt(5))  # 3 per row, 2 rows of 8 px with 2 px padding
    assert Image.open(tmp_path / "a.png").size == (side * 8 + (side + 1) * 2, 2 * 8 + 3 * 2)
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))  # the same seed
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))


def test_one_png_per_image_and_the_same_first_images_for_any_n(checkpoint: Path, tmp_path: Path) -> None:
    _sample_here(checkpoint, "seed=3", "n=4", "out=four/", cwd=tmp_path)
    _sample_here(checkpoint, "seed=3", "n=2", "out=two/", cwd=tmp_path)
    four = sorted((tmp_path / "four").iterdir())
    assert [p.name for p in four] == [f"seed3-000{i}.png" for i in range(4)]
    assert Image.open(four[0]).size == (8, 8)
    for i in range(2):
        assert np.array_equal(_pixels(four[i]), _pixels(tmp_path / "two" / f"seed3-000{i}.png"))


def test_a_latent_walk_as_a_strip_and_as_a_looping_gif(checkpoint: Path, tmp_path: Path) -> None:
    _sample_here(checkpoint, "seed=0", "to_seed=1", "steps=5", "out=walk.gif", cwd=tmp_path)
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (8, 8)  # 5 there, 3 back
    _sample_here(checkpoint, "seed=0", "to_seed=1", "steps=5", "out=walk.png", cwd=tmp_path)
    strip = _pixels(tmp_path / "walk.png")
    assert strip.shape[:2] == (8 + 2 * 2, 5 * 8 + 6 * 2)
    # Its ends are image 0 of each seed.
    _sample_here(checkpoint, "seed=1", "n=1", "out=end/", cwd=tmp_path)
    assert np.array_equal(strip[2:10, -10:-2], _pixels(tmp_path / "end" / "seed1-0000.png"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["out=x.png", "ckpt=/no/such.pt"], "error: checkpoint not found: /no/such.pt", marks=pytest.mark.subprocess
        ),
        (["out=x.jpg"], "error: out=x.jpg: expected FILE.png (a grid) or DIR/"),
        (["out=x.png", "psi=-1"], "error: psi must be a finite number > 0 (or null for no truncation), got -1"),
        (["out=x.png", "psi=abc"], "error: psi must be a finite number > 0 (or null for no truncation), got 'abc'"),
        (["out=x.png", "which=D"], "error: which must be G_ema or G"),
        (["n=0", "out=x.png"], "error: n must be an integer >= 1, got 0"),
        # Values that were tracebacks (n=abc) or quietly ran (nrow=0 drew one row, frame_ms=-5 wrote a GIF).
        (["n=abc", "out=x.png"], "error: n must be an integer >= 1, got 'abc'"),
        (["seed=abc", "out=x.png"], "error: seed must be an integer, got 'abc'"),
        (["nrow=0", "out=x.png"], "error: nrow must be an integer >= 1, got 0"),
        (["nrow=-2", "out=x.png"], "error: nrow must be an integer >= 1, got -2"),
        (["to_seed=3", "steps=1", "out=x.gif"], "error: steps must be an integer >= 2, got 1"),
        (["to_seed=x", "out=x.gif"], "error: to_seed must be an integer, got 'x'"),
        (["to_seed=3", "frame_ms=-5", "out=x.gif"], "error: frame_ms must be an integer >= 1, got -5"),
    ],
)
def test_user_errors_are_one_line(checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    if args[-1].startswith("ckpt="):  # through the CLI once: exit code 2 and one line on stderr
        result = _sample(checkpoint, *args, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1
    else:
        with pytest.raises(UserError, match=re.escape(message.removeprefix("error: "))):
            sample(compose_config(f"ckpt={checkpoint}", *args, config_name="sample"))


def test_an_export_of_g_samples_without_naming_it(checkpoint: Path, tmp_path: Path) -> None:
    """An export holds one generator: which= unset takes it (with the old default which=G_ema, an export of G
    was refused by pgan-sample and pgan-demo, and accepted by pgan-eval); naming the other one is an error."""
    from pgan.export import export_safetensors, load_generator

    G, alpha = load_generator(checkpoint, "G")
    export_safetensors(G, alpha, tmp_path / "g", source_info={"which": "G", "stage": 0})
    assert sample(compose_config(f"ckpt={tmp_path / 'g'}", f"out={tmp_path / 'x.png'}", config_name="sample"))
    with pytest.raises(UserError, match="holds G, not G_ema"):
        sample(
            compose_config(f"ckpt={tmp_path / 'g'}", f"out={tmp_path / 'y.png'}", "which=G_ema", config_name="sample")
        )


def test_ckpt_is_required(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^ckpt= is required"):
        sample(compose_config(f"out={tmp_path / 'x.png'}", config_name="sample"))


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory) -> Path:
    """The tiny 8 -> 16 px run, with a sample grid every 64 images (some of them mid-fade)."""
    run_dir = tmp_path_factory.mktemp("timelapse") / "run"
    train(compose_config(*TINY, "diversity.enabled=false"), run_dir)
    return run_dir


def test_the_frames_follow_the_run_with_resolution_and_alpha(two_stage_run: Path) -> None:
    frames = run_frames(two_stage_run, stages_from_config(compose_config(*TINY)))
    assert len(frames) == len(list((two_stage_run / "samples").glob("*.png")))
    assert [f.kimg for f in frames] == sorted(f.kimg for f in frames)
    assert {f.resolution for f in frames[:1]} == {8} and frames[-1].resolution == 16
    fading = [f.alpha for f in frames if f.resolution == 16]
    assert fading == sorted(fading) and 0 < fading[0] < 1 and fading[-1] == 1.0
    assert frames[-1].caption == f"{frames[-1].kimg:.3f} kimg   16 px   alpha 1.00"


@pytest.mark.subprocess
def test_pgan_sample_timelapse_writes_one_captioned_frame_per_grid(two_stage_run: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [PGAN_SAMPLE, "timelapse", f"run={two_stage_run}", "out=progress.gif"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    grids = sorted((two_stage_run / "samples").glob("*.png"))
    with Image.open(grids[-1]) as last:
        width, height = last.size
    with Image.open(tmp_path / "progress.gif") as gif:
        assert gif.n_frames == len(grids)
        assert gif.size == (width, height + 14)  # the last grid's size, plus the caption bar
        gif.seek(0)
        caption = np.asarray(gif.convert("RGB"))[:14]
        assert caption.max() > 200  # white caption text on the black bar (GIF palettes round it)


@pytest.mark.parametrize(
    "args",
    [
        ["timelapse", "run=r", "out=t.gif"],
        ["device=cpu", "timelapse", "run=r", "out=t.gif"],
        ["run=r", "out=t.gif", "timelapse"],
    ],
)
def test_the_timelapse_subcommand_may_stand_anywhere(args: list[str]) -> None:
    assert overrides_of(args) == ["mode=timelapse", *(a for a in args if a != "timelapse")]
    assert overrides_of(["ckpt=x.pt", "out=g.png"]) == ["ckpt=x.pt", "out=g.png"]


def test_timelapse_of_something_else_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(f"run={tmp_path}: not a pgan run directory (no config.yaml)")):
        timelapse(_timelapse_cfg(tmp_path, tmp_path / "x.gif"))


def _timelapse_cfg(run: Path, out: Path, *overrides: str):
    return compose_config("mode=timelapse", f"run={run}", f"out={out}", *overrides, config_name="sample")


def test_the_mp4_time_lapse_decodes_to_every_grid_then_the_held_last_one(two_stage_run: Path, tmp_path: Path) -> None:
    av = pytest.importorskip("av")  # the `video` extra (in `dev`)
    cfg = _timelapse_cfg(two_stage_run, tmp_path / "progress.mp4")
    assert timelapse(cfg) == [tmp_path / "progress.mp4"]
    expected = timelapse_images(run_frames(two_stage_run, stages_from_config(compose_config(*TINY))))
    assert len(expected) == len(list((two_stage_run / "samples").glob("*.png")))
    width, height = expected[0].size
    assert width % 2 == 0 and height % 2 == 0  # the tiny run's frames need no padding (see the odd-size test)
    props = iio.improps(tmp_path / "progress.mp4", plugin="pyav")
    video = iio.imread(tmp_path / "progress.mp4", plugin="pyav")
    # one frame per grid, then the last one HOLD_LAST - 1 more times (the GIF holds it with a longer duration;
    # both last (grids + HOLD_LAST - 1) * frame_ms)
    assert video.shape == props.shape == (len(expected) + HOLD_LAST - 1, height, width, 3)
    meta = iio.immeta(tmp_path / "progress.mp4", plugin="pyav")
    assert meta["fps"] == pytest.approx(1000 / cfg.frame_ms)
    assert meta["codec"] == {"libx264": "h264", "mpeg4": "mpeg4"}[mp4_codec()]  # h264 with PyAV's wheels
    with av.open(str(tmp_path / "progress.mp4")) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"  # what ordinary players decode
    # H.264 is lossy and yuv420p keeps colour at half resolution (the tiny run's noisy 8 px faces lose ~12 of
    # 255 in RGB to that alone), so compare brightness (BT.601 luma, which yuv420p keeps at full resolution):
    # ~5 of 255 off its own grid here (~2 on a real 1 kpx run), ~65 off the last one.
    video_luma, first, last = _luma(video), _luma(expected[0]), _luma(expected[-1])
    assert np.abs(video_luma[0] - first).mean() < 8 < np.abs(video_luma[0] - last).mean()
    assert all(np.abs(frame - last).mean() < 8 for frame in video_luma[-HOLD_LAST:])


def _luma(pixels) -> np.ndarray:
    return np.asarray(pixels, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def test_an_mp4_of_odd_sized_frames_is_padded_to_even(tmp_path: Path) -> None:
    pytest.importorskip("av")
    images = [Image.new("RGB", (21, 15), (255 * i // 2, 0, 0)) for i in range(3)]
    save_timelapse(images, tmp_path / "odd.mp4", frame_ms=50)
    video = iio.imread(tmp_path / "odd.mp4", plugin="pyav")
    assert video.shape == (3 + HOLD_LAST - 1, 16, 22, 3)  # a black row and column added, not rescaled
    assert video[-1, :15, :21, 0].mean() > 200 and video[-1, 15:, :, :].mean() < 30


def test_mp4_without_pyav_is_a_one_line_error(two_stage_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` sees when the video extra is not installed
    with pytest.raises(UserError) as caught:
        timelapse(_timelapse_cfg(two_stage_run, tmp_path / "progress.mp4"))
    assert str(caught.value) == "MP4 output needs PyAV: pip install 'pgan[video]' (or write out=FILE.gif)"
    assert not (tmp_path / "progress.mp4").exists()


@pytest.mark.parametrize(
    ("out", "extra", "message"),
    [
        ("x.webm", [], r"^out=.*x\.webm: the time-lapse is written as FILE\.gif or FILE\.mp4$"),
        ("x.mp4", ["frame_ms=0"], r"^frame_ms must be an integer >= 1, got 0$"),
    ],
)
def test_bad_time_lapse_settings_are_one_line_errors(
    two_stage_run: Path, tmp_path: Path, out: str, extra: list[str], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        timelapse(_timelapse_cfg(two_stage_run, tmp_path / out, *extra))
