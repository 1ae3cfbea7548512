"""Bad configuration is refused before any work, in one line naming the key: in `train()` and on the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PGAN_TRAIN, TINY, compose_config
from PIL import Image

from pgan.cli import user_error_line
from pgan.cli.train import unread_plateau_note
from pgan.errors import UserError
from pgan.train.loop import train
from pgan.train.rundir import discard_unstarted, not_begun


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule.batch_size=0"], "schedule.batch_size at 8 px must be > 0"),
        (["schedule.batch_size=abc"], "schedule.batch_size at 8 px must be an integer, got 'abc'"),
        (["schedule.batch_size=7.5"], "schedule.batch_size at 8 px must be an integer"),
        (["schedule.lr=-0.1"], "schedule.lr at 8 px must be > 0"),
        (["schedule.lr=nan"], "schedule.lr at 8 px must be finite"),
        (["schedule.stable_kimg=inf"], "schedule.stable_kimg at 8 px must be finite"),
        (["schedule.fade_kimg=-1"], "schedule.fade_kimg at 16 px must be >= 0"),
        (["schedule.batch_size={}"], "schedule.batch_size is an empty map"),
        (["schedule.ema_kimg=-1"], "schedule.ema_kimg must be >= 0, got -1"),
        (["schedule.ema_kimg=slow"], "schedule.ema_kimg must be a number, got 'slow'"),
        (["schedule.ema_kimg=inf"], "schedule.ema_kimg must be finite, got inf"),
        (["schedule.ema_rampup=0"], "schedule.ema_rampup must be > 0, got 0"),
        (["schedule.ema_rampup=nan"], "schedule.ema_rampup must be finite, got nan"),
        (["schedule.ema_rampup=fast"], "schedule.ema_rampup must be a number, got 'fast'"),
        (["schedule.ema_rampup=true"], "schedule.ema_rampup must be a number, got True"),
        (["schedule.lr=true"], "schedule.lr at 8 px must be a number, got True"),
        (["schedule.betas=0.9"], r"schedule.betas must be a pair \[beta1, beta2\], got 0.9"),
        (["schedule.betas=[0.5]"], r"schedule.betas must be a pair \[beta1, beta2\], got \[0.5\]"),
        (["schedule.betas=[0.5,1.0]"], r"schedule.betas must each be < 1, got \[0.5, 1.0\]"),
        (["schedule.betas=[-0.1,0.9]"], "schedule.betas must be >= 0, got -0.1"),
        (["schedule.betas=[0.5,fast]"], "schedule.betas must be a number, got 'fast'"),
        (["model.channels={8: 16}"], "cannot build the 16 px networks: model.channels has no entry for resolution 4"),
        (["model.latent_dim=0"], "model.latent_dim must be a positive integer"),
        (["data.source=imagenet"], "unknown data.source='imagenet'"),
        (["checkpoint.keep=0"], "checkpoint.keep must be >= 1"),
        (["guard.max_bad_steps=0"], "guard.max_bad_steps must be >= 1"),
        (["guard.rollback_lr_scale=2"], r"guard.rollback_lr_scale must be in \(0, 1\]"),
        # Intervals that used to mean "every step" (a checkpoint or a grid a step), and counts that were tracebacks.
        (["checkpoint.every_kimg=0"], "checkpoint.every_kimg must be a finite number > 0, got 0"),
        (["log.image_every_kimg=-1"], "log.image_every_kimg must be a finite number > 0, got -1"),
        (["log.tick_kimg=0"], "log.tick_kimg must be a finite number > 0"),
        (["metrics.every_kimg=-1"], r"metrics.every_kimg must be > 0 \(or null: off\), got -1"),
        (["data.num_workers=-1"], "data.num_workers must be an integer >= 0, got -1"),
        (["data.num_workers=abc"], "data.num_workers must be an integer >= 0, got 'abc'"),
        (["log.grid_size=0"], "log.grid_size must be an integer >= 1, got 0"),
        (["schedule.resolutions=8"], "schedule.resolutions must be a list of resolutions in px, got 8"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["stage=32"], r"stage=32 is not one of schedule.resolutions \[8, 16\]"),
        (["stage='16'"], r"stage='16' is not one of schedule.resolutions \[8, 16\] \(resolutions in px\)"),
        (["data.size=0"], "data.size must be an integer >= 1, got 0"),
        (["data.size=abc"], "data.size must be an integer >= 1, got 'abc'"),
        (["data.seed=-3"], "data.seed must be an integer >= 0, got -3"),
        (["data=digits", "data.size=0"], "data.size must be an integer >= 1, got 0"),
        # A map key that is no resolution was ignored (a typo: 17 for 16 px).
        (["schedule.lr={8: 0.004, 17: 0.1}"], r"schedule.lr has the key 17: keys are resolutions in px \(powers"),
        (["schedule.stable_kimg={8: 0.032, 6: 1}"], "schedule.stable_kimg has the key 6"),
        # Missing Inception weights: found before the run writes anything, named by the trainer's own keys.
        (
            ["metrics.every_kimg=0.064", "metrics.names=[fid]", "metrics.inception_weights=/no/such.pth"],
            "metrics.inception_weights=/no/such.pth: no such file",
        ),
        (
            ["schedule.advance=plateau", "schedule.plateau.metric=fid", "schedule.plateau.min_stable_kimg=0.016"]
            + ["metrics.inception_weights=/no/such.pth"],
            "metrics.inception_weights=/no/such.pth: no such file",
        ),
    ],
)
def test_bad_settings_name_the_key_before_anything_is_written(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    """Each mistake is a UserError naming the key, and the run directory is never created."""
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, *overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="device=cuda but CUDA is not available"):
        train(compose_config(*TINY, "device=cuda"), tmp_path / "run")


@pytest.fixture
def run_8px(tiny_run_8px: Path) -> Path:
    """A finished one-stage 8 px run of the tiny model (the session's)."""
    return tiny_run_8px


def test_init_from_another_architecture_names_the_differing_keys(run_8px: Path, tmp_path: Path) -> None:
    ckpt = run_8px / "stage-0008" / "final.pt"
    with pytest.raises(UserError, match=r"different architecture \(model.latent_dim: 16 there vs 32 here\)"):
        train(compose_config(*TINY, "stage=16", f"init_from={ckpt}", "model.latent_dim=32"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_from_grows_a_wider_block_above_the_checkpoint(run_8px: Path, tmp_path: Path) -> None:
    """The widths only have to agree up to the checkpoint's resolution: a 16 px stage of 16 channels (the rule
    gives 8) grows from the 8 px run of the rule's widths, and its block, now square, starts as identities
    (grow_init=preserve). A width that differs at or below 8 px is refused, naming the widths."""
    ckpt = run_8px / "stage-0008" / "final.pt"
    wider = "model.channels={4: 16, 8: 16, 16: 16}"
    final = train(compose_config(*TINY, "stage=16", f"init_from={ckpt}", wider), tmp_path / "run")
    G = torch.load(final, weights_only=False)["G"]
    assert G["blocks.16.conv1.weight"].shape[:2] == (16, 16) and G["blocks.16.conv2.weight"].shape[:2] == (16, 16)
    narrower = "model.channels={4: 16, 8: 8, 16: 16}"
    with pytest.raises(UserError, match=r"widths up to 8 px: \{4: 16, 8: 16\} there vs \{4: 16, 8: 8\} here"):
        train(compose_config(*TINY, "stage=16", f"init_from={ckpt}", narrower), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("with_final", [True, False])
def test_init_from_a_folder_says_it_is_a_folder(run_8px: Path, tmp_path: Path, with_final: bool) -> None:
    """A folder (a stage directory, an export directory) is not "not found": the message says what it is."""
    folder = run_8px / "stage-0008" if with_final else tmp_path / "export"
    folder.mkdir(exist_ok=True)
    hint = f"did you mean {folder / 'final.pt'}" if with_final else r"a .pt file such as"
    with pytest.raises(UserError, match=rf"not a checkpoint: {folder} is a folder.*{hint}"):
        train(compose_config(*TINY, "stage=16", f"init_from={folder}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_from_the_wrong_resolution_is_refused(run_8px: Path, tmp_path: Path) -> None:
    ckpt = run_8px / "stage-0008" / "final.pt"
    with pytest.raises(UserError, match="is a 8 px checkpoint; stage 32 grows from a 16 px one"):
        train(compose_config(*TINY, "schedule.resolutions=[16,32]", "stage=32", f"init_from={ckpt}"), tmp_path / "r")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("schedule.batchsize=8", "error: schedule.batchsize: no such key in the config (a typo? to add a new key"),
        ("loss=foo", "error: loss=foo: no such option in conf/loss/; choose one of hinge, logistic, rpgan, wgan_gp"),
        ("seed=[1", "error: seed=[1: cannot parse this override"),
        ("schedule.batch_size=abc", "error: schedule.batch_size at 8 px must be an integer, got 'abc'"),
    ],
)
@pytest.mark.subprocess
def test_cli_config_mistakes_are_one_line_exit_2(override: str, expected: str, tmp_path: Path) -> None:
    """Typos in keys, unknown options and unparsable overrides: one line naming the culprit, exit 2."""
    result = subprocess.run(
        [PGAN_TRAIN, override, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip() == expected or (
        result.stderr.startswith(expected) and len(result.stderr.strip().splitlines()) == 1
    ), result.stderr
    assert not (tmp_path / "run" / "stage-0032").exists()


def test_a_user_error_from_a_loader_worker_prints_as_its_own_line() -> None:
    """torch re-raises a worker's UserError with the worker's traceback in its message: the CLI prints the
    original message, one line."""
    wrapped = UserError(
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\npgan.errors.UserError: cannot read image /data/a.png: truncated'
    )
    assert user_error_line(wrapped) == "cannot read image /data/a.png: truncated"
    assert user_error_line(UserError("plain")) == "plain"


@pytest.mark.parametrize(
    ("overrides", "note"),
    [
        (["schedule.plateau.patience=5"], "note: schedule.plateau.patience is read only with schedule.advance=plateau"),
        (
            ["schedule.plateau.patience=5", "++schedule.plateau.min_stable_kimg={8: 1}"],
            "note: schedule.plateau.min_stable_kimg, schedule.plateau.patience are read only with",
        ),
        (["schedule.plateau.patience=5", "schedule.advance=plateau"], None),
        (["schedule.lr=0.002"], None),
    ],
)
def test_plateau_settings_without_the_plateau_advance_get_a_note(overrides: list[str], note: str | None) -> None:
    """A user who sets schedule.plateau.* but forgot schedule.advance=plateau is told that nothing reads them."""
    found = unread_plateau_note(compose_config(*overrides), overrides)
    assert found == note if note is None else found.startswith(note)


def test_a_data_error_found_at_a_later_stage_leaves_a_run_that_has_not_begun(tmp_path: Path) -> None:
    """Ten 8 px images: fine for the 8 px stage, none usable at 16 px. The data of every stage is checked before
    training, and the scan it caches there no longer keeps the run directory (pgan-train then removes it)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (25 * i, 0, 0)).save(folder / f"{i}.png")
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="16 px"):
        train(compose_config(*TINY, "data=folder", f"data.path={folder}"), run_dir)
    assert not list(run_dir.glob("stage-*")) and not_begun(run_dir)
    discard_unstarted(run_dir)
    assert not run_dir.exists()
