"""Throughput of the training iteration, its FLOPs against the device's measured matmul ceiling, peak
memory, and the data loader's speed: what `pgan-bench` measures and prints.

The iteration timed is `pgan.train.step.train_step`, the one the training loop runs (reals faded by alpha,
the D step with its penalty, the G step, the EMA update), on a fixed batch of synthetic reals already on the
device: the compute alone. The loader is timed separately with the training loop's settings, so the two
can be compared (the loader must be much faster than the iteration, or it starves it).

FLOPs are counted, not estimated: one whole iteration runs under `IterationFlops`, which applies
torch.utils.flop_counter's per-op formulas (convolutions, matrix products) to every aten op executed -
the forward passes, their backward, and the gradient penalty's double backward alike. Element-wise ops
(activations, pixel norm, Adam) count zero, as in that module.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from pgan.cli import CONFIG_DIR, checked_resolutions
from pgan.data import InfiniteSampler, make_dataset, wants_prepared
from pgan.errors import UserError, check_int
from pgan.losses import Loss, make_loss
from pgan.networks import widths_up_to
from pgan.runtime import apply_thread_budget, autocast_for, configure_backends, resolve_device, resolve_precision
from pgan.schedule import ema_beta, stages_from_config
from pgan.train.feed import make_loader, to_device_images
from pgan.train.options import check_speed
from pgan.train.state import build_models, build_optimizers
from pgan.train.step import fast_networks, train_step


class IterationFlops(TorchDispatchMode):
    """FLOPs of every aten op run under it, by torch.utils.flop_counter's formulas.

    torch's own FlopCounterMode also tracks which module each op belongs to, with hooks that
    `torch.autograd.grad` refuses ("A leaf node was passed to _will_engine_execute_node") - and the
    gradient penalty is an autograd.grad. This counts the same ops without the module tracking.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.convolution = 0  # the part in convolutions (forward and backward), the rest is matrix products

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            flops = int(count(*args, **kwargs, out_val=out))
            self.total += flops
            if "convolution" in func._overloadpacket.__name__:
                self.convolution += flops
        return out


def convolution_seconds(step: Callable[[], None], device: torch.device, steps: int) -> tuple[float, float]:
    """(Seconds per call of `step` spent inside convolution ops (forward and backward), seconds per call of the
    whole profiled step), by torch.profiler.

    The self time of every op whose name contains "convolution" (on CUDA: the device time of the kernels
    those ops launch), so nested ops are never counted twice; it includes their dispatch overhead. The share
    of convolutions is taken against the profiled steps' own wall time, never against a separate unprofiled
    timing: the profiler's overhead and this machine's noise would let it exceed 1 (seen: 1.018).
    """
    # Kineto otherwise prints its start/stop markers (and, without a GPU, an ERROR line) on stderr: in the
    # middle of the table people read. Read when the profiler first starts; a user's own setting wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "9")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_s = time.perf_counter() - start
    total_us = 0.0
    for event in prof.key_averages():
        if "convolution" in event.key.lower():
            total_us += event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
    return total_us / 1e6 / steps, wall_s / steps


