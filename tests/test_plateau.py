"""schedule.advance=plateau (issue 17): a stage's stable phase ends when a quality metric of G_ema has stopped
improving. The decision rule on known sequences, the config's one-line errors, and tiny runs: the stage ends where
the rule says on the logged history, the next stage starts where it ended, and a resumed run, a stage run as its
own job and a 2-rank run decide at the same image with the same weights as an uninterrupted run."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    SAME_FUNCTION,
    TINY,
    TOLERANCE,
    assert_same_state,
    compose_config,
    jsonl_rows,
    stats_rows,
    torchrun,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pgan.checkpoint import load_checkpoint
from pgan.errors import UserError
from pgan.losses import gamma_scale_at
from pgan.report import load_table, run_stages, stage_boundaries, stage_summaries, summary_markdown, write_report
from pgan.schedule import (
    PlateauRule,
    build_stages,
    filled_settings,
    plateau_evaluation_due,
    plateau_progress,
    plateau_reached,
    stable_nimg,
    stages_as_run,
    stages_from_config,
)
from pgan.train.loop import train
from pgan.train.options import TrainOptions
from pgan.train.plateau import Plateau

# --- the decision rule, a pure function of the history -------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "higher", "best", "since"),
    [
        ([10.0], False, 0, 0),
        ([10.0, 9.0, 8.9, 8.8], False, 1, 2),  # 9 beats 10 by more than 5 %; 8.9 and 8.8 do not beat 9 by 5 %
        ([10.0, 9.6, 9.2, 8.9, 8.5], False, 4, 0),  # a creep: the best moves at 9.2 (< 9.5) and 8.5 (< 8.74)
        ([10.0, 10.4, 11.0], False, 0, 2),  # worse is no improvement
        ([0.5, 0.52, 0.6], True, 2, 0),  # higher is better: 0.52 is within 5 % of 0.5, 0.6 is not
        ([0.5, 0.4, 0.3], True, 0, 2),
        ([-1.0, -1.2], False, 1, 0),  # relative to |best|: -1.2 < -1 - 0.05
        ([math.nan, math.nan], False, None, 2),  # nothing finite yet: every evaluation counts as none
        ([math.nan, 3.0, math.inf], False, 1, 1),  # the first finite value is the first best; inf never improves
    ],
)
def test_the_best_value_and_evaluations_since_it(values, higher, best, since) -> None:
    assert plateau_progress(values, 0.05, higher) == (best, since)


def test_a_plateau_is_patience_evaluations_without_an_improvement() -> None:
    history = [10.0, 9.0, 8.9, 8.8]  # best at 1, then two without a 5 % improvement
    assert not plateau_reached(history, 0.05, patience=3, higher_is_better=False)
    assert plateau_reached(history, 0.05, patience=2, higher_is_better=False)
    assert not plateau_reached(history, 0.0, patience=2, higher_is_better=False)  # min_delta 0: any gain counts
    assert plateau_reached([1.0, 1.0, 1.0], 0.0, patience=2, higher_is_better=False)  # equal is no gain
    assert not plateau_reached([], 0.05, patience=1, higher_is_better=False)


def test_evaluations_are_due_every_interval_of_the_stable_phase_only() -> None:
    first, second = build_stages([8, 16], 0.032, 0.2, 8, 0.001)
    rule = PlateauRule("swd", every_kimg=0.016, min_delta=0.05, patience=2, min_stable_kimg=0.0, max_stable_kimg=0.2)
    due = [n for n in range(8, second.num_images + 1, 8) if plateau_evaluation_due(second, rule, n - 8, n)]
    assert due == list(range(32 + 16, second.num_images + 1, 16))  # none in the fade-in (32), none at its end
    assert [n for n in range(8, 41, 8) if plateau_evaluation_due(first, rule, n - 8, n)] == [16, 32]  # no fade
    coarse = build_stages([8, 16], 0.012, 0.2, 8, 0.001)[1]  # the fade ends mid-batch: counted from 12 images
    assert [n for n in range(8, 65, 8) if plateau_evaluation_due(coarse, rule, n - 8, n)] == [32, 48, 64]
    assert stable_nimg(second, 16) == 0 and stable_nimg(second, 56) == 24


def _plateau(values: list[float], min_stable_kimg: float, metric: str = "swd") -> Plateau:
    stage = build_stages([16], 0.0, 1.0, 8, 0.001)[0]
    plateau = Plateau(stage, PlateauRule(metric, 0.016, 0.05, 2, min_stable_kimg, 1.0))
    for i, value in enumerate(values):
        if plateau.ended_at is None:
            plateau.record(16 * (i + 1), value)
    return plateau


def test_the_stable_phase_ends_at_the_plateau_but_not_before_min_stable_kimg() -> None:
    assert _plateau([5.0, 6.0, 6.0, 6.0, 4.0], min_stable_kimg=0.0).ended_at == 48  # 2 without a gain after 16
    late = _plateau([5.0, 6.0, 6.0, 6.0, 4.0], min_stable_kimg=0.064)
    assert late.ended_at == 64 and late.best == (16, 5.0) and late.evals_since_best == 3
    assert _plateau([5.0, 6.0, 6.0, 4.0, 4.1, 4.2], min_stable_kimg=0.064).ended_at == 96  # 4 reset the count
    assert _plateau([0.1, 0.3, 0.3, 0.3], min_stable_kimg=0.0, metric="recall").ended_at == 64  # higher is better
    undefined = Plateau(build_stages([8], 0.0, 1.0, 8, 0.001)[0], _plateau([], 0.0).rule)  # SWD needs 16 px
    assert not undefined.due(8, 16) and undefined.reason() == "metric_not_defined"


def test_the_plateau_is_saved_in_plain_values_and_read_back(tmp_path: Path) -> None:
    plateau = _plateau([5.0, 6.0, math.nan, 6.0], min_stable_kimg=0.0)
    torch.save(plateau.state_dict(), tmp_path / "p.pt")  # checkpoints are read with weights_only=True
    restored = _plateau([], min_stable_kimg=0.0)
    restored.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    assert restored.history[:2] == plateau.history[:2] and math.isnan(restored.history[2][1])
    assert restored.ended_at == plateau.ended_at == 48
    restored.load_state_dict(plateau.state_dict(), new_stage=True)  # a new stage starts afresh
    assert restored.history == [] and restored.ended_at is None
    other = _plateau([], min_stable_kimg=0.0, metric="recall")  # a history of another metric means nothing
    other.load_state_dict(plateau.state_dict())
    assert other.history == [] and other.ended_at is None


# --- the config ------------------------------------------------------------------------------------------------


def test_the_default_is_fixed_and_the_presets_validate_with_plateau() -> None:
    assert TrainOptions.from_config(compose_config()).advance == "fixed"
    quick = TrainOptions.from_config(compose_config("schedule.advance=plateau"))
    fixed = stages_from_config(compose_config())
    # max_stable_kimg null: each stage's stable_kimg is its longest stable phase, so a plateau only shortens it
    assert [st.num_images for st in quick.stages] == [st.num_images for st in fixed]
    assert {r: rule.max_stable_kimg for r, rule in quick.plateau.items()} == {
        st.resolution: st.stable_kimg for st in fixed
    }
    paper = TrainOptions.from_config(compose_config("experiment=paper256", "schedule.advance=plateau"))
    assert paper.plateau[256] == PlateauRule("swd", 50.0, 0.05, 3, 200.0, 800.0)
    assert "swd is not defined at this resolution" in paper.stage_line(paper.stages[0])  # 4 px: no SWD


def test_per_resolution_limits_fill_their_gaps_and_replace_stable_kimg() -> None:
    cfg = compose_config(
        *TINY,
        "schedule.advance=plateau",
        "schedule.plateau.min_stable_kimg={16: 0.016}",
        "schedule.plateau.max_stable_kimg={8: 0.032, 16: 0.24}",
    )
    options = TrainOptions.from_config(cfg)
    assert [st.stable_kimg for st in options.stages] == [0.032, 0.24]
    assert options.plateau[8].min_stable_kimg == 0.016  # below every named resolution: the smallest's value
    assert filled_settings(cfg.schedule, options.stages[0]) == {"plateau.min_stable_kimg": "from 16 px"}
    line = options.stage_line(options.stages[1])
    assert "stable 0.016 to 0.24 kimg" in line and "swd has not improved by 5 % in 3 evaluations" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule.advance=auto"], "schedule.advance must be one of fixed, plateau, got 'auto'"),
        (["schedule.plateau.metric=fid3"], r"schedule.plateau.metric=fid3: unknown \(available: swd, fid"),
        (["schedule.plateau.metric=pr"], "pr gives precision and recall: name one"),
        (["schedule.plateau.metric=modes_covered", "data=folder", "data.path=."], "no mode classifier"),
        (["schedule.plateau.metric=recall", "metrics.num_real=3"], "metrics.num_fake and num_real must be > 3"),
        (["schedule.plateau.patience=0"], "schedule.plateau.patience must be >= 1, got 0"),
        (["schedule.plateau.patience=1.5"], "schedule.plateau.patience must be an integer"),
        (["schedule.plateau.min_delta=1"], "schedule.plateau.min_delta is relative"),
        (["schedule.plateau.min_delta=-0.1"], "schedule.plateau.min_delta must be >= 0"),
        (["schedule.plateau.every_kimg=0"], "schedule.plateau.every_kimg must be > 0"),
        (["schedule.plateau.max_stable_kimg={16: -1}"], "schedule.plateau.max_stable_kimg at 8 px must be >= 0"),
        (["schedule.plateau.min_stable_kimg=0.5"], "schedule.plateau.min_stable_kimg at 8 px is 0.5, more than"),
    ],
)
def test_bad_plateau_settings_are_one_line_errors_naming_the_key(overrides, message, tmp_path: Path) -> None:
    cfg = compose_config(*TINY, "schedule.advance=plateau", "schedule.plateau.min_stable_kimg=0", *overrides)
    with pytest.raises(UserError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


# --- tiny runs -------------------------------------------------------------------------------------------------
PLATEAU = [
    "schedule.advance=plateau",
    "schedule.fade_kimg=0.032",
    "schedule.plateau.every_kimg=0.016",
    "schedule.plateau.min_delta=0.05",
    "schedule.plateau.patience=2",
    "schedule.plateau.min_stable_kimg=0.032",
    "metrics.num_fake=32",
    "metrics.num_real=32",
]
# SWD (the default metric) on the tiny 8 -> 16 px schedule: not defined at 8 px (that stage runs its maximum), a
# plateau at 16 px. Snapshots every 24 images: some in the stable phase before the decision. The settings of
# SAME_FUNCTION, so that a 2-rank run computes what this one does.
SWD_RUN = [
    *SAME_FUNCTION,
    *PLATEAU,
    "schedule.plateau.max_stable_kimg={8: 0.032, 16: 0.24}",
    "checkpoint.every_kimg=0.024",
]
# recall in random features (defined at 8 px too, so that the first stage ends early and the next one starts
# where it ended), with loss=rpgan's gamma decay, which reads the run's images: where stage 16 starts shows in
# its weights.
RECALL_RUN = [
    *PLATEAU,
    "schedule.plateau.metric=recall",
    "schedule.plateau.min_delta=0.5",
    "schedule.plateau.min_stable_kimg=0.016",
    "schedule.plateau.max_stable_kimg=0.2",
    "metrics.features=random",
    "loss=rpgan",
    "loss.gamma_decay_kimg=0.2",
    "diversity.enabled=false",
]


def _train(overrides: list[str], run_dir: Path) -> str:
    """Train in this process; what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(compose_config(*TINY, *overrides), run_dir)
    return out.getvalue()


