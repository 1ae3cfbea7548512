"""Diversity metrics: MS-SSIM at every resolution, the excess-pair fraction, Vendi, std ratio."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgan.data import ShapesDataset
from pgan.metrics.diversity import (
    RandomEmbedding,
    bootstrap_se,
    diversity_metrics,
    embed,
    excess_pair,
    ms_ssim,
    num_scales,
    pairwise_ms_ssim,
    real_reference,
    vendi_score,
)


def smooth_images(n: int, resolution: int, seed: int, channels: int = 3) -> torch.Tensor:
    """n distinct images of smooth random structure in [-1, 1] (upsampled 4x4 noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, 4, 4, generator=gen)
    return torch.tanh(F.interpolate(coarse, size=(resolution, resolution), mode="bicubic", align_corners=False))


def prototypes(k: int, n: int, resolution: int, seed: int) -> torch.Tensor:
    """n samples collapsed onto k prototypes drawn from the same distribution as `smooth_images`."""
    protos = smooth_images(k, resolution, seed=seed + 1000)
    index = torch.arange(n) % k
    return protos[index[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]]


@pytest.mark.parametrize(("side", "scales"), [(4, 1), (7, 1), (8, 2), (16, 3), (32, 4), (64, 5), (1024, 5)])
def test_number_of_scales_adapts_to_the_image(side: int, scales: int) -> None:
    """Up to 5 scales, the coarsest at least 4 px."""
    assert num_scales(side) == scales


def test_images_below_four_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 4 px"):
        num_scales(2)


@pytest.mark.parametrize("resolution", [8, 16, 64, 256])
def test_identical_images_have_ms_ssim_one(resolution: int) -> None:
    x = smooth_images(3, resolution, seed=0)
    assert torch.allclose(ms_ssim(x, x), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("resolution", [8, 32, 256])
def test_ms_ssim_is_symmetric_bounded_and_falls_with_noise(resolution: int) -> None:
    x = smooth_images(8, resolution, seed=1)
    y = smooth_images(8, resolution, seed=2)
    xy, yx = ms_ssim(x, y), ms_ssim(y, x)
    assert torch.allclose(xy, yx, atol=1e-6)
    assert ((xy >= 0) & (xy <= 1)).all()
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=gen)
    scores = [float(ms_ssim(x, (x + s * noise).clamp(-1, 1)).mean()) for s in (0.0, 0.05, 0.2, 0.5)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.999 and scores[-1] < 0.9
    assert float(xy.mean()) < scores[1], "unrelated images are less similar than a lightly noised copy"


def test_ms_ssim_of_grayscale_and_rgb_copies_agree() -> None:
    """A grey image repeated in 3 channels scores like the 1-channel image (the mean is over channels)."""
    x, y = smooth_images(4, 32, seed=4, channels=1), smooth_images(4, 32, seed=5, channels=1)
    assert torch.allclose(ms_ssim(x, y), ms_ssim(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)), atol=1e-5)


def test_pairwise_uses_disjoint_pairs_and_chunking_changes_nothing() -> None:
    images = smooth_images(9, 32, seed=6)
    values = pairwise_ms_ssim(images, seed=0)
    assert values.shape == (4,)  # 9 images -> 4 disjoint pairs, one left out
    chunked = pairwise_ms_ssim(images, seed=0, max_elements=images[0].numel())  # one pair per chunk
    assert torch.allclose(values, chunked, atol=1e-6)
    assert not torch.allclose(values, pairwise_ms_ssim(images, seed=1)), "the pairing depends on the seed"


def test_bootstrap_se_of_a_mean_matches_the_textbook_value() -> None:
    values = torch.randn(400, generator=torch.Generator().manual_seed(0))
    expected = float(values.std() / math.sqrt(len(values)))
    assert bootstrap_se(lambda m: m, [values]) == pytest.approx(expected, rel=0.15)


def test_excess_pair_formula() -> None:
    assert excess_pair(0.5, 0.5) == 0
    assert excess_pair(1.0, 0.3) == pytest.approx(1.0)
    assert excess_pair(0.3 + 0.7 / 4, 0.3) == pytest.approx(0.25)  # 1/k of pairs identical, the rest like real


@pytest.fixture(scope="module")
def embedding() -> RandomEmbedding:
    return RandomEmbedding()


@pytest.fixture(scope="module")
def smooth_reference(embedding: RandomEmbedding):
    return real_reference(smooth_images(512, 32, seed=10), embedding)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_excess_pair_estimates_one_over_k(k: int, smooth_reference, embedding: RandomEmbedding) -> None:
    """Collapse onto k prototypes of the real distribution gives p ~ 1/k (within the bootstrap error)."""
    m = diversity_metrics(prototypes(k, 512, 32, seed=k), smooth_reference, embedding)
    assert abs(m["excess_pair"] - 1 / k) < 3 * m["excess_pair_se"] + 0.03, m


