"""schedule.advance=plateau: a stage's stable phase ends when a quality metric of G_ema stops improving.

Every `schedule.plateau.every_kimg` of the stable phase (never during the fade-in) the trainer evaluates the
metric with the quality metrics' machinery (pgan/train/metrics_watch.py: fixed latents, a fixed seeded subset of
the stage's real images, offline features) and records it in the stage's `Plateau`; `pgan.schedule`'s pure
`plateau_reached` says from the history whether the metric has stopped improving. Once the stable phase has
lasted `min_stable_kimg`, that ends the stage at the step of the evaluation; at `max_stable_kimg` it ends anyway.

The `Plateau` is part of the training state (checkpoint key "plateau", rolled back with the weights), and the
evaluation touches no training random stream, so a resumed run and a stage run as its own job decide at the same
image as an uninterrupted run. Under torchrun rank 0 evaluates and sends the number to the others: every rank
records the same history and ends the stage at the same step.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from pgan import dist
from pgan.errors import UserError
from pgan.metrics.modes import MODE_SOURCES, no_classifier_message
from pgan.metrics.quality import SCORES, check_features_for, nearest_k
from pgan.monitor import Monitor
from pgan.schedule import PlateauRule, Stage, plateau_evaluation_due, plateau_progress, plateau_reached, stable_nimg
from pgan.train.metrics_watch import SMALLEST_RESOLUTION, MetricsWatch, applies_at

if TYPE_CHECKING:
    from pgan.train.context import Progress
    from pgan.train.state import TrainState

# Why a stage's stable phase ended (the `advance` of its stats.jsonl record).
PLATEAU, MAX_STABLE, NOT_DEFINED = "plateau", "max_stable_kimg", "metric_not_defined"


def check_plateau_metric(cfg: DictConfig) -> None:
    """schedule.plateau.metric: a known score, computable on this data with the metrics.* settings (one line)."""
    metric = str(cfg.schedule.plateau.metric)
    if metric not in SCORES:
        hint = " (pr gives precision and recall: name one)" if metric == "pr" else ""
        raise UserError(f"schedule.plateau.metric={metric}: unknown{hint} (available: {', '.join(SCORES)})")
    family = SCORES[metric][0]
    if family == "modes" and str(cfg.data.source) not in MODE_SOURCES:
        raise UserError(f"schedule.plateau.metric={metric}: " + no_classifier_message(str(cfg.data.source)))
    m = cfg.metrics
    k = nearest_k([family], m.pr_k, m.coverage_k)
    if k and min(int(m.num_fake), int(m.num_real)) <= k:
        raise UserError(f"schedule.plateau.metric={metric}: metrics.num_fake and num_real must be > {k} (k={k})")
    check_features_for([family], m.features, m.inception_weights, keys="metrics.")


class Plateau:
    """One stage's plateau: the metric's evaluations and the decision that ended the stable phase, if made."""

    def __init__(self, stage: Stage, rule: PlateauRule) -> None:
        self.stage, self.rule = stage, rule
        family, self.higher_is_better = SCORES[rule.metric]
        # SWD needs 16 px, the mode classifiers 8: a smaller stage runs its longest stable phase.
        self.defined = applies_at(family, stage.resolution)
        self.smallest = SMALLEST_RESOLUTION.get(family, 1)
        self.history: list[tuple[int, float]] = []  # (images of the stage, value) of every evaluation
        self.ended_at: int | None = None  # the stage's image count at which a plateau ended its stable phase

    # --- state carried in checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint: the history and the decision; the best evaluation and the count since
        it are there to read (a resume derives them from the history again)."""
        best = self.best
        return {
            "metric": self.rule.metric,
            "history": [[n, v] for n, v in self.history],
            "ended_at": self.ended_at,
            "best": list(best) if best is not None else None,
            "evals_since_best": self.evals_since_best,
        }

    def load_state_dict(self, state: dict[str, Any] | None, new_stage: bool = False) -> None:
        """Continue from `state_dict()`; a new stage (or a history of another metric) starts afresh."""
        self.history, self.ended_at = [], None
        if not state or new_stage or state.get("metric") != self.rule.metric:
            return
        self.history = [(int(n), float(v)) for n, v in state["history"]]
        self.ended_at = None if state.get("ended_at") is None else int(state["ended_at"])

    # --- the decision -----------------------------------------------------------------------------------
    def due(self, before: int, after: int) -> bool:
        """Whether the step from `before` to `after` images of the stage crossed an evaluation."""
        return self.defined and self.ended_at is None and plateau_evaluation_due(self.stage, self.rule, before, after)

    def record(self, nimg: int, value: float) -> None:
        """One evaluation after `nimg` images of the stage; ends the stable phase here on a plateau (once it has
        lasted min_stable_kimg)."""
        self.history.append((nimg, float(value)))
        rule = self.rule
        if stable_nimg(self.stage, nimg) >= rule.min_stable_nimg and plateau_reached(
            self.values, rule.min_delta, rule.patience, self.higher_is_better
        ):
            self.ended_at = nimg

    @property
    def values(self) -> list[float]:
        """The evaluations' values, in order."""
        return [v for _, v in self.history]

    @property
    def best(self) -> tuple[int, float] | None:
        """(images of the stage, value) of the best evaluation (best by min_delta; see plateau_progress)."""
        index, _ = plateau_progress(self.values, self.rule.min_delta, self.higher_is_better)
        return None if index is None else self.history[index]

    @property
    def evals_since_best(self) -> int:
        """Evaluations since the best one."""
        return plateau_progress(self.values, self.rule.min_delta, self.higher_is_better)[1]

    def reason(self) -> str:
        """Why the stable phase ended (or will end): a plateau, its maximum, or a metric undefined here."""
        if self.ended_at is not None:
            return PLATEAU
        return MAX_STABLE if self.defined else NOT_DEFINED

    # --- what it shows ----------------------------------------------------------------------------------
    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars of the last evaluation."""
        best = self.best
        return {
            "Progress/plateau_metric": self.history[-1][1],
            "Progress/plateau_best": best[1] if best is not None else math.nan,
            "Progress/evals_since_best": self.evals_since_best,
        }

    def _stable_kimg(self, nimg: int) -> float:
        return stable_nimg(self.stage, nimg) / 1000

    def message(self, nimg: int) -> str:
        """The console line at the stage's end (after `nimg` images of it): when its stable phase ended, and why."""
        rule, name = self.rule, self.rule.metric
        head = (
            f"stage {self.stage.resolution} px: stable phase ended at {self._stable_kimg(nimg):.3f} of at most "
            f"{rule.max_stable_kimg:g} kimg (run: {(self.stage.start_nimg + nimg) / 1000:.3f} kimg): "
        )
        if not self.defined:
            return head + f"{name} is not defined below {self.smallest} px, so it ran its max_stable_kimg"
        best, since = self.best, self.evals_since_best
        best_text = (
            "no finite value" if best is None else f"best {best[1]:.4g} at {self._stable_kimg(best[0]):.3f} kimg"
        )
        improvement = f"improved by {rule.min_delta * 100:g} %"
        if self.ended_at is not None:
            return head + f"{name} has not {improvement} in {since} evaluations ({best_text})"
        return (
            head + f"reached max_stable_kimg after {len(self.history)} evaluations of {name} "
            f"({best_text}, {since} since without being {improvement})"
        )

    def record_row(self, nimg: int) -> dict[str, Any]:
        """The stage's stats.jsonl record at its end (`event: stage_advance`): when, why, and the history."""
        step = self.stage.start_nimg + nimg
        best = self.best
        return {
            "step": step,
            "kimg": step / 1000,
            "event": "stage_advance",
            "stage": self.stage.index,
            "resolution": self.stage.resolution,
            "advance": self.reason(),
            "start_kimg": self.stage.start_nimg / 1000,
            "nimg": nimg,  # images of the stage
            "fade_kimg": self.stage.fade_kimg,
            "stable_kimg": self._stable_kimg(nimg),
            "min_stable_kimg": self.rule.min_stable_kimg,
            "max_stable_kimg": self.rule.max_stable_kimg,
            "metric": self.rule.metric,
            "min_delta": self.rule.min_delta,
            "patience": self.rule.patience,
            "evaluations": [[self._stable_kimg(n), v] for n, v in self.history],  # [stable kimg, value]
            "best": best[1] if best is not None else None,
            "best_stable_kimg": self._stable_kimg(best[0]) if best is not None else None,
            "evals_since_best": self.evals_since_best,
            "message": self.message(nimg),
        }