@pytest.fixture(scope="module")
def swd_run(tmp_path_factory) -> tuple[Path, str]:
    """SWD_RUN, trained once for this module: its directory and console output."""
    run_dir = tmp_path_factory.mktemp("plateau") / "swd"
    return run_dir, _train(SWD_RUN, run_dir)


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory) -> Path:
    """RECALL_RUN, trained once for this module."""
    run_dir = tmp_path_factory.mktemp("plateau") / "recall"
    _train(RECALL_RUN, run_dir)
    return run_dir


def _final(run_dir: Path, resolution: int) -> dict:
    return load_checkpoint(run_dir / f"stage-{resolution:04d}" / "final.pt")


def _advances(run_dir: Path) -> list[dict]:
    return [r for r in stats_rows(run_dir) if r.get("event") == "stage_advance"]


def test_the_stage_ends_at_the_first_evaluation_where_the_rule_says_so(swd_run) -> None:
    run_dir, _ = swd_run
    final = _final(run_dir, 16)
    stage = stages_from_config(final["config"])[1]
    history = final["plateau"]["history"]
    # Evaluations every 16 images of the stable phase, which starts after the 32 images of the fade-in.
    assert [n for n, _ in history] == list(range(48, final["nimg"] + 1, 16)) and len(history) >= 3
    values = [v for _, v in history]
    ends = [
        n
        for k, (n, _) in enumerate(history)
        if stable_nimg(stage, n) >= 32 and plateau_reached(values[: k + 1], 0.05, 2, higher_is_better=False)
    ]
    assert ends and final["plateau"]["ended_at"] == final["nimg"] == ends[0] < stage.num_images
    assert final["total_nimg"] == _final(run_dir, 8)["total_nimg"] + final["nimg"]
    eight = _final(run_dir, 8)  # SWD needs 16 px: the first stage ran its max_stable_kimg, no evaluation
    assert eight["plateau"]["history"] == [] and eight["nimg"] == 32


