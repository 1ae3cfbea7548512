"""The skip generator (model.g_architecture=skip, StyleGAN2's output architecture in a growing G): the image is
the sum of every block's toRGB upsampled bilinearly, so growing keeps what the smaller G drew exactly at
alpha = 0 and then adds the new block's toRGB to it; the reals D sees are faded the same way; checkpoints,
exports and resumes carry the architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_resumes_mid_fade_exactly, compose_config

from pgan.errors import UserError
from pgan.export import export_config, export_safetensors, load_generator
from pgan.networks import Generator, grow_from
from pgan.train.loop import train
from pgan.train.step import fade_reals

G_ARGS = dict(latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
SKIP = ["model.g_architecture=skip"]


def bilinear_up(x: torch.Tensor) -> torch.Tensor:
    """2x bilinear upsampling with half-pixel centres, written out: each output pixel is 3/4 of its nearest
    input pixel and 1/4 of the next one along each axis (the edge pixel repeated at the borders)."""
    for dim in (-2, -1):
        prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, x.shape[dim] - 1)], dim)
        nxt = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), x.narrow(dim, x.shape[dim] - 1, 1)], dim)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        x = torch.stack([even, odd], dim=dim if dim == -1 else -2).flatten(dim - 1 if dim == -1 else -3, dim)
    return x


def skip_g(resolution: int, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(resolution, architecture="skip", **G_ARGS).eval().requires_grad_(False)


def test_bilinear_reference_is_torchs_half_pixel_bilinear() -> None:
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(bilinear_up(x), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def test_the_image_is_every_blocks_torgb_upsampled_and_summed() -> None:
    G = skip_g(16)
    assert sorted(G.to_rgb, key=int) == ["4", "8", "16"]  # a progan G keeps only the top two
    z = torch.randn(3, 16)
    x4 = G.blocks["4"](z)
    x8 = G.blocks["8"](x4)
    x16 = G.blocks["16"](x8)
    lower = bilinear_up(bilinear_up(G.to_rgb["4"](x4)) + G.to_rgb["8"](x8))
    torch.testing.assert_close(G(z, 1.0), lower + G.to_rgb["16"](x16), atol=1e-5, rtol=0)
    torch.testing.assert_close(G(z, 0.25), lower + 0.25 * G.to_rgb["16"](x16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_growing_keeps_the_smaller_generators_image_exactly_at_alpha_zero(resolution: int) -> None:
    small, big = skip_g(resolution // 2, seed=1), skip_g(resolution, seed=2)
    fresh = grow_from(big, small.state_dict())
    assert sorted(fresh) == sorted(k for k in big.state_dict() if k.split(".")[1] == str(resolution))
    z = torch.randn(4, 16)
    assert torch.equal(big(z, 0.0), F.interpolate(small(z, 1.0), scale_factor=2, mode="bilinear"))
    assert not torch.allclose(big(z, 1.0), big(z, 0.0), atol=1e-3)  # the new block adds to it


def test_reals_fade_as_a_skip_generators_images_do() -> None:
    reals = torch.rand(2, 3, 16, 16) * 2 - 1
    pooled = F.avg_pool2d(reals, 2)
    assert torch.equal(fade_reals(reals, 0.0, "skip"), F.interpolate(pooled, scale_factor=2, mode="bilinear"))
    assert torch.equal(fade_reals(reals, 0.0, "progan"), pooled.repeat_interleave(2, -2).repeat_interleave(2, -1))
    assert torch.equal(fade_reals(reals, 1.0, "skip"), reals)


def test_an_export_of_a_skip_generator_rebuilds_it(tmp_path: Path) -> None:
    G = skip_g(16)
    export_safetensors(G, 0.4, tmp_path / "x")
    assert export_config(G, 0.4)["g_architecture"] == "skip"
    H, alpha = load_generator(tmp_path / "x")
    z = torch.randn(3, 16)
    assert H.architecture == "skip" and torch.equal(G(z, alpha), H(z, alpha))


def test_skip_runs_train_and_resume_mid_fade_bit_identically(tmp_path: Path) -> None:
    assert_resumes_mid_fade_exactly([*TINY, *SKIP], tmp_path)
    from pgan.load import load_generator as load

    G, _ = load(tmp_path / "full" / "stage-0016" / "final.pt")
    assert G.architecture == "skip" and "to_rgb.4.weight" in G.state_dict()


def test_an_unknown_architecture_and_a_resume_across_architectures_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.g_architecture must be one of progan, skip, got 'styled'"):
        train(compose_config(*TINY, "model.g_architecture=styled"), tmp_path / "bad")
    train(compose_config(*TINY, "schedule.resolutions=[8]"), tmp_path / "progan")
    with pytest.raises(UserError, match="model.g_architecture: 'progan' there vs 'skip' here"):
        train(compose_config(*TINY, *SKIP, "schedule.resolutions=[8]"), tmp_path / "progan")
