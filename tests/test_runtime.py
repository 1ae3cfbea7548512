"""pgan.runtime: the device and the precision a run uses (precision=auto picks bf16 where the hardware has it)."""

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