def test_when_and_why_each_stage_advanced_is_logged(swd_run) -> None:
    run_dir, out = swd_run
    final = _final(run_dir, 16)
    eight, sixteen = _advances(run_dir)
    assert (eight["advance"], eight["step"], eight["stable_kimg"]) == ("metric_not_defined", 32, 0.032)
    assert sixteen["advance"] == "plateau" and sixteen["step"] == final["total_nimg"]
    assert sixteen["nimg"] == final["nimg"] and sixteen["stable_kimg"] == pytest.approx(final["nimg"] / 1000 - 0.032)
    assert [v for _, v in sixteen["evaluations"]] == [v for _, v in final["plateau"]["history"]]
    assert sixteen["message"] in out and "swd has not improved by 5 % in 2 evaluations" in sixteen["message"]
    assert "swd is not defined below 16 px" in eight["message"] and eight["message"] in out
    ticks = [r for r in stats_rows(run_dir) if "event" not in r]
    steps = [r["step"] for r in ticks]
    assert steps == sorted(set(steps)) and steps[-1] == final["total_nimg"]  # the last tick at the decision
    assert ticks[-1]["Progress/stable_kimg_spent"] == sixteen["stable_kimg"]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metric = events.Scalars("Progress/plateau_metric")
    assert [e.step for e in metric] == [32 + n for n, _ in final["plateau"]["history"]]
    assert [e.value for e in metric] == pytest.approx([v for _, v in final["plateau"]["history"]], rel=1e-6)
    assert events.Scalars("Progress/evals_since_best")[-1].value == 2
    assert "Progress/stable_kimg_spent" in events.Tags()["scalars"]
    assert "Progress/advance/text_summary" in events.Tags()["tensors"]


