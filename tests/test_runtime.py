"""pgan.runtime: the device, the precision (precision=auto picks bf16 where the hardware has it) and the CPU
threads a run uses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_8PX, compose_config

from pgan import runtime
from pgan.errors import UserError


def cpuinfo_flags() -> set[str] | None:
    """The CPU flags Linux reports (None elsewhere): an independent reading of what torch.cpu detects."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_native_bf16_detection_agrees_with_the_kernel():
    """cpu_has_native_bf16 is what /proc/cpuinfo says: AMX tiles or AVX512-BF16."""
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this platform")
    assert runtime.cpu_has_native_bf16() == bool({"amx_tile", "avx512_bf16"} & flags)


def test_auto_precision_on_cpu_follows_the_hardware(monkeypatch):
    """auto is bf16 exactly on CPUs with native bf16; fp32 and bf16 are what they say on any CPU."""
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == runtime.cpu_has_native_bf16()
    assert runtime.resolve_precision("fp32", cpu) is False
    assert runtime.resolve_precision("bf16", cpu) is True
    # A CPU without them (torch's own CPUID probes answering no): auto stays fp32.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert runtime.resolve_precision("auto", cpu) is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert runtime.resolve_precision("auto", cpu) is True


def test_a_bad_precision_is_one_user_error():
    with pytest.raises(UserError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        runtime.resolve_precision("fp16", torch.device("cpu"))


def test_the_trainer_says_which_precision_it_uses(tmp_path, capsys):
    """The run's output names the precision in use, so nobody has to guess what auto chose."""
    from pgan.train.loop import train

    train(compose_config(*TINY_8PX, "diversity.enabled=false"), tmp_path)
    expected = runtime.precision_name(runtime.resolve_precision("auto", torch.device("cpu")))
    assert f"device cpu, {expected} (precision=auto)" in capsys.readouterr().out


PENALTY_AT_2_POW_19 = """
import torch
from pgan.losses import zero_centred_penalty
from pgan.networks import Discriminator

torch.set_num_threads(1)
D = Discriminator(128, fmap_base=64, fmap_max=8, fmap_min=4).to(memory_format=torch.channels_last)
reals = torch.randn(32, 3, 128, 128).to(memory_format=torch.channels_last).requires_grad_()  # 32 * 128**2 = 2**19
with torch.autocast("cpu", dtype=torch.bfloat16):
    scores = D(reals, alpha=0.5)
    penalty = zero_centred_penalty(scores, reals, gamma=1.0)
(scores.float().mean() + penalty).backward()
print("finite", bool(torch.isfinite(penalty)), all(torch.isfinite(p.grad).all() for p in D.parameters()))
"""


def test_the_bf16_penalty_survives_the_shape_that_crashed_onednn():
    """D's R1 double backward under CPU bf16 autocast at N*H*W = 2**19 on one thread: oneDNN's bf16 kernel for the
    1x1 fromRGB conv died there with SIGFPE (batch 8 at 256 px, 32 at 128 px); fromRGB now runs in fp32.
    In a subprocess, so that a crash fails this test instead of killing the test run."""
    done = subprocess.run(
        [sys.executable, "-c", PENALTY_AT_2_POW_19],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["finite", "True", "True"]


# ---------------------------------------------------------------- the thread budget

PROC_STAT = """cpu  300 0 100 900 100 0 0 0 0 0
cpu0 100 0 50 400 50 0 0 0 0 0
cpu1 200 0 50 500 50 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_proc_stat_lines_give_idle_and_total_per_cpu():
    """idle + iowait, and the sum of the first eight fields, for each cpuN line (not the aggregate `cpu`)."""
    assert runtime.cpu_times_from(PROC_STAT.splitlines()) == {0: (450, 600), 1: (550, 800)}


@pytest.mark.parametrize("setting", [0, -2, "two", True, 1.5])
def test_a_bad_thread_setting_is_one_user_error(setting):
    with pytest.raises(UserError, match="threads must be auto or an integer >= 1"):
        runtime.thread_budget(setting)


def test_more_threads_than_four_a_usable_core_is_one_user_error():
    cores = len(runtime.usable_cpus())
    assert runtime.thread_budget(4 * cores).threads == 4 * cores
    with pytest.raises(UserError, match=f"threads={4 * cores + 1} is more than 4 a core .* at most {4 * cores}"):
        runtime.thread_budget(4 * cores + 1)


def test_threads_n_and_omp_num_threads_are_taken_as_given(monkeypatch):
    budget = runtime.thread_budget(3)
    assert (budget.threads, budget.source) == (3, "threads=3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # conftest's; torch read it at import
    budget = runtime.thread_budget("auto")
    assert (budget.threads, budget.source) == (torch.get_num_threads(), f"OMP_NUM_THREADS={torch.get_num_threads()}")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/stat").exists(), reason="Linux only")
def test_auto_leaves_out_a_core_that_another_job_keeps_busy(monkeypatch):
    """A busy loop pinned to one of this process's CPUs: `auto` counts that CPU busy and uses fewer threads
    than the usable cores (at least one)."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = runtime.usable_cpus()
    hog = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, {cpus[-1]})
    )
    try:
        budget = runtime.thread_budget("auto")
        assert cpus[-1] in runtime.busy_cpus(cpus)
    finally:
        hog.kill()
        hog.wait()
    assert budget.source == "auto" and budget.cpus == len(cpus) and budget.busy >= 1
    assert budget.threads == max(1, len(cpus) - budget.busy)
    assert "busy with other work" in budget.describe()


def test_the_trainer_applies_and_reports_its_threads(tmp_path, capsys):
    """threads=N: torch computes with N threads, and the run's output says so; a bad value is one line."""
    from pgan.train.loop import train

    before = torch.get_num_threads()
    try:
        train(compose_config(*TINY_8PX, "threads=2"), tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "threads 2 (threads=2)" in capsys.readouterr().out
    with pytest.raises(UserError, match="threads must be auto or an integer >= 1, got 0"):
        train(compose_config(*TINY_8PX, "threads=0"), tmp_path / "bad")
