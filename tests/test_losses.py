"""Tests for pgan.losses: WGAN(-GP), R1, logistic and hinge losses, and make_loss."""

import pytest
import torch
import torch.nn.functional as F

from pgan.losses import (
    LOSS_NAMES,
    gradient_penalty,
    hinge_d_loss,
    hinge_g_loss,
    logistic_d_loss,
    logistic_g_loss,
    make_loss,
    r1_penalty,
    wgan_d_loss,
    wgan_g_loss,
)

SHAPE = (4, 3, 4, 4)  # a small batch of images for the critics below

# ---------------------------------------------------------------- critics with known input gradients


def linear_critic(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """D(x) = sum(w * x) per sample; its input gradient is w for every sample."""
    return (x.flatten(1) * w).sum(dim=1)


def make_nonlinear_critic(seed: int = 0):
    """A small float64 two-layer tanh critic (per-sample, so samples do not interact)."""
    g = torch.Generator().manual_seed(seed)
    d = SHAPE[1] * SHAPE[2] * SHAPE[3]
    w1 = torch.randn(d, 8, generator=g, dtype=torch.float64) / d**0.5
    b1 = torch.randn(8, generator=g, dtype=torch.float64)
    w2 = torch.randn(8, generator=g, dtype=torch.float64)

    def critic(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ w1 + b1) @ w2 + (x.flatten(1) ** 3).sum(dim=1) / 10

    return critic


def finite_difference_grad_norms(critic, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """||grad_x D(x_n)|| per sample by central differences, coordinate by coordinate (no autograd)."""
    flat = x.detach().flatten(1)
    grads = torch.zeros_like(flat)
    for j in range(flat.shape[1]):
        step = torch.zeros_like(flat)
        step[:, j] = h
        plus = critic((flat + step).reshape(x.shape))
        minus = critic((flat - step).reshape(x.shape))
        grads[:, j] = (plus - minus) / (2 * h)
    return grads.norm(dim=1)


def random_inputs(dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """Random images that require grad, as the penalties expect."""
    torch.manual_seed(seed)
    return torch.randn(SHAPE, dtype=dtype).requires_grad_(True)


# ---------------------------------------------------------------- WGAN


@pytest.mark.parametrize("drift", [0.0, 0.001, 0.5])
def test_wgan_d_loss_formula(drift):
    """wgan_d_loss = mean(fake) - mean(real) + drift * mean(real^2)."""
    real = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    fake = torch.tensor([0.25, -1.0, 4.0, 2.0], dtype=torch.float64)
    expected = (0.25 - 1.0 + 4.0 + 2.0) / 4 - (1.0 - 2.0 + 3.0 + 0.5) / 4 + drift * (1.0 + 4.0 + 9.0 + 0.25) / 4
    assert wgan_d_loss(real, fake, drift=drift).item() == pytest.approx(expected, rel=1e-12)


def test_wgan_d_loss_default_drift_is_progans():
    """The default drift is ProGAN's 0.001."""
    real = torch.tensor([2.0, 4.0])
    fake = torch.tensor([0.0, 0.0])
    assert wgan_d_loss(real, fake).item() == pytest.approx(-3.0 + 0.001 * 10.0, rel=1e-6)


def test_wgan_g_loss_formula():
    """wgan_g_loss = -mean(fake)."""
    assert wgan_g_loss(torch.tensor([1.0, 2.0, -6.0])).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- gradient penalty


@pytest.mark.parametrize("weight, target", [(10.0, 1.0), (1.0, 1.0), (10.0, 750.0), (2.5, 0.3)])
def test_gradient_penalty_of_linear_critic(weight, target):
    """A linear critic has gradient w, so GP = weight * (||w|| - target)^2 / target^2."""
    torch.manual_seed(2)
    w = torch.randn(48, dtype=torch.float64)
    x = random_inputs()
    gp = gradient_penalty(linear_critic(x, w), x, weight=weight, target=target)
    expected = weight * (w.norm().item() - target) ** 2 / target**2
    assert gp.item() == pytest.approx(expected, rel=1e-6)


def test_gradient_penalty_default_weight_and_target():
    """The defaults are lambda 10 and target 1; a critic with unit-norm gradient is not penalised."""
    w = torch.zeros(48, dtype=torch.float64)
    w[:3] = torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64)  # ||w|| = 13
    x = random_inputs()
    assert gradient_penalty(linear_critic(x, w), x).item() == pytest.approx(10 * 12**2, rel=1e-6)
    x = random_inputs()
    assert gradient_penalty(linear_critic(x, w / 13), x).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("target", [0.5, 750.0])
def test_gradient_penalty_target_scaling(target):
    """Scaling the critic by `target` and using that target gives the same penalty as target 1."""
    critic = make_nonlinear_critic()
    x = random_inputs()
    gp_one = gradient_penalty(critic(x), x, weight=10.0, target=1.0)
    x2 = random_inputs()
    gp_scaled = gradient_penalty(target * critic(x2), x2, weight=10.0, target=target)
    assert gp_scaled.item() == pytest.approx(gp_one.item(), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_penalty_of_nonlinear_critic_matches_finite_differences(seed):
    """For a nonlinear float64 critic GP == lambda * mean((||grad|| - 1)^2) with FD gradient norms."""
    critic = make_nonlinear_critic(seed)
    x = random_inputs(seed=seed + 10) * 1.5
    x = x.detach().requires_grad_(True)
    norms = finite_difference_grad_norms(critic, x)
    assert norms.std() > 0.01  # the samples really have different gradient norms
    expected = 10.0 * ((norms - 1.0) ** 2).mean()
    gp = gradient_penalty(critic(x), x, weight=10.0)
    assert gp.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_penalty_is_differentiable_wrt_critic_parameters():
    """create_graph: d GP / d w == weight * 2 (||w|| - 1) w / ||w|| for the linear critic."""
    torch.manual_seed(3)
    w = torch.randn(48, dtype=torch.float64).requires_grad_(True)
    x = random_inputs()
    gp = gradient_penalty(linear_critic(x, w), x, weight=10.0)
    gp.backward()
    assert w.grad is not None
    wd = w.detach()
    expected = 10.0 * 2 * (wd.norm() - 1.0) * wd / wd.norm()
    assert w.grad.abs().max() > 1.0
    torch.testing.assert_close(w.grad.double(), expected, rtol=1e-5, atol=1e-8)


def test_gradient_penalty_param_grad_matches_finite_differences_for_nonlinear_critic():
    """The GP's gradient w.r.t. a nonlinear critic's parameter matches central differences of the GP."""
    torch.manual_seed(4)
    x = random_inputs().detach()
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def gp_at(scale: torch.Tensor) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        scores = torch.tanh(scale * xi.flatten(1)).sum(dim=1) * 0.5
        return gradient_penalty(scores, xi, weight=1.0)

    gp_at(a).backward()
    h = 1e-4
    plus, minus = (gp_at(torch.tensor(0.7 + d, dtype=torch.float64)) for d in (h, -h))
    fd = (plus - minus) / (2 * h)
    assert abs(a.grad.item()) > 0.1
    assert a.grad.item() == pytest.approx(fd.item(), rel=1e-3)


# ---------------------------------------------------------------- R1


@pytest.mark.parametrize("gamma", [0.1, 1.0, 10.0])
def test_r1_penalty_of_linear_critic(gamma):
    """R1 = gamma / 2 * ||w||^2 for a linear critic, and its gradient w.r.t. w is gamma * w."""
    torch.manual_seed(5)
    w = torch.randn(48, dtype=torch.float64).requires_grad_(True)
    x = random_inputs()
    r1 = r1_penalty(linear_critic(x, w), x, gamma)
    assert r1.item() == pytest.approx(gamma / 2 * w.detach().square().sum().item(), rel=1e-6)
    r1.backward()
    torch.testing.assert_close(w.grad.double(), gamma * w.detach(), rtol=1e-5, atol=1e-8)


def test_r1_penalty_of_nonlinear_critic_matches_finite_differences():
    """R1 = gamma / 2 * mean ||grad||^2 with finite-difference gradient norms."""
    critic = make_nonlinear_critic(7)
    x = random_inputs(seed=8)
    norms = finite_difference_grad_norms(critic, x)
    r1 = r1_penalty(critic(x), x, gamma=4.0)
    assert r1.item() == pytest.approx((2.0 * norms.square()).mean().item(), rel=1e-6)


@pytest.mark.parametrize("penalty", ["gp", "r1"])
def test_penalties_keep_float64_precision(penalty):
    """For float64 scores and inputs the penalty is float64 and exact to double precision."""
    torch.manual_seed(9)
    w = torch.randn(48, dtype=torch.float64)
    x = random_inputs()
    scores = linear_critic(x, w)
    if penalty == "gp":
        value, expected = gradient_penalty(scores, x, weight=10.0), 10.0 * (w.norm() - 1.0) ** 2
    else:
        value, expected = r1_penalty(scores, x, gamma=10.0), 5.0 * w.square().sum()
    torch.testing.assert_close(value.double(), expected, rtol=1e-12, atol=0)
    assert value.dtype == torch.float64


# ---------------------------------------------------------------- logistic and hinge


SCORES = [
    (torch.tensor([0.3, -1.2, 2.5, 0.0]), torch.tensor([-0.7, 1.1, 0.0, -3.0])),
    (torch.tensor([60.0, -60.0]), torch.tensor([-80.0, 80.0])),  # saturated: must stay finite and exact
]


@pytest.mark.parametrize("real, fake", SCORES)
def test_logistic_d_loss_is_bce_with_logits(real, fake):
    """logistic_d_loss = BCEWithLogits(real, 1) + BCEWithLogits(fake, 0)."""
    expected = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )
    loss = logistic_d_loss(real, fake)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("real, fake", SCORES)
def test_logistic_g_loss_is_non_saturating_bce(real, fake):
    """logistic_g_loss = BCEWithLogits(fake, 1), i.e. -log sigmoid(D(G(z)))."""
    expected = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    torch.testing.assert_close(logistic_g_loss(fake), expected)


def test_logistic_losses_by_hand():
    """At score 0 every term is log 2; at a confident correct score it is ~0."""
    zero = torch.zeros(3)
    assert logistic_d_loss(zero, zero).item() == pytest.approx(2 * 0.6931471805599453, rel=1e-6)
    assert logistic_g_loss(zero).item() == pytest.approx(0.6931471805599453, rel=1e-6)
    assert logistic_d_loss(torch.full((2,), 30.0), torch.full((2,), -30.0)).item() < 1e-12


def test_hinge_losses_on_hand_picked_scores():
    """hinge D = mean relu(1 - real) + mean relu(1 + fake); hinge G = -mean(fake)."""
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 0.5])  # relu(1 + f) = 0, 1, 1.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.5 / 3 + 2.5 / 3)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5)
    # Beyond the margins D is not penalised at all.
    assert hinge_d_loss(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -7.0])).item() == 0.0