@dataclass
class BenchResult:
    """One JSON line of pgan-bench: one resolution at one alpha."""

    resolution: int
    alpha: float
    batch_size: int
    img_per_s: float  # full training iterations, median repeat
    gflop_per_img: float  # counted over one whole iteration (forward, backward, penalty), per image
    achieved_gflops: float  # gflop_per_img * img_per_s
    ceiling_gflops: float  # the best large-matmul throughput of this device in this run
    mfu: float  # achieved / ceiling
    conv_share: float  # the fraction of the iteration's time spent in convolutions (torch.profiler)
    conv_achieved_gflops: float  # convolution FLOPs / time in convolutions: how well the convolutions run
    conv_mfu: float  # conv_achieved_gflops / ceiling
    peak_mem_mb: float  # CUDA max allocated in this measurement; on CPU the process's peak RSS so far (cumulative)
    loader_img_per_s: float  # the training DataLoader at this resolution, to the device
    loader_over_train: float  # loader_img_per_s / img_per_s (>= 10 keeps the device fed)
    loader_prepared: bool  # the loader read a prepared uint8 store (data.prepare; made first when missing)
    step_ms: float  # median time of one iteration
    first_step_s: float  # the first iteration, before warm-up (with speed.compile: the compile time, roughly)
    compile: bool  # speed.compile: G and D torch.compile'd (an exact penalty's double backward stays eager)
    compile_mode: str  # speed.compile_mode: default | reduce-overhead (CUDA graphs) | max-autotune
    reuse_fakes: bool  # speed.reuse_fakes: the G step reuses the D step's G(z)
    latent_dim: int
    channels: dict[str, int]  # feature-map width at every resolution from 4 px up to this one
    params_g: int
    params_d: int
    model: str
    loss: str
    penalty_every: int  # lazy regularisation: a D update of the penalty alone every k-th iteration (1: none)
    penalty_mode: str  # exact (double backward) | approx (central finite differences)
    penalty_sigma: float  # approx's distance (what penalty_sigma=auto chose at this precision)
    threads: int  # torch's CPU threads (the thread budget)
    precision: str
    device: str
    repeats: int
    steps_per_repeat: int


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA work is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """The device's practical peak: GFLOP/s of a large square matrix product, the best of `repeats`.

    The best, not the median: a ceiling is what the hardware can reach, and on shared CPUs the median
    of a few products varied from 90 to 180 GFLOP/s between runs while the best of 10 stayed within 3 %.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, thread pool start)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def interleaved_step_seconds(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, rounds: int, calls: int
) -> dict[str, list[float]]:
    """Seconds per call of each of `steps`, timed in turns: `warmup` calls of each, then `rounds` rounds in which
    every step is timed over `calls` calls (a device sync at both ends), in the given order on even rounds and in
    reverse on odd ones. Returns each step's seconds per call, one value per round.

    In turns because a shared machine's speed drifts: on 2 EPYC cores the same step timed minutes apart read 23.9
    and 31.4 img/s, so two steps timed one after the other compare the machine's moments as much as the steps.
    Within a round they meet the same moment, and a median over rounds discounts the rounds the machine disturbed
    (the drift between whole runs it does not remove: experiments/throughput)."""
    if rounds < 1 or calls < 1:
        raise ValueError(f"rounds and calls must be >= 1, got {rounds} and {calls}")
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else reversed(list(steps)):
            t0 = time.perf_counter()
            for _ in range(calls):
                steps[name]()
            synchronize(device)
            seconds[name].append((time.perf_counter() - t0) / calls)
    return seconds


def ratio_per_round(slower: list[float], faster: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) over rounds of slower[r] / faster[r]: how many times faster the second step is,
    with the spread of the rounds (`interleaved_step_seconds`' timings of the two)."""
    if len(slower) != len(faster) or not slower:
        raise ValueError(f"need the same number of rounds for both, got {len(slower)} and {len(faster)}")
    ratios = [s / f for s, f in zip(slower, faster)]
    return statistics.median(ratios), min(ratios), max(ratios)


def median_step_seconds(step: Callable[[], None], device: torch.device, warmup: int, repeats: int, steps: int) -> float:
    """Seconds per call of `step`: `warmup` calls, then the median of `repeats` timings of `steps` calls each,
    with a device sync at both ends of every timing (`interleaved_step_seconds` with one step)."""
    return statistics.median(interleaved_step_seconds({"step": step}, device, warmup, repeats, steps)["step"])


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated since the last reset, or the process's peak RSS (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def loader_img_per_s(
    cfg: DictConfig, resolution: int, batch_size: int, device: torch.device, batches: int
) -> tuple[float, bool]:
    """Images/s of the training data pipeline (the data config's source, prepared store and workers) delivered
    to the device as training images, and whether it read a prepared store (made first if missing; `auto`
    decides as for a stage showing the timed batches' images)."""
    prepared = wants_prepared(cfg.data, device, batches * batch_size)
    dataset = make_dataset(cfg.data, resolution, prepared=prepared)
    workers = int(cfg.data.num_workers)
    loader = make_loader(dataset, InfiniteSampler(len(dataset), seed=0), batch_size, workers, device, worker_seed=0)
    # Start-up (worker processes, first batches) and the prefetched batches: timing starts with empty queues.
    for _ in range(2 + 4 * workers):
        to_device_images(next(loader), device)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        to_device_images(next(loader), device)
    synchronize(device)
    return batches * batch_size / (time.perf_counter() - t0), prepared


