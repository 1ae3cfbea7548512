"""schedule.betas: Adam's (beta1, beta2) for G and D reach both optimizers (D's raised to the power c under lazy
regularisation) and the checkpoint, survive a resume, and show in the report; configs from before the setting
train with the paper's (0, 0.99)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY, TINY_8PX, assert_resumes_mid_fade_exactly, compose_config

from pgan.checkpoint import load_checkpoint
from pgan.report import config_highlights
from pgan.schedule import PAPER_BETAS, adam_betas
from pgan.train.loop import train

TWO_STEPS = ["schedule.stable_kimg=0.016"]  # two steps of batch 8 at 8 px


def test_the_betas_reach_both_optimizers_the_checkpoint_and_the_report(tmp_path: Path) -> None:
    lazy = ["loss=rpgan", "loss.penalty_every=4"]  # c = 4 / 5
    train(compose_config(*TINY_8PX, *TWO_STEPS, *lazy, "schedule.betas=[0.5,0.9]"), tmp_path / "set")
    train(compose_config(*TINY_8PX, *TWO_STEPS, *lazy), tmp_path / "default")
    ckpt = load_checkpoint(tmp_path / "set" / "stage-0008" / "final.pt")
    default = load_checkpoint(tmp_path / "default" / "stage-0008" / "final.pt")
    assert ckpt["opt_G"]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert ckpt["opt_D"]["param_groups"][0]["betas"] == pytest.approx((0.5**0.8, 0.9**0.8))
    assert default["opt_G"]["param_groups"][0]["betas"] == PAPER_BETAS
    assert ckpt["config"]["schedule"]["betas"] == [0.5, 0.9]
    assert "**Adam betas**: 0.5, 0.9" in " ".join(config_highlights(ckpt["config"]))


def test_a_run_with_other_betas_resumes_mid_fade_exactly(tmp_path: Path) -> None:
    assert_resumes_mid_fade_exactly([*TINY, "schedule.betas=[0.5,0.9]"], tmp_path)


def test_a_config_from_before_the_setting_trains_with_the_papers_betas() -> None:
    assert adam_betas({"lr": 0.001}) == PAPER_BETAS == (0.0, 0.99)
    assert "**Adam betas**: 0, 0.99" in " ".join(config_highlights({"schedule": {"lr": 0.001}}))
    assert "**Adam betas**: [0.5, 2]" in " ".join(config_highlights({"schedule": {"betas": [0.5, 2]}}))  # hand-edited
