"""One discriminator step and one generator step, and `TrainStep`, the two bound to a stage's state for the loop."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pgan.dist import average_gradients, draw_for_rank
from pgan.layers import at_least_fp32, downsample_2x, upsample_2x
from pgan.losses import Loss, gradient_penalty, r1_penalty, zero_centred_penalty
from pgan.schedule import alpha_at
from pgan.schedule import ema_beta as ema_beta_for
from pgan.train.guard import guarded_step, nonfinite

if TYPE_CHECKING:
    from pgan.train.state import TrainState

Augment = Callable[[Tensor], Tensor]  # D's input augmentation (pgan.augment.AugmentPipe), applied to reals and fakes


def fade_reals(reals: Tensor, alpha: float) -> Tensor:
    """Blend real images like G's output: alpha = 0 gives the 2x-downsampled-then-upsampled image, 1 the real one."""
    if alpha >= 1.0:
        return reals
    return torch.lerp(upsample_2x(downsample_2x(reals)), reals, float(alpha))


def d_step(
    G: nn.Module,
    D: nn.Module,
    opt_D: torch.optim.Optimizer,
    loss: Loss,
    reals: Tensor,
    z: Tensor,
    alpha: float,
    autocast: contextlib.AbstractContextManager | None = None,
    with_penalty: bool = True,
    *,
    fakes: Tensor | None = None,
    eager_D: nn.Module | None = None,
    augment: Augment | None = None,
    labels: Tensor | None = None,
    gamma_scale: float = 1.0,
) -> dict[str, Tensor]:
    """Update D once on `reals` and G(z) (or the given detached `fakes`); returns detached scalars (no host
    sync) for logging.

    `labels` (class-conditional models): the reals' classes, which the fakes are generated with too, so D
    judges every real and fake image against its own class, and WGAN-GP's interpolate between a real and a
    fake image of the same class has that class.

    `augment`: D sees augment(reals) and augment(fakes) (each image its own random transform, the same
    pipeline for both). The penalties follow: R1 is the gradient w.r.t. the un-augmented reals through the
    augmentation, as StyleGAN2-ADA computes it; WGAN-GP's interpolates lie between the augmented reals and
    fakes D just scored. `Augment/rt` (the mean of sign(D(augmented reals)), ADA's overfitting measure) is
    returned too.

    With `loss.r2_gamma > 0` R2 on the (detached) fakes is added beside R1; `gamma_scale` scales both.
    `with_penalty=False` leaves the penalty out (lazy regularisation: the steps in between); when it is in,
    it is scaled by `loss.penalty_every` so that its average weight stays the configured one. `D` may be a
    torch.compile'd module: the calls the penalty differentiates twice then go through `eager_D`, the same
    network uncompiled (compiled graphs have no double backward).
    The update is skipped on the device when the loss or a gradient is not finite (`Guard/skipped_D` is 1).
    """
    autocast = autocast or contextlib.nullcontext()
    eager_D = eager_D or D
    if fakes is None:
        with torch.no_grad(), autocast:
            fakes = G(z, alpha, labels)
    penalty_kind = loss.penalty if with_penalty else "none"
    r2 = with_penalty and loss.r2_gamma > 0
    if penalty_kind == "r1":
        reals = reals.detach().requires_grad_(True)
    if r2:  # detached: the penalty's double backward stays inside D
        fakes = fakes.detach().requires_grad_(True)
    d_reals = reals if augment is None else augment(reals)
    d_fakes = fakes if augment is None else augment(fakes)
    with autocast:
        real_scores = at_least_fp32((eager_D if penalty_kind == "r1" else D)(d_reals, alpha, labels))
        fake_scores = at_least_fp32((eager_D if r2 else D)(d_fakes, alpha, labels))
    d_loss = loss.d_loss(real_scores, fake_scores)
    weight = loss.penalty_weight * loss.penalty_every
    r_scale = loss.penalty_every * gamma_scale  # R1 / R2: lazy, and decayed over the run (loss.gamma_decay_kimg)
    if penalty_kind == "gp":
        penalty = interpolate_penalty(eager_D, d_reals, d_fakes, alpha, labels, autocast, weight, loss.gp_target)
    elif penalty_kind == "r1":
        penalty = r1_penalty(real_scores, reals, loss.penalty_weight * r_scale)
    else:
        penalty = torch.zeros((), device=reals.device)
    if r2:
        penalty = penalty + zero_centred_penalty(fake_scores, fakes, loss.r2_gamma * r_scale)
    total = d_loss + penalty
    opt_D.zero_grad(set_to_none=True)
    total.backward()
    params = list(D.parameters())
    # Under torchrun: the gradients (and the loss the guard checks) averaged across ranks, so every rank takes
    # the same step, or skips it.
    skipped = nonfinite(average_gradients(params, total), params)
    guarded_step(opt_D, skipped)
    stats = {
        "Guard/skipped_D": skipped,
        "Loss/D": d_loss.detach(),
        "Loss/gp": penalty.detach(),
        "Scores/real": real_scores.detach().mean(),
        "Scores/fake": fake_scores.detach().mean(),
    }
    if augment is not None:
        stats["Augment/rt"] = real_scores.detach().sign().mean()
    return stats


