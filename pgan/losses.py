"""GAN losses as pure functions: scores (and, for penalties, the inputs they came from) in, scalar out.

`rpgan` is the relativistic pairing loss of R3GAN (Huang et al., "The GAN is dead; long live the GAN!",
NeurIPS 2024), meant with both zero-centred penalties: R1 on reals and R2 on detached fakes.

Scores are the discriminator's raw outputs, one per image. `make_loss(name, ...)` bundles the D and G losses with
the penalty the trainer applies for `loss=<name>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from pgan.errors import check_number
from pgan.layers import at_least_fp32


def wgan_d_loss(real_scores: Tensor, fake_scores: Tensor, drift: float = 0.001) -> Tensor:
    """WGAN critic loss plus ProGAN's drift term eps * E[D(x)^2] that keeps the scores near zero."""
    return fake_scores.mean() - real_scores.mean() + drift * real_scores.square().mean()


def wgan_g_loss(fake_scores: Tensor) -> Tensor:
    """WGAN generator loss: -E[D(G(z))]."""
    return -fake_scores.mean()


def gradient_penalty(scores: Tensor, inputs: Tensor, weight: float = 10.0, target: float = 1.0) -> Tensor:
    """WGAN-GP penalty weight * E[(||grad_x D(x)|| - target)^2] / target^2 (Gulrajani et al.; ProGAN eq.).

    `scores` must have been computed from `inputs` (random interpolates of reals and fakes, with
    requires_grad) so the penalty is differentiable w.r.t. the critic's parameters.
    """
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    norm = at_least_fp32(grad).flatten(1).norm(dim=1)
    return weight * ((norm - target) / target).square().mean()


