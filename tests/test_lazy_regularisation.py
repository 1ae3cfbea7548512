"""Lazy regularisation (loss.penalty_every=k): the penalty on every k-th D step only, scaled by k."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_same_state, compose_config, stats_rows

from pgan.checkpoint import load_checkpoint
from pgan.losses import make_loss
from pgan.networks import Discriminator, Generator
from pgan.train.loop import train
from pgan.train.step import d_step


@pytest.mark.parametrize("every", [0, -1, 1.5, "x"])
def test_penalty_every_must_be_a_positive_integer(every) -> None:
    with pytest.raises(ValueError, match="loss.penalty_every must be an integer >= 1"):
        make_loss("wgan_gp", penalty_every=every)


@pytest.mark.parametrize("name", ["wgan_gp", "logistic"])
def test_the_penalty_is_scaled_by_k_on_its_steps_and_absent_between(name: str) -> None:
    """Same weights, data and random draws: the lazy penalty is k times the eager one, and zero between."""
    extra = {"r1_gamma": 1.0} if name == "logistic" else {}
    G = Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4)
    reals, z = torch.randn(4, 3, 8, 8), torch.randn(4, 16)
    results = {}
    for every, with_penalty in ((1, True), (4, True), (4, False)):
        torch.manual_seed(0)
        D = Discriminator(8, fmap_base=64, fmap_max=16, fmap_min=4)
        opt = torch.optim.Adam(D.parameters(), fused=True)
        stats = d_step(G, D, opt, make_loss(name, penalty_every=every, **extra), reals, z, 1.0, None, with_penalty)
        results[(every, with_penalty)] = stats
    eager, lazy, between = results[(1, True)], results[(4, True)], results[(4, False)]
    assert eager["Loss/gp"].item() > 0
    assert lazy["Loss/gp"].item() == pytest.approx(4 * eager["Loss/gp"].item(), rel=1e-5)
    assert between["Loss/gp"].item() == 0
    assert between["Loss/D"].item() == pytest.approx(eager["Loss/D"].item(), rel=1e-6)  # the loss itself unchanged


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
