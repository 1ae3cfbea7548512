"""Shared fixtures: composing the real Hydra config with tiny, fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A two-stage 8 -> 16 px run of a tiny model that trains in a couple of seconds on a CPU.
TINY = [
    "model.latent_dim=16",
    "model.fmap_base=64",
    "model.fmap_max=16",
    "model.fmap_min=4",
    "schedule.resolutions=[8,16]",
    "schedule.fade_kimg=0.128",
    "schedule.stable_kimg=0.016",
    "schedule.batch_size=8",
    "schedule.lr=0.001",
    "schedule.ema_kimg=0.05",
    "data.num_workers=0",
    "checkpoint.every_kimg=0.056",
    "log.tick_kimg=0.016",
    "log.image_every_kimg=0.064",
    "log.grid_size=4",
    "log.progress_bar=false",
    "diversity.every_kimg=0.032",
    "diversity.num_samples=16",
    "diversity.num_real=32",
    "diversity.mode_coverage=false",
    # PGAN_TEST_DEVICE=cuda runs the training tests on a GPU (experiments/cuda); CI has none: cpu.
    f"device={os.environ.get('PGAN_TEST_DEVICE', 'cpu')}",
]


def compose_config(*overrides: str, config_name: str = "train") -> DictConfig:
    """The config `pgan-train` (or the command of `config_name`) would build from these overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def tiny_cfg() -> DictConfig:
    """The tiny two-stage config."""
    return compose_config(*TINY)
