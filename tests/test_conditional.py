"""Class-conditional networks (num_classes > 0): G's label embedding, D's projection head, label checks,
growth, the unconditional default left bit-identical, config pass-through and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config

from pgan.checkpoint import checkpoint_problem, generator_from_checkpoint
from pgan.export import CONFIG, check_onnx, export_onnx, export_safetensors, generator_kwargs, load_generator
from pgan.networks import Discriminator, Generator, grow_from, model_kwargs_from, networks_from

LATENT = 16
CLASSES = 5
SMALL = {"fmap_base": 64, "fmap_max": 16, "fmap_min": 4}  # widths 16, 16, 8, 4, 4, ...
RESOLUTIONS = [4, 8, 16, 32, 64, 128, 256]


def make_g(res: int, seed: int = 0, num_classes: int = CLASSES, **kw) -> Generator:
    """A small generator built under a fixed seed."""
    torch.manual_seed(seed)
    return Generator(res, latent_dim=LATENT, num_classes=num_classes, **{**SMALL, **kw})


def make_d(res: int, seed: int = 0, num_classes: int = CLASSES, **kw) -> Discriminator:
    """A small discriminator built under a fixed seed."""
    torch.manual_seed(seed)
    return Discriminator(res, num_classes=num_classes, **{**SMALL, **kw})


def make(kind: str, res: int, seed: int = 0, **kw):
    """make_g or make_d by name."""
    return (make_g if kind == "G" else make_d)(res, seed, **kw)


def labels_for(n: int) -> torch.Tensor:
    """Class indices 0, 1, ..., CLASSES - 1, 0, ... for a batch of n."""
    return torch.arange(n) % CLASSES


def nearest_up(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling written out with repeat_interleave."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


# ---------------------------------------------------------------- shapes and labels


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_conditional_shapes_at_every_resolution(res, alpha):
    """G(z, alpha, labels) is [N, 3, R, R] and D(images, alpha, labels) is [N], finite, at every resolution."""
    G, D = make_g(res), make_d(res)
    y = labels_for(4)
    with torch.no_grad():
        images = G(torch.randn(4, LATENT), alpha, y)
        scores = D(images, alpha, y)
    assert images.shape == (4, 3, res, res) and scores.shape == (4,)
    assert torch.isfinite(images).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("res", [4, 16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_the_label_changes_g_output_and_d_score(res, alpha):
    """The same z with another label gives another image; the same image with another label another score."""
    G, D = make_g(res), make_d(res)
    z = torch.randn(1, LATENT).expand(CLASSES, LATENT)
    y = torch.arange(CLASSES)
    with torch.no_grad():
        images = G(z, alpha, y)
        scores = D(images[:1].expand(4, -1, -1, -1), alpha, y[:4])  # batch 4: the minibatch-stddev group
    for i in range(1, CLASSES):
        assert (images[i] - images[0]).abs().max() > 1e-3, i
    assert len(set(scores.tolist())) == 4
    with torch.no_grad():  # and the label is all that changes: the same label gives the same output
        torch.testing.assert_close(G(z[:2], alpha, y[[3, 3]]), images[[3, 3]])


def test_the_projection_is_out_h_plus_embed_dot_h():
    """D's score is out(h) + <embed(y), h>, h the head's last hidden features (the input of `out`)."""
    D = make_d(8).double()
    torch.manual_seed(1)
    images, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), labels_for(4)
    captured = {}
    D.blocks["4"].out.register_forward_hook(lambda m, args, out: captured.update(h=args[0]))
    with torch.no_grad():
        score = D(images, 1.0, y)
        h = captured["h"]
        expected = D.blocks["4"].out(h).squeeze(1) + (D.embed.weight[y] * D.embed.scale * h).sum(1)
    assert h.shape == (4, 16)
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=1e-12)


def test_g_pixel_normalises_the_concatenated_latent_and_embedding():
    """G's first layer sees pixel_norm(cat(z, embed(y))): scaling z and the table together changes nothing."""
    G = make_g(4).double()
    z, y = torch.randn(3, LATENT, dtype=torch.float64), labels_for(3)
    assert G.blocks["4"].dense.weight.shape[1] == 2 * LATENT and G.embed.weight.shape == (CLASSES, LATENT)
    with torch.no_grad():
        before = G(z, 1.0, y)
        G.embed.weight.mul_(7.0)
        torch.testing.assert_close(G(7.0 * z, 1.0, y), before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["G", "D"])
