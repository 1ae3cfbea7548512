"""Tests for pgan.networks (Generator, Discriminator, channels_for, grow_from) and the step helpers
fade_reals / ema_update from pgan.train.step."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pgan.networks import Discriminator, Generator, channels_for, eval_chunk, grow_from, largest_activation
from pgan.train.step import ema_update, fade_reals
from pgan.train.watch import evaluation_samples

LATENT = 16
SMALL = {"fmap_base": 64, "fmap_max": 16, "fmap_min": 4}  # widths 16, 16, 8, 4, 4, ...
TINY = {"fmap_base": 64, "fmap_max": 16, "fmap_min": 1}  # down to 1 channel, for the 512 / 1024 px models
RESOLUTIONS = [4, 8, 16, 32, 64, 128, 256, 512, 1024]


def make_g(res: int, seed: int = 0, **kw) -> Generator:
    """A small generator built under a fixed seed."""
    torch.manual_seed(seed)
    return Generator(res, latent_dim=LATENT, **{**SMALL, **kw})


def make_d(res: int, seed: int = 0, **kw) -> Discriminator:
    """A small discriminator built under a fixed seed."""
    torch.manual_seed(seed)
    return Discriminator(res, **{**SMALL, **kw})


def make(kind: str, res: int, seed: int = 0, **kw):
    """make_g or make_d by name."""
    return (make_g if kind == "G" else make_d)(res, seed, **kw)


def nearest_up(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling written out with repeat_interleave."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def avg_down(x: torch.Tensor) -> torch.Tensor:
    """2x2 mean pooling written out with a reshape."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def rgb_name(kind: str) -> str:
    """The RGB-layer dict of a model kind."""
    return "to_rgb" if kind == "G" else "from_rgb"


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_output_shapes_at_every_resolution(res, alpha):
    """G(z, alpha) is [N, 3, R, R] and D(images, alpha) is [N], at every resolution and alpha."""
    kw = TINY if res >= 512 else {}
    G, D = make_g(res, **kw), make_d(res, **kw)
    with torch.no_grad():
        images = G(torch.randn(2, LATENT), alpha)
        scores = D(images, alpha)
    assert images.shape == (2, 3, res, res)
    assert scores.shape == (2,)
    assert torch.isfinite(images).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res", [4, 16])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_image_channels(channels, res, alpha):
    """image_channels sets G's output channels and D's expected input channels."""
    G, D = make_g(res, image_channels=channels), make_d(res, image_channels=channels)
    with torch.no_grad():
        images = G(torch.randn(2, LATENT), alpha)
        assert images.shape == (2, channels, res, res)
        assert D(images, alpha).shape == (2,)
    wrong = torch.randn(2, 4 - channels if channels == 3 else 3, res, res)
    with pytest.raises(RuntimeError):
        D(wrong, alpha)


@pytest.mark.parametrize("cls", [Generator, Discriminator])
@pytest.mark.parametrize("res", [3, 6, 2048, 0, 2, 1, -4, 12, 1000])
def test_invalid_resolution_raises(cls, res):
    """Resolutions that are not a power of two in [4, 1024] raise ValueError."""
    with pytest.raises(ValueError, match="resolution"):
        cls(res, **SMALL)


# ---------------------------------------------------------------- channels_for


@pytest.mark.parametrize(
    "res, width", [(4, 512), (8, 512), (16, 512), (32, 512), (64, 256), (128, 128), (256, 64), (512, 32), (1024, 16)]
)
def test_channels_for_paper_preset(res, width):
    """fmap_base 8192, fmap_max 512: 512 up to 32 px, then halving down to 16 at 1024 px."""
    assert channels_for(res, fmap_base=8192, fmap_max=512) == width
    assert channels_for(res) == width  # the defaults are the paper preset


@pytest.mark.parametrize("res, width", [(4, 16), (8, 16), (16, 8), (32, 4), (64, 4), (1024, 4)])
def test_channels_for_clamps_to_fmap_min(res, width):
    """The small test preset: min(64 / 2**(log2 R - 1), 16), never below fmap_min 4."""
    assert channels_for(res, **SMALL) == width


@pytest.mark.parametrize("key", [int, str], ids=["int-keys", "str-keys"])
def test_channels_table_overrides_the_rule(key):
    """An explicit table (int or str keys) wins over fmap_*; the models use it."""
    table = {key(4): 7, key(8): 5, key(16): 3}
    assert [channels_for(r, table=table) for r in (4, 8, 16)] == [7, 5, 3]
    G = Generator(16, latent_dim=LATENT, channels=table)
    assert G.blocks["4"].conv.weight.shape == (7, 7, 3, 3)
    assert G.blocks["16"].conv1.weight.shape == (3, 5, 3, 3)
    assert G.to_rgb["8"].weight.shape == (3, 5, 1, 1)
    D = Discriminator(16, channels=table)
    assert D.blocks["16"].conv2.weight.shape == (5, 3, 3, 3)
    assert D.from_rgb["16"].weight.shape == (3, 3, 1, 1)
    with torch.no_grad():
        assert D(G(torch.randn(4, LATENT))).shape == (4,)


