"""pgan-report: the loss/score PNG and the markdown summary of a tiny 8 -> 16 px run, a resumed run, the
records of an interrupted attempt, and one-line errors for a directory that is not a run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, compose_config
from PIL import Image

from pgan.cli.report import report
from pgan.errors import UserError
from pgan.report import load_table, stage_boundaries, stage_summaries, summary_markdown, write_report
from pgan.schedule import stages_from_config
from pgan.train.loop import train

PGAN_REPORT = str(Path(sys.executable).with_name("pgan-report"))
STAGES = stages_from_config(compose_config(*TINY))
TOTAL_KIMG = (STAGES[-1].start_nimg + STAGES[-1].num_images) / 1000


def _report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PGAN_REPORT, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def run_dir(tiny_run: Path) -> Path:
    """The tiny 8 -> 16 px run, with diversity evaluations (collapse.jsonl): the session's."""
    return tiny_run


@pytest.fixture(scope="module")
def written(tiny_run: Path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`pgan-report run=... out=...` on the tiny run."""
    out = tmp_path_factory.mktemp("out") / "report"
    return _report(f"run={tiny_run}", f"out={out}", cwd=out.parent), out


@pytest.mark.subprocess
def test_the_cli_writes_a_png_and_markdown_and_prints_their_paths_and_a_json_line(written) -> None:
    result, out = written
    assert result.returncode == 0, result.stderr
    png, md, last = result.stdout.strip().splitlines()
    assert (png, md) == (str(out / "report.png"), str(out / "report.md"))
    summary = json.loads(last)
    assert summary["png"] == png and summary["kimg"] == pytest.approx(TOTAL_KIMG)
    assert [s["resolution"] for s in summary["stages"]] == [8, 16] and all(s["done"] for s in summary["stages"])
    with Image.open(png) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert 800 <= width <= 2000 and 500 <= height <= 2000
    assert pixels.std() > 10  # curves and text, not a blank canvas


@pytest.mark.subprocess
def test_the_markdown_lists_both_stages_with_their_time(written) -> None:
    text = (written[1] / "report.md").read_text()
    for stage in STAGES:
        row = next(line for line in text.splitlines() if line.startswith(f"| {stage.index} | {stage.resolution} px |"))
        assert re.search(r"\| \d+\.\d s \|", row), row  # the time per stage
        assert f"| {(stage.start_nimg + stage.num_images) / 1000:.3f} |" in row  # logged up to the stage's end
    assert "Speed/img_per_s" in text  # says where the time comes from
    assert "`rpgan`" in text and "`shapes`" in text and "**batch size**: 8" in text
    assert "## Collapse detector" in text and "evaluations" in text
    assert "![losses and scores over kimg](report.png)" in text


def test_the_table_spans_the_run_and_the_boundaries_are_the_schedules(run_dir: Path) -> None:
    table = load_table(run_dir)
    kimg = table["kimg"]
    assert np.all(np.diff(kimg) > 0)
    assert kimg[0] == pytest.approx(0.016) and kimg[-1] == pytest.approx(TOTAL_KIMG)  # first tick .. the end
    assert stage_boundaries(table) == [(STAGES[1].start_nimg / 1000, 16)]
    # Stage 8's last record is at the boundary, stage 16's are after it, fading in.
    eight, sixteen = table["resolution"] == 8, table["resolution"] == 16
    assert kimg[eight][-1] == pytest.approx(STAGES[1].start_nimg / 1000) and kimg[sixteen][0] > kimg[eight][-1]
    alpha = table["alpha"][sixteen]
    assert 0 < alpha[0] < 1 and alpha[-1] == 1 and np.all(np.diff(alpha) >= 0)
    for name in ("Loss/D", "Loss/G", "Scores/real", "Scores/fake", "Diversity/excess_pair", "Collapse/level"):
        assert np.isfinite(table[name]).any(), name
    seconds = [s["seconds"] for s in stage_summaries(table)]
    assert all(s > 0 for s in seconds)


@pytest.mark.subprocess
def test_a_resumed_run_reports_each_kimg_once(run_dir: Path, tmp_path: Path, capsys) -> None:
    """Killed late in stage 16 (final.pt gone, its log ahead of the snapshot) and resumed: the default out= is the
    run directory, and the report's rows are the uninterrupted run's."""
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    (resumed / "stage-0016" / "final.pt").unlink()
    train(compose_config(*TINY), resumed)
    assert "resuming from" in capsys.readouterr().out
    result = _report(f"run={resumed}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (resumed / "report.png").is_file() and (resumed / "report.md").is_file()
    table = load_table(resumed)
    assert len(set(table["kimg"])) == len(table) and np.array_equal(table["kimg"], load_table(run_dir)["kimg"])
    assert all(s["done"] for s in json.loads(result.stdout.splitlines()[-1])["stages"])


def test_records_of_an_interrupted_attempt_are_replaced_by_the_resumed_ones(run_dir: Path, tmp_path: Path) -> None:
    """A log whose interrupted attempt was not purged (copied or merged logs) and with a torn last line: the later
    attempt's records win, one row per kimg."""
    shutil.copy(run_dir / "config.yaml", tmp_path)
    lines = (run_dir / "stats.jsonl").read_text().splitlines()
    redo = [json.loads(line) | {"Loss/D": 123.0} for line in lines[5:]]
    (tmp_path / "stats.jsonl").write_text("\n".join(lines + [json.dumps(r) for r in redo]) + '\n{"step": 9')
    table = load_table(tmp_path)
    assert np.array_equal(table["kimg"], [json.loads(line)["step"] / 1000 for line in lines])
    assert np.all(table["Loss/D"][5:] == 123.0) and not np.any(table["Loss/D"][:5] == 123.0)
    assert table.superseded == len(lines) - 5 and table.unreadable == [
        f"stats.jsonl line {2 * len(lines) - 4} (the last)"
    ]
    text = summary_markdown(tmp_path, table)
    assert f"{len(lines) - 5} records of an interrupted attempt" in text and "Not evaluated" in text
    assert "1 unreadable line(s) in the jsonl logs were skipped (a write cut short by a kill)" in text


def test_damaged_lines_inside_a_log_are_named(run_dir: Path, tmp_path: Path) -> None:
    """Garbage in the middle of a log (not a kill's cut-short last line): the report skips it, names the lines in
    report.md and warns on the console."""
    shutil.copytree(run_dir, tmp_path / "run")
    stats = tmp_path / "run" / "stats.jsonl"
    lines = stats.read_text().splitlines()
    stats.write_text("\n".join(lines[:2] + ["garbage", "[1, 2]"] + lines[2:]) + "\n")
    result = _report(f"run={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    named = "stats.jsonl line 3, stats.jsonl line 4"
    note = f"2 unreadable line(s) in the jsonl logs were skipped (damaged or edited): {named}"
    assert f"warning: run={tmp_path / 'run'}: {note}" in result.stderr
    assert note in (tmp_path / "run" / "report.md").read_text()
    assert json.loads(result.stdout.splitlines()[-1])["unreadable_lines"] == [
        "stats.jsonl line 3",
        "stats.jsonl line 4",
    ]
    assert np.array_equal(load_table(tmp_path / "run")["kimg"], load_table(run_dir)["kimg"])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "run={run}: no such directory"),
        ("empty", "run={run}: not a pgan run directory (no config.yaml)"),
        ("config only", "run={run}: no stats.jsonl (the trainer's log) in this run directory"),
        ("no records", "run={run}: stats.jsonl has no records yet (the run has not reached its first log tick)"),
        ("a file", "run={run}: not a directory"),
        # Damaged copies of a run: tracebacks before.
        ("config not yaml", "run={run}: cannot read config.yaml ("),
        ("config empty", "run={run}: config.yaml is not a pgan run's resolved config (no schedule section)"),
        ("config a list", "run={run}: config.yaml is not a pgan run's resolved config (no schedule section)"),
        ("a value of the wrong type", "run={run}: a record of its jsonl logs holds a value of the wrong type ("),
    ],
)
def test_a_directory_that_is_not_a_run_is_named(run_dir: Path, tmp_path: Path, setup: str, message: str) -> None:
    run = tmp_path / "run"
    if setup == "a file":
        run.write_text("not a run")
    elif setup != "missing":
        shutil.copytree(run_dir, run) if setup in (
            "config not yaml",
            "config empty",
            "config a list",
            "a value of the wrong type",
        ) else run.mkdir()
    if setup in ("config only", "no records"):
        shutil.copy(run_dir / "config.yaml", run)
    if setup == "no records":
        (run / "stats.jsonl").write_text("")
    damaged = {"config not yaml": "schedule: [unclosed", "config empty": "", "config a list": "- 1\n- 2\n"}
    if setup in damaged:
        (run / "config.yaml").write_text(damaged[setup])
    if setup == "a value of the wrong type":
        rows = (run / "stats.jsonl").read_text().splitlines()
        damaged_rows = [json.loads(line) for line in rows]
        for row in damaged_rows:
            if "Progress/resolution" in row:
                row["Progress/resolution"] = "abc"
        (run / "stats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in damaged_rows))
    with pytest.raises(UserError) as error:
        write_report(run)
    expected = message.format(run=run)
    assert str(error.value) == expected or (expected.endswith("(") and str(error.value).startswith(expected))
    assert len(str(error.value).splitlines()) == 1
    assert setup == "a file" or not (run / "report.png").exists()


def test_an_empty_out_is_refused(run_dir: Path) -> None:
    """out= (empty) wrote the report into the current directory, not the run's (what out unset means)."""
    with pytest.raises(UserError, match="^out= is empty"):
        report(compose_config(f"run={run_dir}", "out=", config_name="report"))


@pytest.mark.subprocess
def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    result = _report(f"run={tmp_path / 'nothing'}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == f"error: run={tmp_path / 'nothing'}: no such directory\n"
    assert result.stdout == ""


def test_run_is_required() -> None:
    with pytest.raises(UserError, match=r"^run= is required, e\.g\. pgan-report run=runs/my-run$"):
        report(compose_config(config_name="report"))


def test_the_augmentation_gets_its_own_panel_when_logged(tmp_path: Path) -> None:
    from PIL import Image

    from pgan.report import build_table, plot_report

    stages = stages_from_config(compose_config(*TINY))
    rows = [{"step": s, "Loss/D": -0.1, "Loss/G": 0.2, "Scores/real": 0.1, "Scores/fake": -0.1} for s in (16, 32, 48)]
    plain = plot_report(build_table(rows, [], stages), tmp_path / "plain.png")
    augmented = [r | {"Augment/p": 0.1 * i, "Augment/rt": 0.5} for i, r in enumerate(rows)]
    with_p = plot_report(build_table(augmented, [], stages), tmp_path / "augmented.png")
    assert build_table(augmented, [], stages)["Augment/p"].tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert Image.open(with_p).height > Image.open(plain).height  # one panel more