def test_excess_pair_falls_as_k_grows_on_shapes(embedding: RandomEmbedding) -> None:
    """On the procedural shapes (real data with a lot of shared background), p falls monotonically with k."""
    ds = ShapesDataset(32, size=4000, seed=0)
    ref = real_reference(torch.stack([ds[i] for i in range(256)]), embedding)
    others = torch.stack([ds[i] for i in range(1000, 1064)])
    values = []
    for k in (1, 2, 4, 16, 64):
        fakes = others[:k][torch.arange(256) % k]
        values.append(diversity_metrics(fakes, ref, embedding)["excess_pair"])
    assert values == sorted(values, reverse=True), values
    assert values[0] > 0.9 and abs(values[-1]) < 0.1


def test_healthy_samples_look_healthy(smooth_reference, embedding: RandomEmbedding) -> None:
    m = diversity_metrics(smooth_images(512, 32, seed=11), smooth_reference, embedding)
    assert abs(m["excess_pair"]) < 3 * m["excess_pair_se"] + 0.02
    assert 0.9 < m["vendi_ratio"] < 1.1 and 0.9 < m["std_ratio"] < 1.1
    assert m["n_fake"] == m["n_real"] == 512 and m["resolution"] == 32


def test_total_collapse_is_obvious(smooth_reference, embedding: RandomEmbedding) -> None:
    m = diversity_metrics(prototypes(1, 64, 32, seed=0), smooth_reference, embedding)
    assert m["excess_pair"] > 0.99 and m["std_ratio"] < 1e-6 and m["vendi_fake"] == pytest.approx(1.0)


def test_vendi_of_identical_and_orthogonal_samples() -> None:
    assert vendi_score(torch.ones(10, 5)) == pytest.approx(1.0)
    assert vendi_score(torch.eye(7)) == pytest.approx(7.0)
    assert vendi_score(torch.eye(7)[:, :3].T.repeat(2, 1)) == pytest.approx(3.0)  # 6 samples, 3 distinct
    assert vendi_score(torch.zeros(4, 3)) == 1.0  # all at the centre: one sample, not NaN


def test_vendi_is_centred_by_the_real_mean(embedding: RandomEmbedding) -> None:
    """A collapsed batch (one image + tiny noise) is ~1 distinct sample around the real mean, but would look
    diverse if centred by its own mean - the reason the centre comes from the real data."""
    reals = smooth_images(256, 32, seed=12)
    collapsed = prototypes(1, 256, 32, seed=3) + 1e-3 * torch.randn(256, 3, 32, 32)
    features = embed(collapsed, embedding)
    assert vendi_score(features, embed(reals, embedding).mean(0)) < 1.1
    assert vendi_score(features, features.mean(0)) > 20


def test_vendi_grows_with_k(smooth_reference, embedding: RandomEmbedding) -> None:
    ratios = [
        diversity_metrics(prototypes(k, 256, 32, seed=k), smooth_reference, embedding)["vendi_ratio"]
        for k in (1, 4, 16, 64)
    ]
    assert ratios == sorted(ratios) and ratios[0] < 0.1


@pytest.mark.parametrize("resolution", [8, 256])
def test_metrics_work_at_the_extreme_resolutions(resolution: int, embedding: RandomEmbedding) -> None:
    ref = real_reference(smooth_images(32, resolution, seed=20), embedding)
    m = diversity_metrics(smooth_images(32, resolution, seed=21), ref, embedding)
    assert all(math.isfinite(v) for v in m.values())
    assert m["resolution"] == resolution and abs(m["excess_pair"]) < 0.3 and m["vendi_ratio"] > 0.7
    collapsed = diversity_metrics(prototypes(2, 32, resolution, seed=1), ref, embedding)
    assert collapsed["excess_pair"] > 0.3 and collapsed["vendi_ratio"] < m["vendi_ratio"]


def test_resolution_mismatch_is_refused(smooth_reference, embedding: RandomEmbedding) -> None:
    with pytest.raises(ValueError, match="16 px"):
        diversity_metrics(smooth_images(8, 16, seed=0), smooth_reference, embedding)


def test_embedding_is_fixed_by_its_seed() -> None:
    x = smooth_images(4, 16, seed=0)
    assert torch.equal(RandomEmbedding()(x), RandomEmbedding()(x))
    assert not torch.equal(RandomEmbedding(seed=1)(x), RandomEmbedding()(x))
    assert RandomEmbedding()(x[:, :1]).shape == (4, 2048)  # grayscale input works
