"""Mode coverage: label generated images with the mode of a dataset with known modes, then count the modes hit.

No pretrained weights: each classifier is an RBF support-vector machine (scikit-learn's SVC) fitted in-process
on the dataset's own labelled real images at 8x8 px, in 1.5 to 3 s on one CPU core. Images at any
resolution >= 8 are brought down to 8x8 the way the dataset itself relates its resolutions, so a real image
at any resolution reaches the classifier as (nearly) the same 8x8 input it was fitted on:

- shapes: box-filter (area) downsampling, the filter the renderer itself uses on its 4x supersampled mask:
  renders at 16 to 256 px box-filtered to 8 px differ from each other only where the rasterisation of an
  edge does (mean absolute difference below 0.01 on the [-1, 1] scale).
- digits, stacked digits: the least-squares inverse of the datasets' bilinear upsampling
  (pgan.data.digits.downsample), which returns the bundled 8x8 digit exactly. Stacked digits classify each RGB
  channel with the one digit classifier, as the Stacked-MNIST protocol does with its MNIST classifier.

`mode_coverage` then reports the modes covered and KL(p_hat || uniform) in nats, the numbers the
Stacked-MNIST literature (VEEGAN, PacGAN) reports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pgan.data import digits
from pgan.data.digits import DigitsDataset, StackedDigitsDataset
from pgan.data.prepared import PreparedImages
from pgan.data.shapes import NUM_MODES as SHAPES_NUM_MODES
from pgan.data.shapes import ShapesDataset
from pgan.errors import UserError

WORKING_RESOLUTION = 8  # px; every classifier sees 8x8 images

# Shapes are rendered for training from this seed, never the default data.seed, so the items of a shapes
# dataset with a small seed are images the classifier has not seen.
SHAPES_TRAIN_SEED = 2_147_483_647
SHAPES_TRAIN_ITEMS = 6000  # held-out accuracy 0.99 RGB, 0.97 grey (3000 items: 0.97 RGB); 2-3 s to render + fit
# Rendered at 16 px and box-filtered to 8: closer to what larger images look like after the same filter than an
# 8 px render (whose coarser 32 px rasterisation differs at edges), and measured better at every size (0.994 at
# 8 px, 0.996 at 16 to 256 px, against 0.993 and 0.989 for 8 px renders).
SHAPES_RENDER_RESOLUTION = 16
SHAPES_SVC_C = 100.0  # the classes are nearly separable at 8 px; a soft margin (C=10) costs 3 points of accuracy
DIGITS_SVC_C = 10.0
DIGITS_SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))  # 1 px translations: +1.3 points held-out accuracy

MODE_SOURCES = ("shapes", "digits", "stacked_digits")  # the data.source values with known modes
_PREDICT_CHUNK = 1024  # images per SVC call: bounds the [chunk, num_support_vectors] kernel matrix


def _svc(c: float) -> Any:
    """An unfitted RBF SVC (scikit-learn imported lazily, like the digits datasets)."""
    try:
        from sklearn.svm import SVC
    except ImportError as exc:
        raise UserError("mode classifiers need scikit-learn: pip install scikit-learn") from exc
    return SVC(C=c, gamma="scale")  # deterministic: no probability calibration, no random state involved


def area_downsample(images: torch.Tensor) -> torch.Tensor:
    """[N, C, R, R] -> [N, C, 8, 8] by box filtering (exact averaging when R is a multiple of 8)."""
    return F.interpolate(images, size=WORKING_RESOLUTION, mode="area")


class ModeClassifier:
    """Labels images in [-1, 1] of any resolution >= 8 with one of `num_modes` modes of a known dataset."""

    def __init__(self, estimator: Any, num_modes: int, source: str, channels: int | None) -> None:
        self.estimator = estimator  # a fitted scikit-learn classifier on flattened 8x8 features
        self.num_modes = num_modes
        self.source = source  # "shapes", "digits" or "stacked_digits": picks the downsampling and features
        self.channels = channels  # channels the images must have; None: any (digits are averaged to grey)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, R, R] images -> the [M, D] float64 rows the estimator classifies (M = 3N for stacked digits)."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"expected square NCHW images, got shape {tuple(images.shape)}")
        if images.shape[-1] < WORKING_RESOLUTION:
            raise ValueError(f"mode classifiers need images of at least 8 px, got {images.shape[-1]}")
        if self.channels is not None and images.shape[1] != self.channels:
            raise ValueError(f"the {self.source} classifier expects {self.channels} channels, got {images.shape[1]}")
        # Downsample in float32 where the images are (a GPU batch stays there), then hand scikit-learn the
        # small float64 result it works in.
        images = images.detach().float()
        small = area_downsample(images) if self.source == "shapes" else digits.downsample(images)  # [N, C, 8, 8]
        small = small.to("cpu", torch.float64)
        if self.source == "shapes":
            return small.flatten(1)
        if self.source == "digits":
            small = small.mean(1, keepdim=True)  # a 3-channel digit is one grey digit repeated
        return small.flatten(2).flatten(0, 1)  # stacked: one row per channel, in R, G, B order

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The mode label (int64, in [0, num_modes)) of each image of an [N, C, R, R] batch in [-1, 1]."""
        rows = self.features(images)
        if rows.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long)
        labels = torch.cat(
            [torch.from_numpy(self.estimator.predict(chunk.numpy())) for chunk in rows.split(_PREDICT_CHUNK)]
        ).long()
        if self.source == "stacked_digits":
            red, green, blue = labels.view(-1, 3).unbind(1)
            return 100 * red + 10 * green + blue
        return labels