def interpolate_penalty(
    D: nn.Module,
    reals: Tensor,
    fakes: Tensor,
    alpha: float,
    labels: Tensor | None,
    autocast: contextlib.AbstractContextManager,
    weight: float,
    target: float,
) -> Tensor:
    """WGAN-GP's penalty at one random interpolate per sample between its real and its fake image."""
    eps = draw_for_rank(torch.rand, reals.shape[0], 1, 1, 1, device=reals.device).to(reals.dtype)
    mixed = torch.lerp(reals, fakes.to(reals.dtype), eps).requires_grad_(True)
    with autocast:
        mixed_scores = at_least_fp32(D(mixed, alpha, labels))
    return gradient_penalty(mixed_scores, mixed, weight, target)


def g_step(
    G: nn.Module,
    D: nn.Module,
    opt_G: torch.optim.Optimizer,
    loss: Loss,
    z: Tensor,
    alpha: float,
    autocast: contextlib.AbstractContextManager | None = None,
    *,
    fakes: Tensor | None = None,
    augment: Augment | None = None,
    labels: Tensor | None = None,
    reals: Tensor | None = None,
) -> dict[str, Tensor]:
    """Update G once through a frozen D (skipped on a non-finite loss or gradient); returns the detached G loss.
    `fakes`: G(z) computed earlier with its graph (reused from the D step), instead of a new forward pass.
    `augment`: D sees augment(G(z)), differentiated through, as in the D step. `labels`: the classes G(z) is
    generated with and D judges it against (class-conditional models). `reals` (faded like D's inputs): what
    a relativistic G loss compares G(z) with, fake i paired with real i (augmented like the fakes)."""
    autocast = autocast or contextlib.nullcontext()
    D.requires_grad_(False)  # D's gradients are not needed here: skip computing them
    try:
        with autocast:
            images = G(z, alpha, labels) if fakes is None else fakes
            fake_scores = at_least_fp32(D(images if augment is None else augment(images), alpha, labels))
            if loss.g_uses_reals:
                with torch.no_grad():
                    d_reals = reals if augment is None else augment(reals)
                    real_scores = at_least_fp32(D(d_reals, alpha, labels))
        g_loss = loss.g_loss(fake_scores, real_scores) if loss.g_uses_reals else loss.g_loss(fake_scores)
        opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        params = list(G.parameters())
        skipped = nonfinite(average_gradients(params, g_loss), params)
        guarded_step(opt_G, skipped)
    finally:
        D.requires_grad_(True)
    return {"Guard/skipped_G": skipped, "Loss/G": g_loss.detach()}


