"""The training loop: every stage of the schedule in order, on a kimg clock, resumable at any checkpoint.

Read top to bottom: `train` resolves the device and the stages, then for each stage `train_stage` builds G,
D and G_ema at the stage's resolution, initialises them (resume from this stage's checkpoint, or grow from
the previous stage's final.pt / `init_from`), and loops: real batch (faded by alpha) and latents -> D step
-> G step -> EMA -> at ticks: scalars, sample grids, checkpoints. A stage ends with `final.pt`.

Exact resume: alpha is a function of the image counter, the data order is a function of (seed, stage,
image counter), and the checkpoint carries the RNG state, so a resumed run continues bit for bit.

With `augment.policy` and `augment.p > 0` (or `augment.adaptive`), every image D sees goes through
`pgan.augment` in both steps; the adaptive p is state: in every checkpoint, and carried from stage to stage.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torchvision.utils import make_grid, save_image

from pgan import dist
from pgan.augment import AugmentPipe, check_augment_config
from pgan.checkpoint import (
    FINAL,
    LATEST,
    OK,
    checkpoint_classes,
    damaged_files,
    get_rng_state,
    link_checkpoint,
    load_checkpoint,
    load_newest_usable,
    prune_snapshots,
    resume_candidates,
    rewind_snapshots,
    save_checkpoint,
    set_rng_state,
    snapshot_name,
    snapshot_nimg,
    snapshots,
)
from pgan.data import InfiniteSampler, PreparedImages, make_dataset, wants_prepared
from pgan.data.labels import ClassLabels, LabelledDataset, class_labels, grid_classes
from pgan.data.prepared import PreparedBatches, uint8_to_signed
from pgan.errors import UserError, first_line
from pgan.losses import Loss, make_loss
from pgan.monitor import Monitor, NullMonitor, progress_bar, resource_stats, warn
from pgan.networks import Discriminator, Generator, check_resolution, grow_from, model_kwargs_from, networks_from
from pgan.schedule import Stage, alpha_at, build_stages, ema_beta
from pgan.train.guard import Guard, check_guard_config
from pgan.train.interrupt import Interrupted, StopFlag, ignore_stop_signals
from pgan.train.metrics_watch import MetricsWatch, check_metrics_config
from pgan.train.step import train_step
from pgan.train.watch import CollapseWatch, check_diversity_config

# Keys of the model that define the architecture: a checkpoint is only usable by a model with the same ones.
ARCHITECTURE_KEYS = (
    "latent_dim",
    "fmap_base",
    "fmap_max",
    "fmap_min",
    "channels",
    "mbstd_group_size",
    "image_channels",
    "conditional",
)
# What a key means in configs written before it existed.
ARCHITECTURE_DEFAULTS = {"conditional": False}


class CollapseStop(Exception):
    """The collapse detector fired with on_collapse=stop (or no rollback was left); latest.pt was written."""


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


def resolve_precision(name: str, device: torch.device) -> bool:
    """Whether to use bf16 autocast: `auto` on GPUs with native bf16, `bf16` always, `fp32` never."""
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision must be auto, fp32 or bf16, got {name!r}")
    if name == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return name == "bf16"


def configure_backends(device: torch.device, precision: str) -> None:
    """On CUDA: cuDNN autotuning, and TF32 matmuls/convolutions unless the user asked for full fp32."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"


