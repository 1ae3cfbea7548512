"""One discriminator step and one generator step, and `TrainStep`, the two bound to a stage's state for the loop."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pgan.dist import average_gradients, draw_for_rank
from pgan.layers import at_least_fp32, differentiated_twice, downsample_2x
from pgan.losses import (
    Loss,
    approx_gradient_penalty,
    approx_zero_centred_penalty,
    gradient_penalty,
    zero_centred_penalty,
)
from pgan.networks import FADE_UPSAMPLE
from pgan.schedule import alpha_at, ema_half_life_kimg
from pgan.schedule import ema_beta as ema_beta_for
from pgan.train.guard import guarded_step, nonfinite

if TYPE_CHECKING:
    from pgan.train.options import TrainOptions
    from pgan.train.state import TrainState

Augment = Callable[[Tensor], Tensor]  # D's input augmentation (pgan.augment.AugmentPipe), applied to reals and fakes


def fade_reals(reals: Tensor, alpha: float, g_architecture: str = "progan") -> Tensor:
    """Blend real images like G's output: alpha = 0 gives the 2x-downsampled-then-upsampled image (upsampled as
    a G of `g_architecture` upsamples its previous image: nearest for progan, bilinear for skip), 1 the real one."""
    if alpha >= 1.0:
        return reals
    return torch.lerp(FADE_UPSAMPLE[g_architecture](downsample_2x(reals)), reals, float(alpha))


class Critic:
    """D as the D step calls it: at one alpha, with the batch's classes, under autocast, behind the augmentation,
    and the penalties in the loss's mode (`loss.penalty_mode`).

    `D` may be torch.compile'd; `eager_D` is the same network uncompiled, for the exact penalties' calls (compiled
    graphs have no double backward). The approximate penalties need no double backward: every call goes
    through `D`.
    """

    def __init__(
        self,
        D: nn.Module,
        eager_D: nn.Module,
        loss: Loss,
        alpha: float,
        labels: Tensor | None,
        autocast: contextlib.AbstractContextManager,
        augment: Augment | None,
    ) -> None:
        self.D, self.eager_D, self.loss, self.alpha, self.labels = D, eager_D, loss, alpha, labels
        self.autocast, self.augment = autocast, augment
        self.exact = loss.penalty_mode == "exact"

    def scores(self, d_images: Tensor, eager: bool = False) -> Tensor:
        """D's score of each (already augmented) image, in fp32. `eager`: for an exact penalty, whose gradient is
        differentiated again: through the uncompiled D, its convolutions as `differentiated_twice` runs them."""
        D, twice = (self.eager_D, differentiated_twice()) if eager else (self.D, contextlib.nullcontext())
        with self.autocast, twice:
            return at_least_fp32(D(d_images, self.alpha, self.labels))

    def slope_scores(self, d_images: Tensor) -> tuple[Tensor, Tensor]:
        """D's scores at d_images - sigma * eps and d_images + sigma * eps, eps ~ N(0, I) drawn for the global
        batch: what the approximate penalties' central differences take."""
        eps = draw_for_rank(torch.randn, d_images.shape[0], *d_images.shape[1:], device=d_images.device)
        step = self.loss.penalty_sigma * eps.to(d_images.dtype)
        return self.scores(d_images - step), self.scores(d_images + step)

    def augmented(self, images: Tensor) -> Tensor:
        """The images as D sees them: through the augmentation when there is one."""
        return images if self.augment is None else self.augment(images)

    def approx_penalty(self, d_images: Tensor, gamma: float) -> Tensor:
        """gamma / 2 * E[slope^2] at D's input `d_images` (central finite differences, one eps per image)."""
        return approx_zero_centred_penalty(*self.slope_scores(d_images), self.loss.penalty_sigma, gamma)

    def judge(self, images: Tensor, gamma: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """(augment(images), D's scores of them, the zero-centred penalty gamma / 2 * E||grad D||^2 at them: R1 on
        reals, R2 on detached fakes; 0 when gamma is 0).

        Exact: the gradient w.r.t. the un-augmented images, through the augmentation, as StyleGAN2-ADA computes
        R1. Approximate: finite differences at D's input (the augmented images), one eps per image."""
        if gamma and self.exact:
            images = images.detach().requires_grad_(True)
            d_images = self.augmented(images)
            scores = self.scores(d_images, eager=True)
            return d_images, scores, zero_centred_penalty(scores, images, gamma)
        d_images = self.augmented(images)
        scores = self.scores(d_images)
        penalty = self.approx_penalty(d_images, gamma) if gamma else torch.zeros((), device=images.device)
        return d_images, scores, penalty

    def penalty(self, images: Tensor, gamma: float) -> Tensor:
        """The zero-centred penalty alone (lazy regularisation's own update): as `judge`'s, without an approximate
        penalty's extra pass for the loss's scores."""
        return self.judge(images, gamma)[2] if self.exact else self.approx_penalty(self.augmented(images), gamma)

    def interpolate_penalty(self, d_reals: Tensor, d_fakes: Tensor, weight: float) -> Tensor:
        """WGAN-GP's penalty at one random interpolate per sample between its (augmented) real and fake image."""
        eps = draw_for_rank(torch.rand, d_reals.shape[0], 1, 1, 1, device=d_reals.device).to(d_reals.dtype)
        mixed = torch.lerp(d_reals.detach(), d_fakes.detach().to(d_reals.dtype), eps)
        target = self.loss.gp_target
        if self.exact:
            mixed.requires_grad_(True)
            return gradient_penalty(self.scores(mixed, eager=True), mixed, weight, target)
        return approx_gradient_penalty(*self.slope_scores(mixed), self.loss.penalty_sigma, weight, target)


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
    """Update D once on `reals` and G(z) (or the given `fakes`, detached here); returns detached scalars (no host
    sync) for logging.

    `labels` (class-conditional models): the reals' classes, which the fakes are generated with too, so D
    judges every real and fake image against its own class, and WGAN-GP's interpolate between a real and a
    fake image of the same class has that class.

    `augment`: D sees augment(reals) and augment(fakes) (each image its own random transform, the same
    pipeline for both). The penalties follow: exact R1 is the gradient w.r.t. the un-augmented reals through
    the augmentation, as StyleGAN2-ADA computes it; WGAN-GP's interpolates lie between the augmented reals and
    fakes D just scored. `Augment/rt` (the mean of sign(D(augmented reals)), ADA's overfitting measure) is
    returned too.

    `with_penalty`: the loss's penalties (R1, and R2 on the detached fakes with `loss.r2_gamma > 0`, scaled by
    `gamma_scale`; or WGAN-GP) are added to this step's loss, sharing its D passes. Lazy regularisation
    (`loss.penalty_every > 1`) leaves them out here (and `Loss/gp` out of the stats) and takes them in
    `d_penalty_step`. `D` may be a torch.compile'd module, `eager_D` the same network uncompiled (see `Critic`).
    The update is skipped on the device when the loss or a gradient is not finite (`Guard/skipped_D` is 1).
    """
    autocast = autocast or contextlib.nullcontext()
    if fakes is None:
        with torch.no_grad(), autocast:
            fakes = G(z, alpha, labels)
    critic = Critic(D, eager_D or D, loss, alpha, labels, autocast, augment)
    r1_gamma = loss.penalty_weight * gamma_scale if with_penalty and loss.penalty == "r1" else 0.0
    r2_gamma = loss.r2_gamma * gamma_scale if with_penalty else 0.0
    d_reals, real_scores, penalty = critic.judge(reals, r1_gamma)
    d_fakes, fake_scores, r2 = critic.judge(fakes.detach(), r2_gamma)  # detached: G never enters the penalty
    penalty = penalty + r2
    if with_penalty and loss.penalty == "gp":
        penalty = penalty + critic.interpolate_penalty(d_reals, d_fakes, loss.penalty_weight)
    d_loss = loss.d_loss(real_scores, fake_scores)
    skipped = _update(opt_D, D, d_loss + penalty)
    stats = {
        "Guard/skipped_D": skipped,
        "Loss/D": d_loss.detach(),
        "Scores/real": real_scores.detach().mean(),
        "Scores/fake": fake_scores.detach().mean(),
    }
    if with_penalty:
        stats["Loss/gp"] = penalty.detach()
    if augment is not None:
        stats["Augment/rt"] = real_scores.detach().sign().mean()
    return stats


def d_penalty_step(
    D: nn.Module,
    opt_D: torch.optim.Optimizer,
    loss: Loss,
    reals: Tensor,
    fakes: Tensor,
    alpha: float,
    autocast: contextlib.AbstractContextManager | None = None,
    *,
    eager_D: nn.Module | None = None,
    augment: Augment | None = None,
    labels: Tensor | None = None,
    gamma_scale: float = 1.0,
) -> dict[str, Tensor]:
    """Lazy regularisation as StyleGAN2 does it: on every `loss.penalty_every`-th iteration, a D update of the
    penalties alone, times k, with their own D passes on the reals (R1), the detached `fakes` (R2) or their
    interpolates (WGAN-GP). D's Adam runs at lr * c and betas ** c (`Loss.lazy_ratio`) for the k + 1 updates
    per k iterations. Returns the penalty as a non-lazy step would add it (`Loss/gp`: the update's divided by k, so
    it reads the same for every k) and whether the update was skipped (non-finite)."""
    critic = Critic(D, eager_D or D, loss, alpha, labels, autocast or contextlib.nullcontext(), augment)
    k = loss.penalty_every
    penalty = torch.zeros((), device=reals.device)
    if loss.penalty == "r1":
        penalty = penalty + critic.penalty(reals, loss.penalty_weight * gamma_scale * k)
    if loss.r2_gamma > 0:
        penalty = penalty + critic.penalty(fakes.detach(), loss.r2_gamma * gamma_scale * k)
    if loss.penalty == "gp":
        d_reals, d_fakes = critic.augmented(reals), critic.augmented(fakes.detach())
        penalty = penalty + critic.interpolate_penalty(d_reals, d_fakes, loss.penalty_weight * k)
    return {"Guard/skipped_D": _update(opt_D, D, penalty), "Loss/gp": penalty.detach() / k}


def _update(opt: torch.optim.Optimizer, net: nn.Module, objective: Tensor) -> Tensor:
    """One guarded optimizer step of `net` on `objective`; the device-side flag of a skipped (non-finite) step.
    Under torchrun the gradients (and the objective the guard checks) are averaged across ranks first, so every
    rank takes the same step, or skips it."""
    opt.zero_grad(set_to_none=True)
    objective.backward()
    params = list(net.parameters())
    skipped = nonfinite(average_gradients(params, objective), params)
    guarded_step(opt, skipped)
    return skipped


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
        skipped = _update(opt_G, G, g_loss)
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
    penalties on fresh latents (under lazy regularisation, `loss.penalty_every` = k > 1: a D step without them,
    and on every k-th iteration by `step_index` a D update of the penalties alone, `d_penalty_step`), a G step
    on fresh latents, the EMA update. Returns the detached scalars.

    `G` and `D` may be torch.compile'd (then `eager_D` is D uncompiled, for the exact penalties). With `reuse_fakes`
    the G step uses the D step's latents and G(z) (one G forward pass fewer; G's parameters have not changed
    in between, so its graph is still the right one; D is re-evaluated after its update, as it must be).
    `augment` (pgan.augment.AugmentPipe, applied outside the compiled networks) augments every image D sees,
    real or fake, in both steps; its random numbers come from the same stream as the latents, after them.
    `labels` (class-conditional models): the reals' classes; both steps generate their fakes with them, so the
    fakes' classes follow the data's class frequencies and no random number is drawn for them.
    """
    reals = fade_reals(reals, alpha, G.architecture)
    autocast = autocast or contextlib.nullcontext()
    latent_dim = G.latent_dim
    z = draw_for_rank(torch.randn, reals.shape[0], latent_dim, device=reals.device)
    with torch.set_grad_enabled(reuse_fakes), autocast:  # with reuse_fakes, G's graph serves the G step too
        fakes = G(z, alpha, labels)
    lazy = loss.penalty_every > 1
    options = {"eager_D": eager_D, "augment": augment, "labels": labels, "gamma_scale": gamma_scale}
    stats = d_step(G, D, opt_D, loss, reals, z, alpha, autocast, not lazy, fakes=fakes, **options)
    if lazy and loss.penalised and step_index % loss.penalty_every == 0:
        lazy_stats = d_penalty_step(D, opt_D, loss, reals, fakes, alpha, autocast, **options)
        stats["Guard/skipped_D"] = torch.maximum(stats["Guard/skipped_D"], lazy_stats["Guard/skipped_D"])
        stats["Loss/gp"] = lazy_stats["Loss/gp"]
    if not reuse_fakes:
        z, fakes = draw_for_rank(torch.randn, reals.shape[0], latent_dim, device=reals.device), None
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

    With `speed.compile`, G and D run torch.compile'd (the penalty's double backward through the eager D); the first
    step of each phase (fading, stable) compiles its graphs, and says what that cost.
    """

    def __init__(self, state: TrainState, options: TrainOptions, autocast: contextlib.AbstractContextManager) -> None:
        self.state, self.loss, self.autocast, self.reuse_fakes = state, options.loss, autocast, options.reuse_fakes
        self.G, self.D = fast_networks(state.G, state.D, options.compile, options.compile_mode)
        self.ema_kimg, self.ema_rampup = options.ema_kimg, options.ema_rampup
        self.compile_pending = {False, True} if options.compile else set()  # phases (alpha >= 1) not compiled yet

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
            ema_beta_for(s.stage.batch_size, ema_half_life_kimg(self.ema_kimg, self.ema_rampup, s.nimg)),
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