def test_channels_table_missing_entry_raises():
    """A table without an entry for a needed resolution raises ValueError."""
    with pytest.raises(ValueError, match="16"):
        channels_for(16, table={4: 8, 8: 8})
    with pytest.raises(ValueError):
        Generator(16, latent_dim=LATENT, channels={4: 8, 8: 8})


# ---------------------------------------------------------------- stable parameter names


@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("res", [4, 8, 16, 32, 64])
def test_parameter_names_are_stable_across_resolutions(kind, res):
    """Every parameter of the R model but the old RGB layer exists, same shape, in the 2R model."""
    small = dict(make(kind, res).named_parameters())
    big = dict(make(kind, 2 * res).named_parameters())
    old_rgb = f"{rgb_name(kind)}.{res // 2}."
    only_small = {k for k in small if k not in big}
    assert only_small == ({old_rgb + "weight", old_rgb + "bias"} if res > 4 else set())
    for k in small.keys() - only_small:
        assert big[k].shape == small[k].shape, k


# ---------------------------------------------------------------- grow_from


def grown(kind: str, res: int, **kw):
    """(small model at res, fresh big model at 2 res snapshot, big model grown from small, returned names)."""
    small = make(kind, res, seed=1, **kw)
    with torch.no_grad():
        for name, p in small.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)  # non-zero biases, so a bias that is not copied shows
    big = make(kind, 2 * res, seed=2, **kw)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    fresh = grow_from(big, small.state_dict())
    return small, before, big, fresh


@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("res", [4, 8, 16])
def test_grow_from_copies_shared_params_and_keeps_new_ones_fresh(kind, res):
    """grow_from returns exactly the new block's and new RGB layer's names; the rest equals the source."""
    small, before, big, fresh = grown(kind, res)
    new_prefixes = (f"blocks.{2 * res}.", f"{rgb_name(kind)}.{2 * res}.")
    expected_fresh = [k for k, _ in big.named_parameters() if k.startswith(new_prefixes)]
    assert len(expected_fresh) >= 4
    assert sorted(fresh) == sorted(expected_fresh)
    src = small.state_dict()
    for k, v in big.state_dict().items():
        if k in fresh:
            assert torch.equal(v, before[k]), f"{k} should keep its fresh initialisation"
        else:
            assert torch.equal(v, src[k]), f"{k} should be copied from the source"
            assert not torch.equal(v, before[k]), f"{k} was not overwritten"


@pytest.mark.parametrize("res", [4, 8, 16])
def test_grown_generator_at_alpha_zero_is_upsampled_old_output(res):
    """A grown G(2R) at alpha 0 outputs exactly the nearest-upsampled G(R)(z, alpha=1)."""
    small, _, big, _ = grown("G", res)
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        expected = nearest_up(small(z, 1.0))
        out = big(z, 0.0)
    assert out.shape == (3, 3, 2 * res, 2 * res)
    assert torch.equal(out, expected)
    with torch.no_grad():
        assert not torch.allclose(big(z, 1.0), expected, atol=1e-3)  # the new block really is different


@pytest.mark.parametrize("res", [4, 8, 16])
def test_grown_discriminator_at_alpha_zero_scores_pooled_images(res):
    """A grown D(2R) at alpha 0 scores images exactly as D(R) at alpha 1 scores their 2x avg-pooled versions."""
    small, _, big, _ = grown("D", res)
    torch.manual_seed(3)
    images = torch.randn(4, 3, 2 * res, 2 * res)
    with torch.no_grad():
        expected = small(F.avg_pool2d(images, 2), 1.0)
        out = big(images, 0.0)
        torch.testing.assert_close(small(avg_down(images), 1.0), expected)
        assert torch.equal(out, expected)
        assert not torch.allclose(big(images, 1.0), expected, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.99])