class PlateauWatch:
    """Evaluates schedule.plateau.metric of G_ema for each stage's `Plateau`: rank 0 computes the number (with the
    metrics.* settings: num_fake, num_real, features, ...), every rank receives it."""

    def __init__(
        self,
        cfg: DictConfig,
        device: torch.device,
        autocast: contextlib.AbstractContextManager,
        monitor: Monitor,
        ranks: dist.Ranks,
    ) -> None:
        self.metric = str(cfg.schedule.plateau.metric)  # checked by check_plateau_metric
        self.family = SCORES[self.metric][0]
        self.monitor, self.ranks = monitor, ranks
        # Built before the first step on rank 0: a missing Inception file stops the run at once.
        self.metrics = MetricsWatch(cfg, [self.family], device, autocast, monitor) if ranks.is_main else None

    def begin_stage(self, stage: Stage, dataset: Dataset) -> None:
        """The stage's real subset (rank 0, where the metric is defined)."""
        if self.metrics is not None and applies_at(self.family, stage.resolution):
            self.metrics.begin_stage(stage, dataset)

    def evaluate(self, state: TrainState, progress: Progress) -> None:
        """Evaluate G_ema at the state's image count, record it in the stage's plateau and log it (TensorBoard
        `Progress/plateau_metric`, `Progress/plateau_best`, `Progress/evals_since_best`); a plateau ends the
        stage at this step."""
        value = None
        if self.metrics is not None:
            value = float(self.metrics.measure(state.G_ema, state.stage, state.nimg)[self.metric])
        value = dist.broadcast_object(value)  # rank 0's number: every rank decides alike
        state.plateau.record(state.nimg, value)
        self.monitor.scalars(state.plateau.scalars(), state.total_nimg, jsonl=None)
        if state.plateau.ended_at is not None:
            progress.end_at(state.nimg)

    def announce(self, state: TrainState, progress: Progress) -> None:
        """At the stage's end: a console line, a TensorBoard text entry (`Progress/advance`) and a stats.jsonl
        record saying when its stable phase ended and why."""
        row = state.plateau.record_row(state.nimg)
        if self.ranks.is_main:
            progress.write(row["message"])
        self.monitor.text("Progress/advance", row["message"], state.total_nimg)
        self.monitor.record("stats", row)