@torch.no_grad()
def ema_update(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    """G_ema <- beta * G_ema + (1 - beta) * G, parameter by parameter.

    Written by hand rather than with torch.optim.swa_utils.AveragedModel: G_ema must stay a plain
    Generator (same parameter names) so that it grows across stages and exports like G.
    """
    ema_params = list(G_ema.parameters())
    torch._foreach_lerp_(ema_params, list(G.parameters()), 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def train_step(
    G: nn.Module,
    D: nn.Module,
    G_ema: nn.Module,
    opt_G: torch.optim.Optimizer,
    opt_D: torch.optim.Optimizer,
    loss: Loss,
    reals: Tensor,
    alpha: float,
    ema_beta: float,
    autocast: contextlib.AbstractContextManager | None = None,
    step_index: int = 0,
    *,
    eager_D: nn.Module | None = None,
    reuse_fakes: bool = False,
    augment: Augment | None = None,
    labels: Tensor | None = None,
    gamma_scale: float = 1.0,
) -> dict[str, Tensor]:
    """One training iteration, as the loop (and pgan-bench) runs it: reals faded by alpha, a D step with its
    penalty (on the steps `step_index` makes due under lazy regularisation) on fresh latents, a G step on
    fresh latents, the EMA update. Returns the detached scalars.

    `G` and `D` may be torch.compile'd (then `eager_D` is D uncompiled, for the penalty). With `reuse_fakes`
    the G step uses the D step's latents and G(z) (one G forward pass fewer; G's parameters have not changed
    in between, so its graph is still the right one; D is re-evaluated after its update, as it must be).
    `augment` (pgan.augment.AugmentPipe, applied outside the compiled networks) augments every image D sees,
    real or fake, in both steps; its random numbers come from the same stream as the latents, after them.
    `labels` (class-conditional models): the reals' classes; both steps generate their fakes with them, so the
    fakes' classes follow the data's class frequencies and no random number is drawn for them.
    """
    reals = fade_reals(reals, alpha)
    latent_dim = G.latent_dim
    z = draw_for_rank(torch.randn, reals.shape[0], latent_dim, device=reals.device)
    with_penalty = step_index % loss.penalty_every == 0
    fakes = None
    if reuse_fakes:
        with autocast or contextlib.nullcontext():
            fakes = G(z, alpha, labels)
    detached = None if fakes is None else fakes.detach()
    stats = d_step(
        G,
        D,
        opt_D,
        loss,
        reals,
        z,
        alpha,
        autocast,
        with_penalty,
        fakes=detached,
        eager_D=eager_D,
        augment=augment,
        labels=labels,
        gamma_scale=gamma_scale,
    )
    if not reuse_fakes:
        z = draw_for_rank(torch.randn, reals.shape[0], latent_dim, device=reals.device)
    stats |= g_step(G, D, opt_G, loss, z, alpha, autocast, fakes=fakes, augment=augment, labels=labels, reals=reals)
    ema_update(G_ema, G, ema_beta)
    return stats


def fast_networks(G: nn.Module, D: nn.Module, compile: bool, mode: str = "default") -> tuple[nn.Module, nn.Module]:
    """G and D as the training step calls them: torch.compile'd with `compile` (same parameters), else as is."""
    if not compile:
        return G, D
    # alpha changes every step of a fade: a symbolic float, not one compilation per value.
    torch._dynamo.config.specialize_float = False
    # Compiled graphs are cached per code object (Generator.forward), across instances: the previous stage's
    # graphs would count towards the recompile limit (8), after which dynamo silently runs eager.
    torch._dynamo.reset()
    return torch.compile(G, mode=mode), torch.compile(D, mode=mode)


class TrainStep:
    """`train_step` bound to one stage's state: the loop calls `step(reals, labels)` and nothing more.

    With `compile`, G and D run torch.compile'd (the penalty's double backward through the eager D); the first
    step of each phase (fading, stable) compiles its graphs, and says what that cost.
    """

    def __init__(
        self,
        state: TrainState,
        loss: Loss,
        autocast: contextlib.AbstractContextManager,
        ema_kimg: float,
        compile: bool = False,
        compile_mode: str = "default",
        reuse_fakes: bool = False,
    ) -> None:
        self.state, self.loss, self.autocast, self.reuse_fakes = state, loss, autocast, reuse_fakes
        self.G, self.D = fast_networks(state.G, state.D, compile, compile_mode)
        self.ema_beta = ema_beta_for(state.stage.batch_size, ema_kimg)
        self.compile_pending = {False, True} if compile else set()  # phases (alpha >= 1) not compiled yet

    def __call__(self, reals: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """One iteration at the state's image count (alpha and the lazy penalty's phase follow from it)."""
        s = self.state
        alpha = alpha_at(s.stage, s.nimg)
        gamma_scale = self.loss.gamma_scale(s.total_nimg / 1000)
        start_s = time.perf_counter()
        stats = train_step(
            self.G,
            self.D,
            s.G_ema,
            s.opt_G,
            s.opt_D,
            self.loss,
            reals,
            alpha,
            self.ema_beta,
            self.autocast,
            s.nimg // s.stage.batch_size,  # lazy regularisation resumes in phase
            eager_D=s.D,
            reuse_fakes=self.reuse_fakes,
            augment=s.augment if s.augment.enabled else None,
            labels=labels,
            gamma_scale=gamma_scale,
        )
        if (alpha >= 1.0) in self.compile_pending:
            self.compile_pending.discard(alpha >= 1.0)
            seconds = time.perf_counter() - start_s
            print(f"torch.compile: {'stable' if alpha >= 1.0 else 'fade-in'} step compiled in {seconds:.1f} s")
        if s.augment.adaptive:
            s.augment.observe(stats["Augment/rt"], s.stage.batch_size)  # every augment.interval steps, p moves
        if self.loss.gamma_decay_kimg > 0:
            stats["Loss/gamma_scale"] = torch.tensor(gamma_scale, device=stats["Loss/D"].device)
        return stats
