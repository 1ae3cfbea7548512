"""Every config group option composes, and the presets mean what they say."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import CONF_DIR, PGAN_TRAIN, WAIT_TIMEOUT_S, compose_config
from omegaconf import OmegaConf

from pgan.errors import UserError
from pgan.networks import Discriminator, Generator, model_kwargs_from
from pgan.schedule import adam_betas, stages_from_config
from pgan.train.options import TrainOptions

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((Path(CONF_DIR) / group).glob("*.yaml"))]


def test_groups_exist() -> None:
    """The config groups the README documents are all there."""
    assert {"model", "data", "loss", "schedule", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group: str, option: str) -> None:
    """`<group>=<option>` composes with the defaults and gives a schedule the trainer accepts."""
    # The paper's batch of 14 at 256 px needs a minibatch-stddev group that divides it (experiment=paper256 sets 2).
    extra = ["model.mbstd_group_size=2"] if (group, option) == ("schedule", "paper") else []
    cfg = compose_config(f"{group}={option}", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert resolved["model"]["image_channels"] == resolved["data"]["channels"]
    stages = stages_from_config(cfg)
    assert stages[0].fade_kimg == 0 and all(s.fade_kimg > 0 for s in stages[1:])


def test_default_run_is_8_to_256_on_shapes() -> None:
    """The default run is the documented 8 -> 256 px run of the small model on shapes, with the recipe
    experiments/quality chose: rpgan, lr 0.004 (0.002 at 128 px, 0.001 at 256), 16 channels at 64-256 px, batch 8
    and 4 at 128 and 256 px, new stages that start as the smaller model's function."""
    cfg = compose_config()
    stages = stages_from_config(cfg)
    assert [s.resolution for s in stages] == [8, 16, 32, 64, 128, 256]
    assert cfg.model.name == "small" and cfg.data.source == "shapes" and cfg.loss.name == "rpgan"
    assert [s.batch_size for s in stages] == [16, 16, 16, 16, 8, 4]
    assert [s.lr for s in stages] == [0.004] * 4 + [0.002, 0.001]
    assert cfg.model.grow_init == "preserve" and cfg.model.grow_smooth is True
    G = Generator(256, latent_dim=cfg.model.latent_dim, **model_kwargs_from(cfg.model))
    assert [G.blocks[str(r)].conv1.weight.shape[0] for r in (64, 128, 256)] == [16, 16, 16]
    # the paper's own loss stays one preset away
    assert compose_config("experiment=paper256").loss.name == "wgan_gp"


def test_wide_is_the_small_model_twice_as_wide_up_to_64_px() -> None:
    """model=wide: small's every other setting, channels 128 to 16 px, 64 at 32, 32 at 64, small's 16 above."""
    small, wide = compose_config().model, compose_config("model=wide").model
    assert wide.name == "wide"
    assert {k: v for k, v in wide.items() if k not in ("name", "fmap_base", "fmap_max")} == {
        k: v for k, v in small.items() if k not in ("name", "fmap_base", "fmap_max")
    }
    widths = {}
    for model in (small, wide):
        G = Generator(256, latent_dim=model.latent_dim, **model_kwargs_from(model))
        widths[model.name] = [G.blocks["4"].conv.weight.shape[0]]
        widths[model.name] += [G.blocks[str(r)].conv1.weight.shape[0] for r in (8, 16, 32, 64, 128, 256)]
    assert widths["wide"] == [128, 128, 128, 64, 32, 16, 16]
    assert widths["small"] == [64, 64, 64, 32, 16, 16, 16]


