"""model.grow_init=preserve: a grown model's new block starts as identity convs and its new RGB layer as a copy of
the previous one, so that at alpha = 1 it computes what the smaller model computed (exactly where no LeakyReLU
sees a negative feature), instead of a random function that the fade-in then hides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_resumes_mid_fade_exactly, compose_config

from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.layers import upsample_2x, upsample_2x_bilinear
from pgan.networks import (
    SMOOTH_TAPS,
    Discriminator,
    Generator,
    carry_rgb_through,
    grow_from,
    preserve_function,
)
from pgan.train.loop import train

WIDE = dict(fmap_base=64, fmap_max=8, fmap_min=8)  # 8 channels everywhere: every new layer can be preserved
NARROWING = dict(fmap_base=64, fmap_max=16, fmap_min=4)  # 16 channels at 8 px, 8 at 16 px
SMALL = dict(fmap_base=512, fmap_max=64, fmap_min=16)  # the `small` model: its 32 px block narrows 64 -> 32


def grown(
    kind: type, resolution: int, grow_init: str, widths: dict, smooth: bool = False, **kw
) -> tuple[torch.nn.Module, list[str]]:
    torch.manual_seed(1)
    small = kind(resolution // 2, **widths, **kw)
    torch.manual_seed(2)
    big = kind(resolution, **widths, **kw)
    return big.requires_grad_(False), grow_from(big, small.state_dict(), grow_init, smooth)


@pytest.mark.parametrize("resolution", [8, 16])
def test_preserve_makes_the_new_convs_identities_and_copies_the_rgb_layer(resolution: int) -> None:
    G, fresh = grown(Generator, resolution, "preserve", WIDE, latent_dim=16)
    D, _ = grown(Discriminator, resolution, "preserve", WIDE)
    x = torch.randn(2, 8, resolution, resolution)
    for model in (G, D):
        for conv in (model.blocks[str(resolution)].conv1, model.blocks[str(resolution)].conv2):
            torch.testing.assert_close(conv(x), x)
    old, new = str(resolution // 2), str(resolution)
    assert torch.equal(G.to_rgb[new].weight, G.to_rgb[old].weight)
    assert torch.equal(D.from_rgb[new].bias, D.from_rgb[old].bias)
    assert sorted(fresh) == sorted(k for k in G.state_dict() if k.split(".")[1] == new)  # what grow_from returns


@pytest.mark.parametrize("kind", [Generator, Discriminator])
def test_a_block_that_changes_the_width_keeps_its_random_draw(kind: type) -> None:
    """All or nothing: identity convs beside random ones are not the smaller model's function."""
    kw = {"latent_dim": 16} if kind is Generator else {}
    fresh, _ = grown(kind, 16, "fresh", NARROWING, **kw)
    model, _ = grown(kind, 16, "preserve", NARROWING, **kw)
    assert preserve_function(model) == []  # G's conv1 is 16 -> 8 channels, D's conv2 8 -> 16
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def latents(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(0))


def smooth_images(resolution: int, n: int = 8) -> torch.Tensor:
    images = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.nn.functional.interpolate(images, size=resolution, mode="bilinear")


