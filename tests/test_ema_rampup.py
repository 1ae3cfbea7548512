"""schedule.ema_rampup: G_ema's half-life grows with the stage's images (min(ema_kimg, rampup x stage kimg)), as
StyleGAN2-ADA's EMA rampup does, counted per stage: G_ema starts every stage as G and averages over a window
that widens as the stage goes on. The update the trainer applies is checked against that rule step by step."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import TINY, TINY_8PX, assert_resumes_mid_fade_exactly, compose_config

from pgan.checkpoint import load_checkpoint
from pgan.train.loop import train

# Stages of two steps each (batch 8, 16 images; the 16 px one all fade-in), a snapshot after every step.
TWO_STEPS = ["schedule.stable_kimg={8: 0.016, 16: 0.0}", "checkpoint.every_kimg=0.008", "checkpoint.keep=5"]


def test_g_ema_follows_the_rampup_rule_step_by_step(tmp_path: Path) -> None:
    """rampup 1, in each stage: step 1 (0 images in the stage, whatever came before) has half-life 0, so G_ema
    becomes G; step 2 (8 images) has a half-life of 8 images at batch 8, beta = 0.5, so G_ema = (G after step 1
    + G after step 2) / 2."""
    train(compose_config(*TINY, *TWO_STEPS, "schedule.fade_kimg=0.016", "schedule.ema_rampup=1.0"), tmp_path / "r")
    for stage in ("stage-0008", "stage-0016"):
        first = load_checkpoint(tmp_path / "r" / stage / "ckpt-0000000008.pt")
        final = load_checkpoint(tmp_path / "r" / stage / "final.pt")
        assert first["nimg"] == 8 and final["nimg"] == 16
        for name, g1 in first["G"].items():
            if not g1.is_floating_point():
                continue
            assert torch.equal(first["G_ema"][name], g1), f"{stage} {name}"
            torch.testing.assert_close(final["G_ema"][name], (g1 + final["G"][name]) / 2, rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(first["G"][n], final["G"][n]) for n in first["G"]), "G did not move"


def test_without_rampup_g_ema_keeps_its_fixed_half_life(tmp_path: Path) -> None:
    """The default (null): step 1 already averages (TINY's 0.05-kimg half-life), so G_ema is not G after it."""
    train(compose_config(*TINY_8PX, *TWO_STEPS), tmp_path / "r")
    first = load_checkpoint(tmp_path / "r" / "stage-0008" / "ckpt-0000000008.pt")
    assert any(
        not torch.equal(first["G_ema"][n], first["G"][n]) for n in first["G"] if first["G"][n].is_floating_point()
    )


def test_a_run_with_rampup_resumes_mid_fade_exactly(tmp_path: Path) -> None:
    """The half-life follows from the stage's image count, which the checkpoint holds: resuming changes nothing."""
    assert_resumes_mid_fade_exactly([*TINY, "schedule.ema_rampup=0.5"], tmp_path)
