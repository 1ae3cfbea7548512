"""Quality metrics of generated images against real ones, by name: what `pgan-eval metrics=[...]` and the
trainer's `metrics.every_kimg` compute.

- fid: the Fréchet distance of feature statistics (written here for speed, checked against torchmetrics'),
  kid: the kernel distance, computed by torchmetrics on features we extract once (`pgan.metrics.features`)
  and hand over through an identity "feature extractor".
- swd: sliced Wasserstein distance on Laplacian pyramids (`pgan.metrics.swd`), in pixel space.
- pr: k-NN precision / recall; coverage: density / coverage (`pgan.metrics.prdc`), in the feature space.
- modes: modes covered and KL to uniform, for datasets with known modes (`pgan.metrics.modes`).
- diversity: the collapse flag's metrics are computed by `pgan.metrics.diversity` (pgan-eval handles them).

A `QualityEvaluator` keeps what depends only on the real images (their features, their pixels for SWD), so
evaluating a stream of generator snapshots against one real set costs only the fakes' side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from pgan.errors import UserError
from pgan.metrics.features import FeatureSpace, check_feature_space, feature_space
from pgan.metrics.modes import ModeClassifier, digit_kl, mode_coverage
from pgan.metrics.prdc import density_coverage, precision_recall
from pgan.metrics.swd import MIN_RESOLUTION as SWD_MIN_RESOLUTION
from pgan.metrics.swd import swd

QUALITY_METRICS = ("fid", "kid", "swd", "pr", "coverage", "modes")
FEATURE_METRICS = ("fid", "kid", "pr", "coverage")  # the ones computed in a feature space
# The single numbers of those metrics that a run can act on (schedule.plateau.metric): the metric that computes
# each, and whether a higher value is better.
SCORES: dict[str, tuple[str, bool]] = {
    "swd": ("swd", False),
    "fid": ("fid", False),
    "kid": ("kid", False),
    "precision": ("pr", True),
    "recall": ("pr", True),
    "density": ("coverage", True),
    "coverage": ("coverage", True),
    "modes_covered": ("modes", True),
    "kl_to_uniform": ("modes", False),
}
KID_SUBSETS = 100  # torchmetrics' default and the KID paper's protocol
KID_SUBSET_SIZE = 1000  # capped at the number of samples


class Precomputed(nn.Module):
    """An identity "feature extractor": lets torchmetrics' FID/KID take features we already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to `real` and `fake` features ([N, D] each, N >= 2).

    |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2)), the number torchmetrics' FID gives (the tests
    compare them), computed differently: torchmetrics takes a general eigendecomposition of the D x D product
    S_r S_f (54 s for D = 2048 on this project's 2-core machine, too slow to run inside training). With
    S = A A^T / (n - 1) for the centred features A, the nonzero eigenvalues of S_r S_f are the squared singular
    values of A_r^T A_f / sqrt((n_r - 1)(n_f - 1)), so the trace term is that matrix's nuclear norm: an
    n_r x n_f SVD. With more samples than dimensions, two symmetric D x D eigendecompositions do the same.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 real and 2 fake feature vectors")
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    a_r = (real - mu_r) / math.sqrt(len(real) - 1)  # S_r = a_r^T a_r (rows are samples here)
    a_f = (fake - mu_f) / math.sqrt(len(fake) - 1)
    if min(len(real), len(fake)) <= real.shape[1]:
        trace_sqrt = torch.linalg.svdvals(a_r @ a_f.T).sum()
    else:
        evals, evecs = torch.linalg.eigh(a_r.T @ a_r)
        sqrt_r = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
        inner = sqrt_r @ (a_f.T @ a_f) @ sqrt_r
        trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_r - mu_f).square().sum() + a_r.square().sum() + a_f.square().sum() - 2 * trace_sqrt
    return float(distance)


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance (mean, std over subsets) of `real` and `fake` features (torchmetrics' KID)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": that is what we hand it, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=KID_SUBSETS, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    # KID draws its subsets from the global RNG: fork it, so a metric inside training changes no random stream
    # (exact resume), and seed it, so the same inputs give the same number.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def nearest_k(names: Sequence[str], pr_k: int, coverage_k: int) -> int:
    """The largest k of the k-NN metrics among `names`: each set needs more images than that (0: neither asked)."""
    return max(int(pr_k) if "pr" in names else 0, int(coverage_k) if "coverage" in names else 0)


def features_for(
    names: Sequence[str], kind: str, weights: str | None, device: torch.device, keys: str = ""
) -> FeatureSpace | None:
    """The feature space `kind` for the metrics `names` (None if none of them needs one); with fid / kid asked
    for, `auto` without Inception weights is an error rather than random features (see `feature_space`)."""
    if not any(n in FEATURE_METRICS for n in names):
        return None
    return feature_space(str(kind), weights, device, random_by_default=not wants_fid(names), keys=keys)


def check_features_for(names: Sequence[str], kind: str, weights: str | None, keys: str = "") -> None:
    """`features_for`'s one-line errors, without loading any weights (the trainer checks before it writes)."""
    if any(n in FEATURE_METRICS for n in names):
        check_feature_space(str(kind), weights, random_by_default=not wants_fid(names), keys=keys)


def wants_fid(names: Sequence[str]) -> bool:
    """Whether FID or KID is among `names` (they need Inception features, or an explicit features=random)."""
    return any(n in ("fid", "kid") for n in names)


def check_metric_names(names: Sequence[str], available: Sequence[str] = QUALITY_METRICS) -> list[str]:
    """`names` as a list, or a user error naming the unknown ones. One name given as a string (`metrics=modes`)
    is that name, not its letters."""
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserError(f"metrics: unknown {', '.join(unknown)} (available: {', '.join(available)})")
    return names


class QualityEvaluator:
    """Computes the named quality metrics of fake batches against one fixed set of real images."""

    def __init__(
        self,
        names: Sequence[str],
        reals: torch.Tensor,
        *,
        features: FeatureSpace | None = None,
        modes: ModeClassifier | None = None,
        seed: int = 0,
        pr_k: int = 3,
        coverage_k: int = 5,
    ) -> None:
        self.names = [n for n in check_metric_names(names) if n in QUALITY_METRICS]
        self.seed, self.pr_k, self.coverage_k = seed, pr_k, coverage_k
        self.resolution = reals.shape[-1]
        if "swd" in self.names and self.resolution < SWD_MIN_RESOLUTION:
            raise UserError(f"swd needs images of at least {SWD_MIN_RESOLUTION} px, got {self.resolution} px")
        needs_features = [n for n in self.names if n in FEATURE_METRICS]
        if needs_features and features is None:
            raise ValueError(f"{', '.join(needs_features)} need a feature space")
        if "modes" in self.names and modes is None:
            raise ValueError("modes needs a mode classifier")
        smallest_k = nearest_k(self.names, pr_k, coverage_k)
        if smallest_k and len(reals) <= smallest_k:
            raise UserError(f"pr / coverage with k={smallest_k} need more than {smallest_k} real images")
        self.features, self.modes = features, modes
        self.reals = reals if "swd" in self.names else None  # SWD works on pixels
        self.real_features = features.extract(reals) if needs_features else None

    def __call__(self, fakes: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float | int | str]:
        """The metrics of `fakes` ([N, C, R, R] in [-1, 1], the reals' resolution) as a flat dict. `labels`: the
        classes a conditional G generated `fakes` in, when its classes are the dataset's modes; `modes` then
        also gives class_accuracy (how often the classifier reads back the asked-for class) and its worst
        class's value."""
        if fakes.shape[-1] != self.resolution:
            raise ValueError(f"fakes are {fakes.shape[-1]} px, the reals {self.resolution} px")
        result: dict[str, float | int | str] = {}
        fake_features = None
        if self.real_features is not None:
            fake_features = self.features.extract(fakes)
            result["features"] = self.features.name
        real_features = self.real_features
        if "fid" in self.names:
            result["fid"] = fid_from_features(real_features, fake_features)
        if "kid" in self.names:
            result["kid"], result["kid_std"] = kid_from_features(real_features, fake_features, self.seed)
        if "pr" in self.names:
            result |= precision_recall(real_features, fake_features, self.pr_k)
        if "coverage" in self.names:
            result |= density_coverage(real_features, fake_features, self.coverage_k)
        if "swd" in self.names:
            result |= swd(self.reals.to(fakes.device), fakes, seed=self.seed)
        if "modes" in self.names:
            predicted = self.modes.predict(fakes)
            result |= mode_coverage(predicted, self.modes.num_modes)
            if self.modes.source == "stacked_digits":
                result |= digit_kl(predicted)
            if labels is not None:
                result |= class_accuracy(predicted, labels)
        return result


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How often a class-conditional G's samples are read back as the class they were generated in (the mode
    classifier's prediction equals the label), overall and for its worst class."""
    hit = predicted.flatten().cpu() == labels.flatten().cpu()
    per_class = [hit[labels.cpu() == c].float().mean().item() for c in labels.unique().tolist()]
    return {"class_accuracy": hit.float().mean().item(), "class_accuracy_worst": min(per_class)}
