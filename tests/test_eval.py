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
    with pytest.raises(UserError, match="num_fake must be an integer >= 1, got 0"):
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
        # Values that were tracebacks (seed=abc) or ran (pr_k=0: every ball holds only its own centre).
        (["fake=/tmp", "seed=abc"], "seed must be an integer, got 'abc'"),
        (["fake=/tmp", "pr_k=0"], "pr_k must be an integer >= 1, got 0"),
        (["fake=/tmp", "coverage_k=x"], "coverage_k must be an integer >= 1, got 'x'"),
        (["fake=/tmp", "num_real=0"], "num_real must be an integer >= 1, got 0"),
        (["fake=/tmp", "resolution=abc"], "resolution must be an integer, got 'abc'"),
    ],
)
def test_bad_inputs_are_one_line_errors(overrides: list[str], message: str, folders) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        run_eval(*overrides)


@pytest.mark.parametrize("side", ["real", "fake"])
def test_an_empty_folder_is_named_by_its_own_key(folders, tmp_path: Path, side: str) -> None:
    """Not "data.path", which pgan-eval's user never set."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    other = "fake" if side == "real" else "real"
    given = {side: tmp_path / "empty", other: folders["healthy"]}
    with pytest.raises(UserError, match=f"no usable images under the {side}= folder {tmp_path / 'empty'}: 1 files"):
        run_eval(*(f"{k}={v}" for k, v in given.items()), "resolution=32")


@pytest.mark.subprocess
def test_cli_error_is_one_line_and_exit_2(folders, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    run = subprocess.run(
        [PGAN_EVAL, f"real={missing}", f"fake={folders['healthy']}"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == f"error: real={missing}: no such folder"