def check_bench_config(cfg: DictConfig) -> list[int]:
    """The resolutions to measure, with one-line errors for impossible settings."""
    resolutions = checked_resolutions(
        cfg.resolutions, "resolutions must list at least one resolution, e.g. resolutions=[32,64]"
    )
    batch, group = check_int("batch_size", cfg.batch_size, low=1), int(cfg.model.mbstd_group_size)
    if batch % min(group, batch):
        raise UserError(f"batch_size must be divisible by model.mbstd_group_size={group}, got {batch}")
    for key in ("warmup_steps", "steps", "repeats", "loader_batches"):
        check_int(key, cfg[key], low=0 if key == "warmup_steps" else 1)
    if cfg.matmul_size is not None:
        check_int("matmul_size", cfg.matmul_size, low=1)
    every = cfg.loss.get("penalty_every", 1)
    if not isinstance(every, int) or every < 1:
        raise UserError(f"loss.penalty_every must be an integer >= 1, got {every!r}")
    if int(cfg.steps) % every:
        raise UserError(f"steps ({cfg.steps}) must be a multiple of loss.penalty_every ({every}): whole lazy cycles")
    if any(not 0 <= float(a) <= 1 for a in cfg.alphas):
        raise UserError(f"alphas must be in [0, 1], got {list(cfg.alphas)}")
    return resolutions


@dataclass(frozen=True)
class _Setup:
    """What every measurement of one `pgan-bench` call shares."""

    device: torch.device
    loss: Loss  # for the precision in use
    autocast: contextlib.AbstractContextManager
    use_bf16: bool
    ceiling_gflops: float  # the measured matmul ceiling of that precision
    batch: int


def _setup(cfg: DictConfig) -> _Setup:
    """Device, threads, precision, the loss and the matmul ceiling, checked and resolved once."""
    check_speed(cfg.speed)
    device = resolve_device(cfg.device)
    apply_thread_budget(cfg.threads)
    use_bf16 = resolve_precision(cfg.precision, device)
    try:
        loss = make_loss(**OmegaConf.to_container(cfg.loss, resolve=True))
    except (TypeError, ValueError) as exc:
        raise UserError(f"loss: {exc}") from exc
    configure_backends(device, cfg.precision)
    size = int(cfg.matmul_size or (8192 if device.type == "cuda" else 4096))
    return _Setup(
        device=device,
        loss=loss.for_precision(use_bf16),  # loss.penalty_sigma=auto
        autocast=autocast_for(device, use_bf16),
        use_bf16=use_bf16,
        ceiling_gflops=matmul_ceiling_gflops(device, torch.bfloat16 if use_bf16 else torch.float32, size),
        batch=int(cfg.batch_size),
    )


def run_bench(cfg: DictConfig) -> list[BenchResult]:
    """Measure every resolution x alpha of the bench config (see conf/bench.yaml)."""
    resolutions = check_bench_config(cfg)
    setup = _setup(cfg)
    results = []
    for res in resolutions:
        loader = loader_img_per_s(cfg, res, setup.batch, setup.device, int(cfg.loader_batches))
        for alpha in cfg.alphas:
            results.append(_measure(cfg, setup, res, float(alpha), loader))
    return results


