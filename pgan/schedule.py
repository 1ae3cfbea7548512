"""The progressive schedule as pure functions of images seen. No torch here.

A stage is (resolution, fade_kimg, stable_kimg, batch_size, lr). Progress inside a stage is counted in
images (`nimg`), and alpha is a function of it alone, so resuming needs nothing but the image counter.
"""

from __future__ import annotations

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
            named[int(k)] = v
        except (TypeError, ValueError):
            raise ValueError(f"schedule.{key} has the key {k!r}: keys are resolutions in px or 'default'") from None
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
    sources = {k: setting_at(schedule[k], stage.resolution, k)[1] for k in keys}
    return {k: source for k, source in sources.items() if source is not None}


def _setting(value: Any, res: int, key: str, kind: type, minimum: float, strict: bool) -> Any:
    """One stage's value of schedule.<key>, converted to `kind` and range-checked (a ValueError naming it)."""
    raw, _ = setting_at(value, res, key)
    try:
        number = kind(raw)
        if kind is int and number != float(raw):
            raise ValueError
    except (TypeError, ValueError):
        kind_name = "an integer" if kind is int else "a number"
        raise ValueError(f"schedule.{key} at {res} px must be {kind_name}, got {raw!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"schedule.{key} at {res} px must be finite, got {raw!r}")
    if number < minimum or (strict and number == minimum):
        raise ValueError(f"schedule.{key} at {res} px must be {'>' if strict else '>='} {minimum}, got {raw!r}")
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


def stages_from_config(cfg: Mapping[str, Any]) -> list[Stage]:
    """The run's stages from a run config's `schedule` (a DictConfig or a config.yaml loaded as a dict), with a
    ValueError naming the setting for a bad schedule. (pgan-report and pgan-sample read a run's stages here,
    without the trainer.)

    The first stage fades in too when the run grows it from `init_from` (a smaller checkpoint).
    """
    s = cfg["schedule"]
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
    return build_stages(resolutions, s["fade_kimg"], s["stable_kimg"], s["batch_size"], s["lr"], fade_first=grows_first)
