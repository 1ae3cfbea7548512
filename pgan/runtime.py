"""Where and in what precision the networks run: the device, bf16 autocast, the backends' switches and the CPU
thread budget.

The CLIs (pgan-train, pgan-sample, pgan-eval, pgan-demo, pgan-bench) import these; nothing here knows about
training.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pgan.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device this machine lacks is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available on this machine (use device=cpu or device=auto)")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    device = torch.device("cuda", device.index or 0)
    # Initialise CUDA now: torch.manual_seed before initialisation is queued and would run *after* a CUDA
    # RNG state restored later, silently replacing it. set_device keeps stray contexts off GPU 0.
    torch.cuda.init()
    torch.cuda.set_device(device)
    return device


def check_precision(name: str) -> str:
    """`name` if it is a precision setting, else a one-line user error."""
    if name not in PRECISIONS:
        raise UserError(f"precision must be auto, fp32 or bf16, got {name!r}")
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 tiles or AVX512-BF16), the kernels oneDNN uses for
    bf16 convolutions and matmuls. Without them bf16 is emulated and slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own CPUID checks
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def resolve_precision(name: str, device: torch.device) -> bool:
    """Whether to use bf16 autocast: `auto` on GPUs and CPUs with native bf16, `bf16` always, `fp32` never.

    On a CPU with AMX-BF16 (measured, experiments/quality) the default run's step is about 1.7x faster in
    bf16 than in fp32, with the same mode coverage; on CPUs without native bf16 `auto` stays fp32."""
    if check_precision(name) == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return device.type == "cpu" and cpu_has_native_bf16()
    return name == "bf16"


def precision_name(use_bf16: bool) -> str:
    """How the run's precision is shown: 'bf16 autocast' or 'fp32'."""
    return "bf16 autocast" if use_bf16 else "fp32"


def configure_backends(device: torch.device, precision: str) -> None:
    """On CUDA: cuDNN autotuning, and TF32 matmuls/convolutions unless the user asked for full fp32."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast_for(device: torch.device, use_bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, or a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def usable_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity mask (taskset, cgroups' cpusets, SLURM), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU, (idle, total) jiffies since boot from /proc/stat; empty where there is none (not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    return cpu_times_from(lines)


def cpu_times_from(lines: list[str]) -> dict[int, tuple[int, int]]:
    """/proc/stat's `cpuN user nice system idle iowait irq softirq steal ...` lines as {N: (idle + iowait, total)}."""
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def busy_cpus(cpus: list[int], window_s: float = 0.25, threshold: float = 0.5) -> list[int]:
    """Those of `cpus` that other work kept busy more than `threshold` of a `window_s` window (this process
    sleeps meanwhile); none where /proc/stat cannot be read."""
    before = _cpu_times()
    time.sleep(window_s)
    after = _cpu_times()
    busy = []
    for cpu in cpus:
        if cpu in before and cpu in after:
            idle = after[cpu][0] - before[cpu][0]
            total = after[cpu][1] - before[cpu][1]
            if total > 0 and 1 - idle / total > threshold:
                busy.append(cpu)
    return busy


# threads=N beyond this many a usable core is refused: 5000 threads on 2 cores made no progress in 5 minutes.
MAX_THREADS_PER_CORE = 4


def check_threads(setting: str | int) -> str | int:
    """`setting` if it is a thread setting (auto, or an integer >= 1), else a one-line user error."""
    if setting != "auto" and (isinstance(setting, bool) or not isinstance(setting, int) or setting < 1):
        raise UserError(f"threads must be auto or an integer >= 1, got {setting!r}")
    return setting


@dataclass(frozen=True)
class ThreadBudget:
    """The intra-op threads torch computes with, and why."""

    threads: int
    cpus: int  # usable by this process (its affinity)
    busy: int  # of those, busy with other work when measured (threads=auto)
    source: str  # "threads=N", "OMP_NUM_THREADS=N" or "auto"

    def describe(self) -> str:
        """One line for the console, e.g. 'threads 1 (auto: 2 usable cores, 1 busy with other work)'."""
        if self.source != "auto":
            return f"threads {self.threads} ({self.source})"
        busy = f", {self.busy} busy with other work" if self.busy else ""
        return f"threads {self.threads} (auto: {self.cpus} usable cores{busy}; threads=N sets it)"


def thread_budget(setting: str | int, processes: int = 1) -> ThreadBudget:
    """How many intra-op threads to use: `threads=N` as given; else OMP_NUM_THREADS if set (torchrun sets it to
    1 per process); else (`auto`) the usable cores not busy with other work, shared by `processes` processes
    on this machine. OpenMP threads wait for each other at every operation: one that shares its core with
    another job slows them all (measured: 2.1x on a 2-core machine with one core taken, experiments/throughput)."""
    if check_threads(setting) != "auto":
        cpus = len(usable_cpus())
        if setting > MAX_THREADS_PER_CORE * cpus:
            raise UserError(
                f"threads={setting} is more than {MAX_THREADS_PER_CORE} a core this process may use ({cpus}): "
                f"OpenMP threads sharing a core wait for each other at every operation; use threads=auto or at "
                f"most {MAX_THREADS_PER_CORE * cpus}"
            )
        return ThreadBudget(setting, cpus, 0, f"threads={setting}")
    if os.environ.get("OMP_NUM_THREADS"):
        n = torch.get_num_threads()
        return ThreadBudget(n, len(usable_cpus()), 0, f"OMP_NUM_THREADS={n}")
    cpus = usable_cpus()
    busy = busy_cpus(cpus)
    return ThreadBudget(max(1, (len(cpus) - len(busy)) // max(1, processes)), len(cpus), len(busy), "auto")


def apply_thread_budget(setting: str | int, processes: int = 1) -> ThreadBudget:
    """`thread_budget`, applied: torch computes with that many intra-op threads from here on."""
    budget = thread_budget(setting, processes)
    torch.set_num_threads(budget.threads)
    return budget
