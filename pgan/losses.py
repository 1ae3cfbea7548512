"""GAN losses as pure functions: scores (and, for penalties, the inputs they came from) in, scalar out.

Scores are the discriminator's raw outputs, one per image. `make_loss(name, ...)` bundles the D and G losses with
the penalty the trainer applies for `loss=<name>`.
"""

from __future__ import annotations

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


def r1_penalty(real_scores: Tensor, reals: Tensor, gamma: float) -> Tensor:
    """R1 penalty gamma / 2 * E[||grad_x D(x)||^2] on real images (Mescheder et al. 2018)."""
    (grad,) = torch.autograd.grad(real_scores.sum(), reals, create_graph=True)
    return 0.5 * gamma * at_least_fp32(grad).flatten(1).square().sum(dim=1).mean()


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


@dataclass(frozen=True)
class Loss:
    """The pieces the trainer needs for one `loss=` choice, with the config's constants bound."""

    name: str
    d_loss: Callable[[Tensor, Tensor], Tensor]  # (real_scores, fake_scores) -> scalar
    g_loss: Callable[[Tensor], Tensor]  # fake_scores -> scalar
    penalty: str  # "gp" (gradient penalty on interpolates), "r1" (on reals) or "none"
    penalty_weight: float  # lambda for "gp", gamma for "r1"
    gp_target: float = 1.0
    # Lazy regularisation (StyleGAN2): the penalty only every `penalty_every` D steps, scaled by it.
    penalty_every: int = 1


LOSS_NAMES = ("wgan_gp", "logistic", "hinge")


def make_loss(
    name: str,
    drift: float = 0.001,
    gp_weight: float = 10.0,
    gp_target: float = 1.0,
    r1_gamma: float = 0.0,
    penalty_every: int = 1,
) -> Loss:
    """Bundle the losses for `name` (wgan_gp | logistic | hinge); R1 is used when r1_gamma > 0; the penalty is
    applied every `penalty_every` D steps, scaled by it (1 = every step)."""
    try:
        every = int(penalty_every)
    except (TypeError, ValueError):
        every = 0
    if every < 1 or every != penalty_every:
        raise ValueError(f"loss.penalty_every must be an integer >= 1, got {penalty_every!r}")
    if name == "wgan_gp":
        return Loss(name, partial(wgan_d_loss, drift=drift), wgan_g_loss, "gp", gp_weight, gp_target, every)
    r1 = ("r1", r1_gamma) if r1_gamma > 0 else ("none", 0.0)
    if name == "logistic":
        return Loss(name, logistic_d_loss, logistic_g_loss, *r1, penalty_every=every)
    if name == "hinge":
        return Loss(name, hinge_d_loss, hinge_g_loss, *r1, penalty_every=every)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
