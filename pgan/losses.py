"""GAN losses as pure functions: scores (and, for penalties, the inputs they came from) in, scalar out.

`rpgan` is the relativistic pairing loss of R3GAN (Huang et al., "The GAN is dead; long live the GAN!",
NeurIPS 2024), meant with both zero-centred penalties: R1 on reals and R2 on detached fakes.

Scores are the discriminator's raw outputs, one per image. `make_loss(name, ...)` bundles the D and G losses with
the penalty the trainer applies for `loss=<name>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

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

    def gamma_scale(self, kimg: float) -> float:
        """The factor on R1 / R2's gamma after `kimg` thousand images of the run (see `gamma_scale_at`)."""
        return gamma_scale_at(kimg, self.gamma_decay_kimg, self.gamma_final_scale)

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (the steps where it is due differentiate D twice)."""
        return self.penalty != "none" or self.r2_gamma > 0


LOSS_NAMES = ("wgan_gp", "logistic", "hinge", "rpgan")


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
) -> Loss:
    """Bundle the losses for `name` (wgan_gp | logistic | hinge | rpgan); R1 is used when r1_gamma > 0 and R2
    when r2_gamma > 0 (logistic, hinge, rpgan); the penalties are applied every `penalty_every` D steps,
    scaled by it (1 = every step)."""
    try:
        every = int(penalty_every)
    except (TypeError, ValueError):
        every = 0
    if every < 1 or every != penalty_every:
        raise ValueError(f"loss.penalty_every must be an integer >= 1, got {penalty_every!r}")
    for key, gamma in (("r1_gamma", r1_gamma), ("r2_gamma", r2_gamma)):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
            raise ValueError(f"loss.{key} must be a number >= 0, got {gamma!r}")
    if not isinstance(gamma_decay_kimg, (int, float)) or not gamma_decay_kimg >= 0:
        raise ValueError(f"loss.gamma_decay_kimg must be >= 0 (0: constant gamma), got {gamma_decay_kimg!r}")
    if not isinstance(gamma_final_scale, (int, float)) or not 0 <= gamma_final_scale <= 1:
        raise ValueError(f"loss.gamma_final_scale must be in [0, 1], got {gamma_final_scale!r}")
    decay = {"gamma_decay_kimg": float(gamma_decay_kimg), "gamma_final_scale": float(gamma_final_scale)}
    if name == "wgan_gp":
        if gamma_decay_kimg:
            raise ValueError("loss.gamma_decay_kimg decays R1 / R2, which wgan_gp does not use")
        if r2_gamma:
            raise ValueError("loss.r2_gamma applies to logistic, hinge and rpgan, not to wgan_gp")
        return Loss(name, partial(wgan_d_loss, drift=drift), wgan_g_loss, "gp", gp_weight, gp_target, every)
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
        name, d_loss, g_loss, *r1, penalty_every=every, r2_gamma=float(r2_gamma), g_uses_reals=uses_reals, **decay
    )