# ---------------------------------------------------------------- make_loss


REAL = torch.tensor([1.5, -0.5, 2.0])
FAKE = torch.tensor([-1.0, 0.25, 3.0])


@pytest.mark.parametrize("drift", [0.0, 0.001, 0.3])
def test_make_loss_wgan_gp(drift):
    """wgan_gp: WGAN losses with the drift bound, penalty 'gp' with lambda and target."""
    loss = make_loss("wgan_gp", drift=drift, gp_weight=7.0, gp_target=3.0, r1_gamma=5.0)
    assert loss.name == "wgan_gp"
    assert (loss.penalty, loss.penalty_weight, loss.gp_target) == ("gp", 7.0, 3.0)
    expected = FAKE.mean() - REAL.mean() + drift * REAL.square().mean()
    torch.testing.assert_close(loss.d_loss(REAL, FAKE), expected)
    torch.testing.assert_close(loss.g_loss(FAKE), -FAKE.mean())


@pytest.mark.parametrize(
    "name, d_loss, g_loss", [("logistic", logistic_d_loss, logistic_g_loss), ("hinge", hinge_d_loss, hinge_g_loss)]
)
@pytest.mark.parametrize("r1_gamma, penalty", [(0.0, "none"), (2.0, "r1")])
def test_make_loss_logistic_and_hinge(name, d_loss, g_loss, r1_gamma, penalty):
    """logistic / hinge: their own losses, penalty 'r1' with weight gamma when r1_gamma > 0, else 'none'."""
    loss = make_loss(name, drift=0.5, r1_gamma=r1_gamma)
    assert loss.name == name
    assert loss.penalty == penalty
    assert loss.penalty_weight == r1_gamma
    torch.testing.assert_close(loss.d_loss(REAL, FAKE), d_loss(REAL, FAKE))
    torch.testing.assert_close(loss.g_loss(FAKE), g_loss(FAKE))


def test_make_loss_unknown_name_lists_the_valid_ones():
    """An unknown loss name raises ValueError naming every valid choice."""
    with pytest.raises(ValueError) as info:
        make_loss("lsgan")
    message = str(info.value)
    assert "lsgan" in message
    assert set(LOSS_NAMES) == {"wgan_gp", "logistic", "hinge", "rpgan"}
    for name in LOSS_NAMES:
        assert name in message
