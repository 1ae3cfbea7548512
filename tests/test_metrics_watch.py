"""Quality metrics inside training (issue 7): `metrics.every_kimg` evaluates G_ema and logs `Metrics/*` to
TensorBoard and metrics.jsonl, without touching the training trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.schedule import alpha_at, stages_from_config
from pgan.train.loop import train

METRICS = [
    "metrics.every_kimg=0.048",
    "metrics.names=[swd,pr,coverage,fid,modes]",
    "metrics.features=random",
    "metrics.num_fake=24",
    "metrics.num_real=24",
]


@pytest.fixture(scope="module")
def metrics_on(tmp_path_factory) -> Path:
    """The tiny 8 -> 16 px run with metrics on."""
    run_dir = tmp_path_factory.mktemp("metrics") / "on"
    train(compose_config(*TINY, *METRICS), run_dir)
    return run_dir


@pytest.fixture
def runs(metrics_on: Path, tiny_run: Path) -> dict[str, Path]:
    """The tiny 8 -> 16 px run with metrics on, and the same run with them off (the session's tiny run)."""
    return {"on": metrics_on, "off": tiny_run}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_are_logged_at_their_kimg_and_every_stage_end(runs) -> None:
    cfg = compose_config(*TINY, *METRICS)
    stages = stages_from_config(cfg)
    records = _records(runs["on"])
    expected = []  # every 48 images into a stage, and the stage's last image
    for st in stages:
        expected += [(st.resolution, st.start_nimg + n) for n in range(48, st.num_images, 48)]
        expected.append((st.resolution, st.start_nimg + st.num_images))
    assert [(r["resolution"], r["step"]) for r in records] == expected
    for r in records:
        st = stages[r["stage"]]
        assert r["alpha"] == alpha_at(st, r["step"] - st.start_nimg) and r["features"] == "random"
        assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1 and r["num_modes"] == 16
        assert ("swd" in r) == (r["resolution"] >= 16)  # SWD needs 16 px: skipped in the 8 px stage


def test_metrics_reach_tensorboard_under_metrics_tags(runs) -> None:
    events = EventAccumulator(str(runs["on"]), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"Metrics/fid", "Metrics/precision", "Metrics/recall", "Metrics/coverage", "Metrics/swd"} <= tags
    assert {"Metrics/modes_covered", "Metrics/eval_s"} <= tags
    fid = events.Scalars("Metrics/fid")
    assert [e.step for e in fid] == [r["step"] for r in _records(runs["on"])]
    assert [e.value for e in fid] == pytest.approx([r["fid"] for r in _records(runs["on"])], rel=1e-6)


def test_metrics_leave_the_training_trajectory_unchanged(runs) -> None:
    on = load_checkpoint(runs["on"] / "stage-0016" / "final.pt")
    off = load_checkpoint(runs["off"] / "stage-0016" / "final.pt")
    for key in ("G", "D", "G_ema"):
        assert all(torch.equal(on[key][k], off[key][k]) for k in on[key]), key
    assert not (runs["off"] / "metrics.jsonl").read_text()  # off by default: nothing evaluated


def test_the_run_report_shows_the_last_metrics(runs, tmp_path: Path) -> None:
    from pgan.report import load_table, write_report

    last = _records(runs["on"])[-1]
    assert load_table(runs["on"])["Metrics/fid"][-1] == pytest.approx(last["fid"])
    write_report(runs["on"], tmp_path)
    assert f"| `Metrics/fid` | {last['fid']:.4g} |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["metrics.every_kimg=1", "metrics.names=[fid3]"], "metrics: unknown fid3"),
        (["metrics.every_kimg=-1"], "metrics.every_kimg must be > 0"),
        (["metrics.every_kimg=1", "metrics.names=[pr]", "metrics.num_real=3"], "must be > 3"),
        (["metrics.every_kimg=1", "metrics.names=[modes]", "data=folder", "data.path=DIR"], "no mode classifier"),
        (["metrics.every_kimg=1", "metrics.names=[fid]", "metrics.inception_weights=/nope.pth"], "/nope.pth"),
    ],
)
def test_metrics_config_errors_stop_before_training(overrides, message, tmp_path: Path) -> None:
    from torchvision.utils import save_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        save_image(torch.rand(3, 16, 16), images / f"{i}.png")
    overrides = [o.replace("DIR", str(images)) for o in overrides]
    with pytest.raises(UserError, match=message):
        train(compose_config(*TINY, *overrides), tmp_path / "run")
    assert not list((tmp_path / "run").glob("stage-*/*.pt"))  # nothing trained
