"""The mode-collapse detector: a small state machine over the diversity metrics of successive evaluations.

States: ok (0) -> warning (1) -> collapsed (2). Each evaluation gets a *level* from thresholds on the
metrics (`severity`). The state rises to a level only after `patience` consecutive evaluations at that
level or above, and falls back only after `recover_patience` consecutive evaluations below it with the
thresholds relaxed by `hysteresis` - so noise around a threshold does not make the flag flicker.

Grace: right after a resolution change and during the first part of a fade-in the generator's variety is
in flux (a fresh block, the old block upsampled), so evaluations in a grace window are logged but neither
move the state nor count towards patience; the history restarts after it (re-baselined: the trainer also
switches to the real reference of the new resolution).

Everything here is pure Python on plain values, so the state goes into checkpoints as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import OmegaConf

from pgan.errors import UserError

STATES = ("ok", "warning", "collapsed")
# What the detector can say: a state it reached, or that it has not judged yet ("in grace": the last evaluation
# fell in a grace window; "pending": fewer judged evaluations since the last grace window than `patience`).
VERDICTS = (*STATES, "pending", "in grace")


@dataclass(frozen=True)
class Thresholds:
    """Where an evaluation counts as a warning or as collapse; see `severity`.

    `excess_pair_*` are compared with the lower confidence bound p - z * se (z = `excess_pair_z`), so that a
    small real-vs-fake MS-SSIM gap measured on few pairs does not raise the flag by chance.
    """

    excess_pair_warning: float = 0.1
    excess_pair_collapsed: float = 0.25
    excess_pair_z: float = 2.0
    vendi_ratio_warning: float = 0.6
    vendi_ratio_collapsed: float = 0.4
    std_ratio_collapsed: float = 0.3
    hysteresis: float = 0.8  # recovering needs the metrics this much further inside the thresholds

    def __post_init__(self) -> None:
        if not 0 < self.hysteresis <= 1:
            raise ValueError(f"hysteresis must be in (0, 1], got {self.hysteresis}")
        if self.excess_pair_warning > self.excess_pair_collapsed:
            raise ValueError("excess_pair_warning must be <= excess_pair_collapsed")
        if self.vendi_ratio_warning < self.vendi_ratio_collapsed:
            raise ValueError("vendi_ratio_warning must be >= vendi_ratio_collapsed")


def severity(metrics: Mapping[str, float], t: Thresholds, recovering: bool = False) -> int:
    """The level (0 ok, 1 warning, 2 collapsed) one evaluation's metrics point to.

    With `recovering`, the thresholds are moved by the hysteresis factor towards the healthy side: an
    evaluation only counts as clear of a level when it is clearly inside it.
    """
    h = t.hysteresis if recovering else 1.0
    excess = metrics["excess_pair"] - t.excess_pair_z * metrics.get("excess_pair_se", 0.0)
    vendi = metrics["vendi_ratio"]
    std = metrics["std_ratio"]
    if excess > t.excess_pair_collapsed * h or vendi < t.vendi_ratio_collapsed / h or std < t.std_ratio_collapsed / h:
        return 2
    if excess > t.excess_pair_warning * h or vendi < t.vendi_ratio_warning / h:
        return 1
    return 0


@dataclass
class DetectorState:
    """Everything the detector remembers (plain values, saved in checkpoints)."""

    level: int = 0  # index into STATES
    levels: list[int] = field(default_factory=list)  # recent severity levels since the last grace window
    recovery_levels: list[int] = field(default_factory=list)  # the same with the hysteresis thresholds
    evaluations: int = 0
    in_grace: bool = False  # whether the last evaluation fell in a grace window

    @property
    def state(self) -> str:
        """The state's name: ok, warning or collapsed."""
        return STATES[self.level]

    def verdict(self, patience: int) -> str:
        """What the detector can say: a warning or collapse it reached; `ok` only once `patience` judged
        evaluations since the last grace window back it; else `in grace` or `pending` (unjudged is not ok)."""
        if self.level > 0:
            return self.state
        if self.in_grace or self.evaluations == 0:
            return "in grace" if self.in_grace else "pending"
        return "ok" if len(self.levels) >= patience else "pending"

    def to_dict(self) -> dict:
        """A plain dict for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> DetectorState:
        """Inverse of `to_dict`."""
        return cls(
            level=int(d["level"]),
            levels=[int(x) for x in d["levels"]],
            recovery_levels=[int(x) for x in d["recovery_levels"]],
            evaluations=int(d["evaluations"]),
            in_grace=bool(d.get("in_grace", False)),  # absent in checkpoints written before it existed
        )


def update(
    state: DetectorState,
    metrics: Mapping[str, float],
    thresholds: Thresholds,
    patience: int = 2,
    recover_patience: int = 2,
    in_grace: bool = False,
) -> DetectorState:
    """The detector's state after one more evaluation (a new object; `state` is left unchanged)."""
    if patience < 1 or recover_patience < 1:
        raise ValueError("patience and recover_patience must be >= 1")
    if in_grace:
        # Logged, not judged; the history restarts so patience counts only post-grace evaluations.
        return DetectorState(state.level, [], [], state.evaluations + 1, in_grace=True)
    keep = max(patience, recover_patience)
    levels = (state.levels + [severity(metrics, thresholds)])[-keep:]
    recovery = (state.recovery_levels + [severity(metrics, thresholds, recovering=True)])[-keep:]
    level = state.level
    if len(levels) >= patience and min(levels[-patience:]) > level:
        level = min(levels[-patience:])  # every one of the last `patience` evaluations was at least this bad
    elif len(recovery) >= recover_patience and max(recovery[-recover_patience:]) < level:
        level = max(recovery[-recover_patience:])
    return DetectorState(level, levels, recovery, state.evaluations + 1)


def in_grace_window(nimg_in_stage: int, fade_nimg: int, grace_kimg: float, grace_fade_fraction: float) -> bool:
    """Whether an evaluation `nimg_in_stage` images into a stage falls in its grace window: the first
    `grace_kimg` of every stage, and the first `grace_fade_fraction` of its fade-in."""
    if nimg_in_stage < grace_kimg * 1000:
        return True
    return fade_nimg > 0 and nimg_in_stage < grace_fade_fraction * fade_nimg


def thresholds_from_config(cfg: Any) -> Thresholds:
    """The detector thresholds from `diversity.thresholds`, with a user error naming a bad key."""
    values = OmegaConf.to_container(cfg.diversity.thresholds, resolve=True)
    try:
        return Thresholds(**values)
    except (TypeError, ValueError) as exc:  # an unknown key, or inconsistent values
        raise UserError(f"diversity.thresholds: {exc}") from exc
