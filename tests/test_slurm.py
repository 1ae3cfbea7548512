"""SLURM: the submitit launcher preset composes (no cluster needed); SIGUSR1, SLURM's warning before a time
limit, makes the trainer write a checkpoint, hand the signal on to the handler that was there before it
(submitit's requeue) and exit 138; under torchrun a signal that reached one rank stops all of them."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    CONF_DIR,
    LONG,
    STAGE,
    TINY,
    TORCHRUN,
    TRAIN_TIMEOUT_S,
    start_and_wait_for_stage_16,
    wait_for,
    wait_until_training_stage_16,
)
from hydra import compose, initialize_config_dir

from pgan.checkpoint import load_checkpoint, snapshots

# Runs pgan-train after installing a SIGUSR1 handler of its own, as submitit does before it calls the job:
# the handler records which checkpoints exist when it is called.
WITH_PREVIOUS_HANDLER = """
import os, signal, sys
from pathlib import Path
marker = Path(sys.argv[1])
stage = Path(sys.argv[2])
def previous(signum, frame):
    marker.write_text(" ".join(sorted(p.name for p in stage.glob("ckpt-*.pt"))))
signal.signal(signal.SIGUSR1, previous)
sys.argv = ["pgan-train", *sys.argv[3:]]
from pgan.cli.train import main
main()
"""


def test_the_slurm_launcher_preset_composes() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=paper256"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8  # one training process per GPU
    assert launcher.signal_delay_s >= 120 and launcher.max_num_timeout > 0  # checkpoint, then requeue


@pytest.mark.subprocess
def test_sigusr1_writes_a_checkpoint_hands_the_signal_on_and_exits_138(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    args = [sys.executable, "-c", WITH_PREVIOUS_HANDLER, str(marker), str(run_dir / STAGE), *LONG]
    proc = subprocess.Popen(
        [*args, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_until_training_stage_16(proc, run_dir)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 138, stderr
    assert "received SIGUSR1: finishing the current step" in stderr and "Traceback" not in stderr
    written = load_checkpoint(run_dir / STAGE / "latest.pt")
    assert written["nimg"] > 0 and not written["done"]
    # The previous handler ran after the stop snapshot was on disk (the one a requeued job resumes from).
    assert f"ckpt-{written['nimg']:010d}.pt" in marker.read_text().split()


@pytest.mark.subprocess
def test_plain_pgan_train_exits_138_on_sigusr1(tmp_path: Path) -> None:
    """Without a previous handler (SIGUSR1's default would kill the process) nothing is handed on."""
    proc = start_and_wait_for_stage_16(tmp_path / "run")
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 138, stderr
    assert f"resume with: pgan-train hydra.run.dir={tmp_path / 'run'}" in stderr


@pytest.mark.distributed
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_next_tick(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "pgan.train", *TINY]
    args += ["schedule.stable_kimg=1.0", "diversity.enabled=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for(lambda: (run_dir / "stage-0016" / "latest.pt").exists(), "stage-16 snapshot", proc)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    # The workers are started in rank order; signal the second one only.
    rank_1 = max(int(pid) for pid in workers)
    subprocess.run(["kill", "-USR1", str(rank_1)], check=True)
    _, stderr = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode != 0  # torchrun reports the workers' exit code 138 as a failure
    assert stderr.count("stopped by SIGUSR1 after the current step") == 2, stderr[-3000:]  # both ranks
    stopped = load_checkpoint(run_dir / "stage-0016" / "latest.pt")
    assert not stopped["done"] and stopped["nimg"] % 16 == 0  # at a tick (log.tick_kimg=0.016)
    assert [p.name for p in snapshots(run_dir / "stage-0016")][0] == f"ckpt-{stopped['nimg']:010d}.pt"