def test_the_report_lists_the_stable_phase_of_each_stage_and_why(swd_run, tmp_path: Path) -> None:
    run_dir, _ = swd_run
    summary = write_report(run_dir, tmp_path)
    final = _final(run_dir, 16)
    assert summary["kimg"] == final["total_nimg"] / 1000 and all(s["done"] for s in summary["stages"])
    assert [a["advance"] for a in summary["advances"]] == ["metric_not_defined", "plateau"]
    text = (tmp_path / "report.md").read_text()
    stable = final["nimg"] / 1000 - 0.032
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 16 px | ") and "plateau:" in line)
    assert f"| {stable:.3f} (of 0.24) | {len(final['plateau']['history'])} |" in row
    assert "plateau: no 5 % improvement of swd in 2 evaluations" in row
    assert "swd not defined at this resolution: ran max_stable_kimg" in text
    assert f"ended {0.24 - stable:.3f} kimg before their maxima" in text


def test_a_run_resumed_mid_stable_decides_at_the_same_image_with_the_same_weights(swd_run, tmp_path: Path) -> None:
    """The state a kill leaves: stage 16 with its snapshots up to the first one in the stable phase that has an
    evaluation, nothing later, and a log that runs past it (purged on resume)."""
    run_dir, _ = swd_run
    full = _final(run_dir, 16)
    cut = tmp_path / "run"
    shutil.copytree(run_dir, cut)
    stage_dir = cut / "stage-0016"
    snapshots = sorted(stage_dir.glob("ckpt-*.pt"))
    keep = next(p for p in snapshots if load_checkpoint(p)["plateau"]["history"])
    resume_from = load_checkpoint(keep)
    assert 0 < len(resume_from["plateau"]["history"]) < len(full["plateau"]["history"])
    for path in [stage_dir / "final.pt", stage_dir / "latest.pt", stage_dir / "ok.pt", *snapshots]:
        if path.name != keep.name:
            path.unlink(missing_ok=True)
    assert "resuming from" in _train(SWD_RUN, cut)
    resumed = _final(cut, 16)
    assert_same_state(resumed, full)
    assert resumed["plateau"] == full["plateau"] and resumed["total_nimg"] == full["total_nimg"]
    assert _advances(cut) == _advances(run_dir)
    steps = [r["step"] for r in stats_rows(cut) if "event" not in r]
    assert steps == sorted(set(steps))  # what the first attempt logged after the snapshot was dropped


