"""One way back: the non-finite guard and the collapse watch roll a stage back through `roll_back`.

A rollback restores a checkpoint of the stage (the newest snapshot from before a run of non-finite steps, or
ok.pt, the last one written while the collapse detector said ok), deletes the abandoned branch's snapshots,
scales the learning rates by the rollbacks so far, reseeds the random stream (so that the rolled-back run
does not replay the same failure) and announces it on the console, in TensorBoard and in the logs.
"""

from __future__ import annotations

import torch

from pgan import dist
from pgan.checkpoint import OK, load_newest_usable, rewind_snapshots, snapshot_nimg, snapshots
from pgan.errors import UserError
from pgan.monitor import warn
from pgan.train.checkpointer import Checkpointer
from pgan.train.context import Progress, RunContext
from pgan.train.feed import Feed
from pgan.train.state import TrainState


class CollapseStop(Exception):
    """The collapse detector fired with on_collapse=stop (or no rollback was left); latest.pt was written."""


def roll_back(
    ctx: RunContext,
    state: TrainState,
    feed: Feed,
    progress: Progress,
    found: tuple[dict, object],
    cause: str,
) -> None:
    """Continue from the stage's checkpoint `found` = (loaded state, path) after a `cause` ("guard" or
    "collapse") rollback: restore, rewind, scale the learning rates, reseed, restart the logs and the data."""
    checkpoint, path = found
    stage = state.stage
    state.load_training(checkpoint)
    if ctx.ranks.is_main:  # nothing may resume into the abandoned branch
        rewind_snapshots(ctx.run_dir / stage.name, path, state.nimg)
    dist.barrier()
    ctx.guard.rewind(checkpoint.get("guard"))  # the abandoned branch's bad-step counts go with its curves
    if cause == "collapse":  # its detector state, one more rollback, its lower learning rate
        ctx.watch.roll_back(checkpoint.get("collapse"), ctx.options.collapse_lr_scale)
    state.set_lr_scale(ctx.lr_scale())
    torch.manual_seed(ctx.options.seed + 1_000_003 * ctx.rollbacks() + stage.index)
    # Curves restart at the restored point, as after a resume; the rollback itself is logged there.
    ctx.monitor.restart(purge_step=state.total_nimg + 1)
    progress.restart(state.nimg)
    feed.restart(state.nimg)


def guard_rollback(ctx: RunContext, state: TrainState, feed: Feed, progress: Progress, bad_steps: int) -> None:
    """Back to the newest usable snapshot taken before the run of `bad_steps` non-finite steps began (skipped
    steps leave the weights as they are, so a snapshot inside the run would not escape whatever caused it)."""
    stage, from_step = state.stage, state.total_nimg
    ctx.guard.roll_back()  # GuardGaveUp when the rollbacks are used up
    before = max(0, state.nimg - bad_steps * stage.batch_size)
    stage_dir = ctx.run_dir / stage.name
    found = load_newest_usable([p for p in snapshots(stage_dir) if snapshot_nimg(p) <= before])
    if found is None:
        raise UserError(f"non-finite steps in stage {stage.resolution} px and no usable snapshot in {stage_dir}")
    roll_back(ctx, state, feed, progress, found, cause="guard")
    step, guard = state.total_nimg, ctx.guard
    message = (
        f"{bad_steps} non-finite steps (loss or gradients inf/NaN) up to {from_step / 1000:.3f} kimg: rolled "
        f"back to {found[1].name} ({step / 1000:.3f} kimg), rollback {guard.rollbacks} of at most "
        f"{guard.max_rollbacks}, learning rates x{ctx.lr_scale():g}"
    )
    warn(message)
    ctx.monitor.text("Guard/events", "warning: " + message, step)
    ctx.monitor.scalars({"Guard/rollbacks": guard.rollbacks, "Guard/lr_scale": guard.lr_scale}, step, None)


def collapse_rollback(
    ctx: RunContext, state: TrainState, feed: Feed, progress: Progress, checkpointer: Checkpointer
) -> None:
    """The detector entered collapse (with diversity.on_collapse stop or rollback): back to the stage's ok.pt
    while rollbacks are left, else a snapshot and CollapseStop."""
    watch, options, from_step = ctx.watch, ctx.options, state.total_nimg
    ok = ctx.run_dir / state.stage.name / OK
    rollback_left = watch.rollbacks < options.collapse_max_rollbacks and ok.is_file()
    found = load_newest_usable([ok]) if options.on_collapse == "rollback" and rollback_left else None
    if found is None:
        checkpointer.snapshot(state)
        raise CollapseStop(watch.stop_message(state.stage, from_step, ok))
    roll_back(ctx, state, feed, progress, found, cause="collapse")
    watch.announce_rollback(from_step, state.stage, state.nimg)