def _measure(cfg: DictConfig, setup: _Setup, res: int, alpha: float, loader: tuple[float, bool]) -> BenchResult:
    """Time the training iteration at `res` px and `alpha` on fresh networks, count its FLOPs, profile it."""
    device, loss, batch = setup.device, setup.loss, setup.batch
    torch.manual_seed(int(cfg.seed))
    G, D = build_models(cfg.model, res, device)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_G, opt_D = build_optimizers(G, D, float(cfg.lr), loss.lazy_ratio)
    reals = (torch.rand(batch, int(cfg.model.image_channels), res, res, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    G_fast, D_fast = fast_networks(G, D, bool(cfg.speed.compile), str(cfg.speed.compile_mode))
    options = {"eager_D": D, "reuse_fakes": bool(cfg.speed.reuse_fakes)}
    fixed = (G_ema, opt_G, opt_D, loss, reals, alpha, ema_beta(batch, 10.0), setup.autocast)
    step = _counting(partial(train_step, G_fast, D_fast, *fixed, **options))  # step_index 0, 1, 2, ...

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    step()  # with speed.compile, this one compiles
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    step_s = median_step_seconds(step, device, int(cfg.warmup_steps), int(cfg.repeats), int(cfg.steps))
    # FLOPs over one full lazy-regularisation cycle (one iteration without it), per iteration; counted on the
    # eager networks (the same operations: compiling fuses element-wise work, which counts zero).
    with IterationFlops() as flops:
        eager_step = _counting(partial(train_step, G, D, *fixed, **options))
        for _ in range(loss.penalty_every):
            eager_step()
    conv_s, profiled_step_s = convolution_seconds(step, device, int(cfg.steps))
    img_per_s = batch / step_s
    gflop_per_img = flops.total / loss.penalty_every / batch / 1e9
    conv_gflops = flops.convolution / loss.penalty_every / 1e9 / conv_s
    return BenchResult(
        resolution=res,
        alpha=alpha,
        batch_size=batch,
        img_per_s=round(img_per_s, 3),
        gflop_per_img=round(gflop_per_img, 4),
        achieved_gflops=round(gflop_per_img * img_per_s, 2),
        ceiling_gflops=round(setup.ceiling_gflops, 1),
        mfu=round(gflop_per_img * img_per_s / setup.ceiling_gflops, 4),
        conv_share=round(min(conv_s / profiled_step_s, 1.0), 4),
        conv_achieved_gflops=round(conv_gflops, 2),
        conv_mfu=round(conv_gflops / setup.ceiling_gflops, 4),
        peak_mem_mb=round(peak_memory_mb(device), 1),
        loader_img_per_s=round(loader[0], 1),
        loader_over_train=round(loader[0] / img_per_s, 2),
        loader_prepared=loader[1],
        step_ms=round(step_s * 1000, 2),
        first_step_s=round(first_step_s, 2),
        compile=bool(cfg.speed.compile),
        compile_mode=str(cfg.speed.compile_mode),
        reuse_fakes=bool(cfg.speed.reuse_fakes),
        latent_dim=int(cfg.model.latent_dim),
        channels=_channels(cfg.model, res),
        params_g=sum(p.numel() for p in G.parameters()),
        params_d=sum(p.numel() for p in D.parameters()),
        model=str(cfg.model.name),
        loss=loss.name,
        penalty_every=loss.penalty_every,
        penalty_mode=loss.penalty_mode,
        penalty_sigma=loss.penalty_sigma,
        threads=torch.get_num_threads(),
        precision="bf16" if setup.use_bf16 else "fp32",
        device=_device_name(device),
        repeats=int(cfg.repeats),
        steps_per_repeat=int(cfg.steps),
    )


def _channels(model: DictConfig, res: int) -> dict[str, int]:
    """The model's feature maps per resolution up to `res` ({"4": 64, ...})."""
    return {str(r): width for r, width in widths_up_to(model, res).items()}


def _counting(iteration: Callable[..., Any]) -> Callable[[], None]:
    """`iteration(step_index=k)` for k = 0, 1, 2, ... on successive calls."""
    count = itertools.count()

    def step() -> None:
        iteration(step_index=next(count))

    return step


def _device_name(device: torch.device) -> str:
    """`cpu (N threads)` or `cuda:K (<GPU name>)`: what the numbers were measured on."""
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def to_json_lines(results: list[BenchResult]) -> list[str]:
    """One JSON object per result."""
    return [json.dumps(asdict(r)) for r in results]


def to_table(results: list[BenchResult]) -> str:
    """The results as a fixed-width table for people."""
    header = ("res", "alpha", "batch", "img/s", "ms/step", "GFLOP/img", "GFLOP/s", "ceiling", "MFU", "conv MFU")
    header += ("conv time", "mem MB", "loader img/s")
    rows = [
        (
            r.resolution,
            f"{r.alpha:g}",
            r.batch_size,
            f"{r.img_per_s:.1f}",
            f"{r.step_ms:.1f}",
            f"{r.gflop_per_img:.3f}",
            f"{r.achieved_gflops:.1f}",
            f"{r.ceiling_gflops:.0f}",
            f"{100 * r.mfu:.1f}%",
            f"{100 * r.conv_mfu:.1f}%",
            f"{100 * r.conv_share:.0f}%",
            f"{r.peak_mem_mb:.0f}",
            f"{r.loader_img_per_s:.0f}",
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in (header, *rows)]
    return "\n".join([switches(results[0]) if results else "", *lines])


def switches(r: BenchResult) -> str:
    """The table's title: what was measured, with every switch that changes the speed."""
    penalty = f"{r.penalty_mode} penalties" + (f" (sigma {r.penalty_sigma:g})" if r.penalty_mode == "approx" else "")
    if r.penalty_every > 1:
        penalty += f", lazy every {r.penalty_every}"
    compiled = f"compile={r.compile}" + (f" ({r.compile_mode})" if r.compile else "")
    return (
        f"pgan-bench: model={r.model} loss={r.loss}, {penalty}, {r.precision} on {r.device}; "
        f"{compiled} reuse_fakes={r.reuse_fakes}"
    )


def _preset_stages(name: str) -> list:
    """The stages of the schedule preset `name` (conf/schedule/<name>.yaml), or a UserError naming it."""
    path = Path(CONFIG_DIR) / "schedule" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"project={name}: no schedule preset {path}")
    return stages_from_config({"schedule": OmegaConf.load(path)})


def check_project(name: str, resolutions: list[int]) -> None:
    """Before any measurement: `name` is a schedule preset and `resolutions` measures at least one of its stages
    (with none, the projection was "0 h")."""
    wanted = [st.resolution for st in _preset_stages(name)]
    if not set(wanted) & set(resolutions):
        raise UserError(
            f"project={name}: its stages are {wanted} px and resolutions={resolutions} measures none of them, "
            f"e.g. resolutions=[{','.join(map(str, wanted))}]"
        )


def project_schedule(results: list[BenchResult], name: str) -> dict[str, Any]:
    """The wall-clock of the schedule preset `name` (conf/schedule/<name>.yaml) at the measured rates: each
    stage's fade-in at the rate measured fading in (alpha < 1) and its stable phase at alpha = 1. Stages whose
    rates were not measured are listed under `missing` and left out of `total_h`; those of them measured at alpha = 1
    only (so their fade-in's rate is what is missing) also under `missing_fade`. The rates are those of this run's
    batch size; the schedule's own batch sizes are listed beside them."""
    stages = _preset_stages(name)
    fading = {r.resolution: r.img_per_s for r in results if r.alpha < 1}
    stable = {r.resolution: r.img_per_s for r in results if r.alpha >= 1}
    rows, missing = [], []
    for st in stages:
        if st.resolution not in stable or (st.fade_kimg > 0 and st.resolution not in fading):
            missing.append(st.resolution)
            continue
        seconds = st.stable_kimg * 1000 / stable[st.resolution]
        if st.fade_kimg > 0:
            seconds += st.fade_kimg * 1000 / fading[st.resolution]
        rows.append({"resolution": st.resolution, "schedule_batch": st.batch_size, "hours": round(seconds / 3600, 3)})
    return {
        "schedule": name,
        "measured_batch": results[0].batch_size if results else None,
        "stages": rows,
        "total_h": round(sum(r["hours"] for r in rows), 2),
        "missing": missing,
        "missing_fade": [r for r in missing if r in stable],
    }
