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


def _per_resolution(value: Any, resolution: int, key: str) -> Any:
    """A schedule setting is either one value for all stages or a mapping resolution -> value."""
    if isinstance(value, Mapping):
        for k in (resolution, str(resolution)):
            if k in value:
                return value[k]
        raise ValueError(f"schedule.{key} has no entry for resolution {resolution}")
    return value


def _setting(value: Any, res: int, key: str, kind: type, minimum: float, strict: bool) -> Any:
    """One stage's value of schedule.<key>, converted to `kind` and range-checked (a ValueError naming it)."""
    raw = _per_resolution(value, res, key)
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
