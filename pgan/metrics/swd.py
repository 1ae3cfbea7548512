"""Sliced Wasserstein distance between two image sets on Laplacian pyramids: the ProGAN paper's own metric
(Karras et al. 2018, section 5 and appendix D), needing no pretrained network.

The recipe, as the paper and its official code (`metrics/sliced_wasserstein.py`) define it:

- Each image's Laplacian pyramid, from its resolution down to 16 px: every level is the Gaussian level
  minus the upsampled next one, the last is the 16 px Gaussian level. The filter is the 5x5 binomial
  [1, 4, 6, 4, 1]^2 / 256 with mirrored borders; upsampling inserts zeros and filters with 4 x that filter.
- From every level, 128 descriptors per image: 7x7 neighbourhoods of all channels at uniformly random
  positions (fully inside the image).
- Each set's descriptors are normalised per level and per channel: its own mean subtracted and its own
  standard deviation divided out.
- SWD between the two sets of descriptors at one level: 4 repeats of 128 random unit directions. The
  descriptors are projected on each direction, both projections sorted, and the mean absolute difference
  taken, averaged over all directions.
- Reported x 1e3 per level (`swd_<res>`, fine to coarse) and their mean (`swd`), like the paper's tables.

Lower is closer. Both sets must have the same number of images (the sorted projections are compared
element by element); the larger one is cut to the smaller one's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16
# Images per pyramid computation: the filter's padded and zero-stuffed temporaries then stay about 0.1 GB at
# 256 px, where the whole set at once took 12 GB for 1,000 images (each image's pyramid is its own, so the
# levels are the same).
PYRAMID_CHUNK = 64

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
_GAUSS = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0  # the 5x5 filter, which _filter applies as two 1-D passes


def _filter(images: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The 5x5 binomial filter (x gain), per channel, with mirrored borders; same size out. Applied as its two
    1-D factors [1, 4, 6, 4, 1] / 16, each as five shifted, weighted slices added up (equal to the 2-D
    convolution up to float rounding, mirrored padding being per axis too): 3x faster than that convolution
    on the CPU, and no unfolded temporaries."""
    taps = (_BINOMIAL / 16.0).tolist()
    for dim in (-1, -2):
        size = images.shape[dim]
        padded = F.pad(images, (2, 2, 0, 0) if dim == -1 else (0, 0, 2, 2), mode="reflect")
        images = padded.narrow(dim, 0, size) * taps[0]
        for shift in range(1, 5):
            images.add_(padded.narrow(dim, shift, size), alpha=taps[shift])
    return images * gain if gain != 1.0 else images


def pyramid_down(images: torch.Tensor) -> torch.Tensor:
    """Gaussian pyramid step: filter, then keep every second row and column."""
    return _filter(images)[..., ::2, ::2]


def pyramid_up(images: torch.Tensor) -> torch.Tensor:
    """Inverse step: insert zeros between rows and columns, then filter with 4 x the filter."""
    n, c, h, w = images.shape
    up = images.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = images
    return _filter(up, gain=4.0)


def laplacian_pyramid(images: torch.Tensor, min_resolution: int = MIN_RESOLUTION) -> list[torch.Tensor]:
    """Band-pass levels from the images' resolution down to `min_resolution`, then the low-pass residual."""
    levels = []
    while images.shape[-1] > min_resolution:
        smaller = pyramid_down(images)
        levels.append(images - pyramid_up(smaller))
        images = smaller
    levels.append(images)
    return levels


def _pyramid_levels(images: torch.Tensor) -> list[torch.Tensor]:
    """The Laplacian pyramid of [-1, 1] images on the 0..255 scale (as the official code), PYRAMID_CHUNK images
    at a time."""
    chunks = [laplacian_pyramid((chunk.float() + 1) * 127.5) for chunk in images.split(PYRAMID_CHUNK)]
    return [torch.cat(level) for level in zip(*chunks, strict=True)]


def descriptors(level: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """NHOODS_PER_IMAGE random 7x7 neighbourhoods of each image, normalised per channel over the whole set:
    [images x NHOODS_PER_IMAGE, channels x 7 x 7]."""
    n, _c, h, w = level.shape
    half = NHOOD_SIZE // 2
    count = n * NHOODS_PER_IMAGE
    which = torch.arange(count) // NHOODS_PER_IMAGE
    ys = torch.randint(half, h - half, (count,), generator=generator)
    xs = torch.randint(half, w - half, (count,), generator=generator)
    offsets = torch.arange(-half, half + 1)
    rows, cols = (ys[:, None] + offsets)[:, :, None], (xs[:, None] + offsets)[:, None, :]
    patches = level[which[:, None, None].to(level.device), :, rows.to(level.device), cols.to(level.device)]
    patches = patches.permute(0, 3, 1, 2).double()  # [count, channels, 7, 7]
    patches = patches - patches.mean(dim=(0, 2, 3), keepdim=True)
    patches = patches / patches.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
    return patches.reshape(count, -1)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of `x` (contiguous) sorted ascending; on the CPU in place with numpy's sort, about 3x torch.sort
    along the rows and 1.7x along the columns here (64k values per row, 1 thread)."""
    if x.device.type == "cpu":
        x.numpy().sort(axis=1)
        return x
    return x.sort(dim=1).values


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> float:
    """Mean over DIR_REPEATS x DIRS_PER_REPEAT random unit directions of the mean |sorted(a.d) - sorted(b.d)|."""
    distances = []
    for _ in range(DIR_REPEATS):
        dirs = torch.randn(a.shape[1], DIRS_PER_REPEAT, generator=generator, dtype=torch.float64).to(a.device)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        # One row per direction, so that each sort runs over contiguous memory.
        proj_a, proj_b = _sorted_rows(dirs.T @ a.T), _sorted_rows(dirs.T @ b.T)
        distances.append((proj_a - proj_b).abs().mean())
    return float(torch.stack(distances).mean())


def swd(reals: torch.Tensor, fakes: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """SWD x 1e3 between two image sets ([N, C, R, R] in [-1, 1], R >= 16) at every pyramid level
    (`swd_<res>`) and their mean (`swd`)."""
    if reals.shape[1:] != fakes.shape[1:]:
        raise ValueError(f"SWD needs images of one shape, got {tuple(reals.shape[1:])} and {tuple(fakes.shape[1:])}")
    if reals.shape[-1] < MIN_RESOLUTION:
        raise ValueError(f"SWD needs images of at least {MIN_RESOLUTION} px, got {reals.shape[-1]}")
    n = min(len(reals), len(fakes))
    generator = torch.Generator().manual_seed(seed)
    result = {}
    # As the official code: pixel values on the 0..255 scale (the normalisation makes the scale irrelevant).
    pyramids = [_pyramid_levels(images[:n]) for images in (reals, fakes)]
    for level_a, level_b in zip(*pyramids):
        a, b = descriptors(level_a, generator), descriptors(level_b, generator)
        result[f"swd_{level_a.shape[-1]}"] = 1e3 * sliced_wasserstein(a, b, generator)
    result["swd"] = sum(result.values()) / len(result)
    return result
