"""The progressive schedule as pure functions of images seen. No torch here.

A stage is (resolution, fade_kimg, stable_kimg, batch_size, lr). Progress inside a stage is counted in
images (`nimg`), and alpha is a function of it alone, so resuming needs nothing but the image counter.

With `schedule.advance=plateau` a stage's stable phase ends early when a quality metric stops improving: the
stage is built with its longest stable phase (`plateau.max_stable_kimg`), and when the evaluations are due and
what counts as "stopped improving" are pure functions here too (`plateau_evaluation_due`, `plateau_reached`)
of the stage's image count and the metric's history.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One resolution of the progressive schedule."""

    index: int  # position in the schedule, 0-based
    resolution: int  # output size in pixels
    fade_kimg: float  # thousands of real images shown while alpha goes 0 -> 1 (0 for the first stage)
    stable_kimg: float  # thousands of real images shown at alpha = 1
    batch_size: int  # global batch (all devices together)
    lr: float  # Adam learning rate for G and D
    start_nimg: int  # images shown before this stage, over the whole run

    @property
    def num_steps(self) -> int:
        """Optimizer steps in this stage: the stage's images rounded up to whole batches."""
        return math.ceil(round((self.fade_kimg + self.stable_kimg) * 1000) / self.batch_size)

    @property
    def num_images(self) -> int:
        """Images actually shown in this stage (a whole number of batches)."""
        return self.num_steps * self.batch_size

    @property
    def name(self) -> str:
        """Directory name of the stage inside a run, e.g. 'stage-0064'."""
        return f"stage-{self.resolution:04d}"


# The settings that may be a map {resolution: value}; fade_kimg of a stage that does not fade is not read.
PER_RESOLUTION = ("fade_kimg", "stable_kimg", "batch_size", "lr")
DEFAULT_KEY = "default"
MIN_RESOLUTION = 4  # the smallest block of the networks
MAX_RESOLUTION = 1024


def check_resolution(resolution: int, minimum: int = MIN_RESOLUTION) -> int:
    """Return log2(resolution); raise ValueError unless it is a power of two in [minimum, 1024]."""
    log2 = int(math.log2(resolution)) if resolution > 0 else -1
    if resolution < minimum or resolution > MAX_RESOLUTION or 2**log2 != resolution:
        raise ValueError(f"resolution must be a power of two in [{minimum}, {MAX_RESOLUTION}], got {resolution}")
    return log2


def setting_at(value: Any, resolution: int, key: str) -> tuple[Any, str | None]:
    """One stage's raw value of schedule.<key>, and where it came from when a map does not name `resolution`.

    A setting is one value for all stages or a map {resolution: value}. The gaps of a map are filled by one
    rule: its `default` entry if it has one, else the value of the nearest smaller resolution it names, else
    (below all of them) the value of the smallest. Returns (value, None) when the value was given for this
    resolution, else (value, "default" | "from <r> px"). Only an empty map has no rule (a ValueError).
    """
    if not isinstance(value, Mapping):
        return value, None
    named: dict[int, Any] = {}
    for k, v in value.items():
        if str(k) == DEFAULT_KEY:
            continue
        try:
            check_resolution(int(str(k)))
            named[int(str(k))] = v
        except (TypeError, ValueError):
            raise ValueError(
                f"schedule.{key} has the key {k!r}: keys are resolutions in px (powers of two, "
                f"{MIN_RESOLUTION}-{MAX_RESOLUTION}) or 'default'"
            ) from None
    if resolution in named:
        return named[resolution], None
    if DEFAULT_KEY in value:
        return value[DEFAULT_KEY], DEFAULT_KEY
    if not named:
        raise ValueError(f"schedule.{key} is an empty map: give one value, or values per resolution")
    smaller = [r for r in named if r < resolution]
    source = max(smaller) if smaller else min(named)
    return named[source], f"from {source} px"


def filled_settings(schedule: Mapping[str, Any], stage: Stage) -> dict[str, str]:
    """Which of `stage`'s settings a map did not name, and the rule that filled each ({"lr": "from 64 px"})."""
    keys = [k for k in PER_RESOLUTION if k != "fade_kimg" or stage.fade_kimg > 0]
    values = {k: schedule[k] for k in keys}
    if advance_of(schedule) == "plateau":  # its per-resolution limits too; a given max replaces stable_kimg
        plateau = schedule["plateau"]
        values |= {f"plateau.{k}": plateau[k] for k in PLATEAU_PER_RESOLUTION if plateau.get(k) is not None}
        if "plateau.max_stable_kimg" in values:
            del values["stable_kimg"]
    sources = {k: setting_at(v, stage.resolution, k)[1] for k, v in values.items()}
    return {k: source for k, source in sources.items() if source is not None}


