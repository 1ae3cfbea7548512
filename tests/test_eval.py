"""`pgan-eval`: diversity of a folder or a checkpoint against a folder or a dataset, as one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_eval

from pgan.errors import UserError

PGAN_EVAL = str(Path(sys.executable).with_name("pgan-eval"))
KEYS = {
    "msssim_fake",
    "msssim_real",
    "excess_pair",
    "vendi_ratio",
    "std_ratio",
    "state",
    "n_fake",
    "n_real",
    "resolution",
}


def test_healthy_folder_is_ok(folders) -> None:
    result = run_eval(f"real={folders['real']}", f"fake={folders['healthy']}", "device=cpu")
    assert KEYS <= result.keys()
    assert result["state"] == "ok" and result["n_fake"] == result["n_real"] == 128 and result["resolution"] == 32
    assert abs(result["excess_pair"]) < 0.15 and result["vendi_ratio"] > 0.8


def test_collapsed_folder_is_flagged(folders) -> None:
    result = run_eval(f"real={folders['real']}", f"fake={folders['collapsed']}", "device=cpu")
    assert result["state"] == "collapsed" and result["excess_pair"] > 0.3 and result["vendi_ratio"] < 0.4


def test_resolution_follows_the_fakes_and_can_be_set(folders) -> None:
    assert run_eval(f"real={folders['real']}", f"fake={folders['healthy']}", "resolution=16")["resolution"] == 16


def test_checkpoint_against_a_dataset_config(tiny_run_8px: Path, tmp_path: Path) -> None:
    from pgan.export import export_safetensors, load_generator

    final = tiny_run_8px / "stage-0008" / "final.pt"
    result = run_eval(f"ckpt={final}", "data=shapes", "num_fake=64", "num_real=64")
    assert result["resolution"] == 8 and result["n_fake"] == 64 and result["n_real"] == 64
    assert 0 <= result["msssim_fake"] <= 1 and result["state"] in ("ok", "warning", "collapsed")
    # An export of the same G_ema gives the same images (pgan-sample's latents for the seed): the same numbers.
    export_safetensors(*load_generator(final), tmp_path / "export")
    assert run_eval(f"ckpt={tmp_path / 'export'}", "data=shapes", "num_fake=64", "num_real=64") == result
    with pytest.raises(UserError, match="num_fake must be >= 1"):
        run_eval(f"ckpt={final}", "num_fake=0")


@pytest.mark.subprocess
def test_cli_prints_json_last_and_exits_0_whatever_the_verdict(folders) -> None:
    run = subprocess.run(
        [PGAN_EVAL, f"real={folders['real']}", f"fake={folders['collapsed']}", "metrics=[diversity]", "device=cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert KEYS <= result.keys() and result["state"] == "collapsed"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fake=/nonexistent/fakes", "real=/tmp"], "fake=/nonexistent/fakes"),
        (["metrics=[fid2]"], "unknown fid2"),
        (["metrics=fid2"], "unknown fid2 "),  # one name as a string: the name, not its letters f, i, d, 2
        (["metrics=[]"], "metrics=[] asks for nothing"),
        ([], "exactly one of fake=FOLDER or ckpt=CHECKPOINT"),
        (["ckpt=/nonexistent.pt"], "/nonexistent.pt"),
    ],
)
def test_bad_inputs_are_one_line_errors(overrides: list[str], message: str, folders) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        run_eval(*overrides)


@pytest.mark.subprocess
def test_cli_error_is_one_line_and_exit_2(folders, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    run = subprocess.run(
        [PGAN_EVAL, f"real={missing}", f"fake={folders['healthy']}"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == f"error: real={missing}: no such folder"
