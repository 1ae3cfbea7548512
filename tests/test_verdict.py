"""The collapse flag says what it knows: `pending` or `in grace` until the detector has judged, never `ok` by
default, with the last evaluation's own reading beside it, in the console, collapse.jsonl, TensorBoard's
scalars and pgan-report; pgan-eval's one-shot state of the same checkpoint agrees with the trainer's reading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import TINY, compose_config, jsonl_rows, run_eval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgan.metrics.collapse import STATES, DetectorState, Thresholds, update
from pgan.report import write_report
from pgan.train.loop import train

T = Thresholds()


def _tensorboard(run: Path, tag: str) -> list[float]:
    """A scalar's values in the run's TensorBoard events, in step order."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


HEALTHY = {"excess_pair": 0.0, "excess_pair_se": 0.0, "vendi_ratio": 1.0, "std_ratio": 1.0}
COLLAPSED = {"excess_pair": 0.5, "excess_pair_se": 0.0, "vendi_ratio": 1.0, "std_ratio": 1.0}


def test_verdict_is_reached_only_after_patience_judged_evaluations() -> None:
    """Nothing evaluated: pending; in grace: in grace; one collapsed reading of patience 2: pending (not ok);
    two: collapsed; then two healthy ones: ok after the recovery patience."""
    state = DetectorState()
    assert state.verdict(2) == "pending"
    state = update(state, COLLAPSED, T, patience=2, in_grace=True)
    assert state.verdict(2) == "in grace" and state.state == "ok"
    state = update(state, COLLAPSED, T, patience=2)
    assert state.verdict(2) == "pending" and state.state == "ok"
    state = update(state, COLLAPSED, T, patience=2)
    assert state.verdict(2) == "collapsed"
    for _ in range(2):
        state = update(state, HEALTHY, T, patience=2, recover_patience=2)
    assert state.state == "ok" and state.verdict(2) == "ok"
    assert DetectorState.from_dict({**state.to_dict(), "in_grace": True}).verdict(2) == "in grace"
    old = {k: v for k, v in state.to_dict().items() if k != "in_grace"}  # a checkpoint from before verdicts
    assert DetectorState.from_dict(old).verdict(2) == "ok"


def test_a_short_run_says_its_verdict_is_not_reached(tmp_path: Path, capsys) -> None:
    """In the tiny run every evaluation falls in a grace window (grace_kimg 0.256 > each stage): the console,
    collapse.jsonl and the report say `in grace`, with the raw reading, not `ok`; a longer stage is judged."""
    run = tmp_path / "run"
    # 64 samples per evaluation: the tiny G's Vendi ratio reads 0.22-0.34, clear of the 0.4 threshold, in pgan-eval too.
    train(compose_config(*TINY, "diversity.num_samples=64", "diversity.num_real=64"), run)
    out = capsys.readouterr().out
    assert "collapse detector after stage 8 px: in grace (last evaluation reads " in out
    assert "collapse detector after stage 16 px: in grace (last evaluation reads " in out
    rows = [r for r in jsonl_rows(run, "collapse") if "event" not in r]
    assert rows and all(r["verdict"] == "in grace" and r["state"] == "ok" for r in rows)
    assert all(r["reading"] in ("ok", "warning", "collapsed") for r in rows)
    judged, reading = _tensorboard(run, "Collapse/judged"), _tensorboard(run, "Collapse/reading")
    assert judged == [0.0] * len(rows) and reading == [float(STATES.index(r["reading"])) for r in rows]
    summary = write_report(run)
    assert summary["collapse_state"] == "in grace"
    markdown = Path(summary["markdown"]).read_text()
    assert "| detector verdict | **in grace** |" in markdown and "| this evaluation alone reads |" in markdown
    # pgan-eval's one-shot state of the final checkpoint is the trainer's last reading (other latents, as many).
    last = rows[-1]
    evaluated = run_eval(f"ckpt={run / 'stage-0016' / 'final.pt'}", "num_fake=64", "num_real=64")
    assert evaluated["state"] == last["reading"] == "collapsed", (evaluated, last)
    assert abs(evaluated["vendi_ratio"] - last["vendi_ratio"]) < 0.15
    # Judged: no grace, patience 1: every evaluation gets a verdict of its own.
    judged = tmp_path / "judged"
    train(
        compose_config(*TINY, "diversity.grace_kimg=0", "diversity.grace_fade_fraction=0", "diversity.patience=1"),
        judged,
    )
    rows = [r for r in jsonl_rows(judged, "collapse") if "event" not in r]
    assert all(r["verdict"] in ("ok", "warning", "collapsed") for r in rows)
    assert _tensorboard(judged, "Collapse/judged") == [1.0] * len(rows)
    assert write_report(judged)["collapse_state"] in ("ok", "warning", "collapsed")


def test_a_report_of_logs_written_before_verdicts_shows_the_state(tiny_run_8px: Path, tmp_path: Path) -> None:
    """collapse.jsonl without verdicts (older runs): the report falls back to the detector state."""
    run = tiny_run_8px  # TINY's 8 px stage, the session's (read here, copied below)
    rows = (run / "collapse.jsonl").read_text().splitlines()
    stripped = [json.dumps({k: v for k, v in json.loads(r).items() if k not in ("verdict", "reading")}) for r in rows]
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "collapse.jsonl").write_text("\n".join(stripped) + "\n")
    assert write_report(old)["collapse_state"] == "ok"