def zero_centred_penalty(scores: Tensor, inputs: Tensor, gamma: float) -> Tensor:
    """gamma / 2 * E[||grad_x D(x)||^2] at `inputs` (which `scores` were computed from, with requires_grad): R1
    on real images, R2 on (detached) generated ones (Mescheder et al. 2018; Huang et al. 2024)."""
    (grad,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    return 0.5 * gamma * at_least_fp32(grad).flatten(1).square().sum(dim=1).mean()


def r1_penalty(real_scores: Tensor, reals: Tensor, gamma: float) -> Tensor:
    """R1 penalty gamma / 2 * E[||grad_x D(x)||^2] on real images (Mescheder et al. 2018)."""
    return zero_centred_penalty(real_scores, reals, gamma)


def finite_difference_slopes(minus_scores: Tensor, plus_scores: Tensor, sigma: float) -> Tensor:
    """(D(x + sigma eps) - D(x - sigma eps)) / (2 sigma) per image, from D's scores at x - sigma eps and
    x + sigma eps: the slope grad D(x) . eps up to O(sigma^2), whose square averages to ||grad D(x)||^2 over
    eps ~ N(0, I).

    Central, not the one-sided (D(x + sigma eps) - D(x)) / sigma: that one's error is sigma / 2 * eps' H eps,
    which grows with the number of pixels and does not vanish where R1 has made the gradient small. Measured
    on trained discriminators at 16-128 px (experiments/penalty_modes), the one-sided estimate of R1 at the
    reals was 10 to 381 times the exact value at sigma = 0.01 in fp32; the central one 0.76 to 0.85 times."""
    return (at_least_fp32(plus_scores) - at_least_fp32(minus_scores)) / (2.0 * sigma)


def approx_zero_centred_penalty(minus_scores: Tensor, plus_scores: Tensor, sigma: float, gamma: float) -> Tensor:
    """R1 / R2 without a double backward: gamma / 2 * E[slope^2] with the central slopes of
    `finite_difference_slopes` (one eps ~ N(0, I) per image), from two forward passes. Its expectation over eps
    tends to the exact `zero_centred_penalty` as sigma -> 0; at a finite sigma it is D's mean squared slope
    across that distance of x. Its gradient w.r.t. D's parameters needs first-order gradients only."""
    return 0.5 * gamma * finite_difference_slopes(minus_scores, plus_scores, sigma).square().mean()


def approx_gradient_penalty(
    minus_scores: Tensor, plus_scores: Tensor, sigma: float, weight: float = 10.0, target: float = 1.0
) -> Tensor:
    """WGAN-GP's weight * E[(||grad D|| - target)^2] / target^2 without a double backward, from the slopes
    u = grad D . eps (`finite_difference_slopes`): for eps ~ N(0, I), E[u^2] = ||grad D||^2 and
    E|u| = sqrt(2 / pi) ||grad D||, so u^2 - 2 target sqrt(pi / 2) |u| + target^2 is an unbiased estimate of
    (||grad D|| - target)^2 (one term of it may be negative; its mean over a batch is what is penalised)."""
    u = finite_difference_slopes(minus_scores, plus_scores, sigma)
    estimate = u.square() - 2.0 * target * math.sqrt(math.pi / 2.0) * u.abs() + target**2
    return weight * estimate.mean() / target**2


def relativistic_d_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Relativistic pairing D loss softplus(-(D(x_r) - D(x_f))), real i paired with fake i (R3GAN, eq. 2)."""
    return F.softplus(fake_scores - real_scores).mean()


def relativistic_g_loss(fake_scores: Tensor, real_scores: Tensor) -> Tensor:
    """Relativistic pairing G loss softplus(-(D(G(z)) - D(x_r))): the same pairs, the roles swapped."""
    return F.softplus(real_scores - fake_scores).mean()


def logistic_d_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Binary cross-entropy D loss (the DCGAN one): softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()


def logistic_g_loss(fake_scores: Tensor) -> Tensor:
    """Non-saturating G loss: softplus(-D(G(z)))."""
    return F.softplus(-fake_scores).mean()


def hinge_d_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Hinge D loss: relu(1 - D(real)) + relu(1 + D(fake))."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_g_loss(fake_scores: Tensor) -> Tensor:
    """Hinge G loss: -E[D(G(z))]."""
    return -fake_scores.mean()


# penalty_sigma=auto, measured against the exact R1 / R2 on trained discriminators at 16-128 px
# (experiments/penalty_modes): fp32 0.64-1.00 times the exact value at 0.01; bf16 0.77-1.48 times it at 0.03,
# where 0.01 gave 1.2-6.8 times (rounding noise).
SIGMA_FP32, SIGMA_BF16 = 0.01, 0.03


def gamma_scale_at(kimg: float, decay_kimg: float, final_scale: float) -> float:
    """A cosine decay from 1 at kimg 0 to `final_scale` at `decay_kimg`, constant after (1 when decay_kimg is 0):
    a large gamma early keeps D smooth while G is far off, a smaller one later lets D see details (R3GAN decays
    gamma over training too)."""
    if decay_kimg <= 0:
        return 1.0
    t = min(max(kimg / decay_kimg, 0.0), 1.0)
    return final_scale + (1.0 - final_scale) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Loss:
    """The pieces the trainer needs for one `loss=` choice, with the config's constants bound."""

    name: str
    d_loss: Callable[[Tensor, Tensor], Tensor]  # (real_scores, fake_scores) -> scalar
    g_loss: Callable[..., Tensor]  # fake_scores (and real_scores when g_uses_reals) -> scalar
    penalty: str  # "gp" (gradient penalty on interpolates), "r1" (on reals) or "none"
    penalty_weight: float  # lambda for "gp", gamma for "r1"
    gp_target: float = 1.0
    # Lazy regularisation (StyleGAN2): the penalty only every `penalty_every` D steps, scaled by it.
    penalty_every: int = 1
    r2_gamma: float = 0.0  # R2: the zero-centred penalty on detached fakes, beside R1 (0: off)
    g_uses_reals: bool = False  # the G loss compares D(G(z)) with D(reals) (relativistic pairing)
    # R1 / R2's gamma decays (cosine) to gamma_final_scale times itself over the run's first gamma_decay_kimg.
    gamma_decay_kimg: float = 0.0  # 0: constant gamma
    gamma_final_scale: float = 0.1
    # "exact": the penalties differentiate D twice; "approx": central finite differences at distance
    # penalty_sigma (two more forward passes, first-order gradients only: the whole step can be compiled).
    penalty_mode: str = "exact"
    penalty_sigma: float = SIGMA_FP32
    sigma_auto: bool = False  # penalty_sigma=auto: SIGMA_FP32, or SIGMA_BF16 under bf16 (`for_precision`)

    def for_precision(self, bf16: bool) -> Loss:
        """This loss as the step runs it at that precision: penalty_sigma=auto becomes SIGMA_BF16 under bf16,
        whose rounding noise (about 2^-8 of each score) swamps the slope at smaller distances."""
        return replace(self, penalty_sigma=SIGMA_BF16) if self.sigma_auto and bf16 else self

    @property
    def lazy_ratio(self) -> float:
        """c = k / (k + 1) for lazy regularisation every k > 1 D steps, else 1: D's Adam runs at lr * c with betas
        beta ** c, since k iterations then take k + 1 D updates (the penalty's own; StyleGAN2's correction)."""
        k = self.penalty_every
        return k / (k + 1) if k > 1 else 1.0

    def gamma_scale(self, kimg: float) -> float:
        """The factor on R1 / R2's gamma after `kimg` thousand images of the run (see `gamma_scale_at`)."""
        return gamma_scale_at(kimg, self.gamma_decay_kimg, self.gamma_final_scale)

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (the steps where it is due differentiate D twice)."""
        return self.penalty != "none" or self.r2_gamma > 0


LOSS_NAMES = ("wgan_gp", "logistic", "hinge", "rpgan")
PENALTY_MODES = ("exact", "approx")


def make_loss(
    name: str,
    drift: float = 0.001,
    gp_weight: float = 10.0,
    gp_target: float = 1.0,
    r1_gamma: float = 0.0,
    r2_gamma: float = 0.0,
    penalty_every: int = 1,
    gamma_decay_kimg: float = 0.0,
    gamma_final_scale: float = 0.1,
    penalty_mode: str = "exact",
    penalty_sigma: float | str = "auto",
) -> Loss:
    """Bundle the losses for `name` (wgan_gp | logistic | hinge | rpgan); R1 is used when r1_gamma > 0 and R2
    when r2_gamma > 0 (logistic, hinge, rpgan); the penalties are applied every `penalty_every` D steps,
    scaled by it (1 = every step), exactly or by finite differences (`penalty_mode`, `penalty_sigma`)."""
    try:
        every = int(penalty_every)
    except (TypeError, ValueError):
        every = 0
    if every < 1 or every != penalty_every or isinstance(penalty_every, bool):
        raise ValueError(f"loss.penalty_every must be an integer >= 1, got {penalty_every!r}")
    check_number("loss.r1_gamma", r1_gamma, low=0.0)
    check_number("loss.r2_gamma", r2_gamma, low=0.0)
    check_number("loss.gamma_decay_kimg", gamma_decay_kimg, low=0.0, meaning="0: constant gamma")
    check_number("loss.gamma_final_scale", gamma_final_scale, low=0.0, high=1.0)
    if name == "wgan_gp":
        check_number("loss.gp_weight", gp_weight, low=0.0)
        check_number("loss.gp_target", gp_target, low=0.0, strict=True)
        check_number("loss.drift", drift, low=0.0)
    if penalty_mode not in PENALTY_MODES:
        raise ValueError(f"loss.penalty_mode must be one of {', '.join(PENALTY_MODES)}, got {penalty_mode!r}")
    auto = penalty_sigma == "auto"
    number = isinstance(penalty_sigma, (int, float)) and not isinstance(penalty_sigma, bool)
    if not auto and not (number and penalty_sigma > 0):
        raise ValueError(f"loss.penalty_sigma must be auto or a number > 0, got {penalty_sigma!r}")
    decay = {"gamma_decay_kimg": float(gamma_decay_kimg), "gamma_final_scale": float(gamma_final_scale)}
    sigma = SIGMA_FP32 if auto else float(penalty_sigma)
    mode = {"penalty_mode": penalty_mode, "penalty_sigma": sigma, "sigma_auto": auto}
    if name == "wgan_gp":
        if gamma_decay_kimg:
            raise ValueError("loss.gamma_decay_kimg decays R1 / R2, which wgan_gp does not use")
        if r2_gamma:
            raise ValueError("loss.r2_gamma applies to logistic, hinge and rpgan, not to wgan_gp")
        return Loss(name, partial(wgan_d_loss, drift=drift), wgan_g_loss, "gp", gp_weight, gp_target, every, **mode)
    r1 = ("r1", float(r1_gamma)) if r1_gamma > 0 else ("none", 0.0)
    losses = {
        "logistic": (logistic_d_loss, logistic_g_loss, False),
        "hinge": (hinge_d_loss, hinge_g_loss, False),
        "rpgan": (relativistic_d_loss, relativistic_g_loss, True),
    }
    if name not in losses:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    d_loss, g_loss, uses_reals = losses[name]
    return Loss(
        name,
        d_loss,
        g_loss,
        *r1,
        penalty_every=every,
        r2_gamma=float(r2_gamma),
        g_uses_reals=uses_reals,
        **decay,
        **mode,
    )
