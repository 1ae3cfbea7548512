"""Quality metrics during training: every `metrics.every_kimg` (and at the end of every stage), a fixed latent
batch through G_ema and `pgan.metrics.quality` against a fixed seeded subset of the stage's real images,
faded by the same alpha as the images D sees. Logged as TensorBoard scalars `Metrics/<name>` and as a line of
`metrics.jsonl`, by rank 0 only.

Like the collapse watch, nothing here touches the training RNG (the latents and the real subset have their own
seeded generators, KID forks the RNG), so turning metrics on never changes the training trajectory, and it
carries no state: a resumed run evaluates at the same kimg as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from pgan.errors import UserError
from pgan.metrics.diversity import sample_dataset
from pgan.metrics.features import FEATURE_SPACES, FeatureSpace
from pgan.metrics.modes import MODE_SOURCES, ModeClassifier, mode_classifier_for, no_classifier_message
from pgan.metrics.modes import WORKING_RESOLUTION as MODES_MIN_RESOLUTION
from pgan.metrics.quality import (
    QUALITY_METRICS,
    QualityEvaluator,
    check_features_for,
    check_metric_names,
    features_for,
    nearest_k,
)
from pgan.metrics.swd import MIN_RESOLUTION as SWD_MIN_RESOLUTION
from pgan.monitor import Monitor
from pgan.networks import Generator, g_architecture_of
from pgan.schedule import Stage, alpha_at
from pgan.train.step import fade_reals
from pgan.train.watch import evaluation_samples

LATENT_SEED_OFFSET = 15_485_863  # the metrics' latents: their own stream, apart from the collapse watch's
REAL_SEED_OFFSET = 32_452_843  # and their own real subset
# The smallest resolution each metric is computed at (smaller stages skip it): SWD's pyramid starts at 16 px,
# the mode classifiers work at 8.
SMALLEST_RESOLUTION = {"swd": SWD_MIN_RESOLUTION, "modes": MODES_MIN_RESOLUTION}


def applies_at(name: str, resolution: int) -> bool:
    """Whether the metric `name` is computed at `resolution` px."""
    return resolution >= SMALLEST_RESOLUTION.get(name, 1)


def check_metrics_config(cfg: DictConfig) -> list[str]:
    """The metric names of `cfg.metrics`, checked (one-line errors for unknown names and bad settings)."""
    m = cfg.metrics
    names = check_metric_names(m.names, QUALITY_METRICS)
    if m.every_kimg is not None and float(m.every_kimg) <= 0:
        raise UserError(f"metrics.every_kimg must be > 0 (or null: off), got {m.every_kimg}")
    for key in ("num_fake", "num_real"):
        if int(m[key]) < 2:
            raise UserError(f"metrics.{key} must be >= 2, got {m[key]}")
    if str(m.features) not in FEATURE_SPACES:
        raise UserError(f"metrics.features={m.features}: unknown (available: {', '.join(FEATURE_SPACES)})")
    if "modes" in names and str(cfg.data.source) not in MODE_SOURCES:
        raise UserError("metrics.names: modes: " + no_classifier_message(str(cfg.data.source)))
    k = nearest_k(names, m.pr_k, m.coverage_k)
    if k and min(int(m.num_fake), int(m.num_real)) <= k:
        raise UserError(f"metrics.num_fake and num_real must be > {k} for pr / coverage with k={k}")
    if m.every_kimg is not None:
        check_features_for(names, m.features, m.inception_weights, keys="metrics.")
    return names


class MetricsWatch:
    """Evaluates the configured quality metrics of G_ema at a stage's resolution and logs them."""

    def __init__(
        self,
        cfg: DictConfig,
        names: Sequence[str],
        device: torch.device,
        autocast: contextlib.AbstractContextManager,
        monitor: Monitor,
    ) -> None:
        self.names = list(names)  # check_metrics_config(cfg)'s result
        m = cfg.metrics
        self.cfg, self.device, self.autocast, self.monitor = m, device, autocast, monitor
        self.seed = int(cfg.seed)
        self.g_architecture = g_architecture_of(cfg.model)  # how its reals are faded
        # Resolved once, before the first step: a missing Inception file stops the run at once, not at 1st eval.
        self.features: FeatureSpace | None = features_for(
            self.names, m.features, m.inception_weights, device, keys="metrics."
        )
        # Checked at start too: "modes" on data without known modes is a config error, not a mid-run surprise.
        self.modes: ModeClassifier | None = mode_classifier_for(cfg.data) if "modes" in self.names else None
        gen = torch.Generator().manual_seed(self.seed + LATENT_SEED_OFFSET)
        self.z = torch.randn(int(m.num_fake), int(cfg.model.latent_dim), generator=gen)
        self._reals: torch.Tensor | None = None  # float images of the current stage on the CPU
        self._evaluator: tuple[float, QualityEvaluator] | None = None  # (alpha, evaluator) of the last evaluation

    def names_at(self, resolution: int) -> list[str]:
        """The metrics that apply at `resolution`: SWD needs 16 px, the mode classifiers 8; smaller are skipped."""
        return [n for n in self.names if applies_at(n, resolution)]

    def begin_stage(self, stage: Stage, dataset: Dataset) -> None:
        """Load this stage's real images: the same seeded subset on every run and resume."""
        self._reals = sample_dataset(dataset, int(self.cfg.num_real), seed=self.seed + REAL_SEED_OFFSET)
        self._evaluator = None

    def evaluator(self, alpha: float) -> QualityEvaluator:
        """The evaluator against the reals faded by `alpha` (rebuilt when alpha moved, i.e. during a fade)."""
        if self._evaluator is None or self._evaluator[0] != alpha:
            reals = fade_reals(self._reals.to(self.device), alpha, self.g_architecture)
            names = self.names_at(reals.shape[-1])
            evaluator = QualityEvaluator(
                names,
                reals,
                features=self.features,
                modes=self.modes,
                seed=self.seed,
                pr_k=int(self.cfg.pr_k),
                coverage_k=int(self.cfg.coverage_k),
            )
            self._evaluator = (alpha, evaluator)
        return self._evaluator[1]

    def samples(self, G_ema: Generator, alpha: float) -> torch.Tensor:
        """G_ema's images for the fixed latents, float32 in [-1, 1]."""
        return evaluation_samples(G_ema, self.z, alpha, self.autocast).clamp(-1, 1)

    def measure(self, G_ema: Generator, stage: Stage, nimg: int) -> dict[str, float | int | str]:
        """The metrics of G_ema at `nimg` images into `stage` (nothing logged)."""
        alpha = alpha_at(stage, nimg)
        return self.evaluator(alpha)(self.samples(G_ema, alpha))

    def evaluate(self, G_ema: Generator, stage: Stage, nimg: int) -> dict[str, float]:
        """Compute, log (`Metrics/*`, metrics.jsonl) and return the metrics at `nimg` images into `stage`."""
        start = time.perf_counter()
        alpha = alpha_at(stage, nimg)
        result = self.measure(G_ema, stage, nimg)
        numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = stage.start_nimg + nimg
        seconds = time.perf_counter() - start
        self.monitor.scalars({f"Metrics/{k}": v for k, v in numbers.items()} | {"Metrics/eval_s": seconds}, step, None)
        self.monitor.record(
            "metrics",
            {
                "step": step,
                "kimg": step / 1000,
                "stage": stage.index,
                "resolution": stage.resolution,
                "alpha": alpha,
                "eval_s": seconds,
                **result,
            },
        )
        return numbers
