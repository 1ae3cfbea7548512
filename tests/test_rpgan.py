"""loss=rpgan (relativistic pairing + R1 + R2, R3GAN) and R2 with logistic / hinge: known answers for every new
term, gradients by finite differences in float64, and the trainer's paths (conditional, augmented, lazy,
exact resume, 2 ranks) with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SAME_FUNCTION,
    TINY,
    TOLERANCE,
    assert_resumes_mid_fade_exactly,
    compose_config,
    stats_rows,
    torchrun,
)
from torch import nn

from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.losses import gamma_scale_at, make_loss, relativistic_d_loss, relativistic_g_loss, zero_centred_penalty
from pgan.networks import Discriminator, Generator
from pgan.train.loop import train
from pgan.train.state import build_optimizers
from pgan.train.step import d_penalty_step, d_step, g_step, train_step

RPGAN = ["loss=rpgan", "loss.r1_gamma=0.5", "loss.r2_gamma=0.25"]


class LinearD(nn.Module):
    """D(x) = <w, x> + b per image: its input gradient is w for every image, so ||grad||^2 = ||w||^2."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=dtype))

    def forward(self, x: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1) + self.b


class FixedG(nn.Module):
    """G(z) = a fixed batch of images (times a learnable scale), to drive d_step / g_step by hand."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.scale, self.latent_dim = images, nn.Parameter(torch.ones((), dtype=images.dtype)), 4

    def forward(self, z: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.images * self.scale


def frozen(net: nn.Module) -> torch.optim.Adam:
    """The step needs an optimizer that can skip on a device flag (fused Adam); lr 0 keeps the weights."""
    return torch.optim.Adam(net.parameters(), lr=0.0, fused=True)


def test_relativistic_losses_known_values() -> None:
    """softplus(-(D(x_r) - D(x_f))) pairs real i with fake i; G's loss swaps the roles."""
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    expected_d = torch.stack(
        [F.softplus(torch.tensor(-2.0)), F.softplus(torch.tensor(2.0)), F.softplus(torch.tensor(0.0))]
    )
    assert relativistic_d_loss(real, fake) == pytest.approx(expected_d.mean().item(), rel=1e-6)
    assert relativistic_g_loss(fake, real) == pytest.approx(F.softplus(real - fake).mean().item(), rel=1e-6)
    # Pairing, not a batch mean of each side: swapping two fakes changes the loss.
    assert relativistic_d_loss(real, fake.flip(0)) != pytest.approx(relativistic_d_loss(real, fake).item())