def _setting(value: Any, res: int, key: str, kind: type, minimum: float, strict: bool) -> Any:
    """One stage's value of schedule.<key>, converted to `kind` and range-checked (a ValueError naming it)."""
    raw, _ = setting_at(value, res, key)
    return _checked(raw, f"schedule.{key} at {res} px", kind, minimum, strict)


def _checked(raw: Any, name: str, kind: type, minimum: float, strict: bool) -> Any:
    """`raw` converted to `kind` and range-checked; the ValueError starts with `name`."""
    try:
        if isinstance(raw, bool):  # true is not 1
            raise ValueError
        number = kind(raw)
        if kind is int and number != float(raw):
            raise ValueError
    except (TypeError, ValueError):
        kind_name = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {kind_name}, got {raw!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {raw!r}")
    if number < minimum or (strict and number == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {raw!r}")
    return number


def build_stages(
    resolutions: Sequence[int],
    fade_kimg: float | Mapping,
    stable_kimg: float | Mapping,
    batch_size: int | Mapping,
    lr: float | Mapping,
    fade_first: bool = False,
) -> list[Stage]:
    """Expand the schedule settings into stages.

    The first stage has no fade-in (nothing to fade from) unless `fade_first`: it is grown from a smaller
    checkpoint, so its new block must fade in like any other.
    """
    stages: list[Stage] = []
    start_nimg = 0
    for index, res in enumerate(resolutions):
        fades = not (index == 0 and not fade_first)
        stage = Stage(
            index=index,
            resolution=int(res),
            fade_kimg=_setting(fade_kimg, res, "fade_kimg", float, 0, strict=False) if fades else 0.0,
            stable_kimg=_setting(stable_kimg, res, "stable_kimg", float, 0, strict=False),
            batch_size=_setting(batch_size, res, "batch_size", int, 0, strict=True),
            lr=_setting(lr, res, "lr", float, 0, strict=True),
            start_nimg=start_nimg,
        )
        stages.append(stage)
        start_nimg += stage.num_images
    return stages


def alpha_at(stage: Stage, nimg: int) -> float:
    """Fade-in weight after `nimg` images of `stage`: linear from 0 to 1 over fade_kimg, then 1."""
    fade_nimg = stage.fade_kimg * 1000
    if fade_nimg <= 0:
        return 1.0
    return min(1.0, nimg / fade_nimg)


def ema_beta(batch_size: int, half_life_kimg: float) -> float:
    """Per-step EMA decay such that the weight of old parameters halves every `half_life_kimg` images.

    The paper's 0.999 per step at batch 16 is a half-life of 16 * ln 0.5 / ln 0.999 = 11.085 kimg.
    """
    if half_life_kimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / (half_life_kimg * 1000))


def ema_half_life_kimg(ema_kimg: float, rampup: float | None, stage_nimg: int) -> float:
    """G_ema's half-life after `stage_nimg` images of a stage: `ema_kimg`, or with a `rampup` fraction (StyleGAN2-ADA's
    ema_rampup, counted per stage here) min(ema_kimg, rampup * the stage's kimg so far). The rampup keeps G_ema
    close to G while a stage is young (its new layers move fast) and lets it average over a growing window as
    the stage goes on; at a stage's first step the half-life is 0, so G_ema starts the stage as G."""
    if rampup is None:
        return ema_kimg
    return min(ema_kimg, rampup * stage_nimg / 1000)


def ema_settings(schedule: Mapping[str, Any]) -> tuple[float, float | None]:
    """(schedule.ema_kimg, schedule.ema_rampup): a half-life >= 0 (0: G_ema is G) and None (a fixed half-life;
    also configs from before the rampup) or a fraction > 0, with a ValueError naming the key for a bad value."""
    ema_kimg = _checked(schedule.get("ema_kimg"), "schedule.ema_kimg", float, 0, strict=False)
    rampup = schedule.get("ema_rampup")
    return ema_kimg, None if rampup is None else _checked(rampup, "schedule.ema_rampup", float, 0, strict=True)


PAPER_BETAS = (0.0, 0.99)  # Adam's (beta1, beta2) in ProGAN, StyleGAN2 and R3GAN


def adam_betas(schedule: Mapping[str, Any]) -> tuple[float, float]:
    """schedule.betas, Adam's (beta1, beta2) for G and D: two numbers in [0, 1) (PAPER_BETAS for configs from
    before the setting), with a ValueError naming the key for a bad value."""
    raw = schedule.get("betas")
    if raw is None:
        return PAPER_BETAS
    if isinstance(raw, (str, int, float)) or len(raw) != 2:
        raise ValueError(f"schedule.betas must be a pair [beta1, beta2], got {raw!r}")
    betas = tuple(_checked(beta, "schedule.betas", float, 0, strict=False) for beta in raw)
    if max(betas) >= 1:
        raise ValueError(f"schedule.betas must each be < 1, got {list(raw)!r}")
    return betas[0], betas[1]


def stages_from_config(cfg: Mapping[str, Any]) -> list[Stage]:
    """The run's stages from a run config's `schedule` (a DictConfig or a config.yaml loaded as a dict), with a
    ValueError naming the setting for a bad schedule. (pgan-report and pgan-sample read a run's stages here,
    without the trainer.)

    The first stage fades in too when the run grows it from `init_from` (a smaller checkpoint).
    """
    s = cfg["schedule"]
    if isinstance(s["resolutions"], (str, int, float)):  # a list or a ListConfig; `schedule.resolutions=8`
        raise ValueError(f"schedule.resolutions must be a list of resolutions in px, got {s['resolutions']!r}")
    resolutions = [int(r) for r in s["resolutions"]]
    if not resolutions or any(b <= a for a, b in zip(resolutions, resolutions[1:])):
        raise ValueError(f"schedule.resolutions must be a non-empty increasing list, got {resolutions}")
    for res in resolutions:
        try:
            check_resolution(res)
        except ValueError as exc:
            raise ValueError(f"schedule.resolutions: {exc}") from None
    for a, b in zip(resolutions, resolutions[1:]):
        if b != 2 * a:
            raise ValueError(f"schedule.resolutions must double from stage to stage, got {a} -> {b}")
    grows_first = cfg.get("init_from") is not None and cfg.get("stage") in (None, resolutions[0])
    stable_kimg = s["stable_kimg"]
    if advance_of(s) == "plateau":  # a stage is built with its longest stable phase; a plateau may end it sooner
        stable_kimg = {res: rule.max_stable_kimg for res, rule in plateau_rules(s, resolutions).items()}
    return build_stages(resolutions, s["fade_kimg"], stable_kimg, s["batch_size"], s["lr"], fade_first=grows_first)


# --- schedule.advance=plateau --------------------------------------------------------------------------------
ADVANCE_MODES = ("fixed", "plateau")
# The plateau settings that may be a map {resolution: value}.
PLATEAU_PER_RESOLUTION = ("min_stable_kimg", "max_stable_kimg")


@dataclass(frozen=True)
class PlateauRule:
    """When the stable phase of one stage ends under schedule.advance=plateau (schedule.plateau at its
    resolution): after `patience` evaluations in a row that did not beat the best value by `min_delta` of it,
    once it has lasted `min_stable_kimg`; at `max_stable_kimg` in any case."""

    metric: str  # the number watched, e.g. swd (a key of pgan.metrics.quality.SCORES)
    every_kimg: float  # an evaluation every this many thousand images of the stable phase
    min_delta: float  # relative: an evaluation improves when it beats the best value by this fraction of it
    patience: int  # evaluations in a row without an improvement that end the stable phase
    min_stable_kimg: float  # the stable phase lasts at least this long ...
    max_stable_kimg: float  # ... and at most this long (the stage's stable_kimg)

    @property
    def every_nimg(self) -> int:
        """The evaluation interval in images (at least 1)."""
        return max(1, round(self.every_kimg * 1000))

    @property
    def min_stable_nimg(self) -> int:
        """The shortest stable phase in images."""
        return round(self.min_stable_kimg * 1000)


def advance_of(schedule: Mapping[str, Any]) -> str:
    """schedule.advance (`fixed` when a config predates it), checked."""
    advance = str(schedule.get("advance", "fixed"))
    if advance not in ADVANCE_MODES:
        raise ValueError(f"schedule.advance must be one of {', '.join(ADVANCE_MODES)}, got {advance!r}")
    return advance


def plateau_rules(schedule: Mapping[str, Any], resolutions: Sequence[int]) -> dict[int, PlateauRule]:
    """schedule.plateau resolved at every resolution, with a ValueError naming the setting for a bad value.
    `max_stable_kimg: null` means the stage's `stable_kimg`: the plateau can only shorten the fixed schedule."""
    plateau = schedule.get("plateau")
    if not isinstance(plateau, Mapping):
        raise ValueError("schedule.advance=plateau needs a schedule.plateau section (metric, every_kimg, ...)")
    metric = plateau.get("metric")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"schedule.plateau.metric must be a metric's name (e.g. swd), got {metric!r}")
    every_kimg = _checked(plateau.get("every_kimg"), "schedule.plateau.every_kimg", float, 0, strict=True)
    min_delta = _checked(plateau.get("min_delta"), "schedule.plateau.min_delta", float, 0, strict=False)
    if min_delta >= 1:
        raise ValueError(f"schedule.plateau.min_delta is relative (0.05: 5 %) and must be < 1, got {min_delta:g}")
    patience = _checked(plateau.get("patience"), "schedule.plateau.patience", int, 1, strict=False)
    rules = {}
    for res in resolutions:
        max_value = plateau.get("max_stable_kimg")
        if max_value is None:
            max_kimg = _setting(schedule["stable_kimg"], res, "stable_kimg", float, 0, strict=False)
        else:
            max_kimg = _setting(max_value, res, "plateau.max_stable_kimg", float, 0, strict=False)
        min_kimg = _setting(plateau.get("min_stable_kimg"), res, "plateau.min_stable_kimg", float, 0, strict=False)
        if min_kimg > max_kimg:
            longest = "max_stable_kimg" if max_value is not None else "stable_kimg (the longest stable phase)"
            raise ValueError(
                f"schedule.plateau.min_stable_kimg at {res} px is {min_kimg:g}, more than its {longest} {max_kimg:g}"
            )
        rules[int(res)] = PlateauRule(str(metric), every_kimg, min_delta, patience, min_kimg, max_kimg)
    return rules