def relative_change(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """How far the grown model at alpha = 1 is from its old path (alpha = 0: the smaller model), relative."""
    new, old = model(inputs, 1.0), model(inputs, 0.0)
    return float((new - old).norm() / old.norm())


@pytest.mark.parametrize("widths", [NARROWING, SMALL])
def test_preserve_all_carries_the_smaller_models_function_through_a_block_that_changes_the_width(widths) -> None:
    """NARROWING: G's 16 px block narrows 16 -> 8 channels and D's widens 8 -> 16; the second: the `small`
    model's 32 px blocks (64 <-> 32). At alpha = 1 the grown model computes within 15 % of what the smaller one
    did (measured: G 13 % with NARROWING's 16 input channels, 3 % with the small model's 64, through the anchor's
    pixel norm; D 1.3-1.4 %, through the pooling order), where fresh or `preserve` layers are 90-150 % off."""
    resolution = 16 if widths is NARROWING else 32
    G, _ = grown(Generator, resolution, "preserve_all", widths, latent_dim=16)
    D, _ = grown(Discriminator, resolution, "preserve_all", widths)
    assert relative_change(G, latents()) < 0.15
    assert relative_change(D, smooth_images(resolution)) < 0.02
    for grow_init in ("fresh", "preserve"):
        assert relative_change(grown(Generator, resolution, grow_init, widths, latent_dim=16)[0], latents()) > 0.8
        assert relative_change(grown(Discriminator, resolution, grow_init, widths)[0], smooth_images(resolution)) > 0.8


@pytest.mark.parametrize("kind", [Generator, Discriminator])
def test_every_channel_of_a_carrying_block_learns(kind: type) -> None:
    """The channels that carry nothing start so that they change nothing (their incoming or outgoing weights are
    zero), but within two SGD steps every row and column of the new layers has a gradient: none stays dead."""
    kw = {"latent_dim": 16} if kind is Generator else {}
    model, _ = grown(kind, 16, "preserve_all", NARROWING, **kw)
    model.requires_grad_(True)
    inputs = latents(8) if kind is Generator else smooth_images(16)
    target = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    rgb = model.to_rgb if kind is Generator else model.from_rgb
    layers = [model.blocks["16"].conv1, model.blocks["16"].conv2, rgb["16"]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        out = model(inputs, 1.0)
        (out * target).sum().backward() if kind is Generator else out.square().sum().backward()
        optimizer.step()
    for layer in layers:
        grad = layer.weight.grad.abs()
        assert (grad.sum(dim=(1, 2, 3)) > 0).all() and (grad.sum(dim=(0, 2, 3)) > 0).all(), layer


def test_a_block_too_narrow_to_carry_the_rgb_directions_keeps_its_random_draw() -> None:
    """Three pairs and an anchor need 7 channels: TINY's 32 px block has 4 (8 -> 4)."""
    fresh, _ = grown(Generator, 32, "fresh", NARROWING, latent_dim=16)
    model, _ = grown(Generator, 32, "preserve_all", NARROWING, latent_dim=16)
    block, rgb = model.blocks["32"], model.to_rgb
    assert not carry_rgb_through(block, rgb["32"], rgb["16"], generator=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def positive_features(G: Generator) -> Generator:
    """G with non-negative features out of its second-highest block (a large bias before its last LeakyReLU),
    where the identity convs and LeakyReLUs of a preserved top block pass them through unchanged."""
    below = G.blocks[str(G.resolution // 2)]
    (below.conv if G.resolution == 8 else below.conv2).bias.fill_(100.0)
    return G


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_a_preserved_generator_draws_the_smaller_ones_images(resolution: int) -> None:
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    G, _ = grown(Generator, resolution, "preserve", WIDE, latent_dim=16)
    G = positive_features(G)
    torch.testing.assert_close(G(z, 1.0), G(z, 0.0), atol=1e-5, rtol=1e-5)
    # The same weights grown fresh draw something else at alpha = 1; preserved but with negative features,
    # the LeakyReLUs change the image a little, not wholly.
    G_fresh, _ = grown(Generator, resolution, "fresh", WIDE, latent_dim=16)
    G_fresh = positive_features(G_fresh)
    assert (G_fresh(z, 1.0) - G_fresh(z, 0.0)).norm() > 0.8 * G_fresh(z, 0.0).norm()  # measured 1.2-1.7
    G, _ = grown(Generator, resolution, "preserve", WIDE, latent_dim=16)
    assert 0 < (G(z, 1.0) - G(z, 0.0)).norm() < 0.6 * G(z, 0.0).norm()  # measured 0.2-0.45


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_a_preserved_discriminator_scores_as_the_smaller_one(resolution: int) -> None:
    images = torch.rand(8, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    smooth = torch.nn.functional.interpolate(images[..., :4, :4], size=resolution, mode="bilinear")
    D, _ = grown(Discriminator, resolution, "preserve", WIDE)
    D.from_rgb[str(resolution)].bias.fill_(100.0)  # non-negative fromRGB features at both resolutions
    D.from_rgb[str(resolution // 2)].bias.fill_(100.0)
    torch.testing.assert_close(D(images, 1.0), D(images, 0.0), atol=1e-3, rtol=1e-5)
    # Without the large biases, on smooth images: fresh layers score differently, preserved ones about the same.
    D_fresh, _ = grown(Discriminator, resolution, "fresh", WIDE)
    D, _ = grown(Discriminator, resolution, "preserve", WIDE)
    assert (D_fresh(smooth, 1.0) - D_fresh(smooth, 0.0)).norm() > 0.4 * D_fresh(smooth, 0.0).norm()  # 0.55-0.83
    assert 0 < (D(smooth, 1.0) - D(smooth, 0.0)).norm() < 0.3 * D(smooth, 0.0).norm()  # 0.03-0.22


def test_a_smooth_preserved_conv_upsamples_bilinearly() -> None:
    """model.grow_smooth: the first conv of a preserved G block blurs each channel with [1, 2, 1]^2 / 16, which after
    the block's nearest 2x upsampling is the bilinear one (away from the zero-padded border); D is left as it was."""
    G, _ = grown(Generator, 16, "preserve", WIDE, smooth=True, latent_dim=16)
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    inner = (..., slice(1, -1), slice(1, -1))
    out = G.blocks["16"].conv1(upsample_2x(x))
    torch.testing.assert_close(out[inner], upsample_2x_bilinear(x)[inner])
    y = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(G.blocks["16"].conv2(y), y)  # the second conv stays the identity
    D, _ = grown(Discriminator, 16, "preserve", WIDE, smooth=True)
    torch.testing.assert_close(D.blocks["16"].conv1(y), y)


@pytest.mark.parametrize(("grow_init", "widths", "resolution"), [("preserve", WIDE, 16), ("preserve_all", SMALL, 32)])
def test_a_smooth_grown_generator_draws_the_smaller_ones_image_upsampled_bilinearly(
    grow_init: str, widths: dict, resolution: int
) -> None:
    """At alpha = 1 a smooth-grown G draws the smaller G's image upsampled bilinearly, where the default start draws
    it in 2x2 steps (nearest). `preserve` with non-negative features (as above), and the `small` model's narrowing
    32 px block carried by `preserve_all`, where the pixel norms' anchor and the LeakyReLUs make it approximate
    (measured: 0.025 from bilinear against 0.169 from nearest; without smooth 0.029 from nearest, 0.161 bilinear)."""
    z = latents()
    inner = (..., slice(1, -1), slice(1, -1))

    def distance(image: torch.Tensor, target: torch.Tensor) -> float:
        return float((image - target)[inner].norm() / target[inner].norm())

    steps, _ = grown(Generator, resolution, grow_init, widths, latent_dim=16)
    smooth, _ = grown(Generator, resolution, grow_init, widths, smooth=True, latent_dim=16)
    if grow_init == "preserve":
        steps, smooth = positive_features(steps), positive_features(smooth)
    nearest = steps(z, 0.0)  # the smaller G's image, nearest-upsampled: the old path, the same in both
    bilinear = upsample_2x_bilinear(torch.nn.functional.avg_pool2d(nearest, 2))
    assert distance(smooth(z, 1.0), bilinear) < 0.25 * distance(smooth(z, 1.0), nearest)
    assert distance(steps(z, 1.0), nearest) < 0.25 * distance(steps(z, 1.0), bilinear)


def test_a_preserved_skip_generator_adds_nothing_yet() -> None:
    G, _ = grown(Generator, 16, "preserve", NARROWING, latent_dim=16, architecture="skip")
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(G(z, 1.0), G(z, 0.0))
    assert torch.equal(G.to_rgb["16"].weight, torch.zeros_like(G.to_rgb["16"].weight))


PRESERVE = ["model.grow_init=preserve", "model.channels={4: 8, 8: 8, 16: 8}"]


def test_a_preserving_run_starts_each_stage_from_the_smaller_models_layers_and_resumes_exactly(tmp_path: Path) -> None:
    assert_resumes_mid_fade_exactly([*TINY, *PRESERVE], tmp_path)
    # 7 Adam steps of lr 0.001 into the 16 px stage, its new RGB layers are still within 0.1 of the 8 px ones
    # they were copied from (each net's own; G_ema's from G_ema's); drawn fresh they would be N(0, 1) apart.
    early = load_checkpoint(tmp_path / "full" / "stage-0016" / "ckpt-0000000056.pt")
    previous = load_checkpoint(tmp_path / "full" / "stage-0008" / "final.pt")
    for net, layer in (("G", "to_rgb"), ("G_ema", "to_rgb"), ("D", "from_rgb")):
        for param in ("weight", "bias"):
            moved = early[net][f"{layer}.16.{param}"] - previous[net][f"{layer}.8.{param}"]
            assert moved.abs().max() < 0.1, (net, layer, param)
    # G's conv1 still about the default start (model.grow_smooth): each channel blurred by SMOOTH_TAPS, and its
    # conv2 about the identity; no channel mixes with another yet.
    channels, centre = torch.arange(8), torch.zeros(3, 3)
    centre[1, 1] = 1.0
    for name, taps in (("conv1", SMOOTH_TAPS), ("conv2", centre)):
        conv = early["G"][f"blocks.16.{name}.weight"]
        own = conv[channels, channels]  # [8, 3, 3]: each channel's taps onto itself
        mixed = conv.clone()
        mixed[channels, channels] = 0.0
        assert mixed.abs().max() < 0.1 < own[:, 1, 1].min(), name
        assert (own / own[:, 1:2, 1:2] - taps / taps[1, 1]).abs().max() < 0.1, name


def test_a_run_that_carries_the_rgb_directions_through_a_narrowing_block_resumes_exactly(tmp_path: Path) -> None:
    """TINY's 16 px blocks change the width (G 16 -> 8, D 8 -> 16): with preserve_all they start carrying."""
    assert_resumes_mid_fade_exactly([*TINY, "model.grow_init=preserve_all"], tmp_path)
    early = load_checkpoint(tmp_path / "full" / "stage-0016" / "ckpt-0000000056.pt")
    anchor = early["G"]["blocks.16.conv1.bias"][6]  # sqrt(16 channels) at the start, a few Adam steps ago
    assert 3.5 < anchor < 4.5


def test_an_unknown_grow_init_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.grow_init must be one of fresh, preserve, preserve_all, got 'copy'"):
        train(compose_config(*TINY, "model.grow_init=copy"), tmp_path / "bad")


def test_grow_smooth_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.grow_smooth must be true or false, got 'maybe'"):
        train(compose_config(*TINY, "model.grow_smooth=maybe"), tmp_path / "bad")