def autocast_for(device: torch.device, use_bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, or a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def make_loader(
    dataset: Dataset,
    sampler: InfiniteSampler,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    worker_seed: int,
    timeout_s: float = 0.0,
    labels: ClassLabels | None = None,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The training DataLoader's iterator (also what pgan-bench times). A prepared store is read a whole batch
    at a time (one slice of the memory map, uint8); the other datasets item by item, stacked by the loader.
    With `labels` (a conditional run), each batch is (images, int64 class indices)."""
    batched = isinstance(dataset, PreparedImages)
    if batched:
        items = PreparedBatches(dataset, labels)
    else:
        items = dataset if labels is None else LabelledDataset(dataset, labels)
    return iter(
        DataLoader(
            items,
            batch_size=None if batched else batch_size,
            sampler=BatchSampler(sampler, batch_size, drop_last=True) if batched else sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            drop_last=not batched,
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
            generator=_private_generator(worker_seed),
            worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
            # A hung worker (a stuck network file system) becomes an error, and a restart, instead of a silent hang.
            timeout=timeout_s if num_workers > 0 else 0,
        )
    )


def to_device_images(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loader batch on `device` as float32 NCHW (channels_last) in [-1, 1]. A prepared store's uint8 NHWC batch
    is converted on the device (a quarter of the bytes to move; NHWC permuted is channels_last already)."""
    if batch.dtype == torch.uint8:
        return uint8_to_signed(batch.to(device, non_blocking=True).permute(0, 3, 1, 2))
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def stages_from_config(cfg: DictConfig) -> list[Stage]:
    """The run's stages from `cfg.schedule`, with a user-facing error for a bad schedule.

    The first stage fades in too when the run grows it from `init_from` (a smaller checkpoint).
    """
    s = cfg.schedule
    resolutions = list(s.resolutions)
    if not resolutions or any(b <= a for a, b in zip(resolutions, resolutions[1:])):
        raise UserError(f"schedule.resolutions must be a non-empty increasing list, got {resolutions}")
    for res in resolutions:
        try:
            check_resolution(res)
        except ValueError as exc:
            raise UserError(f"schedule.resolutions: {exc}") from exc
    for a, b in zip(resolutions, resolutions[1:]):
        if b != 2 * a:
            raise UserError(f"schedule.resolutions must double from stage to stage, got {a} -> {b}")
    grows_first = cfg.init_from is not None and cfg.stage in (None, resolutions[0])
    try:
        stages = build_stages(resolutions, s.fade_kimg, s.stable_kimg, s.batch_size, s.lr, fade_first=grows_first)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    group = cfg.model.mbstd_group_size
    if group < 1:
        raise UserError(f"model.mbstd_group_size must be >= 1, got {group}")
    for st in stages:
        if st.batch_size <= 0 or st.batch_size % min(group, st.batch_size):
            raise UserError(
                f"schedule.batch_size at {st.resolution} px is {st.batch_size}: it must be > 0 and divisible "
                f"by model.mbstd_group_size={group}"
            )
    return stages


def check_rank_batches(cfg: DictConfig, stages: list[Stage], ranks: dist.Ranks) -> None:
    """Under torchrun: every stage's global batch splits evenly into per-rank batches that minibatch-stddev
    can group (one line naming the stage otherwise)."""
    group = int(cfg.model.mbstd_group_size)
    for st in stages:
        per_rank, rest = divmod(st.batch_size, ranks.world_size)
        if rest or per_rank == 0 or per_rank % min(group, per_rank):
            raise UserError(
                f"schedule.batch_size={st.batch_size} at {st.resolution} px does not split into {ranks.world_size} "
                f"per-rank batches divisible by model.mbstd_group_size={group} (batch_size is the global batch)"
            )


def check_model_config(cfg: DictConfig, stages: list[Stage]) -> None:
    """Build G and D for the largest stage on the meta device (shapes only): a model preset that cannot make
    the schedule's resolutions (an explicit channel table without one, a width below 1) is a user error."""
    m = cfg.model
    for key in ("latent_dim", "image_channels"):
        if not isinstance(m[key], int) or m[key] < 1:
            raise UserError(f"model.{key} must be a positive integer, got {m[key]!r}")
    if not isinstance(m.get("conditional", False), bool):
        raise UserError(f"model.conditional must be true or false, got {m.conditional!r}")
    try:
        with torch.device("meta"):
            build_models(cfg, stages[-1].resolution, torch.device("meta"))
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise UserError(f"model={m.get('name')} cannot build the {stages[-1].resolution} px networks: {exc}") from exc


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Constructor arguments shared by G and D, from the model config."""
    return model_kwargs_from(cfg.model)


def build_models(
    cfg: DictConfig, resolution: int, device: torch.device, classes: ClassLabels | None = None
) -> tuple[Generator, Discriminator]:
    """Fresh G and D for one resolution (weights drawn from the global torch RNG), channels-last on `device`;
    class-conditional on `classes` when given."""
    G, D = networks_from(cfg.model, resolution, classes.num_classes if classes is not None else 0)
    if classes is not None:
        G.class_names = classes.names
    # channels_last is faster for these convolutions on CUDA and, measured, 2x at 256 px on CPU (oneDNN).
    return G.to(device, memory_format=torch.channels_last), D.to(device, memory_format=torch.channels_last)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_speed_config(cfg: DictConfig) -> None:
    """One-line errors for speed.* settings that are not what they should be."""
    for key in ("compile", "reuse_fakes"):
        if not isinstance(cfg.speed[key], bool):
            raise UserError(f"speed.{key} must be true or false, got {cfg.speed[key]!r}")
    if cfg.speed.compile_mode not in COMPILE_MODES:
        raise UserError(f"speed.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.speed.compile_mode!r}")


def fast_networks(cfg: DictConfig, G: Generator, D: Discriminator) -> tuple[nn.Module, nn.Module]:
    """G and D as the training step calls them: torch.compile'd with speed.compile (same parameters), else as is."""
    if not cfg.speed.compile:
        return G, D
    # alpha changes every step of a fade: a symbolic float, not one compilation per value.
    torch._dynamo.config.specialize_float = False
    # Compiled graphs are cached per code object (Generator.forward), across instances: the previous stage's
    # graphs would count towards the recompile limit (8), after which dynamo silently runs eager.
    torch._dynamo.reset()
    mode = str(cfg.speed.compile_mode)
    return torch.compile(G, mode=mode), torch.compile(D, mode=mode)


def build_optimizers(G: Generator, D: Discriminator, lr: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The paper's Adam (beta1 0, beta2 0.99, eps 1e-8) for G and D, fresh for every stage. Fused: one kernel
    per step, and it can skip a step on a device-side flag (the non-finite guard) without a host sync."""
    kwargs = dict(lr=lr, betas=(0.0, 0.99), eps=1e-8, fused=True)
    return torch.optim.Adam(G.parameters(), **kwargs), torch.optim.Adam(D.parameters(), **kwargs)


def check_same_architecture(cfg: DictConfig, saved_config: dict, what: str) -> None:
    """Refuse a checkpoint whose model settings differ from this run's, naming the keys that differ."""
    ours = OmegaConf.to_container(cfg.model, resolve=True)
    theirs = saved_config.get("model", {})
    differing = [
        k
        for k in ARCHITECTURE_KEYS
        if ours.get(k, ARCHITECTURE_DEFAULTS.get(k)) != theirs.get(k, ARCHITECTURE_DEFAULTS.get(k))
    ]
    if differing:
        pairs = ", ".join(f"model.{k}: {theirs.get(k)!r} there vs {ours.get(k)!r} here" for k in differing)
        raise UserError(f"{what} has a different architecture ({pairs})")


def check_same_classes(state: dict, classes: ClassLabels | None, what: str) -> None:
    """Refuse a conditional checkpoint whose classes are not the data's (a class folder added or renamed)."""
    theirs = checkpoint_classes(state)
    ours = classes.names if classes is not None else ()
    if theirs != ours:
        added, gone = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        changes = [f"{label}: {', '.join(names[:3])}" for label, names in (("new", added), ("gone", gone)) if names]
        raise UserError(
            f"{what} was trained on {len(theirs)} classes, the data has {len(ours)} "
            f"({' '.join(changes) or 'in another order'})"
        )


def stage_classes(cfg: DictConfig, dataset: Dataset) -> ClassLabels | None:
    """The dataset's classes when the model is class-conditional (a UserError when it has none), else None."""
    if not cfg.model.get("conditional", False):
        return None
    return class_labels(dataset)


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Run (or resume) every selected stage of `cfg` in `run_dir`; returns the last stage's final.pt."""
    run_dir = Path(run_dir)
    ranks = dist.current()
    device = resolve_device(cfg.device)
    if ranks.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # torchrun: one GPU per process
    use_bf16 = resolve_precision(cfg.precision, device)
    stages = stages_from_config(cfg)
    check_model_config(cfg, stages)
    check_rank_batches(cfg, stages, ranks)
    try:
        loss = make_loss(**OmegaConf.to_container(cfg.loss, resolve=True))
    except (TypeError, ValueError) as exc:
        raise UserError(f"loss: {exc}") from exc
    if cfg.diversity.enabled:
        check_diversity_config(cfg)
    check_guard_config(cfg)
    check_speed_config(cfg)
    check_metrics_config(cfg)
    check_augment_config(cfg)
    if int(cfg.checkpoint.keep) < 1:
        raise UserError(f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    if cfg.stage is not None:
        selected = [st for st in stages if st.resolution == cfg.stage]
        if not selected:
            raise UserError(f"stage={cfg.stage} is not one of schedule.resolutions {list(cfg.schedule.resolutions)}")
    else:
        selected = stages
    configure_backends(device, cfg.precision)

    # The same random stream on every rank: each draws the global batch's latents (and penalty mixes) and
    # keeps its own chunk (pgan.dist.draw_for_rank), so N ranks compute what one process with the same
    # global batch computes.
    torch.manual_seed(cfg.seed)

    # Where does this run stand? The newest usable checkpoint of the newest stage is the resume point.
    # (Rank 0 first: it sets damaged checkpoints aside, the other ranks then find the same one.)
    resume_state = dist.main_first(lambda: find_resume_point(cfg, run_dir, selected))
    plan = selected
    if resume_state is not None:
        done = resume_state["done"]
        plan = [
            st
            for st in selected
            if st.index > resume_state["stage"] or (st.index == resume_state["stage"] and not done)
        ]
    if not plan:
        print(f"nothing to do: every stage in {run_dir} is finished", flush=True)
        return run_dir / selected[-1].name / FINAL
    # Everything the first stage needs is checked before anything is written.
    resuming_first = resume_state is not None and resume_state["stage"] == plan[0].index
    init = (
        None if resuming_first else initial_state(cfg, run_dir, stages, plan[0], use_init_from=plan[0] is selected[0])
    )
    dataset = stage_dataset(cfg, plan[0], run_dir, device)
    classes = stage_classes(cfg, dataset)
    empty = [name for name, count in zip(classes.names, classes.counts()) if count == 0] if classes else []
    if empty:  # G still learns an embedding for it, from nothing: its samples show what the other classes share
        warn(
            f"model.conditional=true: {len(empty)} of {classes.num_classes} classes have no images (e.g. {empty[0]!r})"
        )
    for state, what in ((resume_state, f"the run in {run_dir}"), (init, "the checkpoint this stage grows from")):
        if state is not None:
            check_same_classes(state, classes, what)
    if cfg.data.source == "folder":  # a later stage may skip more images (too small for it): check it now
        for st in plan[1:]:
            later = stage_dataset(cfg, st, run_dir, device)
            if classes is not None and (gone := set(classes.names) - set(stage_classes(cfg, later).names)):
                raise UserError(
                    f"model.conditional=true: every image of class {sorted(gone)[0]!r} is too small for "
                    f"{st.resolution} px ({len(gone)} such classes); data.small_images=upscale keeps them"
                )

    run_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # TensorBoard and stats.jsonl drop what an interrupted attempt logged after the point this run
    # continues from (the checkpoint, or the start of the first stage to run), so curves never double.
    continue_from = resume_state["total_nimg"] if resuming_first else plan[0].start_nimg
    # One writer for the run: rank 0's; the other ranks log nothing.
    monitor = Monitor(run_dir, purge_step=continue_from + 1) if ranks.is_main else NullMonitor()
    if resume_state is None:
        monitor.text("Config", "```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "\n```")
    print(f"run directory: {run_dir}\nwatch it with: tensorboard --logdir {run_dir}", flush=True)
    autocast = autocast_for(device, use_bf16)
    watch = CollapseWatch(cfg, device, autocast, monitor) if cfg.diversity.enabled else None
    # Quality metrics are logged, never acted on: rank 0 alone computes them.
    metrics = MetricsWatch(cfg, device, autocast, monitor) if cfg.metrics.every_kimg and ranks.is_main else None
    guard = Guard(cfg.guard, device)
    try:
        with StopFlag() as stop:
            for st in plan:
                if st is not plan[0]:
                    init = initial_state(cfg, run_dir, stages, st, use_init_from=False)
                    dataset = stage_dataset(cfg, st, run_dir, device)
                if ranks.is_main:
                    write_data_report(run_dir, st, dataset)
                resume = resume_state if resuming_first and st is plan[0] else None
                # Everything but where it resumes from, for surviving_loader_failures to call.
                args = (cfg, st, run_dir, dataset, device, autocast, loss, monitor, watch, guard, stop)
                run_stage = partial(train_stage, *args, init=init, metrics=metrics)
                if ranks.distributed:  # a loader failure on one rank ends the job (torchrun stops the others)
                    final = run_stage(resume)
                else:
                    final = surviving_loader_failures(run_stage, resume, cfg, run_dir / st.name, monitor)
                signum = dist.max_across_ranks(stop.signum or 0, device)
                if signum and st is not plan[-1]:
                    raise Interrupted(signum, final)
    finally:
        monitor.close()
    print(f"done. watch it with: tensorboard --logdir {run_dir}", flush=True)
    return final


def surviving_loader_failures(
    run_stage: Callable[[dict | None], Path], resume: dict | None, cfg: DictConfig, stage_dir: Path, monitor: Monitor
) -> Path:
    """`run_stage(resume)`, and after a DataLoader worker crashed or hung, `run_stage(newest snapshot)` again,
    at most `loader.max_restarts` times, so the stage continues like a resume: the same result as if nothing
    had happened.

    A worker's death reaches the main process in more than one way and at any moment: as the RuntimeError
    torch's SIGCHLD handler raises wherever the main process is (mid-step included, or a little later, even
    during the recovery below), or as a ConnectionResetError/EOFError when the worker dies while handing over
    a batch. So the recovery itself runs inside the `try`: a late signal for the same death counts as one
    more failure instead of escaping.
    """
    max_restarts = int(cfg.loader.max_restarts)
    failures: list[str] = []
    while True:
        try:
            if failures:
                found = load_newest_usable(resume_candidates(stage_dir))
                if found is None:
                    # (worded so that _loader_failure does not take it for another worker failure)
                    raise RuntimeError(f"no usable checkpoint in {stage_dir} to continue the stage from")
                resume, path = found
                warn(
                    f"{failures[-1]}; resuming from {path} ({len(failures)} of at most "
                    f"loader.max_restarts={max_restarts} in this stage)"
                )
                monitor.restart(purge_step=resume["total_nimg"] + 1)
            return run_stage(resume)
        except (RuntimeError, ConnectionError, EOFError) as exc:
            if not _loader_failure(exc) or len(failures) == max_restarts:
                raise
            first = first_line(exc) or type(exc).__name__
            lost = f"DataLoader worker lost ({type(exc).__name__}: {first})"
            failures.append(first if "DataLoader" in first else lost)


def find_resume_point(cfg: DictConfig, run_dir: Path, selected: list[Stage]) -> dict | None:
    """The newest usable checkpoint among the selected stages' directories (final.pt, then the snapshots
    newest first, stage by stage from the last); damaged ones are reported and set aside. None for a new
    run; an error, never a silent fresh start, when checkpoints exist but none is usable."""
    tried = []
    for st in reversed(selected):
        candidates = resume_candidates(run_dir / st.name)
        tried += candidates
        found = load_newest_usable(candidates)
        if found is not None:
            state, path = found
            check_same_architecture(cfg, state["config"], f"the run in {run_dir}")
            print(f"resuming from {path} ({state['total_nimg'] / 1000:.3f} kimg)", flush=True)
            return state
    # Checkpoints set aside by an earlier attempt count too: repeating the command must not start afresh.
    tried += [path for st in selected for path in damaged_files(run_dir / st.name)]
    if tried:
        raise UserError(
            f"no usable checkpoint in {run_dir}: all {len(tried)} are damaged (set aside as *.damaged); "
            "start a new run in another directory"
        )
    return None


def stage_dataset(cfg: DictConfig, stage: Stage, run_dir: Path, device: torch.device) -> Dataset:
    """The dataset at the stage's resolution (its prepared store when data.prepare asks for one), with at least
    one batch of images."""
    # A folder's scan (which files decode, their sizes) is cached in the run directory: a resumed run over
    # many files does not decode them all again.
    # Rank 0 first: it writes the scan cache and the prepared store, which the other ranks then only read.
    dataset = dist.main_first(
        lambda: make_dataset(
            cfg.data,
            stage.resolution,
            scan_cache=run_dir / "data-scan.json",
            min_images=stage.batch_size,
            prepared=wants_prepared(cfg.data, device, stage.num_images),
        )
    )
    if isinstance(dataset, PreparedImages):
        info = dataset.info
        done = f"prepared in {info['seconds']:.1f} s" if info["built"] else "already prepared"
        print(f"data at {stage.resolution} px: {info['path']} ({info['count']} images, {info['mib']} MiB, {done})")
    if len(dataset) < stage.batch_size:
        raise UserError(
            f"the dataset has {len(dataset)} images at {stage.resolution} px, fewer than one batch "
            f"({stage.batch_size})" + (f": {cfg.data.path}" if cfg.data.get("path") else "")
        )
    return dataset


def write_data_report(run_dir: Path, stage: Stage, dataset: Dataset) -> None:
    """Print what a folder dataset skipped or converted and keep it in `data-report.json` (one entry per stage)."""
    report = getattr(dataset, "report", None)
    if report is None:
        return
    for line in report.lines():
        print(line, flush=True)
    path = run_dir / "data-report.json"
    reports = json.loads(path.read_text()) if path.is_file() else {}
    reports[stage.name] = report.to_dict()
    path.write_text(json.dumps(reports, indent=2) + "\n")


def initial_state(
    cfg: DictConfig, run_dir: Path, stages: list[Stage], stage: Stage, use_init_from: bool
) -> dict | None:
    """The checkpoint a stage starting afresh grows from: `init_from` (for the run's first selected stage
    only: later stages grow from this run's own final.pt), else the previous stage's final.pt."""
    if cfg.init_from is not None and use_init_from:
        init = load_checkpoint(cfg.init_from)
        check_same_architecture(cfg, init["config"], f"init_from={cfg.init_from}")
        if init["resolution"] * 2 != stage.resolution:
            raise UserError(
                f"init_from={cfg.init_from} is a {init['resolution']} px checkpoint; stage {stage.resolution} "
                f"grows from a {stage.resolution // 2} px one"
            )
        return init
    if stage.index == 0:
        return None  # the first stage starts from scratch
    prev = run_dir / stages[stage.index - 1].name / FINAL
    if not prev.is_file():
        raise UserError(f"stage {stage.resolution} needs the previous stage's checkpoint {prev} (or init_from=...)")
    return load_checkpoint(prev)


def train_stage(
    cfg: DictConfig,
    stage: Stage,
    run_dir: Path,
    dataset: Dataset,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    loss: Loss,
    monitor: Monitor,
    watch: CollapseWatch | None,
    guard: Guard,
    stop: StopFlag,
    resume: dict | None,
    init: dict | None,
    metrics: MetricsWatch | None = None,
) -> Path:
    """Train one stage from `resume` (its own checkpoint) or `init` (the state it grows from); returns final.pt.

    With a collapse watch, `diversity.on_collapse` decides what a collapse does: `warn` logs it, `stop` writes
    a checkpoint and raises CollapseStop, `rollback` restores the stage's ok.pt (the last checkpoint written
    while the detector said ok) with scaled learning rates and goes on. The guard skips non-finite steps and,
    after `guard.max_bad_steps` in a row, rolls back to the newest snapshot from before them. A stop signal
    ends the stage after the current step with a checkpoint and `Interrupted`.
    """
    if resume is None and init is not None:
        # Continue the random stream where the previous stage ended (before the new layers draw their
        # weights), so that a stage started from final.pt - after a kill, or as a separate job - is
        # identical to the same stage in one uninterrupted run.
        set_rng_state(init["rng"])
    ranks = dist.current()
    classes = stage_classes(cfg, dataset)  # None: unconditional
    G, D = build_models(cfg, stage.resolution, device, classes)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_G, opt_D = build_optimizers(G, D, stage.lr)
    G_fast, D_fast = fast_networks(cfg, G, D)
    # D's input augmentation; with augment off (the default) the step draws no random number more than before.
    augment = AugmentPipe.from_config(cfg, device)
    step_options = {
        "eager_D": D,
        "reuse_fakes": bool(cfg.speed.reuse_fakes),
        "augment": augment if augment.enabled else None,
    }
    compile_pending = {False, True} if cfg.speed.compile else set()  # phases (alpha >= 1) not compiled yet
    nimg = 0
    sums: dict[str, torch.Tensor] = {}
    steps_since_tick = 0

    def restore(state: dict) -> None:
        """Continue from one of this stage's checkpoints: weights, optimizers, counters, RNG, partial tick."""
        nonlocal nimg, sums, steps_since_tick
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        G_ema.load_state_dict(state["G_ema"])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        nimg = int(state["nimg"])
        set_rng_state(state["rng"])
        augment.load_state_dict(state.get("augment"))
        sums = {k: v.to(device) for k, v in state["tick"]["sums"].items()}
        steps_since_tick = int(state["tick"]["steps"])

    if resume is not None:
        restore(resume)
        if watch is not None:
            watch.load_state_dict(resume.get("collapse"))
        guard.load_state_dict(resume.get("guard"))
    elif init is not None:
        try:
            grow_from(G, init["G"])
            grow_from(D, init["D"])
            # New layers of G_ema start equal to G's fresh ones; shared layers continue the old average.
            G_ema.load_state_dict(G.state_dict())
            grow_from(G_ema, init["G_ema"])
        except ValueError as exc:
            raise UserError(f"cannot grow stage {stage.resolution} from the previous checkpoint: {exc}") from exc
        if watch is not None:
            watch.load_state_dict(init.get("collapse"), new_stage=True)
        # The adaptive p carries on from the previous stage, as ADA's p runs on through a whole training run:
        # the amount of augmentation D needs reflects the dataset's size, not the resolution.
        augment.load_state_dict(init.get("augment"))
    if resume is None:
        guard.load_state_dict(init.get("guard") if init is not None else None, new_stage=True)
        # The same starting weights on every rank (they are already: a safety net, once per stage).
        dist.broadcast_modules(G, D, G_ema)
    if watch is not None:
        watch.begin_stage(stage, dataset)
    if metrics is not None:
        metrics.begin_stage(stage, dataset)

    beta = ema_beta(stage.batch_size, cfg.schedule.ema_kimg)
    latent_dim = int(cfg.model.latent_dim)

    stage_dir = run_dir / stage.name
    # The data order is a pure function of (seed, stage, images seen), so resuming restarts it exactly.
    workers = int(cfg.data.num_workers)

    # Under torchrun each rank takes its share of every global batch (InfiniteSampler's chunks).
    rank_batch = stage.batch_size // ranks.world_size

    def stage_loader(start: int) -> Iterator[torch.Tensor]:
        sampler = InfiniteSampler(
            len(dataset), cfg.seed * 1000 + stage.index, start, ranks.rank, ranks.world_size, rank_batch
        )
        return make_loader(
            dataset, sampler, rank_batch, workers, device, int(cfg.seed), float(cfg.loader.timeout_s), classes
        )

    loader = stage_loader(nimg)

    def lr_scale() -> float:
        """The product of what rollbacks did to the learning rates (collapse and guard)."""
        return guard.lr_scale * (watch.lr_scale if watch is not None else 1.0)

    def roll_back(state: dict, path: Path, announce: Callable[[], None]) -> None:
        """Continue from the stage's checkpoint `path` (loaded: `state`) with the learning rates scaled by the
        rollbacks so far and a new random stream (so that the rolled-back run does not replay the same
        failure). The abandoned branch's snapshots are deleted, so nothing resumes into it."""
        nonlocal loader, tick_start_time, tick_start_nimg
        restore(state)
        if ranks.is_main:
            rewind_snapshots(stage_dir, path, nimg)
        dist.barrier()
        guard.rewind(state.get("guard"))  # the abandoned branch's bad-step counts go with its curves
        announce()  # the watch/guard bookkeeping, before the learning rates use it
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = stage.lr * lr_scale()
        rollbacks = guard.rollbacks + (watch.rollbacks if watch is not None else 0)
        torch.manual_seed(cfg.seed + 1_000_003 * rollbacks + stage.index)
        # Curves restart at the restored point, as after a resume; the rollback itself is logged there.
        monitor.restart(purge_step=stage.start_nimg + nimg + 1)
        bar.reset(stage.num_images)
        bar.update(nimg)
        loader = stage_loader(nimg)
        tick_start_time, tick_start_nimg = time.perf_counter(), nimg

    def collapse_rollback(ok_state: dict, ok_path: Path, from_step: int) -> None:
        """Back to a checkpoint taken while the detector said ok."""

        def announce() -> None:
            watch.roll_back(ok_state.get("collapse"), float(cfg.diversity.rollback_lr_scale))

        roll_back(ok_state, ok_path, announce)
        watch.announce_rollback(from_step, stage, nimg)

    def guard_rollback(from_step: int, bad_steps: int) -> None:
        """Back to the newest usable snapshot taken before the run of non-finite steps began (skipped steps
        leave the weights as they are, so a snapshot inside the run would not escape whatever caused it)."""
        guard.roll_back()  # GuardGaveUp when the rollbacks are used up
        before = max(0, nimg - bad_steps * stage.batch_size)
        found = load_newest_usable([p for p in snapshots(stage_dir) if snapshot_nimg(p) <= before])
        if found is None:
            raise UserError(f"non-finite steps in stage {stage.resolution} px and no usable snapshot in {stage_dir}")
        state, path = found
        roll_back(state, path, lambda: None)
        step = stage.start_nimg + nimg
        message = (
            f"{bad_steps} non-finite steps (loss or gradients inf/NaN) up to {from_step / 1000:.3f} kimg: rolled "
            f"back to {path.name} ({step / 1000:.3f} kimg), rollback {guard.rollbacks} of at most "
            f"{guard.max_rollbacks}, learning rates x{lr_scale():g}"
        )
        warn(message)
        monitor.text("Guard/events", "WARNING: " + message, step)
        monitor.scalars({"Guard/rollbacks": guard.rollbacks, "Guard/lr_scale": guard.lr_scale}, step, None)

    # Fixed latents (and classes) for the sample grids, the same for the whole run, drawn without touching the
    # training RNG.
    grid_z, grid_labels, grid_columns = sample_grid_inputs(cfg, latent_dim, classes)
    grid_z = grid_z.to(device)
    grid_labels = grid_labels.to(device) if grid_labels is not None else None

    if nimg == 0 and ranks.is_main:
        reals = real_grid_images(dataset, int(cfg.log.grid_size), classes, grid_labels, grid_columns)
        monitor.image(f"Reals/{stage.name}", _to_grid(reals, grid_columns), stage.start_nimg)

    def save(name: str, done: bool) -> Path:
        """Rank 0 writes the checkpoint; all ranks return once it is on disk (or the write failed). Under
        torchrun the ranks' weights are compared first: what rank 0 saves is what every rank holds."""
        path = stage_dir / name
        dist.check_in_sync(G, D, G_ema)
        if not ranks.is_main:
            dist.barrier()
            return path
        try:
            _write(path, done)
        finally:
            dist.barrier()  # also after a failed write: rank 0 goes on (a warning), so must the others
        return path

    def _write(path: Path, done: bool) -> None:
        save_checkpoint(
            path,
            {
                "stage": stage.index,
                "resolution": stage.resolution,
                "nimg": nimg,
                "total_nimg": stage.start_nimg + nimg,
                "done": done,
                "G": G.state_dict(),
                "D": D.state_dict(),
                "G_ema": G_ema.state_dict(),
                "opt_G": opt_G.state_dict(),
                "opt_D": opt_D.state_dict(),
                "rng": get_rng_state(),
                # The partial log tick, so that a resumed run logs the same averages as an uninterrupted one.
                "tick": {"sums": sums, "steps": steps_since_tick},
                "collapse": watch.state_dict() if watch is not None else None,
                "guard": guard.state_dict(),
                "augment": augment.state_dict(),
                # The class names of a conditional run, in label order (empty: unconditional): the data's
                # classes, which the config alone does not name.
                "classes": list(classes.names) if classes is not None else [],
                "config": OmegaConf.to_container(cfg, resolve=True),
                "stage_info": asdict(stage),
            },
        )

    def save_snapshot() -> Path | None:
        """A snapshot; latest.pt (and ok.pt while the detector says ok) made to point at it; snapshots beyond
        checkpoint.keep deleted. A write error (a full disk) is a warning: the previous snapshot is intact
        and the next checkpoint tries again."""
        try:
            path = save(snapshot_name(nimg), done=False)
            if ranks.is_main:
                link_checkpoint(path, stage_dir / LATEST)
                if watch is not None and watch.state == "ok":
                    link_checkpoint(path, stage_dir / OK)
        except OSError as exc:
            warn(f"cannot write a checkpoint in {stage_dir}: {exc}; training goes on and the next checkpoint retries")
            return None
        if ranks.is_main:
            prune_snapshots(stage_dir, int(cfg.checkpoint.keep))
        monitor.flush()
        return path

    # guard.inject_nonfinite (fault injection, for tests and experiments): NaN real images for `steps` steps
    # from `at_kimg`, while the guard has rolled back fewer than `times` times.
    inject = cfg.guard.get("inject_nonfinite")
    inject_from = round(float(inject.at_kimg) * 1000) if inject is not None else 0

    def poisoned(total_nimg: int) -> bool:
        if inject is None or guard.rollbacks >= int(inject.times):
            return False
        return inject_from <= total_nimg < inject_from + int(inject.steps) * stage.batch_size

    tick_nimg = max(1, round(cfg.log.tick_kimg * 1000))
    image_nimg = max(1, round(cfg.log.image_every_kimg * 1000))
    ckpt_nimg = max(1, round(cfg.checkpoint.every_kimg * 1000))
    diversity_nimg = max(1, round(cfg.diversity.every_kimg * 1000))
    metrics_nimg = max(1, round(float(cfg.metrics.every_kimg or 0) * 1000))
    values: dict[str, float] = {}
    tick_start_time, tick_start_nimg = time.perf_counter(), nimg
    bar = progress_bar(stage.num_images, nimg, f"{stage.resolution}px", enabled=cfg.log.progress_bar and ranks.is_main)
    print(
        f"stage {stage.index}: {stage.resolution} px, fade {stage.fade_kimg} + stable {stage.stable_kimg} kimg, "
        f"batch {stage.batch_size}, lr {stage.lr}" + (f", resuming at {nimg / 1000:.3f} kimg" if nimg else ""),
        flush=True,
    )
    if resume is None:
        save_snapshot()  # every stage has a snapshot to resume or roll back to from its first step on
    G.train()
    D.train()
    while nimg < stage.num_images:
        reals, labels = to_device_batch(next(loader), device)
        if poisoned(stage.start_nimg + nimg):
            reals = reals * float("nan")
        # The step index is a function of the image counter, so lazy regularisation resumes in phase.
        step_index = nimg // stage.batch_size
        alpha = alpha_at(stage, nimg)
        step_start = time.perf_counter()
        stats = train_step(
            G_fast,
            D_fast,
            G_ema,
            opt_G,
            opt_D,
            loss,
            reals,
            alpha,
            beta,
            autocast,
            step_index,
            **step_options,
            labels=labels,
        )
        if compile_pending and (alpha >= 1.0) in compile_pending:
            # The first step of each phase (fading, stable) compiles its graphs: say what that cost.
            compile_pending.discard(alpha >= 1.0)
            seconds = time.perf_counter() - step_start
            print(f"torch.compile: {'stable' if alpha >= 1.0 else 'fade-in'} step compiled in {seconds:.1f} s")

        if augment.adaptive:
            augment.observe(stats["Augment/rt"], stage.batch_size)  # every augment.interval steps, p moves

        prev, nimg = nimg, nimg + stage.batch_size
        bar.update(stage.batch_size)
        accumulate(sums, stats, guard)
        steps_since_tick += 1
        step = stage.start_nimg + nimg
        finished = nimg >= stage.num_images

        at_tick = _crossed(prev, nimg, tick_nimg) or finished
        if at_tick:
            now = time.perf_counter()
            values = tick_means(sums, steps_since_tick, guard)  # the one host sync per tick
            longest_bad_run = guard.read()
            values |= {
                "Progress/kimg": step / 1000,
                "Progress/resolution": stage.resolution,
                "Progress/stage": stage.index,
                "Progress/alpha": alpha_at(stage, nimg),
                "Speed/img_per_s": (nimg - tick_start_nimg) / max(now - tick_start_time, 1e-9),
                **resource_stats(device),
            }
            if augment.enabled:  # Augment/rt, the tick's mean sign(D(augmented reals)), is among the averages
                values["Augment/p"] = float(augment.p)
            monitor.scalars(values, step)
            bar.set_postfix(
                D=f"{values.get('Loss/D', float('nan')):.3f}",
                G=f"{values.get('Loss/G', float('nan')):.3f}",
                alpha=f"{values['Progress/alpha']:.2f}",
            )
            sums, steps_since_tick = {}, 0
            tick_start_time, tick_start_nimg = now, nimg
            if longest_bad_run >= guard.max_bad_steps:
                guard_rollback(from_step=step, bad_steps=longest_bad_run)
                continue
        if ranks.is_main and (_crossed(prev, nimg, image_nimg) or finished):
            with torch.no_grad(), autocast:
                samples = G_ema(grid_z, alpha_at(stage, nimg), grid_labels).float()
            grid = _to_grid(samples, grid_columns)
            monitor.image("Samples/G_ema", grid, step)
            samples_dir = run_dir / "samples"
            samples_dir.mkdir(exist_ok=True)
            save_image(grid, samples_dir / f"fakes-{stage.name}-{step / 1000:09.3f}kimg.png")
        if watch is not None and (_crossed(prev, nimg, diversity_nimg) or finished):
            if watch.evaluate(G_ema, G, stage, nimg).entered_collapse and cfg.diversity.on_collapse != "warn":
                ok = stage_dir / OK
                rollback_left = watch.rollbacks < cfg.diversity.max_rollbacks and ok.is_file()
                found = load_newest_usable([ok]) if cfg.diversity.on_collapse == "rollback" and rollback_left else None
                if found is not None:
                    collapse_rollback(*found, from_step=step)
                    continue
                save_snapshot()
                raise CollapseStop(watch.stop_message(stage, step, ok))
        if metrics is not None and (_crossed(prev, nimg, metrics_nimg) or finished):
            metrics.evaluate(G_ema, stage, nimg)
        if _crossed(prev, nimg, ckpt_nimg) and not finished:
            save_snapshot()
        # Under torchrun the ranks agree at ticks (a signal may reach one rank only, or them at different steps).
        if ranks.distributed:
            signum = dist.max_across_ranks(stop.signum or 0, device) if at_tick else 0
        else:
            signum = stop.signum or 0
        if signum and not finished:
            bar.close()
            raise Interrupted(signum, save_snapshot())
    bar.close()
    try:
        final = save(FINAL, done=True)
    except OSError as exc:
        raise UserError(
            f"cannot write {stage_dir / FINAL}: {exc}; free the space and resume: the stage continues from "
            "its newest snapshot"
        ) from exc
    monitor.hparams(
        f"hparams/{stage.name}",
        {**asdict(stage), "loss": loss.name, "model": cfg.model.name, "seed": cfg.seed},
        {f"hparam/{k}": v for k, v in values.items() if k.startswith(("Loss/", "Scores/"))},
    )
    monitor.flush()
    return final


def accumulate(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], guard: Guard) -> None:
    """Add one step's scalars to the tick's sums on the device; a skipped (non-finite) step counts for the
    guard and adds nothing to the averages."""
    bad = torch.maximum(stats.pop("Guard/skipped_D"), stats.pop("Guard/skipped_G"))
    guard.record(bad)
    stats = {k: torch.where(bad > 0, 0.0, v) for k, v in stats.items()} | {"Guard/good_steps": 1.0 - bad}
    for k, v in stats.items():
        sums[k] = sums[k] + v if k in sums else v


def tick_means(sums: dict[str, torch.Tensor], steps: int, guard: Guard) -> dict[str, float]:
    """The tick's averages over its good steps (and over the ranks), and the guard's counts (the tick's one host
    sync)."""
    sums = dist.mean_across_ranks(dict(sums))
    good_sum = sums.pop("Guard/good_steps")  # accumulate adds it at every step; a tick follows at least one
    *totals, good = torch.stack([*sums.values(), good_sum]).tolist()
    names = list(sums)
    good = round(good)
    skipped = steps - good
    guard.total_bad_steps += skipped
    values = {k: v / good for k, v in zip(names, totals)} if good else {}
    return values | {"Guard/skipped_steps": skipped, "Guard/skipped_total": guard.total_bad_steps}


def _loader_failure(exc: Exception) -> bool:
    """Whether `exc` is a DataLoader worker that died, was killed or timed out: torch's RuntimeErrors, or the
    inter-process connection to a worker broken mid-batch (the training loop has no other connections)."""
    if isinstance(exc, (ConnectionError, EOFError)):
        return True
    return "DataLoader worker" in str(exc) or "DataLoader timed out" in str(exc)


def _private_generator(seed: int) -> torch.Generator:
    """A generator for DataLoader's worker seeds: without one it draws them from the global RNG, and a
    resumed run, which creates its loader mid-stage, would then diverge from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def _crossed(before: int, after: int, every: int) -> bool:
    """True when a multiple of `every` lies in (before, after]."""
    return before // every != after // every


def _to_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[-1, 1] NCHW images -> one [0, 1] CHW grid of `columns` columns on the CPU."""
    return make_grid(images.detach().float().cpu(), nrow=columns, normalize=True, value_range=(-1, 1))


def sample_grid_inputs(
    cfg: DictConfig, latent_dim: int, classes: ClassLabels | None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The sample grids' fixed latents, their classes and the grid's number of columns.

    Unconditional: log.grid_size latents in a square-ish grid. Conditional: one class per row (every class, or
    log.grid_classes of them evenly spread) and round(sqrt(grid_size)) columns, each column one latent shared
    by all the rows, so a row shows its class and a column what the class changes for one latent.
    """
    generator = torch.Generator().manual_seed(int(cfg.seed))
    size = int(cfg.log.grid_size)
    columns = max(1, round(size**0.5))
    if classes is None:
        return torch.randn(size, latent_dim, generator=generator), None, columns
    rows = grid_classes(classes.num_classes, int(cfg.log.grid_classes))
    z = torch.randn(columns, latent_dim, generator=generator).repeat(len(rows), 1)
    return z, rows.repeat_interleave(columns), columns


def real_grid_images(
    dataset: Dataset, size: int, classes: ClassLabels | None, grid_labels: torch.Tensor | None, columns: int
) -> torch.Tensor:
    """The real images shown at a stage's start: the first `size` items, or for a conditional run, row by row
    the first `columns` items of each grid row's class (mid-grey where a class has fewer)."""
    if classes is None:
        return next(iter(DataLoader(dataset, batch_size=size, generator=_private_generator(0))))
    blank = torch.zeros_like(dataset[0])
    images = []
    for c in grid_labels.cpu()[::columns].tolist():
        row = [dataset[i] for i in np.flatnonzero(classes.labels == c)[:columns].tolist()]
        images += row + [blank] * (columns - len(row))
    return torch.stack(images)


def to_device_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader batch on `device`: the images (see to_device_images) and, for a conditional run, the labels."""
    images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
    return to_device_images(images, device), None if labels is None else labels.to(device, non_blocking=True)