def test_relativistic_gradients_match_finite_differences() -> None:
    """The losses' gradients w.r.t. the scores, checked by finite differences in float64."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    fake = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(relativistic_d_loss, (real, fake))
    assert torch.autograd.gradcheck(relativistic_g_loss, (fake, real))


def test_zero_centred_penalty_of_a_linear_d_is_gamma_half_w_squared() -> None:
    """R1 / R2 of D(x) = <w, x> + b is gamma / 2 * ||w||^2 at any input."""
    D = LinearD((3, 4, 4))
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    penalty = zero_centred_penalty(D(x), x, gamma=0.7)
    assert penalty.item() == pytest.approx(0.35 * D.w.square().sum().item(), rel=1e-12)


def test_penalty_parameter_gradients_match_finite_differences() -> None:
    """The double backward through a smooth nonlinear D: d(penalty)/d(weights) by finite differences."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    w1 = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w2 = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)

    def penalty(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        inputs = x.clone().requires_grad_(True)
        return zero_centred_penalty(torch.tanh(inputs @ w1) @ w2, inputs, gamma=2.0)

    assert torch.autograd.gradcheck(penalty, (w1, w2))


@pytest.mark.parametrize("name", ["rpgan", "logistic", "hinge"])
def test_d_step_adds_r1_and_r2_and_g_gets_no_gradient_from_it(name: str) -> None:
    """With a linear D the step's penalty is (gamma_1 + gamma_2) / 2 * ||w||^2 exactly; the fakes are detached,
    so G's parameters get no gradient from the D step; with penalty_every=2 the lazy penalty step applies it
    twice and reports it once (Loss/gp reads the same for every k)."""
    reals = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    G, D = FixedG(torch.randn(4, 3, 4, 4, dtype=torch.float64)), LinearD((3, 4, 4))
    w_squared = D.w.detach().square().sum().item()
    loss = make_loss(name, r1_gamma=0.5, r2_gamma=0.25)
    stats = d_step(G, D, frozen(D), loss, reals, torch.zeros(4, 4), 1.0)
    assert stats["Loss/gp"].item() == pytest.approx(0.375 * w_squared, rel=1e-9)
    assert G.scale.grad is None
    lazy = make_loss(name, r1_gamma=0.5, r2_gamma=0.25, penalty_every=2)
    stats = d_penalty_step(D, frozen(D), lazy, reals, G(torch.zeros(4, 4)), 1.0)
    assert stats["Loss/gp"].item() == pytest.approx(0.375 * w_squared, rel=1e-9)
    assert G.scale.grad is None
    r2_only = make_loss(name, r2_gamma=0.25)
    stats = d_step(G, D, frozen(D), r2_only, reals, torch.zeros(4, 4), 1.0)
    assert stats["Loss/gp"].item() == pytest.approx(0.125 * w_squared, rel=1e-9)


def test_rpgan_g_step_compares_with_the_reals() -> None:
    """G's loss is softplus(D(x_r) - D(G(z))) over the pairs, and its gradient reaches G through D(G(z))."""
    reals, fakes = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    G, D = FixedG(fakes), LinearD((3, 4, 4))
    opt = frozen(G)
    stats = g_step(G, D, opt, make_loss("rpgan"), torch.zeros(4, 4), 1.0, reals=reals)
    expected = F.softplus(D(reals) - D(fakes)).mean()
    assert stats["Loss/G"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert G.scale.grad is not None and G.scale.grad.abs().item() > 0
    assert all(p.grad is None for p in D.parameters()), "D is frozen in the G step"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=rpgan", "loss.r2_gamma=-1"], "loss.r2_gamma must be a finite number >= 0"),
        (["loss=wgan_gp", "+loss.r2_gamma=1.0"], "r2_gamma applies to logistic, hinge and rpgan"),
        # An infinite gamma made every penalty step non-finite, which the guard skipped: the penalty was off.
        (["loss=rpgan", "loss.r1_gamma=inf"], "loss.r1_gamma must be a finite number >= 0, got inf"),
        (["loss=rpgan", "loss.penalty_every=true"], "loss.penalty_every must be an integer >= 1, got True"),
        # WGAN-GP's own keys: a zero target skipped every step, a string failed mid-training.
        (["loss=wgan_gp", "loss.gp_target=0"], "loss.gp_target must be a finite number > 0"),
        (["loss=wgan_gp", "loss.gp_weight=abc"], "loss.gp_weight must be a finite number >= 0, got 'abc'"),
        (["loss=wgan_gp", "loss.gp_weight=nan"], "loss.gp_weight must be a finite number >= 0"),
        (["loss=wgan_gp", "loss.drift=-1"], "loss.drift must be a finite number >= 0"),
    ],
)
def test_bad_loss_settings_are_one_line_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, *overrides), tmp_path / "run")


def test_rpgan_trains_and_resumes_mid_fade_bit_identically(tmp_path: Path) -> None:
    """A tiny 8 -> 16 px rpgan run with augmentation and lazy penalties: finite, penalised, and a resume from
    its mid-fade snapshot ends bit-identical to the uninterrupted run."""
    overrides = [*TINY, *RPGAN, "loss.penalty_every=2", "augment.policy=[color,translation]", "augment.p=0.3"]
    assert_resumes_mid_fade_exactly(overrides, tmp_path)
    rows = stats_rows(tmp_path / "full")
    assert all(torch.isfinite(torch.tensor([r["Loss/D"], r["Loss/G"], r["Loss/gp"]])).all() for r in rows)
    assert all(r["Loss/gp"] > 0 for r in rows)


def record_labels(net: nn.Module) -> list[torch.Tensor | None]:
    """The class labels of every forward call of `net` from now on, in call order."""
    seen: list[torch.Tensor | None] = []

    def hook(_module, args, kwargs):
        labels = kwargs.get("labels", args[2] if len(args) > 2 else None)
        seen.append(None if labels is None else labels.clone())

    net.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("every", [1, 2])
def test_conditional_rpgan_pairs_each_real_with_a_fake_of_its_class(every: int) -> None:
    """Class labels reach both sides of every pair: the reals' classes generate the fakes, and every D call (the
    loss, R1 on the reals, R2 on the fakes, the G step's pair) scores its images under the reals' labels, in order;
    also in lazy regularisation's penalty-only update."""
    torch.manual_seed(0)
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=4)
    D = Discriminator(8, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=4)
    G_seen, D_seen = record_labels(G), record_labels(D)
    G_ema = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4, num_classes=4).requires_grad_(False)
    opt_G, opt_D = build_optimizers(G, D, 0.002)
    loss = make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0, penalty_every=every)
    labels = torch.tensor([2, 0, 3, 1])
    for step_index in range(every):
        G_seen.clear(), D_seen.clear()
        scalars = train_step(
            G, D, G_ema, opt_G, opt_D, loss, torch.randn(4, 3, 8, 8), 1.0, 0.9, None, step_index, labels=labels
        )
        assert torch.isfinite(torch.stack(list(scalars.values()))).all()
        penalty_update = every > 1 and step_index == 0
        assert len(G_seen) == 2 and len(D_seen) == (6 if penalty_update else 4)
        assert all(seen is not None and torch.equal(seen, labels) for seen in G_seen + D_seen)


