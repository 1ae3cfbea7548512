"""Sample-diversity metrics that need no pretrained weights: MS-SSIM over random pairs, the excess-pair
fraction, the Vendi score on a fixed random embedding, and the per-pixel standard-deviation ratio.

All of them compare a batch of generated images with real images of the same resolution, summarised once
in a `RealReference` (the trainer caches one per resolution). Images are float NCHW in [-1, 1].

Why each one:
- Mean MS-SSIM over disjoint random pairs (Odena et al. 2017, ProGAN's `ms_ssim.py`): near-identical pairs
  push it towards 1. We write it ourselves because the libraries (pytorch-msssim, torchmetrics) refuse images
  under ~160 px with the standard 11-px window and 5 scales; like the ProGAN metric we shrink the window and,
  unlike it, also drop scales so the coarsest one is still >= 4 px (ProGAN keeps 5 and ends on 1-px images).
- Excess-pair fraction p = (s_fake - s_real) / (1 - s_real): if a generator has collapsed onto k look-alike
  modes, a fraction 1/k of random pairs are near-copies (MS-SSIM ~ 1) and the rest look like real pairs, so
  s_fake ~ 1/k + (1 - 1/k) s_real and p ~ 1/k whatever the dataset's own s_real is.
- Vendi score (Friedman & Dieng 2023): exp(entropy) of the eigenvalues of the cosine-similarity kernel, the
  effective number of distinct samples. Features come from a fixed seeded random conv net, centred by the
  *real* mean: centred by the fake batch's own mean, a collapsed batch's tiny residual noise would be
  normalised up into n "distinct" directions.
- Per-pixel std ratio: the cheapest check for total collapse (every sample the same image).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

# Wang et al. 2003 weights per scale, finest first (as in ProGAN's and TensorFlow's MS-SSIM).
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW_SIZE = 11  # Gaussian window of the standard SSIM, shrunk on smaller images
WINDOW_SIGMA = 1.5
MIN_SCALE_SIDE = 4  # the coarsest MS-SSIM scale keeps at least this many pixels per side
DATA_RANGE = 2.0  # images in [-1, 1]
K1, K2 = 0.01, 0.03

# Values per image tensor in one chunk of pairwise MS-SSIM: cache-sized on a CPU (experiments/throughput,
# "Evaluation cost"), on an accelerator only a bound on memory at 1024 px.
MSSSIM_CHUNK_ELEMENTS_CPU = 2**20
MSSSIM_CHUNK_ELEMENTS_ACCELERATOR = 2**24

EMBEDDING_SIDE = 64  # images are resized to this before the random embedding, whatever their resolution
EMBEDDING_SEED = 1234
BOOTSTRAP_RESAMPLES = 1000


def num_scales(side: int) -> int:
    """How many MS-SSIM scales an image of `side` px gets: up to 5, the coarsest at least 4 px."""
    if side < MIN_SCALE_SIDE:
        raise ValueError(f"MS-SSIM needs images of at least {MIN_SCALE_SIDE} px, got {side}")
    return min(len(MSSSIM_WEIGHTS), int(math.log2(side / MIN_SCALE_SIDE)) + 1)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """A normalised 1-D Gaussian of `size` taps."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image SSIM and contrast-structure term, each [N], with the window shrunk to fit the image."""
    side = min(x.shape[-2:])
    size = min(WINDOW_SIZE, side)
    # ProGAN's rule: the window shrinks with the image and its sigma in proportion.
    sigma = WINDOW_SIGMA * size / WINDOW_SIZE
    g = _gaussian_window(size, sigma, x.device)
    channels = x.shape[1]
    wh = g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    wv = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # 'valid' filtering (no padding), as the reference implementations do.
        return F.conv2d(F.conv2d(t, wh, groups=channels), wv, groups=channels)

    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs_map).mean(dim=(1, 2, 3)), cs_map.mean(dim=(1, 2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each pair (x[i], y[i]) of [-1, 1] NCHW images, [N], at any size from 4 px up.

    Scales beyond what the image allows are dropped and the remaining weights renormalised. Negative SSIM /
    contrast terms (anti-correlated images) are clamped to 0 before the fractional powers, which would
    otherwise be NaN (pytorch-msssim's `normalize="relu"` makes the same choice).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ms_ssim needs two NCHW batches of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.float(), y.float()
    scales = num_scales(min(x.shape[-2:]))
    weights = torch.tensor(MSSSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    result = torch.ones(x.shape[0], device=x.device)
    for i in range(scales):
        ssim, cs = _ssim_and_cs(x, y)
        term = ssim if i == scales - 1 else cs
        result = result * term.clamp_min(0) ** weights[i]
        if i < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


def pairwise_ms_ssim(images: torch.Tensor, seed: int = 0, max_elements: int | None = None) -> torch.Tensor:
    """MS-SSIM of n // 2 disjoint random pairs of `images` (one value per pair, on the CPU).

    Pairs are processed in chunks of at most `max_elements` values per image tensor; by default 2**20 on a CPU,
    where cache-sized chunks are fastest (512 images at 256 px: 3.7 s against 11.8 s with 2**24, 2 EPYC cores),
    and 2**24 on an accelerator, where the size only bounds memory at 1024 px.
    """
    if max_elements is None:
        cpu = images.device.type == "cpu"
        max_elements = MSSSIM_CHUNK_ELEMENTS_CPU if cpu else MSSSIM_CHUNK_ELEMENTS_ACCELERATOR
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"pairwise MS-SSIM needs at least 2 images, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n - n % 2].to(images.device)
    first, second = order[0::2], order[1::2]
    per_pair = max(1, max_elements // images[0].numel())
    values = [
        ms_ssim(images[first[i : i + per_pair]], images[second[i : i + per_pair]])
        for i in range(0, len(first), per_pair)
    ]
    return torch.cat(values).cpu()


def bootstrap_se(
    statistic: Callable[..., torch.Tensor],
    samples: list[torch.Tensor],
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> float:
    """Bootstrap standard error of `statistic(*means)`, each sample resampled with replacement on its own."""
    gen = torch.Generator().manual_seed(seed)
    means = [s.double()[torch.randint(len(s), (resamples, len(s)), generator=gen)].mean(dim=1) for s in samples]
    return float(statistic(*means).std())


def excess_pair(s_fake: float | torch.Tensor, s_real: float | torch.Tensor) -> float | torch.Tensor:
    """p = (s_fake - s_real) / (1 - s_real): ~1/k for a generator collapsed onto k look-alike modes."""
    return (s_fake - s_real) / (1 - s_real)


class RandomEmbedding(nn.Module):
    """A fixed, seeded, randomly initialised conv net: images (any size, 1 or 3 channels) -> 2048 features.

    Random conv features keep enough of the layout and colour to tell distinct images apart, which is all the
    Vendi score needs, and nothing has to be downloaded. Images are resized to 64 px (antialiased) first.
    """

    def __init__(self, seed: int = EMBEDDING_SEED) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        widths = (3, 32, 64, 128)
        # nn.Conv2d initialises its weights from the global RNG before we overwrite them: fork it, so building
        # an embedding (the collapse watch, the metrics) never shifts the training run's random streams.
        with torch.random.fork_rng(devices=[]):
            self.convs = nn.ModuleList(
                nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1, bias=False) for a, b in zip(widths, widths[1:])
            )
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> [N, 2048] features."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != EMBEDDING_SIDE or x.shape[-2] != EMBEDDING_SIDE:
            x = F.interpolate(x, size=(EMBEDDING_SIDE, EMBEDDING_SIDE), mode="bilinear", antialias=True)
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def embed(images: torch.Tensor, embedding: RandomEmbedding, batch_size: int = 256) -> torch.Tensor:
    """Features of `images` in batches, as float64 on the CPU."""
    embedding = embedding.to(images.device)
    return torch.cat([embedding(images[i : i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)])


def vendi_score(features: torch.Tensor, centre: torch.Tensor | None = None) -> float:
    """exp(entropy of the eigenvalues of the cosine kernel / n): 1 for n identical samples, n for orthogonal ones."""
    x = features.double()
    if centre is not None:
        x = x - centre.double()
    x = F.normalize(x, dim=1, eps=1e-12)
    n, d = x.shape
    # The n x n kernel and the d x d covariance share their non-zero eigenvalues: use the smaller one.
    gram = x @ x.T / n if n <= d else x.T @ x / n
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)
    total = eig.sum()
    if total <= 0:
        return 1.0  # every sample sits exactly on the centre: one "distinct" sample
    p = eig / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def pixel_std(images: torch.Tensor) -> float:
    """Mean over pixels of the per-pixel standard deviation across the batch."""
    return float(images.float().std(dim=0).mean())


def sample_dataset(dataset: Dataset, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of min(n, len(dataset)) items of `dataset`, stacked (the same one every call)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: min(n, len(dataset))]
    return torch.stack([dataset[int(i)] for i in order])


@dataclass
class RealReference:
    """What the diversity metrics need from real images at one resolution, computed once."""

    resolution: int
    msssim_pairs: torch.Tensor  # MS-SSIM of disjoint random real pairs [n // 2]
    features: torch.Tensor  # random-embedding features of the real images [n, d], float64
    pixel_std: float

    @property
    def msssim(self) -> float:
        """Mean MS-SSIM over the real pairs."""
        return float(self.msssim_pairs.mean())

    @property
    def num_images(self) -> int:
        """How many real images the reference was computed from."""
        return self.features.shape[0]

    @property
    def feature_mean(self) -> torch.Tensor:
        """The centre every Vendi score is computed around."""
        return self.features.mean(dim=0)

    def vendi(self, n: int) -> float:
        """The real Vendi score at sample count `n` (the score grows with n, so ratios compare equal counts)."""
        return vendi_score(self.features[:n], self.feature_mean)


def real_reference(images: torch.Tensor, embedding: RandomEmbedding, seed: int = 0) -> RealReference:
    """Summarise real [-1, 1] images of one resolution for `diversity_metrics`."""
    return RealReference(
        resolution=int(images.shape[-1]),
        msssim_pairs=pairwise_ms_ssim(images, seed=seed),
        features=embed(images, embedding),
        pixel_std=pixel_std(images),
    )


def diversity_metrics(
    fakes: torch.Tensor, ref: RealReference, embedding: RandomEmbedding, seed: int = 0
) -> dict[str, float]:
    """Every diversity metric of generated `fakes` against the real reference of the same resolution.

    Keys: msssim_fake, msssim_real, excess_pair (with *_se bootstrap standard errors), vendi_fake,
    vendi_real, vendi_ratio, std_ratio, n_fake, n_real, resolution.
    """
    if fakes.shape[-1] != ref.resolution:
        raise ValueError(f"fakes are {fakes.shape[-1]} px but the real reference is {ref.resolution} px")
    fake_pairs = pairwise_ms_ssim(fakes, seed=seed)
    s_fake, s_real = float(fake_pairs.mean()), ref.msssim
    n = min(fakes.shape[0], ref.num_images)
    vendi_fake = vendi_score(embed(fakes[:n], embedding), ref.feature_mean)
    vendi_real = ref.vendi(n)
    return {
        "msssim_fake": s_fake,
        "msssim_fake_se": bootstrap_se(lambda m: m, [fake_pairs], seed=seed),
        "msssim_real": s_real,
        "msssim_real_se": bootstrap_se(lambda m: m, [ref.msssim_pairs], seed=seed),
        "excess_pair": float(excess_pair(s_fake, s_real)),
        "excess_pair_se": bootstrap_se(excess_pair, [fake_pairs, ref.msssim_pairs], seed=seed),
        "vendi_fake": vendi_fake,
        "vendi_real": vendi_real,
        "vendi_ratio": vendi_fake / vendi_real,
        "std_ratio": pixel_std(fakes) / max(ref.pixel_std, 1e-12),
        "n_fake": int(fakes.shape[0]),
        "n_real": ref.num_images,
        "resolution": ref.resolution,
    }
