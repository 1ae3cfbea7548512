"""experiments/quality/snapshot_modes.py: its final.pt reading is pgan-eval's, and its weight averages are means."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_8PX, compose_config, experiment_script, run_eval

from pgan.networks import Generator
from pgan.train.loop import train

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "quality" / "snapshot_modes.py"
snapshot_modes = experiment_script("quality/snapshot_modes.py")


def test_weight_average_is_the_mean_of_every_float_tensor() -> None:
    generators = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        generators.append(Generator(8, latent_dim=16, fmap_base=64, fmap_max=16, fmap_min=4))
    mean = snapshot_modes.weight_average(generators)
    for name, tensor in mean.state_dict().items():
        expected = sum(g.state_dict()[name] for g in generators) / 3
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(mean.state_dict()["to_rgb.8.weight"], generators[-1].state_dict()["to_rgb.8.weight"])


@pytest.mark.subprocess
def test_reads_every_snapshot_and_final_as_pgan_eval_does(tmp_path: Path) -> None:
    stacked = ["data=stacked_digits", "data.size=200", "schedule.stable_kimg=0.032", "checkpoint.every_kimg=0.008"]
    train(compose_config(*TINY_8PX, *stacked, "checkpoint.keep=2"), tmp_path / "r")
    stage = tmp_path / "r" / "stage-0008"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(stage), "--last", "2", "3", "--num", "200"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    names = [r["snapshot"] for r in rows]
    assert names == [
        "ckpt-0000000016.pt G_ema",
        "ckpt-0000000024.pt G_ema",
        "final.pt G_ema",
        "final.pt G",
        "mean of the last 2 G_ema",
        "mean of the last 3 G_ema",
    ]
    assert rows[4]["stage_nimg"] == [24, 32]
    expected = run_eval(f"ckpt={stage / 'final.pt'}", "metrics=[modes]", "num_fake=200", "data=stacked_digits")
    for key in ("modes_covered", "kl_to_uniform", "kl_digits_red", "kl_digits_green", "kl_digits_blue"):
        assert rows[2][key] == pytest.approx(expected[key], abs=1e-9), key
