"""The collapse watch inside the trainer: logging, and what warn / stop / rollback do when it fires."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PGAN_TRAIN, TINY, TRAIN_TIMEOUT_S, compose_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.schedule import stages_from_config
from pgan.train.loop import CollapseStop, train

# One 8 px stage of 0.2 kimg: evaluations every 32 images, checkpoints every 56, grace for the first 60.
ONE_STAGE = [*TINY, "schedule.resolutions=[8]", "schedule.stable_kimg=0.2", "diversity.grace_kimg=0.06"]
# Thresholds no generator can meet: every evaluation after the grace window counts as collapse.
ALWAYS_COLLAPSED = ["diversity.thresholds.vendi_ratio_warning=100", "diversity.thresholds.vendi_ratio_collapsed=100"]


def _collapse_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "collapse.jsonl").read_text().splitlines()]


def test_every_evaluation_is_logged(tiny_run: Path) -> None:
    """collapse.jsonl gets a line per evaluation (every 32 images and at each stage end), TensorBoard the
    Diversity/* and Collapse/* scalars, and the checkpoints the detector state."""
    cfg = compose_config(*TINY)
    rows = _collapse_rows(tiny_run)
    stages = stages_from_config(cfg)
    expected = [s.start_nimg + n for s in stages for n in range(32, s.num_images + 32, 32) if n <= s.num_images]
    expected += [s.start_nimg + s.num_images for s in stages if s.num_images % 32]
    assert [r["step"] for r in rows] == sorted(expected)
    for row in rows:
        assert {"msssim_fake", "msssim_real", "excess_pair", "vendi_ratio", "std_ratio", "state", "alpha"} <= row.keys()
        assert row["n_fake"] == 16 and row["n_real"] == 32 and row["state"] in ("ok", "warning", "collapsed")
    assert {r["resolution"] for r in rows} == {8, 16}
    assert any(0 < r["alpha"] < 1 for r in rows) and all(r["in_grace"] for r in rows)  # grace_kimg 0.256 > run
    events = EventAccumulator(str(tiny_run), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("msssim_fake", "msssim_real", "excess_pair", "vendi_ratio", "std_ratio"):
        assert len(events.Scalars(f"Diversity/{tag}")) == len(rows)
    assert [e.value for e in events.Scalars("Collapse/state")] == [0.0] * len(rows)
    state = load_checkpoint(tiny_run / "stage-0016" / "final.pt")["collapse"]
    assert state["detector"]["evaluations"] == len(rows) and state["rollbacks"] == 0


def test_raw_G_is_evaluated_on_request(tmp_path: Path) -> None:
    train(compose_config(*ONE_STAGE, "diversity.raw_G=true"), tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    raw, ema = events.Scalars("Diversity/raw_G/vendi_ratio"), events.Scalars("Diversity/vendi_ratio")
    assert len(raw) == len(ema) > 0 and [e.value for e in raw] != [e.value for e in ema]


def test_warn_logs_the_state_change_and_trains_on(tmp_path: Path, capsys) -> None:
    train(compose_config(*ONE_STAGE, *ALWAYS_COLLAPSED, "diversity.patience=2"), tmp_path)
    rows = _collapse_rows(tmp_path)
    # Evaluations at 32, 64, ..., 192 and 200 images; the one at 32 is in the grace window; patience 2.
    assert [r["state"] for r in rows] == ["ok", "ok", "collapsed", "collapsed", "collapsed", "collapsed", "collapsed"]
    assert [r["in_grace"] for r in rows[:3]] == [True, False, False]
    assert "warning: collapse detector: ok -> collapsed at 0.096 kimg (stage 8 px" in capsys.readouterr().err
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    assert "Collapse/events/text_summary" in events.Tags()["tensors"]
    assert load_checkpoint(tmp_path / "stage-0008" / "final.pt")["done"]  # warn never stops training


def test_stop_writes_a_checkpoint_and_raises(tmp_path: Path) -> None:
    with pytest.raises(CollapseStop, match="mode collapse detected at 0.064 kimg"):
        train(
            compose_config(*ONE_STAGE, *ALWAYS_COLLAPSED, "diversity.patience=1", "diversity.on_collapse=stop"),
            tmp_path,
        )
    latest = load_checkpoint(tmp_path / "stage-0008" / "latest.pt")
    assert latest["nimg"] == 64 and latest["collapse"]["detector"]["level"] == 2
    assert not (tmp_path / "stage-0008" / "final.pt").exists()
    # ok.pt is the checkpoint at 56 images, written during the grace window while the state was ok.
    assert load_checkpoint(tmp_path / "stage-0008" / "ok.pt")["nimg"] == 56


def test_rollback_restores_the_ok_checkpoint_lowers_lr_and_is_bounded(tmp_path: Path) -> None:
    overrides = [
        *ONE_STAGE,
        *ALWAYS_COLLAPSED,
        "diversity.patience=1",
        "diversity.on_collapse=rollback",
        "diversity.rollback_lr_scale=0.5",
        "diversity.max_rollbacks=2",
    ]
    with pytest.raises(CollapseStop, match=r"2 rollback\(s\), diversity.max_rollbacks=2"):
        train(compose_config(*overrides), tmp_path)
    rows = _collapse_rows(tmp_path)
    rollbacks = [r for r in rows if r.get("event") == "rollback"]
    assert [(r["from_kimg"], r["kimg"], r["lr_scale"]) for r in rollbacks] == [
        (0.064, 0.056, 0.5),
        (0.064, 0.056, 0.25),
    ]
    latest = load_checkpoint(tmp_path / "stage-0008" / "latest.pt")
    assert latest["collapse"]["rollbacks"] == 2 and latest["collapse"]["lr_scale"] == 0.25
    assert all(group["lr"] == 0.001 * 0.25 for group in latest["opt_G"]["param_groups"])
    # D's Adam runs at lr * 4 / 5: rpgan's lazy regularisation every 4th iteration (StyleGAN2's correction).
    assert all(group["lr"] == pytest.approx(0.001 * 0.25 * 4 / 5) for group in latest["opt_D"]["param_groups"])
    # The weights after the rollbacks differ from the first attempt's: a new latent stream and a lower lr.
    stopped = tmp_path / "stopped"
    with pytest.raises(CollapseStop):
        train(
            compose_config(*ONE_STAGE, *ALWAYS_COLLAPSED, "diversity.patience=1", "diversity.on_collapse=stop"), stopped
        )
    first = load_checkpoint(stopped / "stage-0008" / "latest.pt")
    assert first["nimg"] == latest["nimg"] == 64
    assert not torch.equal(first["G"]["blocks.8.conv1.weight"], latest["G"]["blocks.8.conv1.weight"])
    # stats.jsonl restarts at the rollback point like TensorBoard: no step is logged twice.
    steps = [json.loads(line)["step"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_rollback_before_any_periodic_checkpoint_goes_back_to_the_stage_start(tmp_path: Path) -> None:
    """A collapse before the first periodic checkpoint rolls back to the snapshot every stage starts with,
    and the run stops once the rollbacks are used up."""
    overrides = [*ONE_STAGE, *ALWAYS_COLLAPSED, "diversity.grace_kimg=0", "diversity.patience=1"]
    with pytest.raises(CollapseStop, match=r"2 rollback\(s\), diversity.max_rollbacks=2"):
        train(compose_config(*overrides, "diversity.on_collapse=rollback"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "collapse.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in rows if r.get("event") == "rollback"] == [0.0, 0.0]


@pytest.mark.subprocess
def test_cli_stop_exits_3_with_one_error_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [PGAN_TRAIN, *ONE_STAGE, *ALWAYS_COLLAPSED, "diversity.on_collapse=stop", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: mode collapse detected") and "Traceback" not in result.stderr
    assert f"pgan-train hydra.run.dir={run_dir} diversity.on_collapse=warn" in lines[-1]
    assert any(line.startswith("warning: collapse detector: ok -> collapsed") for line in lines)
    assert (run_dir / "stage-0008" / "latest.pt").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("diversity.on_collapse=explode", "diversity.on_collapse"),
        ("diversity.num_samples=2", "diversity.num_samples"),
        ("diversity.every_kimg=0", "diversity.every_kimg"),
        ("diversity.rollback_lr_scale=2", "diversity.rollback_lr_scale"),
        ("diversity.thresholds.hysteresis=1.5", "diversity.thresholds"),
        ("+diversity.thresholds.typo=1", "diversity.thresholds"),
    ],
)
def test_bad_diversity_settings_are_user_errors(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mode_coverage_is_logged_on_data_with_known_modes(tmp_path: Path) -> None:
    train(compose_config(*ONE_STAGE, "data=digits", "diversity.mode_coverage=true"), tmp_path)
    rows = _collapse_rows(tmp_path)
    assert rows and all(1 <= r["modes_covered"] <= 10 and r["mode_kl"] >= 0 for r in rows)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("Diversity/modes_covered")) == len(rows)
