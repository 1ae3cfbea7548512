"""One trainer per run directory (the lock), nothing left behind by a user error, and the stage line's story:
what a per-resolution map filled in, and which checkpoint a stage grew from."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PGAN_TRAIN, TINY, TINY_8PX, compose_config, file_listing, wait_for

from pgan.cli.train import replace_resolution_maps
from pgan.errors import UserError
from pgan.train.loop import train
from pgan.train.rundir import LOCK_NAME, RunDirLock, check_free

BOUND_S = 300  # generous: a loaded 2-core machine starts a trainer in seconds, this bounds a hang


@pytest.mark.subprocess
def test_a_second_trainer_is_refused_and_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    """While one pgan-train trains in DIR, a second one exits 2 at once with one line naming the holder and
    writes nothing (not even Hydra's files); after the holder is SIGKILLed, the next one takes over with a
    warning and finishes the run."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "schedule.stable_kimg=0.8", "checkpoint.every_kimg=0.04"]
    holder = subprocess.Popen(
        [PGAN_TRAIN, *overrides, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (run_dir / "stage-0008" / "latest.pt").exists(), "checkpoint", holder)
        lock = json.loads((run_dir / LOCK_NAME).read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
        os.kill(holder.pid, signal.SIGSTOP)  # hold still: nothing of the holder's may change the tree meanwhile
        before = file_listing(run_dir)
        second = subprocess.run(
            [PGAN_TRAIN, *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=BOUND_S
        )
        after = file_listing(run_dir)
        os.kill(holder.pid, signal.SIGCONT)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid} on host {socket.gethostname()} since" in lines[0], lines
        assert after == before, "the refused trainer wrote into the run directory"
        os.killpg(holder.pid, signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
    assert (run_dir / LOCK_NAME).exists(), "a SIGKILLed trainer cannot remove its lock"
    resumed = subprocess.run([PGAN_TRAIN, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=BOUND_S)
    assert resumed.returncode == 0, resumed.stderr
    assert f"taking over run directory {run_dir}" in resumed.stderr and f"pid {holder.pid}" in resumed.stderr
    assert (run_dir / "stage-0016" / "final.pt").is_file()
    assert not (run_dir / LOCK_NAME).exists(), "the lock outlived the trainer that held it"


@pytest.mark.subprocess
def test_a_live_holder_blocks_train_and_a_dead_or_reused_pid_does_not(tmp_path: Path) -> None:
    """In-process: a lock naming a live process (here: a sleeping child) refuses train(); one whose pid has
    gone, or whose pid now belongs to a process started at another time, is taken over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = {"host": socket.gethostname(), "pid": sleeper.pid, "since": "2026-01-01 00:00:00 UTC"}
        (run_dir / LOCK_NAME).write_text(json.dumps(live))
        with pytest.raises(UserError, match=f"in use by pgan-train pid {sleeper.pid} on host .* since 2026-01-01"):
            train(compose_config(*TINY), run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
        (run_dir / LOCK_NAME).write_text(json.dumps(live | {"start_time": "1"}))  # the pid, reused since
        check_free(run_dir)
    finally:
        sleeper.kill()
        sleeper.wait()
    (run_dir / LOCK_NAME).write_text(json.dumps(live))  # the sleeper is gone now
    check_free(run_dir)
    with RunDirLock(run_dir):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_holder_on_another_host_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A lock written on another host (a shared file system) cannot be checked: refused, saying so."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere-42", "pid": 1, "since": "then"}))
    with pytest.raises(UserError, match="host elsewhere-42.*delete the lock file once that job has ended"):
        with RunDirLock(tmp_path):
            pass
    assert (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("with_run_dir", [True, False])
@pytest.mark.subprocess
def test_a_bad_setting_leaves_no_run_directory(tmp_path: Path, with_run_dir: bool) -> None:
    """`pgan-train 'schedule.resolutions=[16,48]'` exits 2 with one line and leaves nothing: neither the named
    run directory nor a runs/<time>/ with Hydra's .hydra/ and train.log."""
    args = [PGAN_TRAIN, *TINY, "schedule.resolutions=[16,48]"]
    if with_run_dir:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    result = subprocess.run(args, capture_output=True, text=True, timeout=BOUND_S, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: schedule.resolutions: resolution must be a power of two in [4, 1024], got 48"
    ]
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_per_resolution_maps_fill_their_gaps_and_the_stage_line_says_how(tmp_path: Path, capsys) -> None:
    """Maps that name only 32 px and up: at 8 and 16 px each falls back to its smallest entry, or to its default,
    printed in the stage line; a grown stage names the checkpoint it grew from."""
    small = [o for o in TINY if not o.startswith(("schedule.fade_kimg", "schedule.stable_kimg", "schedule.lr"))]
    maps = [
        "schedule.stable_kimg={32: 0.016}",
        "schedule.fade_kimg={64: 0.064, default: 0.032}",
        "schedule.lr={32: 0.001}",
    ]
    cfg = compose_config(*small, *replace_resolution_maps(maps))  # as pgan-train composes them
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert (
        "stage 0: 8 px, fade 0.0 + stable 0.016 kimg, batch 8, lr 0.001 (stable_kimg from 32 px, lr from 32 px)" in out
    )
    assert (
        "stage 1: 16 px, fade 0.032 + stable 0.016 kimg, batch 8, lr 0.001 "
        "(fade_kimg default, stable_kimg from 32 px, lr from 32 px)" in out
    )
    assert f"stage 1: growing 16 px from {tmp_path / 'run' / 'stage-0008' / 'final.pt'}" in out
    cfg = compose_config(*TINY, "stage=16", f"init_from={tmp_path / 'run' / 'stage-0008' / 'final.pt'}")
    train(cfg, tmp_path / "grown")
    assert f"growing 16 px from {tmp_path / 'run' / 'stage-0008' / 'final.pt'}" in capsys.readouterr().out


@pytest.mark.subprocess
def test_a_refused_resume_leaves_the_runs_saved_overrides_as_they_were(
    tmp_path: Path, monkeypatch, capsys, hydra_job_logging
) -> None:
    """Hydra rewrites DIR/.hydra/ before the trainer checks the overrides; a resume refused for a bad value
    puts it back, so the next plain resume runs with the run's own overrides (it used to reapply the bad one).
    With hydra.run.dir given twice, the lock and the saved overrides are the last one's, as Hydra's run dir.
    The refused resumes run pgan-train's entry point in this process; the last resume, a console script, also
    finds the run directory's lock released."""
    import pgan.cli.train as cli

    run_dir = tmp_path / "run"
    first = subprocess.run([PGAN_TRAIN, *TINY_8PX, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    decoy = tmp_path / "decoy"
    for args in (["loss.r1_gamma=-1"], [f"hydra.run.dir={decoy}", "loss.r1_gamma=-1"]):
        monkeypatch.setattr(sys, "argv", ["pgan-train", *args, f"hydra.run.dir={run_dir}"])
        with pytest.raises(SystemExit) as refused:
            cli.main()
        stderr = capsys.readouterr().err
        assert refused.value.code == 2 and "loss.r1_gamma" in stderr, stderr
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == before
        assert not decoy.exists()
    resumed = subprocess.run([PGAN_TRAIN, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=BOUND_S)
    assert resumed.returncode == 0, resumed.stderr
    assert "loss.r1_gamma" not in resumed.stdout


@pytest.mark.subprocess
def test_a_user_error_after_the_resume_trained_keeps_the_new_overrides(
    tmp_path: Path, monkeypatch, hydra_job_logging
) -> None:
    """A resume that trains (writes checkpoints) with new overrides and only then meets a user error: its .hydra/
    is not put back, since the run's checkpoints now come from the new overrides. The real Hydra entry point and
    trainer run in-process; only the late error is added after the trainer returns."""
    import pgan.cli.train as cli
    import pgan.train.loop as loop

    run_dir = tmp_path / "run"
    first = subprocess.run([PGAN_TRAIN, *TINY_8PX, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    real_train = loop.train

    def train_then_refuse(cfg, where):
        real_train(cfg, where)
        raise UserError("a late error")

    monkeypatch.setattr(loop, "train", train_then_refuse)
    resume = ["pgan-train", *TINY, f"hydra.run.dir={run_dir}", "log.progress_bar=false"]
    monkeypatch.setattr(sys, "argv", [resume[0], *cli.with_saved_overrides(resume[1:])])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_hydra_keeping_a_refused_runs_record(str(run_dir))
    assert exit_info.value.code == 2 and (run_dir / "stage-0016" / "final.pt").is_file()
    saved = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert [o for o in saved if o.startswith("schedule.resolutions=")][-1] == "schedule.resolutions=[8,16]"


def test_a_resume_through_other_resolutions_is_one_line_naming_the_schedule(tmp_path: Path) -> None:
    """A run grown 8 -> 16 px, resumed with schedule.resolutions=[16,32] (its first stage dropped): its layers
    would not load (a traceback before); now a UserError naming schedule.resolutions. Adding a stage after
    the last one still resumes."""
    run_dir = tmp_path / "run"
    train(compose_config(*TINY), run_dir)
    with pytest.raises(UserError, match=r"grew through \[8, 16\] px .* schedule.resolutions=\[16, 32\] does not"):
        train(compose_config(*TINY, "schedule.resolutions=[16,32]"), run_dir)
    train(compose_config(*TINY, "schedule.resolutions=[8,16,32]"), run_dir)
    assert (run_dir / "stage-0032" / "final.pt").is_file()


def test_a_resume_names_the_settings_changed_since_its_checkpoint(tmp_path: Path, capsys) -> None:
    """A resume with another seed and loss settings says so in one line (it used to take them silently);
    where and how it runs (threads) is not a change; a plain resume prints no such line."""
    run_dir = tmp_path / "run"
    train(compose_config(*TINY_8PX), run_dir)
    capsys.readouterr()
    train(compose_config(*TINY_8PX, "seed=3", "loss.r1_gamma=0.5", "threads=1"), run_dir)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("settings changed")]
    assert lines == ["settings changed since that checkpoint: loss.r1_gamma: 1.0 -> 0.5; seed: 0 -> 3"]
    train(compose_config(*TINY_8PX), run_dir)
    assert "settings changed" not in capsys.readouterr().out
