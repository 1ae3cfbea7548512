"""Real handwritten digits with known modes, no download: scikit-learn's 1797 bundled 8x8 digits at any resolution.

`DigitsDataset` has 10 modes (the digit). `StackedDigitsDataset` is the "stacked MNIST" construction of the
mode-collapse literature (Metz et al. 2017, VEEGAN, PacGAN) built from the same digits: three digits, one per
RGB channel, 1000 modes.

Resampling is bilinear (torch's, align_corners=False, antialiased when going below 8 px). Bicubic looks a
little sharper but overshoots [0, 1] and must be clamped; bilinear weights are convex, so the upsampled digit
is a linear function of the 8x8 one and `downsample` (its least-squares inverse) gives the 8x8 digit back
exactly. That round trip is what lets a classifier fitted on the 8x8 digits label images at any resolution
(pgan.metrics.modes). Both datasets resample by two small matrix products per item, `U @ digit @ U.T`: cheaper
than copying a cached upsampled image, and a cache of the 1797 digits would take 470 MB at 256 px.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pgan.data.labels import ClassLabels
from pgan.data.pil import pil_mode
from pgan.errors import UserError

NUM_DIGITS = 1797  # images in sklearn.datasets.load_digits
DIGIT_RESOLUTION = 8  # their native size in px
STACKED_CHANNELS = 3


@functools.cache
def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled digits as float32 [1797, 8, 8] in [0, 1] (white on black) and int64 labels [1797]."""
    try:
        from sklearn.datasets import load_digits  # lazy: only the digits sources need scikit-learn
    except ImportError as exc:
        raise UserError("data.source=digits/stacked_digits needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float()  # grey levels 0..16
    return images, torch.from_numpy(bunch.target).long()


@functools.cache
def upsample_matrix(resolution: int) -> torch.Tensor:
    """U [resolution, 8]: torch's antialiased bilinear resize of one axis, so an 8x8 image x resizes to U x U^T."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    # Bilinear resizing is separable and linear: resizing the 8 basis vectors gives its matrix's columns.
    basis = torch.eye(DIGIT_RESOLUTION, dtype=torch.float64)[:, None, None, :]
    resized = F.interpolate(basis, size=(1, resolution), mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0, 0, :].T.contiguous()


@functools.cache
def downsample_matrix(resolution: int) -> torch.Tensor:
    """P [8, resolution] = pinv(U): P U = I for resolution >= 8, the exact left inverse of `upsample_matrix`."""
    if resolution < DIGIT_RESOLUTION:
        raise ValueError(f"downsampling to 8 px needs resolution >= 8, got {resolution}")
    # (U^T U)^-1 U^T: U^T is a triangle (antialiasing) filter, the inverse a mild deblur (norm <= 1.9) that
    # undoes the blur of bilinear upsampling. For any image it returns the 8x8 image whose upsampling is
    # nearest in L2, so generated images are read the same way the real ones were made.
    return torch.linalg.pinv(upsample_matrix(resolution))


def upsample(digits: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize [..., 8, 8] images to [..., resolution, resolution] (bilinear; antialiased below 8 px)."""
    up = upsample_matrix(resolution).to(digits)  # same dtype and device
    return up @ digits @ up.T


def downsample(images: torch.Tensor) -> torch.Tensor:
    """The [..., 8, 8] images whose `upsample` is nearest to [..., R, R] `images` (R >= 8); exact on upsampled ones."""
    down = downsample_matrix(images.shape[-1]).to(images)  # same dtype and device
    return down @ images @ down.T


def _check_size_seed(name: str, size: int, seed: int) -> None:
    if size <= 0:
        raise ValueError(f"{name} needs size > 0, got {size}")
    if seed < 0:
        raise ValueError(f"{name} needs seed >= 0, got {seed}")  # numpy seeds must be non-negative


def _load(dataset: Dataset, resolution: int, channels: int, size: int, seed: int) -> None:
    """The settings and the bundled digits every digits dataset holds (after checking size and seed)."""
    _check_size_seed(type(dataset).__name__, size, seed)
    dataset.resolution = resolution
    dataset.channels = channels
    dataset.size = size
    dataset.seed = seed
    dataset.digits, dataset.labels = load_digit_images()
    dataset.up = upsample_matrix(resolution).float()


class DigitsDataset(Dataset):
    """The bundled handwritten digits as [channels, resolution, resolution] tensors in [-1, 1], 10 modes."""

    num_modes = 10

    def __init__(self, resolution: int, channels: int = 3, size: int = NUM_DIGITS, seed: int = 0) -> None:
        pil_mode(channels)  # the same one-line UserError as the other sources for channels other than 1 or 3
        _load(self, resolution, channels, size, seed)
        # Item i is digit order[i mod 1797]: a size below 1797 is a seeded random subset, a larger one repeats
        # the digits (no jitter: a repeat is exactly the same image, which keeps the data honestly real).
        self.order = torch.from_numpy(np.random.default_rng(seed).permutation(NUM_DIGITS))

    def __len__(self) -> int:
        return self.size

    def digit_index(self, index: int) -> int:
        """The index into sklearn's load_digits() of item `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for DigitsDataset of size {self.size}")
        return int(self.order[index % NUM_DIGITS])

    def mode_of(self, index: int) -> int:
        """The mode label of item `index`: its digit, 0..9."""
        return int(self.labels[self.digit_index(index)])

    def class_labels(self) -> ClassLabels:
        """The digits as classes (model.conditional=true): "0" to "9"."""
        digit_indices = self.order[torch.arange(self.size) % NUM_DIGITS]
        return ClassLabels(tuple(str(d) for d in range(10)), self.labels[digit_indices].numpy().astype(np.int64))

    def __getitem__(self, index: int) -> torch.Tensor:
        grey = (self.up @ self.digits[self.digit_index(index)] @ self.up.T).clamp(0.0, 1.0)  # clamp: float rounding
        return (grey * 2.0 - 1.0).repeat(self.channels, 1, 1)


class StackedDigitsDataset(Dataset):
    """Stacked digits: three bundled digits as the R, G and B channels, 1000 modes (100 red + 10 green + blue)."""

    num_modes = 1000

    def __init__(self, resolution: int, size: int = 50000, seed: int = 0, channels: int = STACKED_CHANNELS) -> None:
        if channels != STACKED_CHANNELS:
            raise UserError(f"data.channels must be 3 for stacked_digits (one digit per RGB channel), got {channels}")
        _load(self, resolution, channels, size, seed)

    def __len__(self) -> int:
        return self.size

    def digit_indices(self, index: int) -> tuple[int, int, int]:
        """The load_digits() indices of the red, green and blue digits of item `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for StackedDigitsDataset of size {self.size}")
        # Uniform over the 1797 digits, as Stacked MNIST draws uniformly over MNIST images: the modes are
        # then uniform up to the unequal class sizes (174 to 183 per digit).
        red, green, blue = np.random.default_rng([self.seed, index]).integers(NUM_DIGITS, size=3).tolist()
        return red, green, blue

    def mode_of(self, index: int) -> int:
        """The mode label of item `index`: 100 * red digit + 10 * green digit + blue digit, 0..999."""
        red, green, blue = (int(self.labels[i]) for i in self.digit_indices(index))
        return 100 * red + 10 * green + blue

    def class_labels(self) -> ClassLabels:
        """The 1000 modes as classes (model.conditional=true), named by their red, green and blue digits: "000"
        to "999"."""
        modes = np.fromiter((self.mode_of(i) for i in range(self.size)), dtype=np.int64, count=self.size)
        return ClassLabels(tuple(f"{m:03d}" for m in range(self.num_modes)), modes)

    def __getitem__(self, index: int) -> torch.Tensor:
        digits = self.digits[list(self.digit_indices(index))]  # [3, 8, 8]
        grey = (self.up @ digits @ self.up.T).clamp(0.0, 1.0)  # clamp: float rounding
        return grey * 2.0 - 1.0