def test_paper256_is_the_paper_configuration() -> None:
    """experiment=paper256: 4 -> 256 px, 800k + 800k images, batch 16 then 14, lr 1e-3, 512-wide model."""
    cfg = compose_config("experiment=paper256")
    stages = stages_from_config(cfg)
    assert [s.resolution for s in stages] == [4, 8, 16, 32, 64, 128, 256]
    assert all(s.fade_kimg == 800 for s in stages[1:]) and all(s.stable_kimg == 800 for s in stages)
    assert [s.batch_size for s in stages] == [16] * 6 + [14]
    assert {s.lr for s in stages} == {0.001} and adam_betas(cfg.schedule) == (0.0, 0.99)
    assert cfg.loss.name == "wgan_gp" and cfg.schedule.ema_kimg == pytest.approx(
        16 * math.log(0.5) / math.log(0.999) / 1000, rel=1e-3
    )
    assert cfg.model.latent_dim == 512 and cfg.model.grow_init == "fresh" and cfg.model.grow_smooth is False
    G = Generator(256, latent_dim=cfg.model.latent_dim, **model_kwargs_from(cfg.model))
    assert G.blocks["32"].conv1.weight.shape[0] == 512 and G.blocks["256"].conv1.weight.shape[0] == 64
    # The paper's generator and discriminator have 23.1 M parameters each at 1024 px; at 256 px about 22 M.
    D = Discriminator(256, **model_kwargs_from(cfg.model))
    n_g = sum(p.numel() for p in G.parameters())
    n_d = sum(p.numel() for p in D.parameters())
    assert 21e6 < n_g < 23.1e6 and 21e6 < n_d < 23.1e6


def test_paper_schedule_with_group_of_4_is_refused_clearly() -> None:
    """Batch 14 with minibatch-stddev groups of 4 is a config error that names both keys."""
    with pytest.raises(UserError, match=r"schedule.batch_size at 256 px is 14.*model.mbstd_group_size=4"):
        TrainOptions.from_config(compose_config("schedule=paper"))


def test_scalar_overrides_replace_per_resolution_maps() -> None:
    """`schedule.batch_size=8` replaces a {resolution: batch} map with one value for every stage."""
    cfg = compose_config("experiment=paper256", "schedule.batch_size=8", "schedule.fade_kimg=0.128")
    stages = stages_from_config(cfg)
    assert {s.batch_size for s in stages} == {8} and {s.fade_kimg for s in stages[1:]} == {0.128}


def test_a_per_resolution_map_on_the_command_line_replaces_the_presets():
    """`schedule.stable_kimg={8: ...}` names resolutions the preset's map lacks: the map replaces the preset's
    (Hydra alone would merge it into the preset's map and refuse a new resolution as "no such key")."""
    from pgan.cli.train import replace_resolution_maps

    args = replace_resolution_maps(["schedule.resolutions=[8,16]", "schedule.stable_kimg={8: 0.5}", "seed=3"])
    assert args == [
        "schedule.resolutions=[8,16]",
        "schedule.stable_kimg=null",
        "++schedule.stable_kimg={8: 0.5}",
        "seed=3",
    ]
    cfg = compose_config(*args)
    assert dict(cfg.schedule.stable_kimg) == {8: 0.5}  # the preset's other resolutions are gone
    assert [s.stable_kimg for s in stages_from_config(cfg)] == [0.5, 0.5]  # 16 px filled from 8 px
    # Also where the preset's value is null (max_stable_kimg: null means stable_kimg).
    cfg = compose_config(*replace_resolution_maps(["schedule.plateau.max_stable_kimg={8: 0.25}"]))
    assert dict(cfg.schedule.plateau.max_stable_kimg) == {8: 0.25}
    # Scalars, single entries and explicit +/~ overrides are left as they are.
    same = ["schedule.lr=0.002", "schedule.lr.256=0.001", "+schedule.fade_kimg.8=1.0", "diversity.thresholds={a: 1}"]
    assert replace_resolution_maps(same) == same


def test_pgan_train_accepts_a_map_with_new_resolutions():
    """The real command: the composed job config has the user's map, whole."""
    done = subprocess.run(
        [PGAN_TRAIN, "schedule.resolutions=[8,16]", "schedule.lr={8: 0.003, 16: 0.002}", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=WAIT_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    schedule = yaml.safe_load(done.stdout)["schedule"]
    assert schedule["lr"] == {8: 0.003, 16: 0.002}
