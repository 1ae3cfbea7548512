"""Lazy regularisation (loss.penalty_every=k) as StyleGAN2 does it: on every k-th iteration a D update of the
penalties alone, scaled by k, with D's Adam corrected for the extra updates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_same_state, compose_config, stats_rows
from omegaconf import OmegaConf

from pgan.checkpoint import load_checkpoint
from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator
from pgan.train.clock import TickSums
from pgan.train.guard import Guard
from pgan.train.loop import train
from pgan.train.state import build_optimizers
from pgan.train.step import d_penalty_step, d_step, train_step


@pytest.mark.parametrize("every", [0, -1, 1.5, "x"])
def test_penalty_every_must_be_a_positive_integer(every) -> None:
    with pytest.raises(ValueError, match="loss.penalty_every must be an integer >= 1"):
        make_loss("wgan_gp", penalty_every=every)


def tiny_nets() -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    return Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4), Discriminator(
        8, fmap_base=64, fmap_max=16, fmap_min=4
    )


class CountingD(torch.nn.Module):
    """D, counting the images of every forward call."""

    def __init__(self, D: torch.nn.Module) -> None:
        super().__init__()
        self.D, self.calls = D, []

    def forward(self, x, alpha=1.0, labels=None):
        self.calls.append(x.shape[0])
        return self.D(x, alpha, labels)


@pytest.mark.parametrize("name", ["wgan_gp", "logistic", "rpgan"])
def test_the_lazy_penalty_step_is_k_times_the_penalty_and_the_main_step_has_none(name: str) -> None:
    """Same weights, data and random draws: the lazy penalty step applies k times the penalty a non-lazy D step
    adds to its loss and reports it divided by k (Loss/gp reads the same for every k); the lazy run's main D step
    has none, reports none, and has the same loss."""
    extra = {"wgan_gp": {}, "logistic": {"r1_gamma": 1.0}, "rpgan": {"r1_gamma": 1.0, "r2_gamma": 0.5}}[name]
    G, _ = tiny_nets()
    reals, z = torch.randn(4, 3, 8, 8), torch.randn(4, 16)
    fakes = G(z, 1.0).detach()
    results, grads = {}, {}
    for every in (1, 4):
        loss = make_loss(name, penalty_every=every, **extra)
        for lazy_step in (False, True):
            torch.manual_seed(0)
            D = tiny_nets()[1]
            opt = torch.optim.Adam(D.parameters(), fused=True)
            if lazy_step:
                results[(every, "penalty")] = d_penalty_step(D, opt, loss, reals, fakes, 1.0)
                grads[every] = [p.grad.clone() for p in D.parameters() if p.grad is not None]
            else:
                results[(every, "main")] = d_step(G, D, opt, loss, reals, z, 1.0, None, every == 1, fakes=fakes)
    for applied, once in zip(grads[4], grads[1], strict=True):
        torch.testing.assert_close(applied, 4 * once, rtol=1e-5, atol=1e-7)
    eager, lazy, main = results[(1, "main")], results[(4, "penalty")], results[(4, "main")]
    assert eager["Loss/gp"].item() > 0
    assert lazy["Loss/gp"].item() == pytest.approx(eager["Loss/gp"].item(), rel=1e-5)
    assert "Loss/gp" not in main
    assert main["Loss/D"].item() == pytest.approx(eager["Loss/D"].item(), rel=1e-6)  # the loss itself unchanged


def test_lazy_regularisation_corrects_adam_and_takes_k_plus_one_d_updates_per_k_iterations() -> None:
    """StyleGAN2's lazy R1: D's Adam at lr * c and betas ** c with c = k / (k + 1); over k iterations D takes
    k loss updates and one penalty update, whose passes see only the reals and the detached fakes."""
    k, lr = 3, 0.002
    loss = make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0, penalty_every=k)
    assert loss.lazy_ratio == pytest.approx(0.75) and make_loss("rpgan").lazy_ratio == 1.0
    G, D = tiny_nets()
    G_ema = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4).requires_grad_(False)
    opt_G, opt_D = build_optimizers(G, D, lr, loss.lazy_ratio)
    assert opt_G.param_groups[0]["lr"] == lr and opt_G.param_groups[0]["betas"] == (0.0, 0.99)
    assert opt_D.param_groups[0]["lr"] == pytest.approx(lr * 0.75)
    assert opt_D.param_groups[0]["betas"] == pytest.approx((0.0, 0.99**0.75))
    counting = CountingD(D)
    reals = torch.randn(4, 3, 8, 8)
    calls = []
    for i in range(2 * k):
        counting.calls.clear()
        train_step(G, counting, G_ema, opt_G, opt_D, loss, reals, 1.0, 0.9, None, i)
        calls.append(list(counting.calls))
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert steps(opt_D) == 2 * k + 2 and steps(opt_G) == 2 * k
    # D step: reals, fakes; the penalty step (iterations 0 and k): reals (R1), fakes (R2); G step: fakes, reals.
    assert calls[0] == [4] * 6 and calls[1] == [4] * 4 and calls[k] == [4] * 6


def test_a_non_lazy_penalty_shares_the_loss_passes() -> None:
    """penalty_every=1: R1 and R2 come from the D passes that score the loss, no further D call."""
    G, D = tiny_nets()
    counting = CountingD(D)
    d_step(
        G,
        counting,
        torch.optim.Adam(D.parameters(), fused=True),
        make_loss("rpgan", r1_gamma=1.0, r2_gamma=1.0),
        torch.randn(4, 3, 8, 8),
        torch.randn(4, 16),
        1.0,
    )
    assert counting.calls == [4, 4]


def test_lazy_run_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """A run with penalty_every=2 logs the penalty's average and resumes bit-identically mid-stage (the step
    index is a function of the image counter)."""
    overrides = [*TINY, "loss.penalty_every=2"]
    train(compose_config(*overrides), tmp_path / "full")
    rows = stats_rows(tmp_path / "full")
    assert all(r["Loss/gp"] > 0 for r in rows)
    # Resume a copy of the finished run from its snapshot at 56 images: step index 7, mid lazy cycle.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    for name in ("final.pt", "latest.pt", "ckpt-0000000112.pt"):
        (cut / "stage-0016" / name).unlink()
    assert load_checkpoint(cut / "stage-0016" / "ckpt-0000000056.pt")["nimg"] == 56
    train(compose_config(*overrides), cut)
    assert_same_state(
        load_checkpoint(cut / "stage-0016" / "final.pt"), load_checkpoint(tmp_path / "full" / "stage-0016" / "final.pt")
    )


def test_a_tick_averages_the_penalty_over_the_steps_that_computed_it() -> None:
    """Under lazy regularisation only every k-th step reports Loss/gp: a tick's Loss/gp is the mean of those steps
    (not diluted by the others, and absent from a tick that had none), a skipped step adds nothing, and a partial
    tick saved before the counts existed (every scalar at every good step) resumes with the same means."""
    guard = Guard(OmegaConf.create({"max_bad_steps": 4, "max_rollbacks": 1, "rollback_lr_scale": 0.5}), "cpu")
    flag = lambda bad: torch.tensor(float(bad))  # noqa: E731
    step = lambda d, gp=None, bad=0: {  # noqa: E731
        "Guard/skipped_D": flag(bad),
        "Guard/skipped_G": flag(0),
        "Loss/D": torch.tensor(d),
        **({} if gp is None else {"Loss/gp": torch.tensor(gp)}),
    }
    tick = TickSums()
    for stats in (step(1.0, gp=0.5), step(2.0), step(3.0, gp=1.5, bad=1), step(4.0), step(5.0, gp=2.5)):
        tick.add(stats, guard)
    means = tick.take_means(guard)
    assert means["Loss/D"] == pytest.approx((1 + 2 + 4 + 5) / 4) and means["Loss/gp"] == pytest.approx(1.5)
    assert means["Guard/skipped_steps"] == 1 and tick.steps == 0
    tick.add(step(6.0), guard)
    assert "Loss/gp" not in tick.take_means(guard)

    old = TickSums()
    old.load_state_dict(
        {"sums": {"Loss/D": torch.tensor(6.0), "Guard/good_steps": torch.tensor(3.0)}, "steps": 3}, "cpu"
    )
    old.add(step(2.0), guard)
    assert old.take_means(guard)["Loss/D"] == pytest.approx(2.0)