def train_shapes_classifier(
    channels: int = 3, num_items: int = SHAPES_TRAIN_ITEMS, seed: int = SHAPES_TRAIN_SEED
) -> ModeClassifier:
    """A 16-mode classifier fitted on `num_items` shapes rendered from `seed` with `channels` channels."""
    dataset = ShapesDataset(SHAPES_RENDER_RESOLUTION, size=num_items, seed=seed, channels=channels)
    images = area_downsample(torch.stack([dataset[i] for i in range(num_items)])).double()
    labels = np.array([dataset.mode_of(i) for i in range(num_items)])
    estimator = _svc(SHAPES_SVC_C).fit(images.flatten(1).numpy(), labels)
    return ModeClassifier(estimator, SHAPES_NUM_MODES, "shapes", channels)


def train_digits_classifier(exclude: Collection[int] = ()) -> ModeClassifier:
    """A 10-mode digit classifier fitted on the bundled digits whose load_digits() index is not in `exclude`."""
    images, labels = digits.load_digit_images()
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[list(exclude)] = False  # `exclude` lets tests hold digits out and measure accuracy on unseen writers
    grey = images[keep].double() * 2.0 - 1.0  # [n, 8, 8], the [-1, 1] range of the datasets' items
    # 1 px shifts teach the classifier that position is a nuisance; the border brought in is background (-1).
    padded = F.pad(grey, (1, 1, 1, 1), value=-1.0)
    shifted = [padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy, dx in DIGITS_SHIFTS]
    features = torch.cat(shifted).flatten(1).numpy()
    estimator = _svc(DIGITS_SVC_C).fit(features, labels[keep].repeat(len(DIGITS_SHIFTS)).numpy())
    return ModeClassifier(estimator, DigitsDataset.num_modes, "digits", None)


def stacked(digit_classifier: ModeClassifier) -> ModeClassifier:
    """The 1000-mode stacked-digits classifier that applies `digit_classifier` to each RGB channel."""
    if digit_classifier.source != "digits":
        raise ValueError(f"stacked() needs a digits classifier, got a {digit_classifier.source} one")
    return ModeClassifier(digit_classifier.estimator, StackedDigitsDataset.num_modes, "stacked_digits", 3)