@pytest.mark.parametrize("res", [4, 8])
def test_generator_fade_in_is_lerp_of_the_two_paths(res, alpha):
    """G(2R)(z, alpha) == (1 - alpha) * up(toRGB_R(features_R)) + alpha * toRGB_2R(block_2R(features_R))."""
    _, _, G, _ = grown("G", res)
    G = G.double()
    z = torch.randn(3, LATENT, dtype=torch.float64)
    with torch.no_grad():
        x = G.blocks["4"](z)
        r = 8
        while r <= res:  # the blocks 8 .. R
            x = G.blocks[str(r)](x)
            r *= 2
        old = nearest_up(G.to_rgb[str(res)](x))
        new = G.to_rgb[str(2 * res)](G.blocks[str(2 * res)](x))
        expected = (1 - alpha) * old + alpha * new
        torch.testing.assert_close(G(z, alpha), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G(z, 1.0), new, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_discriminator_fade_in_is_lerp_of_the_two_paths(alpha):
    """D(16)(x, alpha) feeds (1 - alpha) * lrelu(fromRGB_8(pool x)) + alpha * block_16(lrelu(fromRGB_16 x)) on."""
    _, _, D, _ = grown("D", 8)
    D = D.double()
    torch.manual_seed(4)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        old = F.leaky_relu(D.from_rgb["8"](avg_down(images)), 0.2)
        new = D.blocks["16"](F.leaky_relu(D.from_rgb["16"](images), 0.2))
        expected = D.blocks["4"](D.blocks["8"]((1 - alpha) * old + alpha * new))
        torch.testing.assert_close(D(images, alpha), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["G", "D"])
def test_grow_from_rejects_mismatched_shapes(kind):
    """A state from a model with other fmap settings raises ValueError."""
    small = make(kind, 8, fmap_max=16)
    big = make(kind, 16, fmap_max=8)
    with pytest.raises(ValueError, match="shape"):
        grow_from(big, small.state_dict())


@pytest.mark.parametrize("kind", ["G", "D"])
def test_grow_from_rejects_extra_non_rgb_layers(kind):
    """A state with layers other than the old RGB layer that the model lacks raises ValueError."""
    bigger = make(kind, 32)
    with pytest.raises(ValueError, match="lacks"):
        grow_from(make(kind, 16), bigger.state_dict())  # shrinking would drop blocks.32
    state = make(kind, 8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    model = make(kind, 16)
    with pytest.raises(ValueError, match="lacks"):
        grow_from(model, state)


@pytest.mark.parametrize("kind", ["G", "D"])
def test_grow_from_same_resolution_copies_everything(kind):
    """Growing from a same-resolution state leaves nothing fresh and copies every tensor."""
    src = make(kind, 16, seed=5)
    dst = make(kind, 16, seed=6)
    assert grow_from(dst, src.state_dict()) == []
    for (k, a), (_, b) in zip(dst.state_dict().items(), src.state_dict().items()):
        assert torch.equal(a, b), k


def grads_by_prefix(model, prefixes):
    """Largest |grad| of the parameters under each prefix (None where no parameter got a gradient)."""
    out = {}
    for p in prefixes:
        gs = [q.grad for k, q in model.named_parameters() if k.startswith(p) and q.grad is not None]
        out[p] = max(g.abs().max().item() for g in gs) if gs else None
    return out


def test_generator_gradients_reach_new_block_and_both_rgb_layers():
    """At alpha 0.5 the loss's gradient reaches the new block, the new and the old toRGB, and the old blocks."""
    _, _, G, _ = grown("G", 8)
    G(torch.randn(4, LATENT), 0.5).square().mean().backward()
    g = grads_by_prefix(G, ["blocks.16.", "to_rgb.16.", "to_rgb.8.", "blocks.8.", "blocks.4."])
    assert all(v is not None and v > 0 for v in g.values()), g


def test_discriminator_gradients_reach_new_block_and_both_rgb_layers():
    """At alpha 0.5 D's gradient reaches the new block, both fromRGB layers and the old blocks."""
    _, _, D, _ = grown("D", 8)
    torch.manual_seed(6)
    D(torch.randn(4, 3, 16, 16), 0.5).sum().backward()
    g = grads_by_prefix(D, ["blocks.16.", "from_rgb.16.", "from_rgb.8.", "blocks.8.", "blocks.4."])
    assert all(v is not None and v > 0 for v in g.values()), g


def test_stable_phase_does_not_use_old_rgb_layer():
    """At alpha 1 the old RGB layers get no gradient: only the new block is in use."""
    _, _, G, _ = grown("G", 8)
    _, _, D, _ = grown("D", 8)
    D(G(torch.randn(4, LATENT), 1.0), 1.0).sum().backward()
    assert G.to_rgb["8"].weight.grad is None and D.from_rgb["8"].weight.grad is None
    assert G.to_rgb["16"].weight.grad.abs().max() > 0 and D.from_rgb["16"].weight.grad.abs().max() > 0


# ---------------------------------------------------------------- fade_reals / ema_update


def test_fade_reals_at_alpha_one_is_identity():
    """At alpha 1 the reals pass through unchanged."""
    torch.manual_seed(7)
    reals = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(fade_reals(reals, 1.0), reals)


def test_fade_reals_at_alpha_zero_is_pooled_then_upsampled():
    """At alpha 0 each 2x2 block is replaced by its mean (what G's old path can produce)."""
    torch.manual_seed(8)
    reals = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(fade_reals(reals, 0.0), nearest_up(avg_down(reals)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.75])
def test_fade_reals_is_linear_in_alpha(alpha):
    """fade_reals(x, a) == (1 - a) * fade_reals(x, 0) + a * x."""
    torch.manual_seed(9)
    reals = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    expected = (1 - alpha) * nearest_up(avg_down(reals)) + alpha * reals
    torch.testing.assert_close(fade_reals(reals, alpha), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 1.0])
def test_ema_update_blends_every_parameter(beta):
    """After ema_update every EMA parameter is beta * ema + (1 - beta) * G; G is untouched."""
    G_ema = make_g(16, seed=10).double()
    G = make_g(16, seed=11).double()
    ema_before = {k: v.detach().clone() for k, v in G_ema.named_parameters()}
    g_before = {k: v.detach().clone() for k, v in G.named_parameters()}
    ema_update(G_ema, G, beta)
    for k, v in G_ema.named_parameters():
        expected = beta * ema_before[k] + (1 - beta) * g_before[k]
        torch.testing.assert_close(v.detach(), expected, rtol=1e-12, atol=1e-12, msg=k)
    for k, v in G.named_parameters():
        assert torch.equal(v, g_before[k])


def test_ema_update_with_beta_zero_copies_g_exactly():
    """beta 0 makes the EMA copy bit-identical to G, so it generates the same images."""
    G_ema, G = make_g(8, seed=12), make_g(8, seed=13)
    ema_update(G_ema, G, 0.0)
    for (k, a), (_, b) in zip(G_ema.named_parameters(), G.named_parameters()):
        assert torch.equal(a, b), k
    z = torch.randn(2, LATENT)
    with torch.no_grad():
        assert torch.equal(G_ema(z, 0.5), G(z, 0.5))


def test_ema_update_repeated_converges_geometrically():
    """n updates towards a fixed G leave beta**n of the initial difference."""
    G_ema, G = make_g(8, seed=14).double(), make_g(8, seed=15).double()
    start = copy.deepcopy(G_ema)
    for _ in range(5):
        ema_update(G_ema, G, 0.8)
    for (k, e), (_, s), (_, g) in zip(G_ema.named_parameters(), start.named_parameters(), G.named_parameters()):
        torch.testing.assert_close(e - g, 0.8**5 * (s - g), rtol=1e-10, atol=1e-12, msg=k)


def test_largest_activation_is_the_widest_feature_map_of_one_image():
    """SMALL's widths: 16 channels to 8 px, 8 at 16 px, 4 from 32 px; a block's upsampled input counts with the
    channels it arrives with (16 px: 16 in, on 16 x 16 pixels)."""
    assert largest_activation(make_g(8)) == 16 * 8 * 8
    assert largest_activation(make_g(16)) == 16 * 16 * 16
    assert largest_activation(make_g(64)) == 4 * 64 * 64


@pytest.mark.parametrize(("device", "res", "chunk"), [("cpu", 16, 512), ("cpu", 64, 128), ("cuda", 64, 512)])
def test_eval_chunk_is_cache_sized_on_a_cpu_and_memory_bounded_elsewhere(device, res, chunk):
    """On a CPU 2**21 elements of G's largest feature map a pass, on an accelerator 2**21 pixels."""
    assert eval_chunk(torch.device(device), make_g(res)) == chunk


def test_eval_chunk_is_at_least_one_image():
    G = make_g(256, fmap_base=128, fmap_max=128, fmap_min=128)  # 128 channels at 256 px: 2**23 elements
    assert largest_activation(G) == 2**23
    assert eval_chunk(torch.device("cpu"), G) == 1


@pytest.mark.parametrize("chunk", [None, 3])  # None: eval_chunk's (all 11 at once at 32 px); 3: 3 + 3 + 3 + 2
def test_evaluation_samples_do_not_depend_on_the_pass_size(chunk):
    """The collapse watch's samples are G's images of its latents whatever the chunking, and G's mode is restored."""
    G = make_g(32).train()
    z = torch.randn(11, LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = G.eval()(z, 0.5)
    G.train()
    chunked = evaluation_samples(G, z, 0.5, torch.autocast("cpu", enabled=False), chunk)
    torch.testing.assert_close(chunked, expected, atol=1e-4, rtol=0)  # conv kernels differ a little by batch size
    assert G.training
