"""Sliced Wasserstein distance on Laplacian pyramids (the ProGAN paper's metric): its pyramid is exact, it is
small between a set and itself, grows with a known distortion, and sees blur at the fine levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_eval

from pgan.data import ShapesDataset
from pgan.metrics import swd as swd_module
from pgan.metrics.swd import laplacian_pyramid, pyramid_up, swd


@pytest.fixture(scope="module")
def shapes() -> torch.Tensor:
    ds = ShapesDataset(32, size=96, seed=0)
    return torch.stack([ds[i] for i in range(96)])


def test_the_laplacian_pyramid_adds_back_up_to_the_image(shapes: torch.Tensor) -> None:
    images = (shapes + 1) * 127.5
    levels = laplacian_pyramid(images)
    assert [level.shape[-1] for level in levels] == [32, 16]
    rebuilt = levels[-1]
    for level in reversed(levels[:-1]):
        rebuilt = level + pyramid_up(rebuilt)
    torch.testing.assert_close(rebuilt, images, atol=1e-3, rtol=0)


def test_the_filter_is_the_papers_5x5_binomial_with_mirrored_borders() -> None:
    images = torch.rand(3, 2, 12, 9, generator=torch.Generator().manual_seed(0)) * 255
    binomial = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (torch.outer(binomial, binomial) / 256 * 4).expand(2, 1, 5, 5)
    expected = F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), kernel, groups=2)
    torch.testing.assert_close(swd_module._filter(images, gain=4.0), expected, atol=1e-3, rtol=0)


def test_swd_of_a_large_set_is_computed_in_chunks_with_the_same_result(shapes, monkeypatch) -> None:
    whole = swd(shapes[:48], shapes[48:], seed=1)
    monkeypatch.setattr(swd_module, "PYRAMID_CHUNK", 5)  # 48 images: ten chunks, the last one of 3
    assert swd(shapes[:48], shapes[48:], seed=1) == whole


def test_swd_of_a_set_to_itself_is_small_and_grows_with_noise(shapes: torch.Tensor) -> None:
    itself = swd(shapes, shapes)["swd"]
    noisy = [swd(shapes, (shapes + s * torch.randn_like(shapes)).clamp(-1, 1))["swd"] for s in (0.05, 0.1, 0.2)]
    assert itself * 2.5 < noisy[0] < noisy[1] < noisy[2]


def test_blur_shows_at_the_fine_level_more_than_at_the_coarse_one(shapes: torch.Tensor) -> None:
    blurred = F.interpolate(F.avg_pool2d(shapes, 2), scale_factor=2)
    itself, distance = swd(shapes, shapes), swd(shapes, blurred)
    assert distance["swd_32"] / itself["swd_32"] > 2 * distance["swd_16"] / itself["swd_16"]


def test_swd_is_deterministic_for_a_seed_and_checks_its_inputs(shapes: torch.Tensor) -> None:
    assert swd(shapes[:32], shapes[32:64], seed=3) == swd(shapes[:32], shapes[32:64], seed=3)
    with pytest.raises(ValueError, match="at least 16 px"):
        swd(shapes[:, :, :8, :8], shapes[:, :, :8, :8])
    with pytest.raises(ValueError, match="one shape"):
        swd(shapes, shapes[:, :1])


def test_pgan_eval_reports_swd_per_level_and_mean(folders) -> None:
    result = run_eval(f"real={folders['real']}", f"fake={folders['healthy']}", "metrics=[swd]", "device=cpu")
    assert set(result) == {"swd_32", "swd_16", "swd"} and result["swd"] > 0
    collapsed = run_eval(f"real={folders['real']}", f"fake={folders['collapsed']}", "metrics=[swd]", "device=cpu")
    assert collapsed["swd"] > 1.5 * result["swd"]
    both = run_eval(f"real={folders['real']}", f"fake={folders['healthy']}", "metrics=[diversity,swd]", "device=cpu")
    assert {"swd", "vendi_ratio", "state"} <= both.keys()