@functools.cache
def _cached_classifier(source: str, channels: int) -> ModeClassifier:
    """The classifier for `source` (fitted on first use; `channels` only matters for shapes)."""
    if source == "shapes":
        return train_shapes_classifier(channels)
    if source == "digits":
        return train_digits_classifier()
    if source == "stacked_digits":
        return stacked(_cached_classifier("digits", 0))  # the same fitted digit classifier, once per process
    raise UserError(no_classifier_message(source))


def no_classifier_message(source: str) -> str:
    """The one line for mode coverage asked of data without known modes."""
    return f"no mode classifier for data.source={source}: mode coverage needs data=shapes, digits or stacked_digits"


def mode_classifier_for(data: Dataset | Mapping) -> ModeClassifier:
    """The mode classifier for a dataset instance or a data config (cfg.data); fitted once per process."""
    if isinstance(data, PreparedImages) and data.source is not None:
        data = data.source  # a prepared store: the dataset it was made from
    if isinstance(data, Mapping):
        source, channels = str(data.get("source")), int(data.get("channels", 3))
    elif isinstance(data, ShapesDataset):
        source, channels = "shapes", data.channels
    elif isinstance(data, StackedDigitsDataset):
        source, channels = "stacked_digits", 3
    elif isinstance(data, DigitsDataset):
        source, channels = "digits", data.channels
    else:
        raise UserError(f"no mode classifier for {type(data).__name__}: mode coverage needs shapes or digits data")
    # Only the shapes classifier depends on the channels (RGB or luma renders); the digits are grey either way.
    return _cached_classifier(source, channels if source == "shapes" else 0)


def mode_coverage(labels: torch.Tensor, num_modes: int) -> dict[str, float | int]:
    """Modes covered and KL(empirical mode histogram || uniform) in nats of a batch of predicted mode labels."""
    labels = labels.flatten().long().cpu()
    if labels.numel() == 0:
        raise ValueError("mode_coverage needs at least one label")
    if labels.min() < 0 or labels.max() >= num_modes:
        raise ValueError(f"mode labels must lie in [0, {num_modes}), got {labels.min()}..{labels.max()}")
    counts = torch.bincount(labels, minlength=num_modes)
    return {
        "num_samples": labels.numel(),
        "num_modes": num_modes,
        "modes_covered": int((counts > 0).sum()),
        "kl_to_uniform": _kl_to_uniform(counts),
        "max_kl": math.log(num_modes),  # the KL of a fully collapsed generator (one mode), for scale
    }


def digit_kl(labels: torch.Tensor) -> dict[str, float]:
    """KL(digit histogram || uniform over 10) in nats of each channel of stacked-digits mode labels (0..999).

    Where a stacked-digits KL comes from: with these near 0 and the joint KL high, G pairs its digits unevenly
    (coverage); with these high, it draws some digits too often in a channel (fidelity: a blurred or ambiguous
    digit is read as whichever digit it is closest to, for this classifier often an 8). The joint KL is always
    at least their sum (equal when the channels are independent); the rest is how unevenly G pairs digits."""
    labels = labels.flatten().long().cpu()
    digits_by_channel = {"red": labels // 100, "green": labels // 10 % 10, "blue": labels % 10}
    return {
        f"kl_digits_{name}": _kl_to_uniform(torch.bincount(d, minlength=10)) for name, d in digits_by_channel.items()
    }


def _kl_to_uniform(counts: torch.Tensor) -> float:
    """KL(counts / their sum || uniform over len(counts)) in nats."""
    p_hat = counts.double() / counts.sum()
    seen = p_hat > 0  # 0 log 0 = 0
    kl = float((p_hat[seen] * torch.log(p_hat[seen] * len(counts))).sum())
    return max(kl, 0.0)  # >= 0 in exact arithmetic; clip the -1e-16 of rounding
