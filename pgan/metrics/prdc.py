"""k-NN precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) on features.

Each real feature r_i gets a ball B(r_i, d_k(r_i)) whose radius is the distance to its k-th nearest other
real feature; the real manifold is the union of these balls (and likewise for the fakes, for recall):
- precision: the fraction of fakes inside the real manifold (fidelity);
- recall: the fraction of reals inside the fake manifold (diversity);
- density: (1 / kM) sum over fakes of how many real balls hold them, ~1 when fakes are distributed like the
  reals, above 1 when they crowd dense regions, robust to real outliers that inflate precision;
- coverage: the fraction of real balls holding at least one fake, 1 for a set against itself.
Written here because no maintained library we use has them (torchmetrics has none; the authors' `prdc`
package is NumPy-only and unmaintained); the definitions are those of the papers, `<=` on the radius included.
"""

from __future__ import annotations

import torch

_CHUNK = 4096  # rows of a pairwise-distance block: bounds memory at _CHUNK x N float64


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [len(a), len(b)] in float64."""
    return torch.cdist(a.double(), b.double())


def kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest *other* row (the row itself, at distance 0, is skipped)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} samples, got {len(features)}")
    radii = [_distances(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(_CHUNK)]
    return torch.cat(radii)


def _inside_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, how many balls B(centres[i], radii[i]) contain it."""
    counts = [(_distances(chunk, centres) <= radii).sum(1) for chunk in points.split(_CHUNK)]
    return torch.cat(counts)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall of `fake` against `real` features (k = 3 as in the paper)."""
    precision = (_inside_counts(fake, real, kth_neighbour_radii(real, k)) > 0).double().mean()
    recall = (_inside_counts(real, fake, kth_neighbour_radii(fake, k)) > 0).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Density and coverage of `fake` against `real` features (k = 5 as the paper recommends)."""
    radii = kth_neighbour_radii(real, k)
    density = _inside_counts(fake, real, radii).double().sum() / (k * len(fake))
    # coverage: a real ball is covered if its nearest fake lies inside it
    nearest_fake = torch.cat([_distances(chunk, fake).min(1).values for chunk in real.split(_CHUNK)])
    coverage = (nearest_fake <= radii).double().mean()
    return {"density": float(density), "coverage": float(coverage)}
