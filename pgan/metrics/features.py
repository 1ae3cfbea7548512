"""Feature spaces for the distribution metrics (FID, KID, precision/recall, density/coverage).

Two spaces, chosen by `features`:
- `inception`: the standard FID network, torch-fidelity's port of the TF Inception-v3 of 2015-12-05 (2048-d
  pool3 features, the numbers papers report), through torchmetrics. Its weights are never downloaded here:
  they come from `inception_weights=PATH` or from the file torch.hub's cache already holds (where
  torchmetrics / torch-fidelity put it on a machine with internet); anything else is a one-line error.
- `random`: `pgan.metrics.diversity.RandomEmbedding`, a fixed seeded random-init conv net (2048-d). Offline,
  deterministic, good at telling layouts and colours apart; its numbers are comparable only with each other,
  never with published FIDs.
- `auto`: inception when its weights are on this machine, else random (for FID/KID the caller refuses
  random-by-default: a random-feature FID must be asked for by name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pgan.errors import UserError, first_line
from pgan.metrics.diversity import RandomEmbedding

# The file name torch-fidelity's download URL ends in; torch.hub.load_state_dict_from_url caches it under
# <torch hub dir>/checkpoints/ with this name.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_SPACES = ("auto", "inception", "random")
FEATURE_BATCH = 64  # images per feature-extractor call (Inception at 299 px: ~0.6 GB of activations per 64)


@dataclass
class FeatureSpace:
    """A named image -> feature map: `extract(images in [-1, 1]) -> [N, D] float64 on the CPU`."""

    name: str  # "inception" or "random"
    network: nn.Module

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
        """Features of `images` ([N, C, H, W] in [-1, 1], C = 1 or 3), in batches, as float64 on the CPU."""
        device = next(self.network.parameters()).device
        out = [self.network(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 2048, dtype=torch.float64)


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (torch-fidelity's FID network) on images in [-1, 1]: [N, 2048] pool3 features."""

    def __init__(self, weights: Path) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except (ImportError, ModuleNotFoundError) as exc:
            raise UserError("Inception features need torch-fidelity: pip install 'pgan[inception]'") from exc
        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
            )
        except ModuleNotFoundError as exc:  # torchmetrics raises this when torch-fidelity is missing
            raise UserError("Inception features need torch-fidelity: pip install 'pgan[inception]'") from exc
        except Exception as exc:  # a file that is not these weights: unpickling or load_state_dict fails
            raise UserError(f"inception_weights={weights}: not Inception-v3 FID weights ({first_line(exc)})") from exc

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> [N, 2048]; the network resizes to 299 px itself, like the TF original."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        # The FID network was fed uint8 images; quantise the same way as the PNGs a paper's FID is computed on.
        uint8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.inception(uint8).reshape(len(images), -1)


def hub_inception_weights() -> Path:
    """Where torch.hub's cache keeps the Inception weights a download by torchmetrics / torch-fidelity left."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(path: str | os.PathLike | None, keys: str = "") -> Path | None:
    """The weights file: `path` when given (it must exist), else torch.hub's cached copy, else None. `keys`:
    the prefix of the command's keys in messages (the trainer's are `metrics.`)."""
    if path is not None:
        weights = Path(path).expanduser()
        if not weights.is_file():
            raise UserError(f"{keys}inception_weights={path}: no such file")
        return weights
    cached = hub_inception_weights()
    return cached if cached.is_file() else None


def feature_space(
    kind: str,
    weights: str | os.PathLike | None,
    device: torch.device,
    *,
    random_by_default: bool = True,
    keys: str = "",
) -> FeatureSpace:
    """The feature space `kind` (auto | inception | random) on `device`.

    With `random_by_default=False` (FID/KID requested), `auto` without Inception weights is an error rather
    than a quiet switch to random features, whose numbers must never be mistaken for a published-style FID.
    """
    found = check_feature_space(kind, weights, random_by_default=random_by_default, keys=keys)
    if found is not None:
        return FeatureSpace("inception", InceptionFeatures(found).to(device).eval())
    return FeatureSpace("random", RandomEmbedding().to(device).eval())


def check_feature_space(
    kind: str, weights: str | os.PathLike | None, *, random_by_default: bool = True, keys: str = ""
) -> Path | None:
    """`feature_space`'s checks without building it: the Inception weights it would use (None: random features),
    or its one-line error naming the command's keys (prefixed by `keys`). The trainer checks before writing."""
    if kind not in FEATURE_SPACES:
        raise UserError(f"{keys}features={kind}: unknown (available: {', '.join(FEATURE_SPACES)})")
    found = find_inception_weights(weights, keys) if kind != "random" else None
    if kind == "inception" or (kind == "auto" and found is not None):
        if found is None:
            raise UserError(missing_weights_message(keys))
        return found
    if kind == "auto" and not random_by_default:
        offline = f", or {keys}features=random for offline (non-standard) FID/KID"
        raise UserError(missing_weights_message(keys) + offline)
    return None


def missing_weights_message(keys: str = "") -> str:
    """The one line saying where Inception weights were looked for (`keys`: the command's key prefix)."""
    return (
        f"Inception-v3 FID weights not found (looked for {hub_inception_weights()}; nothing is downloaded): "
        f"pass {keys}inception_weights=PATH to a copy of {INCEPTION_FILE}"
    )
