"""The run's options, resolved once from the Hydra config before anything is written.

`TrainOptions.from_config(cfg, world_size)` runs every check of the config (one line naming the setting for a
bad value), turns intervals into images and builds the stages. Below it nothing reads `cfg`: the loop, the
state, the checkpointer and the recovery read typed fields here. The watches (collapse, metrics) are built
from their own config sections, once, in `pgan.train.loop.train`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from pgan.augment import check_augment_config
from pgan.errors import UserError, check_int, check_number
from pgan.losses import Loss, make_loss
from pgan.metrics.quality import SCORES
from pgan.networks import G_ARCHITECTURES, GROW_INITS, networks_from, widths_up_to
from pgan.runtime import check_precision, check_threads
from pgan.schedule import (
    PlateauRule,
    Stage,
    adam_betas,
    advance_of,
    ema_settings,
    filled_settings,
    plateau_rules,
    stages_from_config,
)
from pgan.train.guard import check_guard_config
from pgan.train.metrics_watch import applies_at, check_metrics_config
from pgan.train.plateau import check_plateau_metric
from pgan.train.watch import check_diversity_config

T = TypeVar("T")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
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
    "g_architecture",
)
WIDTH_KEYS = ("fmap_base", "fmap_max", "fmap_min", "channels")  # what sets each resolution's width
# What a key means in configs written before it existed.
ARCHITECTURE_DEFAULTS = {"conditional": False, "g_architecture": "progan"}


@dataclass(frozen=True)
class Intervals:
    """How often the maintenance tasks run, in images of the stage (0: never)."""

    tick_nimg: int  # scalars (TensorBoard, stats.jsonl, the console bar): log.tick_kimg
    grid_nimg: int  # the fixed-latent sample grid: log.image_every_kimg
    diversity_nimg: int  # the collapse watch: diversity.every_kimg (0 with diversity.enabled=false)
    metrics_nimg: int  # quality metrics: metrics.every_kimg (0 when null)
    snapshot_nimg: int  # a snapshot checkpoint: checkpoint.every_kimg


@dataclass(frozen=True)
class FaultInjection:
    """guard.inject_nonfinite: NaN reals for `steps` steps from `from_nimg` (run images), while the guard has
    rolled back fewer than `times` times (for tests and experiments)."""

    from_nimg: int
    steps: int
    times: int

    def poisons(self, total_nimg: int, batch_size: int, rollbacks: int) -> bool:
        """Whether the step starting at `total_nimg` run images gets NaN reals."""
        if rollbacks >= self.times:
            return False
        return self.from_nimg <= total_nimg < self.from_nimg + self.steps * batch_size


@dataclass(frozen=True)
class TrainOptions:
    """Everything the trainer needs from the config, checked and converted (see the module docstring)."""

    config: dict[str, Any]  # the resolved config: config.yaml and every checkpoint carry it
    seed: int
    device: str  # auto | cpu | cuda | cuda:N (resolved by pgan.runtime)
    precision: str  # auto | fp32 | bf16
    threads: str | int  # auto | N: torch's intra-op threads (pgan.runtime.thread_budget)
    stages: tuple[Stage, ...]  # the whole schedule (under advance=plateau: each with its longest stable phase)
    advance: str  # fixed | plateau: what ends a stage's stable phase (schedule.advance)
    plateau: dict[int, PlateauRule]  # per resolution: when a plateau ends it (empty under fixed)
    selected: tuple[Stage, ...]  # the stages this invocation trains (all, or stage=<px>)
    filled: dict[int, dict[str, str]]  # per resolution: the settings a per-resolution map filled in, and how
    init_from: Path | None  # the checkpoint the first selected stage grows from
    data: DictConfig  # the data section (pgan.data.make_dataset builds the dataset from it)
    model: dict[str, Any]  # the model section (networks_from builds G and D from it)
    conditional: bool
    loss: Loss
    betas: tuple[float, float]  # Adam's (beta1, beta2) for G and D (schedule.betas)
    ema_kimg: float  # G_ema's half-life in thousands of images
    ema_rampup: float | None  # or min(ema_kimg, this x the stage's kimg so far) (pgan.schedule.ema_half_life_kimg)
    intervals: Intervals
    snapshots_kept: int  # checkpoint.keep
    compile: bool
    compile_mode: str
    reuse_fakes: bool
    num_workers: int
    loader_timeout_s: float
    loader_max_restarts: int
    augment: dict[str, Any]  # AugmentPipe's arguments
    guard: DictConfig  # max_bad_steps, max_rollbacks, rollback_lr_scale (pgan.train.guard.Guard reads them)
    inject: FaultInjection | None
    collapse_watch: bool  # diversity.enabled
    on_collapse: str  # warn | stop | rollback
    collapse_max_rollbacks: int
    collapse_lr_scale: float
    metric_names: tuple[str, ...]  # checked names; metrics are on when intervals.metrics_nimg > 0
    grid_size: int
    grid_classes: int
    progress_bar: bool

    @property
    def latent_dim(self) -> int:
        """G's latent size."""
        return int(self.model["latent_dim"])

    @classmethod
    def from_config(cls, cfg: DictConfig, world_size: int = 1) -> TrainOptions:
        """Check `cfg` (one-line UserErrors) and resolve it; `world_size`: the ranks sharing each global batch."""
        check_precision(cfg.precision)
        check_threads(cfg.threads)
        stages = _user_error(stages_from_config, cfg)
        advance, plateau = _advance(cfg, stages)
        ema_kimg, ema_rampup = _user_error(ema_settings, cfg.schedule)
        betas = _user_error(adam_betas, cfg.schedule)
        check_model(cfg.model, stages[-1].resolution)
        check_batches(stages, int(cfg.model.mbstd_group_size), world_size)
        config = OmegaConf.to_container(cfg, resolve=True)
        try:
            loss = make_loss(**config["loss"])
        except (TypeError, ValueError) as exc:
            raise UserError(f"loss: {exc}") from exc
        if cfg.diversity.enabled:
            check_diversity_config(cfg)
        check_guard_config(cfg)
        check_speed(cfg.speed)
        metric_names = check_metrics_config(cfg)
        augment = check_augment_config(cfg)
        if int(cfg.checkpoint.keep) < 1:
            raise UserError(f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
        selected = [st for st in stages if cfg.stage is None or st.resolution == cfg.stage]
        if not selected:
            resolutions = list(cfg.schedule.resolutions)
            raise UserError(f"stage={cfg.stage!r} is not one of schedule.resolutions {resolutions} (resolutions in px)")
        inject = cfg.guard.get("inject_nonfinite")
        return cls(
            config=config,
            seed=check_int("seed", cfg.seed),
            device=str(cfg.device),
            precision=str(cfg.precision),
            threads=cfg.threads,
            stages=tuple(stages),
            advance=advance,
            plateau=plateau,
            selected=tuple(selected),
            filled={st.resolution: filled_settings(cfg.schedule, st) for st in stages},
            init_from=Path(cfg.init_from) if cfg.init_from is not None else None,
            data=cfg.data,
            model=config["model"],
            conditional=bool(cfg.model.get("conditional", False)),
            loss=loss,
            betas=betas,
            ema_kimg=ema_kimg,
            ema_rampup=ema_rampup,
            intervals=_intervals(cfg),
            snapshots_kept=int(cfg.checkpoint.keep),
            compile=bool(cfg.speed.compile),
            compile_mode=str(cfg.speed.compile_mode),
            reuse_fakes=bool(cfg.speed.reuse_fakes),
            num_workers=check_int("data.num_workers", cfg.data.num_workers, low=0),
            loader_timeout_s=float(cfg.loader.timeout_s),
            loader_max_restarts=int(cfg.loader.max_restarts),
            augment=augment,
            guard=cfg.guard,
            inject=None
            if inject is None
            else FaultInjection(_nimg(inject.at_kimg, minimum=0), int(inject.steps), int(inject.times)),
            collapse_watch=bool(cfg.diversity.enabled),
            on_collapse=str(cfg.diversity.on_collapse),
            collapse_max_rollbacks=int(cfg.diversity.max_rollbacks),
            collapse_lr_scale=float(cfg.diversity.rollback_lr_scale),
            metric_names=tuple(metric_names),
            grid_size=check_int("log.grid_size", cfg.log.grid_size, low=1),
            grid_classes=check_int("log.grid_classes", cfg.log.grid_classes, low=1),
            progress_bar=bool(cfg.log.progress_bar),
        )

    def stage_line(self, stage: Stage, resume_nimg: int = 0) -> str:
        """The console line that opens a stage: its schedule, and which settings a map filled in."""
        filled = self.filled.get(stage.resolution, {})
        note = f" ({', '.join(f'{k} {how}' for k, how in filled.items())})" if filled else ""
        stable, rule_note = f"{stage.stable_kimg}", ""
        rule = self.plateau.get(stage.resolution)
        if rule is not None:  # a plateau of the metric may end the stable phase between its min and max
            stable = f"{rule.min_stable_kimg:g} to {rule.max_stable_kimg:g}"
            rule_note = (
                f"; the stable phase ends when {rule.metric} has not improved by {rule.min_delta * 100:g} % in "
                f"{rule.patience} evaluations (one every {rule.every_kimg:g} kimg)"
            )
            if not applies_at(SCORES[rule.metric][0], stage.resolution):
                stable, rule_note = f"{rule.max_stable_kimg:g}", f"; {rule.metric} is not defined at this resolution"
        return (
            f"stage {stage.index}: {stage.resolution} px, fade {stage.fade_kimg} + stable {stable} kimg, "
            f"batch {stage.batch_size}, lr {stage.lr}{note}"
            + (f", resuming at {resume_nimg / 1000:.3f} kimg" if resume_nimg else "")
            + rule_note
        )


def _nimg(kimg: Any, minimum: int = 1) -> int:
    """An interval in kimg as whole images (at least `minimum`)."""
    return max(minimum, round(float(kimg) * 1000))


def _interval_nimg(key: str, kimg: Any) -> int:
    """The interval `key` in kimg (a finite number > 0) as whole images, at least 1; else a one-line error (a zero
    or negative interval used to mean every step: a checkpoint or a grid a step)."""
    check_number(key, kimg, low=0.0, strict=True, error=UserError)
    return _nimg(kimg)


def _intervals(cfg: DictConfig) -> Intervals:
    """How often the trainer logs, writes grids, evaluates and snapshots (the evaluations' intervals are checked
    with the rest of their sections: check_diversity_config, check_metrics_config)."""
    watch, metrics = cfg.diversity, cfg.metrics
    return Intervals(
        tick_nimg=_interval_nimg("log.tick_kimg", cfg.log.tick_kimg),
        grid_nimg=_interval_nimg("log.image_every_kimg", cfg.log.image_every_kimg),
        diversity_nimg=_nimg(watch.every_kimg) if watch.enabled else 0,
        metrics_nimg=_nimg(metrics.every_kimg) if metrics.every_kimg else 0,
        snapshot_nimg=_interval_nimg("checkpoint.every_kimg", cfg.checkpoint.every_kimg),
    )


def _user_error(check: Callable[..., T], *args: Any) -> T:
    """`check(*args)` (a pure check of pgan.schedule: stages, advance, plateau rules, EMA, betas) with its
    ValueError as a one-line UserError."""
    try:
        return check(*args)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _advance(cfg: DictConfig, stages: list[Stage]) -> tuple[str, dict[int, PlateauRule]]:
    """schedule.advance and, for a plateau, its rule at each resolution (its metric checked)."""
    advance = _user_error(advance_of, cfg.schedule)
    if advance == "fixed":
        return advance, {}
    rules = _user_error(plateau_rules, cfg.schedule, [st.resolution for st in stages])
    check_plateau_metric(cfg)
    return advance, rules


def check_batches(stages: list[Stage], mbstd_group_size: int, world_size: int = 1) -> None:
    """Every stage's global batch splits into `world_size` per-rank batches that minibatch-stddev can group."""
    if mbstd_group_size < 1:
        raise UserError(f"model.mbstd_group_size must be >= 1, got {mbstd_group_size}")
    for st in stages:
        if st.batch_size <= 0 or st.batch_size % min(mbstd_group_size, st.batch_size):
            raise UserError(
                f"schedule.batch_size at {st.resolution} px is {st.batch_size}: it must be > 0 and divisible "
                f"by model.mbstd_group_size={mbstd_group_size}"
            )
        per_rank, rest = divmod(st.batch_size, world_size)
        if rest or per_rank == 0 or per_rank % min(mbstd_group_size, per_rank):
            raise UserError(
                f"schedule.batch_size={st.batch_size} at {st.resolution} px does not split into {world_size} "
                f"per-rank batches divisible by model.mbstd_group_size={mbstd_group_size} (batch_size is the "
                "global batch)"
            )


def check_model(model: DictConfig, resolution: int) -> None:
    """Build G and D at `resolution` on the meta device (shapes only): a model preset that cannot make the
    schedule's resolutions (an explicit channel table without one, a width below 1) is a user error."""
    for key in ("latent_dim", "image_channels"):
        if not isinstance(model[key], int) or model[key] < 1:
            raise UserError(f"model.{key} must be a positive integer, got {model[key]!r}")
    if not isinstance(model.get("conditional", False), bool):
        raise UserError(f"model.conditional must be true or false, got {model.conditional!r}")
    if model.get("g_architecture", "progan") not in G_ARCHITECTURES:
        raise UserError(
            f"model.g_architecture must be one of {', '.join(G_ARCHITECTURES)}, got {model.g_architecture!r}"
        )
    if model.get("grow_init", "fresh") not in GROW_INITS:
        raise UserError(f"model.grow_init must be one of {', '.join(GROW_INITS)}, got {model.grow_init!r}")
    if not isinstance(model.get("grow_smooth", False), bool):
        raise UserError(f"model.grow_smooth must be true or false, got {model.grow_smooth!r}")
    try:
        with torch.device("meta"):
            networks_from(model, resolution)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise UserError(f"model={model.get('name')} cannot build the {resolution} px networks: {exc}") from exc


def check_speed(speed: DictConfig) -> None:
    """One-line errors for speed.* settings that are not what they should be."""
    for key in ("compile", "reuse_fakes"):
        if not isinstance(speed[key], bool):
            raise UserError(f"speed.{key} must be true or false, got {speed[key]!r}")
    if speed.compile_mode not in COMPILE_MODES:
        raise UserError(f"speed.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {speed.compile_mode!r}")


def check_same_architecture(options: TrainOptions, saved_config: dict, what: str, upto: int | None = None) -> None:
    """Refuse a checkpoint whose model settings differ from this run's, naming the keys that differ.

    `upto` (a checkpoint a new stage grows from, of this resolution): the width settings (fmap_*, channels) only
    have to give the same width at every resolution up to it, since the layers above are new (e.g. a wider
    block from 32 px on, `model.channels`, grown from a 16 px checkpoint of the rule's widths)."""
    ours, theirs = options.model, saved_config.get("model", {})
    keys = [k for k in ARCHITECTURE_KEYS if upto is None or k not in WIDTH_KEYS]
    differing = [
        k for k in keys if ours.get(k, ARCHITECTURE_DEFAULTS.get(k)) != theirs.get(k, ARCHITECTURE_DEFAULTS.get(k))
    ]
    pairs = [f"model.{k}: {theirs.get(k)!r} there vs {ours.get(k)!r} here" for k in differing]
    if upto is not None and (there := widths_up_to(theirs, upto)) != (here := widths_up_to(ours, upto)):
        pairs.append(f"widths up to {upto} px: {there} there vs {here} here")
    if pairs:
        raise UserError(f"{what} has a different architecture ({', '.join(pairs)})")