def test_a_rollback_takes_the_abandoned_branchs_evaluations_with_it(tmp_path: Path) -> None:
    """NaN reals from the stable phase's first images: the guard rolls the stage back to a snapshot from before
    them, and the evaluations of the abandoned branch (where G_ema stood still: a plateau) go with its weights."""
    _train([*SWD_RUN, "guard.inject_nonfinite={at_kimg: 0.072, steps: 6, times: 1}", "guard.max_bad_steps=4"], tmp_path)
    final = _final(tmp_path, 16)
    assert final["guard"]["rollbacks"] == 1
    assert [n for n, _ in final["plateau"]["history"]] == list(range(48, final["nimg"] + 1, 16))
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    metric = events.Scalars("Progress/plateau_metric")
    assert [e.step for e in metric] == [32 + n for n, _ in final["plateau"]["history"]]
    assert [r["step"] for r in _advances(tmp_path)] == [32, final["total_nimg"]]


def test_the_next_stage_starts_where_a_plateau_ended_the_previous_one(recall_run: Path) -> None:
    eight, sixteen = _final(recall_run, 8), _final(recall_run, 16)
    schedule = stages_from_config(eight["config"])
    assert eight["plateau"]["ended_at"] == eight["nimg"] < schedule[0].num_images  # ended early
    assert sixteen["stage_info"]["start_nimg"] == eight["total_nimg"] < schedule[1].start_nimg
    assert sixteen["total_nimg"] == eight["total_nimg"] + sixteen["nimg"]
    # The gamma decay reads the images shown over the run: each tick's mean is that of its steps' run images.
    ticks = [r for r in stats_rows(recall_run) if "event" not in r]
    assert [r["step"] for r in ticks] == list(range(16, sixteen["total_nimg"] + 1, 16))  # no gap at the boundary
    for row in ticks:
        expected = [gamma_scale_at(n / 1000, 0.2, 0.1) for n in range(row["step"] - 16, row["step"], 8)]
        assert row["Loss/gamma_scale"] == pytest.approx(sum(expected) / 2, rel=1e-6), row["step"]
    # pgan-report and pgan-sample's time-lapse place the stages where they ran.
    stages = run_stages(recall_run)
    assert [st.start_nimg for st in stages] == [0, eight["total_nimg"]]
    assert stages[0].num_images == eight["nimg"] and stages[1].num_images == sixteen["nimg"]
    table = load_table(recall_run)
    assert stage_boundaries(table) == [(eight["total_nimg"] / 1000, 16)]
    assert all(s["done"] for s in stage_summaries(table))


