"""The training loop: every stage of the schedule in order, on a kimg clock, resumable at any checkpoint.

`train` resolves the options (every config check), takes the run directory, finds where the run stands and
trains the stages left; `train_stage` builds the stage's state (resumed from its own checkpoint, or grown
from the previous stage's final.pt / `init_from`) and loops: a batch of reals (faded by alpha) and latents
-> D step -> G step -> EMA; after each step, the maintenance tasks that are due run in one fixed order. A
stage ends with `final.pt`, after its schedule's images or, with schedule.advance=plateau, at the step where its
quality metric was found to have stopped improving (pgan/train/plateau.py); the next stage starts there.

Exact resume: alpha is a function of the image counter, the data order is a function of (seed, stage, image
counter), and the checkpoint carries the RNG state, so a resumed run continues bit for bit.

Where the rest lives: the options (pgan/train/options.py), what a checkpoint holds (state.py), the tick
gate (clock.py), the data (feed.py), checkpoint files (checkpointer.py), rollbacks (recovery.py), the resume
point and loader restarts (resume.py), the run directory's lock (rundir.py), the plateau that ends a stable phase
(plateau.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from torchvision.utils import save_image

from pgan import dist
from pgan.checkpoint import FINAL
from pgan.data.labels import check_two_classes
from pgan.errors import UserError
from pgan.monitor import Monitor, NullMonitor, resource_stats, warn
from pgan.runtime import (
    apply_thread_budget,
    autocast_for,
    configure_backends,
    precision_name,
    resolve_device,
    resolve_precision,
)
from pgan.schedule import Stage, alpha_at, stable_nimg
from pgan.train.checkpointer import Checkpointer
from pgan.train.clock import due_after
from pgan.train.context import Progress, RunContext
from pgan.train.feed import Feed, SampleGrid, stage_classes, stage_dataset, write_data_report
from pgan.train.guard import Guard
from pgan.train.interrupt import Interrupted, StopFlag
from pgan.train.metrics_watch import MetricsWatch
from pgan.train.options import TrainOptions
from pgan.train.plateau import PlateauWatch
from pgan.train.recovery import CollapseStop, collapse_rollback, guard_rollback
from pgan.train.resume import Plan, check_same_classes, grows_from, placed, plan_run, surviving_loader_failures
from pgan.train.rundir import RunDirLock
from pgan.train.state import TrainState
from pgan.train.step import TrainStep
from pgan.train.watch import CollapseWatch

__all__ = ["CollapseStop", "train", "train_stage"]


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Run (or resume) every selected stage of `cfg` in `run_dir`; returns the last stage's final.pt."""
    run_dir = Path(run_dir)
    ranks = dist.current()
    options = TrainOptions.from_config(cfg, ranks.world_size)  # every config check, before anything is written
    device = resolve_device(options.device)
    if ranks.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # torchrun: one GPU per process
    # Before any data worker starts: the cores this process may use, less those busy with other work.
    threads = apply_thread_budget(options.threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    use_bf16 = resolve_precision(options.precision, device)
    autocast = autocast_for(device, use_bf16)
    configure_backends(device, options.precision)
    options = replace(options, loss=options.loss.for_precision(use_bf16))  # loss.penalty_sigma=auto
    # The same random stream on every rank: each draws the global batch's latents (and penalty mixes) and
    # keeps its own chunk (pgan.dist.draw_for_rank), so N ranks compute what one process does.
    torch.manual_seed(options.seed)
    with RunDirLock(run_dir) if ranks.is_main else contextlib.nullcontext():  # one trainer per run directory
        # Rank 0 first: it sets damaged checkpoints aside, the other ranks then find the same resume point.
        plan = dist.main_first(lambda: plan_run(options, run_dir))
        if not plan.stages:
            print(f"nothing to do: every stage in {run_dir} is finished", flush=True)
            return run_dir / options.selected[-1].name / FINAL
        init, dataset = check_first_stage(options, run_dir, plan, device)
        plan.stages[0] = placed(options, plan.stages[0], plan.resume, init and init[0])
        if ranks.is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        # TensorBoard and stats.jsonl drop what an interrupted attempt logged after the point this run continues
        # from, so curves never double. One writer for the run: rank 0's.
        monitor = Monitor(run_dir, purge_step=plan.continue_from + 1) if ranks.is_main else NullMonitor()
        if plan.new_run:
            monitor.text("Config", "```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "\n```")
        print(f"run directory: {run_dir}\nwatch it with: tensorboard --logdir {run_dir}", flush=True)
        precision = f"{precision_name(use_bf16)} (precision={options.precision})"
        print(f"device {device}, {precision}, {threads.describe()}", flush=True)
        if options.loss.penalty_mode == "approx" and options.loss.penalised:
            print(f"penalties by central finite differences, sigma {options.loss.penalty_sigma}", flush=True)
        watch = CollapseWatch(cfg, device, autocast, monitor) if options.collapse_watch else None
        # Quality metrics are logged, never acted on: rank 0 alone computes them.
        metrics = None
        if options.intervals.metrics_nimg and ranks.is_main:
            metrics = MetricsWatch(cfg, options.metric_names, device, autocast, monitor)
        # schedule.advance=plateau: the metric that ends stable phases (rank 0 computes it, every rank acts on it).
        plateau = PlateauWatch(cfg, device, autocast, monitor, ranks) if options.advance == "plateau" else None
        guard = Guard(options.guard, device)
        try:
            with StopFlag() as stop:
                ctx = RunContext(
                    options, run_dir, device, autocast, monitor, guard, watch, metrics, plateau, stop, ranks
                )
                final = train_stages(ctx, plan, init, dataset)
        finally:
            monitor.close()
    print(f"done. watch it with: tensorboard --logdir {run_dir}", flush=True)
    return final


def check_first_stage(
    options: TrainOptions, run_dir: Path, plan: Plan, device: torch.device
) -> tuple[tuple[dict, Path] | None, Dataset]:
    """What the first stage grows from and its dataset, checked before anything is written: the classes of a
    conditional run against its checkpoints, and a later stage that would lose a class (images too small)."""
    first = plan.stages[0]
    init = None if plan.resume is not None else grows_from(options, run_dir, first)
    dataset = stage_dataset(options, first, run_dir, device)
    classes = stage_classes(options, dataset)
    if classes is not None and (empty := [n for n, c in zip(classes.names, classes.counts()) if c == 0]):
        # G still learns an embedding for it, from nothing: its samples show what the other classes share.
        warn(
            f"model.conditional=true: {len(empty)} of {classes.num_classes} classes have no images (e.g. {empty[0]!r})"
        )
    for state, what in ((plan.resume, f"the run in {run_dir}"), (init and init[0], "the checkpoint it grows from")):
        if state is not None:
            check_same_classes(state, classes, what)
    if classes is not None:
        check_two_classes(classes, f"the data at {first.resolution} px")
    if options.data.source == "folder":  # a later stage may skip more images (too small for it): check it now
        for st in plan.stages[1:]:
            later = stage_dataset(options, st, run_dir, device)
            if classes is not None and (gone := set(classes.names) - set(stage_classes(options, later).names)):
                raise UserError(
                    f"model.conditional=true: every image of class {sorted(gone)[0]!r} is too small for "
                    f"{st.resolution} px ({len(gone)} such classes); data.small_images=upscale keeps them"
                )
    return init, dataset


def train_stages(ctx: RunContext, plan: Plan, init: tuple[dict, Path] | None, dataset: Dataset) -> Path:
    """Train the plan's stages in order (a loader failure restarts a stage from its newest snapshot)."""
    for i, st in enumerate(plan.stages):
        if i > 0:
            init = grows_from(ctx.options, ctx.run_dir, st)
            st = placed(ctx.options, st, None, init[0])  # after a plateau, where the previous stage ended
            dataset = stage_dataset(ctx.options, st, ctx.run_dir, ctx.device)
        if ctx.ranks.is_main:
            write_data_report(ctx.run_dir, st, dataset)
        run_stage = partial(train_stage, ctx, st, dataset, init=init)
        resume = plan.resume if i == 0 else None
        if ctx.ranks.distributed:  # a loader failure on one rank ends the job (torchrun stops the others)
            final = run_stage(resume)
        else:
            max_restarts = ctx.options.loader_max_restarts
            final = surviving_loader_failures(run_stage, resume, max_restarts, ctx.run_dir / st.name, ctx.monitor)
        signum = dist.max_across_ranks(ctx.stop.signum or 0, ctx.device)
        if signum and i < len(plan.stages) - 1:
            raise Interrupted(signum, final)
    return final


def train_stage(
    ctx: RunContext, stage: Stage, dataset: Dataset, resume: dict | None, init: tuple[dict, Path] | None
) -> Path:
    """Train one stage from `resume` (its own checkpoint) or `init` (the checkpoint it grows from, and its path);
    returns final.pt. A collapse warns, stops (CollapseStop) or rolls back as `diversity.on_collapse` says, a
    run of non-finite steps rolls back (pgan/train/recovery.py), a stop signal checkpoints and raises
    `Interrupted`."""
    options, monitor, watch, guard = ctx.options, ctx.monitor, ctx.watch, ctx.guard
    classes = stage_classes(options, dataset)  # None: unconditional
    state = TrainState(options, stage, ctx.device, classes, guard, watch, resume, init and init[0])
    step = TrainStep(state, options, ctx.autocast)
    for watcher in (watch, ctx.metrics, ctx.plateau):
        if watcher is not None:
            watcher.begin_stage(stage, dataset)
    feed = Feed(options, stage, dataset, classes, ctx.device)
    feed.restart(state.nimg)
    grid = SampleGrid(options, classes, ctx.device)
    if state.nimg == 0 and ctx.ranks.is_main:
        monitor.image(f"Reals/{stage.name}", grid.reals(dataset), stage.start_nimg)
    checkpointer = Checkpointer(ctx.run_dir / stage.name, options.snapshots_kept, monitor)
    progress = Progress(stage, state.nimg, options.progress_bar and ctx.ranks.is_main)
    if resume is None and init is not None:
        print(f"stage {stage.index}: growing {stage.resolution} px from {init[1]}", flush=True)
    print(options.stage_line(stage, state.nimg), flush=True)
    if resume is None:
        checkpointer.snapshot(state)  # something to resume or roll back to from the first step on
    values: dict[str, float] = {}
    state.G.train()
    state.D.train()
    while state.nimg < state.end_nimg:  # the stage's images, or fewer once a plateau ended its stable phase
        reals, labels = feed.next()
        if options.inject is not None and options.inject.poisons(state.total_nimg, stage.batch_size, guard.rollbacks):
            reals = reals * float("nan")
        stats = step(reals, labels)
        before, state.nimg = state.nimg, state.nimg + stage.batch_size
        progress.update(stage.batch_size)
        state.tick.add(stats, guard)
        # schedule.advance=plateau: the metric's evaluation, first: a plateau makes this the stage's last step.
        if state.plateau is not None and state.plateau.due(before, state.nimg):
            ctx.plateau.evaluate(state, progress)
        due = due_after(options.intervals, before, state.nimg, state.end_nimg)
        # The maintenance tasks, in this order.
        # 1. The tick's scalars; too many non-finite steps in a row roll the stage back.
        if due.tick:
            values, bad_run = log_tick(ctx, state, progress)
            if bad_run >= guard.max_bad_steps:
                guard_rollback(ctx, state, feed, progress, bad_run)
                continue
        # 2. The fixed-latent sample grid.
        if due.grid and ctx.ranks.is_main:
            save_grid(ctx, state, grid)
        # 3. The collapse watch: a collapse warns, stops or rolls back (diversity.on_collapse).
        if due.diversity:
            evaluation = watch.evaluate(state.G_ema, state.G, stage, state.nimg)
            if evaluation.entered_collapse and options.on_collapse != "warn":
                collapse_rollback(ctx, state, feed, progress, checkpointer)
                continue
            if due.finished:  # what the detector can say about the stage, judged or not
                progress.write(watch.stage_summary(stage, evaluation.metrics))
        # 4. Quality metrics (logged, never acted on).
        if due.metrics and ctx.metrics is not None:
            ctx.metrics.evaluate(state.G_ema, stage, state.nimg)
        # 5. A snapshot.
        if due.snapshot:
            checkpointer.snapshot(state)
        # 6. A stop signal: a checkpoint, then Interrupted.
        signum = stop_signal(ctx, due.tick)
        if signum and not due.finished:
            progress.close()
            raise Interrupted(signum, checkpointer.snapshot(state))
    progress.close()
    if state.plateau is not None:  # when and why the stable phase ended: console, TensorBoard, stats.jsonl
        ctx.plateau.announce(state, progress)
    final = checkpointer.final(state)
    monitor.hparams(
        f"hparams/{stage.name}",
        {**asdict(stage), "loss": options.loss.name, "model": options.model.get("name"), "seed": options.seed},
        {f"hparam/{k}": v for k, v in values.items() if k.startswith(("Loss/", "Scores/"))},
    )
    monitor.flush()
    return final


def log_tick(ctx: RunContext, state: TrainState, progress: Progress) -> tuple[dict[str, float], int]:
    """The tick's averages (the one host sync per tick) to TensorBoard, stats.jsonl and the progress bar;
    returns them and the longest run of non-finite steps since the last tick."""
    values = state.tick.take_means(ctx.guard)
    bad_run = ctx.guard.read()
    values |= {
        "Progress/kimg": state.total_nimg / 1000,
        "Progress/resolution": state.stage.resolution,
        "Progress/stage": state.stage.index,
        "Progress/alpha": alpha_at(state.stage, state.nimg),
        "Speed/img_per_s": progress.timer.rate(state.nimg),
        **resource_stats(ctx.device),
    }
    if state.plateau is not None:
        values["Progress/stable_kimg_spent"] = stable_nimg(state.stage, state.nimg) / 1000
    if state.augment.enabled:  # Augment/rt, the tick's mean sign(D(augmented reals)), is among the averages
        values["Augment/p"] = float(state.augment.p)
    ctx.monitor.scalars(values, state.total_nimg)
    progress.show(values)
    return values, bad_run


def save_grid(ctx: RunContext, state: TrainState, grid: SampleGrid) -> None:
    """G_ema's images of the fixed latents to TensorBoard and samples/fakes-<stage>-<kimg>kimg.png."""
    image = grid.fakes(state.G_ema, alpha_at(state.stage, state.nimg), ctx.autocast)
    ctx.monitor.image("Samples/G_ema", image, state.total_nimg)
    samples_dir = ctx.run_dir / "samples"
    samples_dir.mkdir(exist_ok=True)
    save_image(image, samples_dir / f"fakes-{state.stage.name}-{state.total_nimg / 1000:09.3f}kimg.png")


def stop_signal(ctx: RunContext, at_tick: bool) -> int:
    """The stop signal received (0: none). Under torchrun the ranks agree at ticks (a signal may reach one
    rank only, or them at different steps)."""
    if ctx.ranks.distributed:
        return dist.max_across_ranks(ctx.stop.signum or 0, ctx.device) if at_tick else 0
    return ctx.stop.signum or 0
