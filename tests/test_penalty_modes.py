"""loss.penalty_mode=approx: R1, R2 and WGAN-GP from central finite differences, the slopes
(D(x + sigma eps) - D(x - sigma eps)) / (2 sigma), with first-order gradients only. Known answers on a linear
D, convergence to the exact penalty as sigma -> 0 on a smooth D (float64), gradients to D's parameters, no
double backward in the step, and the trainer's paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
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
from torch.autograd.function import once_differentiable

from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.losses import (
    approx_gradient_penalty,
    approx_zero_centred_penalty,
    finite_difference_slopes,
    gradient_penalty,
    make_loss,
    zero_centred_penalty,
)
from pgan.train.loop import train
from pgan.train.step import d_penalty_step, d_step

APPROX = ["loss.penalty_mode=approx", "loss.penalty_sigma=0.01"]


class SmoothD(nn.Module):
    """A smooth nonlinear D in float64: tanh(x W1) . w2 per image (48 inputs)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(48, 16, generator=gen, dtype=torch.float64) / 7)
        self.w2 = nn.Parameter(torch.randn(16, generator=gen, dtype=torch.float64))

    def forward(self, x: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose backward cannot itself be differentiated: any double backward through it raises."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class FirstOrderD(SmoothD):
    """SmoothD behind `_FirstOrderOnly`: a step that differentiates it twice fails."""

    def forward(self, x: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(_FirstOrderOnly.apply(x))


class FixedG(nn.Module):
    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.latent_dim = images, 4

    def forward(self, z: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.images


def inputs(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def input_gradients(D: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x).sum(), x)
    return grad.flatten(1)


def test_the_slopes_of_a_linear_d_are_its_weights_along_eps() -> None:
    """D(x) = <w, x>: the central slope is <w, eps> at any sigma; the penalties follow exactly."""
    gen = torch.Generator().manual_seed(2)
    w, x, eps = (torch.randn(5, 48, generator=gen, dtype=torch.float64) for _ in range(3))
    w = w[0]
    for sigma in (1e-3, 0.1, 1.0):
        minus, plus = (x - sigma * eps) @ w, (x + sigma * eps) @ w
        torch.testing.assert_close(finite_difference_slopes(minus, plus, sigma), eps @ w, rtol=1e-9, atol=1e-9)
        r1 = approx_zero_centred_penalty(minus, plus, sigma, gamma=0.4)
        assert r1.item() == pytest.approx(0.2 * (eps @ w).square().mean().item(), rel=1e-9)


def test_approx_r1_converges_to_the_exact_penalty_as_sigma_shrinks() -> None:
    """On a smooth D, with eps fixed, the central slope tends to grad D . eps with an error quadratic in sigma
    (the one-sided slope's error is linear, and larger); averaged over many eps the approximate penalty tends
    to the exact gamma / 2 * E||grad D||^2."""
    D, x = SmoothD(), inputs()
    grads = input_gradients(D, x)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact_slopes = (grads * eps.flatten(1)).sum(1)
    central, one_sided = [], []
    with torch.no_grad():
        for sigma in (1e-1, 1e-2, 1e-3):
            central.append(finite_difference_slopes(D(x - sigma * eps), D(x + sigma * eps), sigma) - exact_slopes)
            one_sided.append((D(x + sigma * eps) - D(x)) / sigma - exact_slopes)
    central_errors = [e.abs().max().item() for e in central]
    assert all(b == pytest.approx(a / 100, rel=0.2) for a, b in zip(central_errors, central_errors[1:]))  # O(sigma^2)
    assert all(c.abs().max() < o.abs().max() / 10 for c, o in zip(central, one_sided))
    # The expectation over eps: 20,000 draws per image (the estimate's relative sd is sqrt(2 / 20000) = 1 %).
    x_many = x.repeat_interleave(20_000, dim=0)
    eps_many = torch.randn(x_many.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        approx = approx_zero_centred_penalty(D(x_many - 1e-3 * eps_many), D(x_many + 1e-3 * eps_many), 1e-3, 2.0)
    x_req = x.clone().requires_grad_(True)
    exact = zero_centred_penalty(D(x_req), x_req, gamma=2.0)
    assert approx.item() == pytest.approx(exact.item(), rel=0.03)


def test_approx_gradient_penalty_is_unbiased_for_wgan_gp() -> None:
    """E over eps of the estimate u^2 - 2 t sqrt(pi / 2) |u| + t^2 is (||grad D|| - t)^2: on a linear D with
    ||w|| = 2.5 and target 1, the mean over 200,000 draws is 10 * 1.5^2 / 1 within 2 %."""
    w = torch.randn(48, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w = 2.5 * w / w.norm()
    x = torch.zeros(200_000, 48, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    approx = approx_gradient_penalty((x - 0.01 * eps) @ w, (x + 0.01 * eps) @ w, 0.01, weight=10.0, target=1.0)
    x_req = torch.zeros(3, 48, dtype=torch.float64, requires_grad=True)
    exact = gradient_penalty(x_req @ w, x_req, weight=10.0, target=1.0)
    assert exact.item() == pytest.approx(22.5, rel=1e-9)
    assert approx.item() == pytest.approx(22.5, rel=0.02)


def test_approx_penalty_gradients_reach_d_and_match_the_exact_ones_on_average() -> None:
    """The approximate R1's gradient w.r.t. D's weights is a first-order one, and averaged over eps it matches
    the exact penalty's (double-backward) gradient."""
    D, x = SmoothD(), inputs(n=4)
    x_req = x.clone().requires_grad_(True)
    zero_centred_penalty(D(x_req), x_req, gamma=1.0).backward()
    exact = [p.grad.clone() for p in D.parameters()]
    D.zero_grad()
    x_many = x.repeat_interleave(20_000, dim=0)
    eps = torch.randn(x_many.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    approx_zero_centred_penalty(D(x_many - 1e-3 * eps), D(x_many + 1e-3 * eps), 1e-3, gamma=1.0).backward()
    for approx_grad, exact_grad in zip((p.grad for p in D.parameters()), exact):
        assert approx_grad.abs().sum() > 0
        cosine = torch.nn.functional.cosine_similarity(approx_grad.flatten(), exact_grad.flatten(), dim=0)
        assert cosine.item() > 0.98
        assert approx_grad.norm().item() == pytest.approx(exact_grad.norm().item(), rel=0.05)


@pytest.mark.parametrize("name", ["rpgan", "wgan_gp"])
def test_the_approx_d_step_never_differentiates_twice(name: str) -> None:
    """With a D whose backward cannot be differentiated, the exact penalty's step fails and the approximate one
    runs, every D call through the (compilable) D, never through eager_D; its penalty is the known one."""
    reals, fakes = inputs(4, seed=8), inputs(4, seed=9)
    G = FixedG(fakes)
    gammas = {"r1_gamma": 1.0, "r2_gamma": 0.5} if name == "rpgan" else {}
    D = FirstOrderD()
    opt = torch.optim.Adam(D.parameters(), lr=0.0, fused=True)
    with pytest.raises(RuntimeError):
        d_step(G, D, opt, make_loss(name, **gammas), reals, torch.zeros(4, 4), 1.0)

    class Forbidden(nn.Module):
        def forward(self, *args):
            raise AssertionError("the approximate penalty must not call eager_D")

    loss = make_loss(name, penalty_mode="approx", penalty_sigma=1e-3, **gammas)
    torch.manual_seed(0)
    stats = d_step(G, D, opt, loss, reals, torch.zeros(4, 4), 1.0, eager_D=Forbidden())
    assert stats["Guard/skipped_D"].item() == 0
    torch.manual_seed(0)
    with torch.no_grad():  # the same draws, in the step's order

        def slope_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps = torch.randn(x.shape).double()
            return D(x - 1e-3 * eps), D(x + 1e-3 * eps)

        if name == "rpgan":
            r1, r2 = slope_pair(reals), slope_pair(fakes)
            expected = approx_zero_centred_penalty(*r1, 1e-3, 1.0) + approx_zero_centred_penalty(*r2, 1e-3, 0.5)
        else:
            mixed = torch.lerp(reals, fakes, torch.rand(4, 1, 1, 1).double())
            expected = approx_gradient_penalty(*slope_pair(mixed), 1e-3, weight=10.0)
    assert stats["Loss/gp"].item() == pytest.approx(expected.item(), rel=1e-9)
    lazy = make_loss(name, penalty_mode="approx", penalty_sigma=1e-3, penalty_every=4, **gammas)
    torch.manual_seed(0)
    lazy_stats = d_penalty_step(D, opt, lazy, reals, fakes, 1.0, eager_D=Forbidden())
    assert lazy_stats["Loss/gp"].item() == pytest.approx(expected.item(), rel=1e-9)  # applied 4x, reported once


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.penalty_mode=second"], "loss.penalty_mode must be one of exact, approx"),
        (["loss.penalty_sigma=0"], "loss.penalty_sigma must be auto or a number > 0"),
    ],
)
def test_bad_penalty_mode_settings_are_one_line_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, *overrides), tmp_path / "run")


@pytest.mark.parametrize("loss", ["rpgan", "wgan_gp"])
def test_approx_runs_train_and_resume_mid_fade_bit_identically(loss: str, tmp_path: Path) -> None:
    """A tiny 8 -> 16 px run with the approximate penalty (lazy for wgan_gp, with augmentation for rpgan): a
    positive, finite penalty, and a resume from its mid-fade snapshot ends bit-identical to the whole run."""
    extra = ["augment.policy=[color,translation]", "augment.p=0.3"] if loss == "rpgan" else ["loss.penalty_every=2"]
    assert_resumes_mid_fade_exactly([*TINY, f"loss={loss}", *APPROX, *extra], tmp_path)
    rows = stats_rows(tmp_path / "full")
    penalties = [r["Loss/gp"] for r in rows if "Loss/gp" in r]  # rpgan: lazy, in every other tick of 2 steps
    assert len(penalties) >= len(rows) // 2 and all(math.isfinite(gp) and gp > 0 for gp in penalties)


@pytest.mark.distributed
def test_two_rank_approx_computes_what_one_process_computes(tmp_path: Path) -> None:
    """eps is drawn for the global batch and each rank keeps its rows: 2 ranks compute what one process does.
    (WGAN-GP: with rpgan, D's output bias cancels from every term, so its gradient is rounding noise, which
    Adam's normalisation turns into steps of about lr that differ with the summation order.)"""
    overrides = [*SAME_FUNCTION, "loss=wgan_gp", *APPROX]
    result = torchrun(tmp_path / "ddp", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    single = load_checkpoint(train(compose_config(*TINY, *overrides), tmp_path / "single"))
    ours = load_checkpoint(tmp_path / "ddp" / "stage-0016" / "final.pt")
    for key in ("G", "D", "G_ema"):
        for name, value in ours[key].items():
            torch.testing.assert_close(value, single[key][name], **TOLERANCE, msg=f"{key}.{name}")


def test_the_approx_penalty_step_makes_two_d_passes_per_penalty() -> None:
    """Lazy and approximate: R1 and R2 take D at x - sigma eps and x + sigma eps each (4 passes), and no pass
    for loss scores the penalty update does not use; the non-lazy step adds the loss's 2 passes."""
    calls = []

    class Counting(SmoothD):
        def forward(self, x, alpha=1.0, labels=None):
            calls.append(x.shape[0])
            return super().forward(x, alpha, labels)

    D, reals, fakes = Counting(), inputs(4, seed=10), inputs(4, seed=11)
    opt = torch.optim.Adam(D.parameters(), lr=0.0, fused=True)
    lazy = make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0, penalty_mode="approx", penalty_every=2)
    d_penalty_step(D, opt, lazy, reals, fakes, 1.0)
    assert calls == [4, 4, 4, 4]
    calls.clear()
    eager = make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0, penalty_mode="approx")
    d_step(FixedG(fakes), D, opt, eager, reals, torch.zeros(4, 4), 1.0)
    assert calls == [4, 4, 4, 4, 4, 4]