def test_a_stage_run_as_its_own_job_decides_as_in_the_whole_run(recall_run: Path, tmp_path: Path) -> None:
    """`stage=16 init_from=<stage 8's final.pt>` starts at the images that final.pt had seen (not where the
    schedule's maxima would put it), so its gamma decay, its plateau and its weights are the whole run's."""
    init = recall_run / "stage-0008" / "final.pt"
    _train([*RECALL_RUN, "stage=16", f"init_from={init}"], tmp_path)
    alone, whole = _final(tmp_path, 16), _final(recall_run, 16)
    assert_same_state(alone, whole)
    assert alone["plateau"] == whole["plateau"] and alone["total_nimg"] == whole["total_nimg"]
    assert _advances(tmp_path) == _advances(recall_run)[1:]


def test_stages_as_run_moves_later_stages_behind_an_early_end() -> None:
    stages = build_stages([8, 16, 32], 0.032, 0.2, 8, 0.001)
    ran = stages_as_run(stages, {0: (0, 48)})
    assert [(st.start_nimg, st.num_images) for st in ran] == [(0, 48), (48, 232), (280, 232)]
    assert stages_as_run(stages, {}) == stages


def test_the_fixed_advance_keeps_no_plateau_state_and_logs_no_advance(tiny_run: Path) -> None:
    assert "plateau" not in _final(tiny_run, 16)
    assert not _advances(tiny_run)
    assert "## Stage advance" not in summary_markdown(tiny_run, load_table(tiny_run), plot_name=None)


@pytest.mark.distributed
def test_two_ranks_decide_as_one_process_and_resume_exactly(swd_run, tmp_path: Path) -> None:
    """Rank 0 evaluates and sends the number: both ranks end the stage at the one process's image, with its
    weights (to the all-reduce's rounding); resumed mid-stable on 2 ranks, bit for bit the 2-rank run."""
    run_dir, _ = swd_run
    ddp = tmp_path / "ddp"
    result = torchrun(ddp, *SWD_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, single = _final(ddp, 16), _final(run_dir, 16)
    assert ours["plateau"]["ended_at"] == single["plateau"]["ended_at"] and ours["total_nimg"] == single["total_nimg"]
    assert [v for _, v in ours["plateau"]["history"]] == pytest.approx(
        [v for _, v in single["plateau"]["history"]], rel=1e-4
    )
    for key in ("G", "D", "G_ema"):
        for name, value in ours[key].items():
            torch.testing.assert_close(value, single[key][name], **TOLERANCE, msg=f"{key}.{name}")
    assert result.stdout.count("stable phase ended") == 2  # rank 0 alone prints (a line per stage)
    cut = tmp_path / "cut"
    shutil.copytree(ddp, cut)
    stage_dir = cut / "stage-0016"
    keep = next(p for p in sorted(stage_dir.glob("ckpt-*.pt")) if load_checkpoint(p)["plateau"]["history"])
    for path in stage_dir.iterdir():
        if path.name != keep.name:
            path.unlink()
    result = torchrun(cut, *SWD_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    resumed = _final(cut, 16)
    assert_same_state(resumed, ours)
    assert resumed["plateau"] == ours["plateau"]
    assert jsonl_rows(cut, "stats")[-1] == jsonl_rows(ddp, "stats")[-1]  # the same stage_advance record