def test_conditional_rpgan_trains(tmp_path: Path) -> None:
    """The whole trainer, conditional, with rpgan: finite losses and a class-conditional G at the end."""
    run = train(compose_config(*TINY, *RPGAN, "model.conditional=true", "data.size=64"), tmp_path)
    rows = stats_rows(tmp_path)
    assert rows and all(torch.isfinite(torch.tensor([r["Loss/D"], r["Loss/G"]])).all() for r in rows)
    assert load_checkpoint(run)["G_ema"]["embed.weight"].shape[0] == 16  # the shapes' 16 classes


@pytest.mark.distributed
def test_two_rank_rpgan_computes_what_one_process_computes(tmp_path: Path) -> None:
    """The pairs are per image, so each rank's half of the batch pairs its own reals and fakes: 2 ranks
    compute what one process does."""
    result = torchrun(tmp_path / "ddp", *SAME_FUNCTION, *RPGAN)
    assert result.returncode == 0, result.stderr[-3000:]
    single = load_checkpoint(train(compose_config(*TINY, *SAME_FUNCTION, *RPGAN), tmp_path / "single"))
    ours = load_checkpoint(tmp_path / "ddp" / "stage-0016" / "final.pt")
    for key in ("G", "D", "G_ema"):
        for name, value in ours[key].items():
            torch.testing.assert_close(value, single[key][name], **TOLERANCE, msg=f"{key}.{name}")


def test_gamma_decays_by_a_cosine_from_one_to_the_final_scale() -> None:
    """1 at the start, halfway between at half the decay, the final scale at its end and after; off: 1."""
    assert gamma_scale_at(0.0, 10.0, 0.1) == 1.0
    assert gamma_scale_at(5.0, 10.0, 0.1) == pytest.approx(0.55, abs=1e-12)
    assert gamma_scale_at(2.5, 10.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert gamma_scale_at(10.0, 10.0, 0.1) == pytest.approx(0.1) and gamma_scale_at(99.0, 10.0, 0.1) == 0.1
    assert gamma_scale_at(3.0, 0.0, 0.1) == 1.0


def test_d_step_scales_r1_and_r2_by_the_decay() -> None:
    """The step's gamma_scale multiplies both penalties (a linear D: exactly)."""
    reals = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    G, D = FixedG(torch.randn(4, 3, 4, 4, dtype=torch.float64)), LinearD((3, 4, 4))
    loss = make_loss("rpgan", r1_gamma=0.5, r2_gamma=0.25, gamma_decay_kimg=1.0)
    stats = d_step(G, D, frozen(D), loss, reals, torch.zeros(4, 4), 1.0, gamma_scale=0.2)
    assert stats["Loss/gp"].item() == pytest.approx(0.2 * 0.375 * D.w.detach().square().sum().item(), rel=1e-9)


def test_a_decaying_gamma_is_logged_and_follows_the_run_images(tmp_path: Path) -> None:
    """Loss/gamma_scale falls over the run's images as the cosine says (the tick's mean), and the penalty with it."""
    train(compose_config(*TINY, *RPGAN, "loss.gamma_decay_kimg=0.1", "loss.gamma_final_scale=0.2"), tmp_path)
    rows = stats_rows(tmp_path)
    scales = [r["Loss/gamma_scale"] for r in rows]
    assert scales == sorted(scales, reverse=True) and scales[0] < 1 and scales[-1] == pytest.approx(0.2)
    # Lazy R1 / R2 every 4th step, ticks of 2 steps: at least every other tick has a penalty step, logged.
    penalties = [r["Loss/gp"] for r in rows if "Loss/gp" in r]
    assert rows[-1]["step"] > 100 and len(penalties) >= len(rows) // 2 and all(gp > 0 for gp in penalties)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=rpgan", "loss.gamma_decay_kimg=-1"], "loss.gamma_decay_kimg must be a finite number >= 0"),
        (["loss=rpgan", "loss.gamma_final_scale=2"], "loss.gamma_final_scale must be a finite number in \\[0, 1\\]"),
        (["loss=wgan_gp", "+loss.gamma_decay_kimg=1"], "which wgan_gp does not use"),
    ],
)
def test_bad_decay_settings_are_one_line_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, *overrides), tmp_path / "run")