def test_missing_or_bad_labels_raise(kind):
    """A conditional model needs integer labels [N] in [0, num_classes); an unconditional one takes none."""
    model = make(kind, 8)
    x = torch.randn(4, LATENT) if kind == "G" else torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match="labels are required.*num_classes=5"):
        model(x, 1.0)
    with pytest.raises(ValueError, match="label 5 is out of range: num_classes=5"):
        model(x, 1.0, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="label -1 is out of range"):
        model(x, 1.0, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, 1.0, torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(x, 1.0, torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        assert model(x, 1.0, labels_for(4).int()).shape[0] == 4  # int32 is fine too
    with pytest.raises(ValueError, match="unconditional"):
        make(kind, 8, num_classes=0)(x, 1.0, labels_for(4))
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        make(kind, 8, num_classes=-1)


# ---------------------------------------------------------------- the unconditional default is unchanged


@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("res", [4, 16])
def test_num_classes_zero_is_the_default_model(kind, res):
    """num_classes=0 builds exactly the default model: same names, same draws, same outputs, no label layers."""
    torch.manual_seed(0)
    default = Generator(res, latent_dim=LATENT, **SMALL) if kind == "G" else Discriminator(res, **SMALL)
    zero = make(kind, res, num_classes=0)
    assert list(default.state_dict()) == list(zero.state_dict())
    assert not any("embed" in k for k in zero.state_dict())
    assert all(torch.equal(v, zero.state_dict()[k]) for k, v in default.state_dict().items())
    torch.manual_seed(1)
    x = torch.randn(4, LATENT) if kind == "G" else torch.randn(4, 3, res, res)
    with torch.no_grad():
        assert torch.equal(default(x, 0.5), zero(x, 0.5))


@pytest.mark.parametrize("kind", ["G", "D"])
def test_the_label_layers_are_drawn_after_every_unconditional_parameter(kind):
    """Under one seed a conditional model holds the unconditional model's weights (G's first dense layer in its
    latent columns) plus the label layers: the same experiment with and without labels starts alike."""
    plain, cond = make(kind, 16, num_classes=0), make(kind, 16)
    own = cond.state_dict()
    assert set(own) - set(plain.state_dict()) == {"embed.weight"}
    for k, v in plain.state_dict().items():
        got = own[k][:, :LATENT] if (kind, k) == ("G", "blocks.4.dense.weight") else own[k]
        assert torch.equal(got, v), k
    if kind == "G":  # the widened layer keeps the equalized-LR scale gain / sqrt(fan_in)
        torch.testing.assert_close(cond.blocks["4"].dense.scale, plain.blocks["4"].dense.scale / 2**0.5)


# ---------------------------------------------------------------- growth


def grown(kind: str, res: int):
    """(conditional model at res with non-zero biases, conditional model at 2 res grown from it, fresh names)."""
    small = make(kind, res, seed=1)
    with torch.no_grad():
        for name, p in small.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    big = make(kind, 2 * res, seed=2)
    return small, big, grow_from(big, small.state_dict())


@pytest.mark.parametrize("kind", ["G", "D"])
def test_growing_copies_the_label_layers(kind):
    """8 -> 16 px: the embedding / projection (and G's widened first layer) are copied, not left fresh."""
    small, big, fresh = grown(kind, 8)
    assert "embed.weight" not in fresh and not any(k.startswith("blocks.4.") for k in fresh)
    assert torch.equal(big.embed.weight, small.embed.weight)
    assert torch.equal(big.blocks["4"].dense.weight, small.blocks["4"].dense.weight)


def test_grown_conditional_generator_at_alpha_zero_is_upsampled_old_output():
    """A grown conditional G(16) at alpha 0 outputs exactly the nearest-upsampled G(8)(z, 1, labels)."""
    small, big, _ = grown("G", 8)
    z, y = torch.randn(5, LATENT), labels_for(5)
    with torch.no_grad():
        expected = nearest_up(small(z, 1.0, y))
        assert torch.equal(big(z, 0.0, y), expected)
        assert not torch.allclose(big(z, 1.0, y), expected, atol=1e-3)


def test_grown_conditional_discriminator_at_alpha_zero_scores_pooled_images():
    """A grown conditional D(16) at alpha 0 scores images as D(8) at alpha 1 scores their 2x avg-pooled versions."""
    small, big, _ = grown("D", 8)
    torch.manual_seed(3)
    images, y = torch.randn(4, 3, 16, 16), labels_for(4)
    with torch.no_grad():
        assert torch.equal(big(images, 0.0, y), small(F.avg_pool2d(images, 2), 1.0, y))


@pytest.mark.parametrize("kind", ["G", "D"])
def test_growing_across_conditioning_or_class_counts_is_refused(kind):
    """An unconditional state cannot grow a conditional model and back; nor another class count."""
    with pytest.raises(ValueError, match="shape" if kind == "G" else "lacks"):
        grow_from(make(kind, 16, num_classes=0), make(kind, 8).state_dict())
    with pytest.raises(ValueError, match="shape"):
        grow_from(make(kind, 16, num_classes=3), make(kind, 8).state_dict())
    if kind == "G":
        with pytest.raises(ValueError, match="shape"):
            grow_from(make(kind, 16), make(kind, 8, num_classes=0).state_dict())


# ---------------------------------------------------------------- gradients


def test_gradients_reach_the_embedding_and_the_projection():
    """The loss's gradient reaches G's embedding rows and D's projection rows of the labels used, no others."""
    G, D = make_g(16), make_d(16)
    y = torch.tensor([0, 2, 2, 3])
    D(G(torch.randn(4, LATENT), 0.5, y), 0.5, y).sum().backward()
    for net in (G, D):
        used = net.embed.weight.grad.abs().amax(dim=1)
        assert (used[[0, 2, 3]] > 0).all() and (used[[1, 4]] == 0).all()
    assert G.blocks["4"].dense.weight.grad[:, LATENT:].abs().max() > 0  # the label columns of the first layer


# ---------------------------------------------------------------- config, checkpoint, export


def test_model_conditional_is_off_in_every_preset_and_num_classes_reaches_both_networks():
    """model.conditional is false in every preset; networks_from passes the data's class count to G and D."""
    for preset in ("small", "paper"):
        assert compose_config(f"model={preset}").model.conditional is False
    cfg = compose_config("model=small", "model.conditional=true")
    with torch.device("meta"):
        G, D = networks_from(cfg.model, 8, 7)
        plain, _ = networks_from(cfg.model, 8)  # no class count: unconditional
    assert G.num_classes == D.num_classes == 7 and plain.num_classes == 0
    assert G.embed.weight.shape == (7, 128) and D.embed.weight.shape == (7, 64)
    assert model_kwargs_from({**cfg.model, "num_classes": 3})["num_classes"] == 3  # an export's config.json


def test_a_checkpoint_of_a_conditional_model_validates_and_rebuilds():
    """checkpoint_problem accepts a conditional checkpoint (and rejects it when its class list has the wrong
    length); generator_from_checkpoint rebuilds the conditional G with its class names."""
    model = dict(model_kwargs_from(compose_config("model=small").model), channels=None)
    model.update(latent_dim=LATENT, **SMALL, mbstd_group_size=4, conditional=True)
    del model["num_classes"]
    G, D = networks_from(model, 8, CLASSES)
    names = [f"class {i}" for i in range(CLASSES)]
    state = {"config": {"model": model}, "resolution": 8, "nimg": 0, "G": G.state_dict(), "G_ema": G.state_dict()}
    state.update(D=D.state_dict(), opt_G={}, opt_D={}, classes=names)
    assert checkpoint_problem(state) is None
    H, alpha = generator_from_checkpoint(state)
    assert H.class_names == tuple(names)
    z, y = torch.randn(3, LATENT), labels_for(3)
    with torch.no_grad():
        assert alpha == 1.0 and torch.equal(H(z, 1.0, y), G(z, 1.0, y))
    state["classes"] = names[:3]
    assert "embed.weight has shape (5, 16), expected (3, 16)" in checkpoint_problem(state)


def test_conditional_export_round_trip(tmp_path: Path):
    """safetensors + config.json carry num_classes; the rebuilt G makes the same images for the same labels."""
    G = make_g(16).eval()
    assert generator_kwargs(G)["num_classes"] == CLASSES
    export_safetensors(G, 0.3, tmp_path / "x")
    assert json.loads((tmp_path / "x" / CONFIG).read_text())["num_classes"] == CLASSES
    H, alpha = load_generator(tmp_path / "x")
    assert H.num_classes == CLASSES and alpha == 0.3 and H.class_names == G.class_names
    z, y = torch.randn(6, LATENT), labels_for(6)
    with torch.no_grad():
        assert torch.equal(H(z, alpha, y), G(z, alpha, y))
    with pytest.raises(ValueError, match="labels are required"):
        H(z, alpha)


def test_an_unconditional_export_without_num_classes_still_loads(tmp_path: Path):
    """config.json written before conditional models (no num_classes) rebuilds an unconditional G."""
    export_safetensors(make_g(8, num_classes=0), 1.0, tmp_path / "x")
    config = json.loads((tmp_path / "x" / CONFIG).read_text())
    assert config.pop("num_classes") == 0
    (tmp_path / "x" / CONFIG).write_text(json.dumps(config))
    assert load_generator(tmp_path / "x")[0].num_classes == 0


def test_conditional_onnx_takes_latent_and_labels(tmp_path: Path):
    """The ONNX graph of a conditional G has inputs (latent, labels) and matches PyTorch for any batch size."""
    ort = pytest.importorskip("onnxruntime")
    G = make_g(8).eval()
    path = export_onnx(G, 0.5, tmp_path / "generator.onnx")
    assert check_onnx(G, 0.5, path, atol=1e-4) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["latent", "labels"]
    z, y = torch.randn(3, LATENT), torch.tensor([4, 0, 4])
    (images,) = session.run(None, {"latent": z.numpy(), "labels": y.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(images), G(z, 0.5, y), atol=1e-4, rtol=0)