def fade_nimg(stage: Stage) -> int:
    """Images of `stage`'s fade-in: its stable phase starts after them."""
    return round(stage.fade_kimg * 1000)


def stable_nimg(stage: Stage, nimg: int) -> int:
    """Images of `stage`'s stable phase after `nimg` images of the stage (0 during the fade-in)."""
    return max(0, nimg - fade_nimg(stage))


def plateau_evaluation_due(stage: Stage, rule: PlateauRule, before: int, after: int) -> bool:
    """Whether a step from `before` to `after` images of `stage` crossed an evaluation of the plateau: every
    `rule.every_kimg` of the stable phase, counted from its start (none at its start, none in the fade-in)."""
    every, start = rule.every_nimg, fade_nimg(stage)
    return after - start >= every and (before - start) // every != (after - start) // every


def improves(value: float, best: float, min_delta: float, higher_is_better: bool) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (relative) of it; a non-finite value never does."""
    if not math.isfinite(value):
        return False
    margin = min_delta * abs(best)
    return value > best + margin if higher_is_better else value < best - margin


def plateau_progress(values: Sequence[float], min_delta: float, higher_is_better: bool) -> tuple[int | None, int]:
    """(index of the best value, evaluations since it) of a metric's history. The best moves only on an
    improvement by `min_delta` (a slow creep of small gains does not restart the count); the first finite value
    is the first best. (None, len(values)) while no value is finite."""
    best = None
    for i, value in enumerate(values):
        if improves(value, values[best], min_delta, higher_is_better) if best is not None else math.isfinite(value):
            best = i
    return best, len(values) - 1 - best if best is not None else len(values)


def plateau_reached(values: Sequence[float], min_delta: float, patience: int, higher_is_better: bool) -> bool:
    """Whether the metric has not improved by `min_delta` (relative) in the last `patience` evaluations."""
    return plateau_progress(values, min_delta, higher_is_better)[1] >= patience


def stages_as_run(stages: Sequence[Stage], ended: Mapping[int, tuple[int, int]]) -> list[Stage]:
    """The stages as a run trained them, given where stages ended early ({index: (start_nimg, nimg)}, from
    schedule.advance=plateau's records): such a stage gets the stable phase it had, and each later stage starts
    where the one before it ended (what the trainer does: pgan.train.resume.placed)."""
    out: list[Stage] = []
    for st in stages:
        if st.index in ended:
            start, nimg = ended[st.index]
            st = dataclasses.replace(st, start_nimg=int(start), stable_kimg=nimg / 1000 - st.fade_kimg)
        elif out and out[-1].index == st.index - 1:
            st = dataclasses.replace(st, start_nimg=out[-1].start_nimg + out[-1].num_images)
        out.append(st)
    return out
