"""Progressive generator and discriminator, parameterised by output resolution.

A model at resolution R is a plain module with stable parameter names (`blocks.<res>.*`, `to_rgb.<res>.*`,
`from_rgb.<res>.*`), so a model at 2R is *built* fresh and *initialised* from one at R (`grow_from`):
shared layers are copied, the new block and the new RGB layer keep their fresh initialisation (or start as
the smaller model's function: `preserve_function`). Nothing is mutated in place, so optimizers and EMA copies
are never silently reset.

alpha (fade-in weight) is an argument of `forward`, never stored state:
alpha = 0 -> only the previous resolution's path (its output upsampled / its input downsampled),
alpha = 1 -> only the new block.

Class-conditional models (num_classes > 0, 0 = unconditional): G concatenates a learned label embedding to
the latent and pixel-normalises the concatenation before its first layer (as ProGAN's official conditional
G does with its label input); D adds a projection term (Miyato & Koyama 2018) to its score. Both label layers
are built after every unconditional parameter, so that a seeded conditional model draws exactly the
unconditional model's weights first (only the label columns of G's first dense layer and the embeddings are
new), and they do not depend on the resolution, so growing copies them like any shared layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pgan.layers import (
    HE_GAIN,
    LRELU_SLOPE,
    EqualizedConv2d,
    EqualizedLinear,
    at_least_fp32,
    downsample_2x,
    fade,
    lrelu,
    minibatch_stddev,
    pixel_norm,
    upsample_2x,
    upsample_2x_bilinear,
)
from pgan.schedule import MAX_RESOLUTION, MIN_RESOLUTION, check_resolution  # noqa: F401 (re-exported)

LABELS_DTYPES = (torch.int64, torch.int32)  # what F.embedding accepts
# How G makes its image (model.g_architecture): `progan`, the top block's toRGB alone (faded in over the
# previous one's upsampled output); `skip`, StyleGAN2's: the sum of every resolution's toRGB, each upsampled
# bilinearly to the top (the top one's weighted by alpha), so a new block adds detail to the colours and
# layout the lower ones have learnt instead of replacing them.
G_ARCHITECTURES = ("progan", "skip")
# How each architecture brings its previous resolution's image up to the new one during a fade-in (the reals D
# sees are faded the same way: pgan.train.step.fade_reals).
FADE_UPSAMPLE = {"progan": upsample_2x, "skip": upsample_2x_bilinear}
# How a grown model's new layers start (model.grow_init): `fresh`, drawn at random (ProGAN's); `preserve`, so
# that at alpha = 1 the grown model computes about what the smaller one did (`preserve_function`), where the new
# block keeps the width; `preserve_all`, also where it changes the width (`carry_rgb_through`).
GROW_INITS = ("fresh", "preserve", "preserve_all")
# preserve_all's G block: the constant feature that keeps the pixel norms' denominators about constant, as large
# as the input feature vector (whose norm bounds the carried RGB directions'). Larger is more exact and worse
# conditioned: the carried channels shrink beside it and the new toRGB must read them with weights as much larger
# (at 4, 10x a fresh layer's at make train's 32 px and 66x at 64 px; at 1, 2.4x and 4.6x).
# At 1 the `small` model's grown G is within 3-5 % of the smaller one (4: 0.2-0.3 %), and make train's seed 0
# kept 16 of 16 modes (4: 13, its blues turning yellow and green at 128 px; experiments/quality).
ANCHOR_OVER_INPUT_NORM = 1.0
# model.grow_smooth: a preserved G block's first conv starts as this 3x3 blur of each carried channel instead of the
# identity. Nearest 2x upsampling followed by [1, 2, 1] / 4 along each axis is the bilinear 2x upsampling
# (half-pixel centres), so the new stage starts from the smaller model's image upsampled smoothly, not in 2x2 steps.
SMOOTH_TAPS = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16


def g_architecture_of(model: Mapping[str, Any]) -> str:
    """The G architecture a model config section (or an export's config.json) names; absent in those written
    before it existed, which were progan."""
    return str(model.get("g_architecture") or "progan")


def resolutions_up_to(resolution: int) -> list[int]:
    """All block resolutions of a model at `resolution`: 4, 8, ..., resolution."""
    return [2**k for k in range(2, check_resolution(resolution) + 1)]


def channels_for(
    resolution: int,
    fmap_base: int = 8192,
    fmap_max: int = 512,
    fmap_min: int = 1,
    table: Mapping[int, int] | None = None,
) -> int:
    """Feature-map width at `resolution`: the explicit `table` if given, else ProGAN's rule.

    The rule is min(fmap_base / 2**stage, fmap_max) with stage = log2(resolution) - 1 (so 4 px is stage 1);
    the paper preset (8192, 512) gives 512 up to 32 px, then 256, 128, 64, 32, 16 at 1024 px.
    """
    if table is not None:
        key = resolution if resolution in table else str(resolution)
        if key not in table:
            raise ValueError(f"model.channels has no entry for resolution {resolution}")
        return int(table[key])
    stage = check_resolution(resolution) - 1
    return max(min(fmap_base // 2**stage, fmap_max), fmap_min)


class EqualizedEmbedding(nn.Module):
    """A per-class vector table with the equalized learning rate: weight ~ N(0, 1), scaled at run time.

    A lookup is a linear layer applied to a one-hot vector, so `scale` plays the role of EqualizedLinear's
    gain / sqrt(fan_in): G's embedding uses 1 (one input is active: its entries are N(0, 1) like the latent's),
    D's projection uses 1 / sqrt(dim), the scale of the score layer it sits beside.
    """

    def __init__(self, num_classes: int, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim))
        self.scale = scale

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices [N] -> vectors [N, dim] (F.embedding, which never wraps negative indices around)."""
        return nn.functional.embedding(labels, self.weight * self.scale)

    def extra_repr(self) -> str:
        n, dim = self.weight.shape
        return f"{n}, {dim}, scale={self.scale:.4g}"


def cycle_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """Class indices 0, 1, ..., num_classes - 1, 0, 1, ... for `n` samples (None for an unconditional model):
    the labels sampling, evaluation and export give a conditional G when no class is asked for, so sample i
    has class i mod num_classes whatever n is."""
    return torch.arange(n) % num_classes if num_classes else None


# How many images a forward pass takes when evaluation samples are generated (the collapse watch, the metrics
# watch, pgan-eval, pgan-sample). On a CPU, passes whose largest feature map stays near cache size are the
# fastest: 2**21 elements (8 MB in fp32), e.g. 2 images at 256 px for the small model, whose 512 samples then
# took 7.3 s where 32 a pass took 16.8 s, and 8 at 128 px: 2.3 s against 5.3 s with 128 (2 EPYC cores;
# experiments/throughput, "Evaluation cost"). On an accelerator larger passes amortise the kernel launches,
# and their size only bounds memory.
EVAL_CHUNK_ELEMENTS_CPU = 2**21
EVAL_CHUNK_PIXELS_ACCELERATOR = 2**21


def largest_activation(G: nn.Module) -> int:
    """Elements of G's largest feature map for one image: the widest convolution's channels x its pixels, over
    G's blocks (a block's upsampled input counts with the channels it arrives with)."""
    return max(
        max(conv.weight.shape[:2]) * int(res) ** 2
        for res, block in G.blocks.items()
        for conv in block.modules()
        if isinstance(conv, EqualizedConv2d)
    )


def eval_chunk(device: torch.device, G: nn.Module) -> int:
    """Images per forward pass for generating G's evaluation samples on `device` (at least 1)."""
    if device.type == "cpu":
        return max(1, EVAL_CHUNK_ELEMENTS_CPU // largest_activation(G))
    return max(1, EVAL_CHUNK_PIXELS_ACCELERATOR // (G.resolution * G.resolution))


def generate_chunks(
    G: nn.Module, z: torch.Tensor, alpha: float, chunk: int | None = None, labels: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """G's images for latents `z` (and `labels`; for a conditional G by default `cycle_labels`), `chunk` at a
    time (default: sized for G's device, `eval_chunk`), each on G's device (the caller picks no_grad, autocast,
    eval mode and where the images go)."""
    device = next(G.parameters()).device
    chunk = chunk or eval_chunk(device, G)
    if labels is None:
        labels = cycle_labels(len(z), G.num_classes)
    for i in range(0, len(z), chunk):
        yield G(z[i : i + chunk].to(device), alpha, None if labels is None else labels[i : i + chunk].to(device))


def check_labels(labels: torch.Tensor | None, num_classes: int, batch: int) -> None:
    """Raise ValueError unless `labels` suits a model with `num_classes` (0: unconditional, labels must be None)
    and a batch of `batch`: an integer tensor [batch] with values in [0, num_classes).

    The value range is checked only for CPU tensors outside torch.compile: on an accelerator it would cost a
    host sync every step (the data layer validates its labels once instead), and an out-of-range index there
    still fails, as a device-side assert of the embedding lookup.
    """
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels given to an unconditional model (num_classes=0)")
        return
    if labels is None:
        raise ValueError(f"labels are required: this model is class-conditional (num_classes={num_classes})")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in LABELS_DTYPES:
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of class indices, got {what}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), one class index per sample, got {tuple(labels.shape)}")
    if labels.device.type == "cpu" and batch and not torch.compiler.is_compiling():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"label {bad} is out of range: num_classes={num_classes} (labels are 0..{num_classes - 1})"
            )


class GeneratorInput(nn.Module):
    """4x4 block: pixel-normalised latent -> dense to 4x4 maps -> 3x3 conv."""

    def __init__(self, latent_dim: int, channels: int) -> None:
        super().__init__()
        # gain sqrt(2)/4 as in the official code: the dense layer feeds 16 spatial positions at once.
        self.dense = EqualizedLinear(latent_dim, channels * 16, gain=HE_GAIN / 4)
        self.conv = EqualizedConv2d(channels, channels, 3)
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Map a latent batch [N, latent_dim] to features [N, C, 4, 4]."""
        x = self.dense(pixel_norm(z)).reshape(-1, self.channels, 4, 4)
        x = pixel_norm(lrelu(x))
        return pixel_norm(lrelu(self.conv(x)))

    def add_inputs(self, extra: int) -> None:
        """Widen the dense layer by `extra` input features (the label embedding), drawn now, appended after the
        latent's columns: the latent's columns keep the values drawn at construction."""
        dense = self.dense
        out_features, in_features = dense.weight.shape
        new = torch.randn(out_features, extra, dtype=dense.weight.dtype, device=dense.weight.device)
        dense.weight = nn.Parameter(torch.cat([dense.weight.detach(), new], dim=1))
        dense.scale *= math.sqrt(in_features / (in_features + extra))  # gain / sqrt(new fan_in)


class GeneratorBlock(nn.Module):
    """Nearest 2x upsample, then two 3x3 convs, each followed by LeakyReLU and pixel norm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3)
        self.conv2 = EqualizedConv2d(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C_in, R/2, R/2] -> [N, C_out, R, R]."""
        x = pixel_norm(lrelu(self.conv1(upsample_2x(x))))
        return pixel_norm(lrelu(self.conv2(x)))


def model_kwargs_from(model: Mapping[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """Constructor arguments shared by G and D from a model config section (a DictConfig or a checkpoint's dict).

    `num_classes`: of a class-conditional model. A training config says only `conditional: true`, and the
    classes come from the data (the checkpoint records them); without it, the section's own `num_classes`
    (an exported generator's config.json), else 0."""
    channels = model.get("channels")
    table = {int(k): int(v) for k, v in channels.items()} if channels else None
    # With a width table the fmap_* rule is unused, and an export's config.json records only the table.
    rule = {k: int(model[k]) for k in ("fmap_base", "fmap_max", "fmap_min") if table is None or k in model}
    return dict(
        image_channels=int(model["image_channels"]),
        **rule,
        channels=table,
        num_classes=int(num_classes if num_classes is not None else model.get("num_classes") or 0),
    )


def widths_up_to(model: Mapping[str, Any], resolution: int) -> dict[int, int]:
    """A model config section's feature-map width at each block resolution 4, 8, ..., `resolution`."""
    kwargs = model_kwargs_from(model)
    rule = {k: kwargs[k] for k in ("fmap_base", "fmap_max", "fmap_min") if k in kwargs}
    return {r: channels_for(r, **rule, table=kwargs["channels"]) for r in resolutions_up_to(resolution)}


class Generator(nn.Module):
    """ProGAN generator producing `resolution` x `resolution` images in [-1, 1] (not clamped).

    forward(z, alpha, labels): alpha in [0, 1] fades in the highest-resolution block. alpha = 0 returns exactly
    the previous resolution's output upsampled 2x (`progan`: its toRGB, by nearest neighbour; `skip`: its
    summed image, bilinearly); alpha = 1 returns only the new block's toRGB (`progan`) or adds all of it to
    that upsampled image (`skip`, see G_ARCHITECTURES). Parameter names are stable across resolutions (see
    `grow_from`).

    num_classes > 0 makes it class-conditional: `labels` (integer class indices [N]) are then required,
    looked up in `embed` (an EqualizedEmbedding of latent_dim entries per class, so the label and the
    latent weigh equally after the pixel norm), concatenated to z and pixel-normalised together; the first
    dense layer takes 2 * latent_dim inputs.
    """

    def __init__(
        self,
        resolution: int,
        latent_dim: int = 512,
        image_channels: int = 3,
        fmap_base: int = 8192,
        fmap_max: int = 512,
        fmap_min: int = 1,
        channels: Mapping[int, int] | None = None,
        num_classes: int = 0,
        architecture: str = "progan",
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        if architecture not in G_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(G_ARCHITECTURES)}, got {architecture!r}")
        self.architecture = architecture
        self.resolution = resolution
        self.latent_dim = latent_dim
        self.image_channels = image_channels
        self.num_classes = num_classes
        # What each class is called (a folder name, "blue circle", ...): set by whoever loads a trained G from
        # a checkpoint or an export; not part of the weights.
        self.class_names: tuple[str, ...] = tuple(str(i) for i in range(num_classes))
        width = functools.partial(
            channels_for, fmap_base=fmap_base, fmap_max=fmap_max, fmap_min=fmap_min, table=channels
        )
        self.resolutions = resolutions_up_to(resolution)
        self.blocks = nn.ModuleDict({"4": GeneratorInput(latent_dim, width(4))})
        for res in self.resolutions[1:]:
            self.blocks[str(res)] = GeneratorBlock(width(res // 2), width(res))
        # toRGB, linear, gain 1: for this resolution and the previous one (progan: the fade-in's old path), or
        # for every resolution (skip).
        rgb_resolutions = self.resolutions if architecture == "skip" else self.resolutions[-2:]
        self.to_rgb = nn.ModuleDict(
            {str(res): EqualizedConv2d(width(res), image_channels, 1, gain=1.0) for res in rgb_resolutions}
        )
        if num_classes > 0:  # last, so that every unconditional parameter is drawn as without labels
            self.blocks["4"].add_inputs(latent_dim)
            self.embed = EqualizedEmbedding(num_classes, latent_dim)

    def forward(self, z: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Generate images [N, image_channels, R, R] from latents [N, latent_dim] (and class indices [N] when
        conditional); alpha: 0 old path, 1 new."""
        check_labels(labels, self.num_classes, z.shape[0])
        if labels is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)  # pixel-normalised together in blocks.4
        x = self.blocks["4"](z)
        if self.architecture == "skip":
            return self._skip_image(x, alpha)
        for res in self.resolutions[1:-1]:
            x = self.blocks[str(res)](x)
        top = self.resolution
        if top == MIN_RESOLUTION:
            return self.to_rgb[str(top)](x)
        new = self.to_rgb[str(top)](self.blocks[str(top)](x))
        if alpha >= 1.0:  # stable phase: the old toRGB is not evaluated at all
            return new
        old = FADE_UPSAMPLE["progan"](self.to_rgb[str(top // 2)](x))
        return fade(old, new, alpha)

    def _skip_image(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """The skip architecture's image from the 4x4 features `x`: every block's toRGB added to the image so
        far, upsampled; the top block's times alpha."""
        image = self.to_rgb["4"](x)
        for res in self.resolutions[1:]:
            x = self.blocks[str(res)](x)
            image = FADE_UPSAMPLE["skip"](image)
            if res < self.resolution or alpha >= 1.0:
                image = image + self.to_rgb[str(res)](x)
            elif alpha > 0.0:  # alpha = 0: exactly the previous resolution's image, upsampled
                image = image + alpha * self.to_rgb[str(res)](x)
        return image


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convs with LeakyReLU, then 2x average pooling: [N, C_in, R, R] -> [N, C_out, R/2, R/2]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = EqualizedConv2d(in_channels, in_channels, 3)
        self.conv2 = EqualizedConv2d(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve twice, then halve the resolution."""
        return downsample_2x(lrelu(self.conv2(lrelu(self.conv1(x)))))


class DiscriminatorOutput(nn.Module):
    """4x4 head: minibatch stddev, 3x3 conv, dense 4x4xC -> C features h, dense C -> 1 score (+ <projection, h>)."""

    def __init__(self, channels: int, mbstd_group_size: int) -> None:
        super().__init__()
        self.mbstd_group_size = mbstd_group_size
        self.conv = EqualizedConv2d(channels + 1, channels, 3)
        self.dense = EqualizedLinear(channels * 16, channels)
        self.out = EqualizedLinear(channels, 1, gain=1.0)

    def forward(self, x: torch.Tensor, projection: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, 4, 4] -> scores [N]; `projection` [N, C] (a conditional D's class vectors) adds <projection, h>."""
        x = minibatch_stddev(x, self.mbstd_group_size)
        x = lrelu(self.conv(x))
        h = lrelu(self.dense(x.flatten(1)))
        # The score itself in (at least) fp32 even under bf16 autocast: scores reach the hundreds, where
        # bf16's spacing is 2-4, and the losses and drift term are computed from them.
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = at_least_fp32(h)
            score = self.out(h).squeeze(1)
            if projection is not None:
                score = score + (at_least_fp32(projection) * h).sum(dim=1)
            return score


class Discriminator(nn.Module):
    """ProGAN discriminator (critic) for `resolution` x `resolution` images, returning one score per image.

    forward(images, alpha, labels): alpha = 0 scores only the 2x-downsampled images through the previous
    resolution's fromRGB; alpha = 1 uses only the new block. Mirrors `Generator`.

    num_classes > 0 makes it a projection discriminator (Miyato & Koyama 2018): `labels` (integer class indices
    [N]) are then required and score = out(h) + <embed(labels), h>, where h [N, C4] is the head's last hidden
    feature vector, lrelu(dense(...)) of the 4x4 block: the input of the final linear layer `out`. `embed` is
    an EqualizedEmbedding with `out`'s run-time scale 1 / sqrt(C4), so both terms start at the same size.
    """

    def __init__(
        self,
        resolution: int,
        image_channels: int = 3,
        fmap_base: int = 8192,
        fmap_max: int = 512,
        fmap_min: int = 1,
        channels: Mapping[int, int] | None = None,
        mbstd_group_size: int = 4,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.resolution = resolution
        self.image_channels = image_channels
        self.num_classes = num_classes
        width = functools.partial(
            channels_for, fmap_base=fmap_base, fmap_max=fmap_max, fmap_min=fmap_min, table=channels
        )
        self.resolutions = resolutions_up_to(resolution)
        self.blocks = nn.ModuleDict({"4": DiscriminatorOutput(width(4), mbstd_group_size)})
        for res in self.resolutions[1:]:
            self.blocks[str(res)] = DiscriminatorBlock(width(res), width(res // 2))
        self.from_rgb = nn.ModuleDict(
            {str(res): EqualizedConv2d(image_channels, width(res), 1) for res in self.resolutions[-2:]}
        )
        if num_classes > 0:  # last, so that every unconditional parameter is drawn as without labels
            self.embed = EqualizedEmbedding(num_classes, width(4), scale=1.0 / math.sqrt(width(4)))

    def rgb_features(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """fromRGB of `resolution` (a 1x1 conv from the image channels, then leaky ReLU), always in fp32.

        Under bf16 autocast on the CPU, oneDNN's bf16 kernel for this conv's double backward (the R1 / R2 and
        WGAN-GP penalties) died with SIGFPE when N*H*W = 2**19 on one thread (torch 2.14.1: batch 8 at 256 px,
        32 at 128 px; measured with F.conv2d's own double backward, before `same_conv2d`). The conv is 3 -> C
        channels, a sliver of D's work, so it runs in fp32 everywhere."""
        with torch.autocast(images.device.type, enabled=False):
            return lrelu(self.from_rgb[str(resolution)](at_least_fp32(images)))

    def forward(self, images: torch.Tensor, alpha: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Score images [N, image_channels, R, R] (with class indices [N] when conditional) -> [N]; alpha: 0 old
        path only, 1 new block only."""
        check_labels(labels, self.num_classes, images.shape[0])
        projection = None if labels is None else self.embed(labels)
        top = self.resolution
        x = self.rgb_features(images, top)
        if top > MIN_RESOLUTION:
            x = self.blocks[str(top)](x)
            if alpha < 1.0:
                old = self.rgb_features(downsample_2x(images), top // 2)
                x = fade(old, x, alpha)
            for res in reversed(self.resolutions[1:-1]):
                x = self.blocks[str(res)](x)
        return self.blocks["4"](x, projection)


def generator_from_config(model: Mapping[str, Any], resolution: int, num_classes: int | None = None) -> Generator:
    """A fresh Generator at `resolution` from a model config section: a training config's `model`, a checkpoint's
    config["model"] or an export's config.json. The one place a generator is built from a config; `num_classes`
    as in model_kwargs_from (None: the section's own num_classes, else 0)."""
    return Generator(
        resolution,
        latent_dim=int(model["latent_dim"]),
        architecture=g_architecture_of(model),
        **model_kwargs_from(model, num_classes),
    )


def networks_from(
    model: Mapping[str, Any], resolution: int, num_classes: int | None = None
) -> tuple[Generator, Discriminator]:
    """Fresh G and D at `resolution` from a model config section (a DictConfig or a checkpoint's dict), with
    `num_classes` classes (see model_kwargs_from)."""
    G = generator_from_config(model, resolution, num_classes)
    D = Discriminator(
        resolution, mbstd_group_size=int(model["mbstd_group_size"]), **model_kwargs_from(model, num_classes)
    )
    return G, D


def grow_from(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], grow_init: str = "fresh", smooth: bool = False
) -> list[str]:
    """Initialise `model` from the state of the same kind of model at half (or the same) resolution.

    Every parameter present in both is copied (shapes must agree); parameters only in `model` (the new
    block and the new RGB layer) keep their fresh initialisation (`grow_init="fresh"`) or start as the
    smaller model's function (`"preserve"` / `"preserve_all"`, see preserve_function; `smooth`: G's image
    upsampled bilinearly rather than in 2x2 steps, SMOOTH_TAPS); parameters only in
    `state_dict` may only be the older RGB layer, which the bigger model no longer needs. Returns the names not
    copied.
    """
    if grow_init not in GROW_INITS:
        raise ValueError(f"grow_init must be one of {', '.join(GROW_INITS)}, got {grow_init!r}")
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"cannot grow from this state: {k} has shape {tuple(state_dict[k].shape)}, expected "
            f"{tuple(own[k].shape)} ({len(mismatched)} mismatched tensors; a different architecture?)"
        )
    dropped = [k for k in state_dict if k not in own]
    if any(not k.startswith(("to_rgb.", "from_rgb.")) for k in dropped):
        raise ValueError(f"cannot grow from this state: it has layers the new model lacks: {dropped[:3]}")
    fresh = [k for k in own if k not in state_dict]
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in own:
                own[k].copy_(v)
    if grow_init != "fresh" and fresh:
        preserve_function(model, any_width=grow_init == "preserve_all", smooth=smooth)
    return fresh


def preserve_function(model: nn.Module, any_width: bool = False, smooth: bool = False) -> list[str]:
    """Start the top block of a model just grown from half its resolution so that, at alpha = 1, it computes
    about what the smaller model computed: a new stage then refines the smaller model's images instead of
    learning colour and layout anew in layers drawn at random.

    `progan` G and D: where the new block keeps the width, its two 3x3 convs start as identities (the centre
    tap, zero bias) and the new RGB layer (G's toRGB, D's fromRGB) as a copy of the previous resolution's. What
    it does not make exact are the LeakyReLUs the identities pass through (negative features shrink by 0.2 at
    each) and, in D, the order of the 2x pooling and the nonlinearity. Where the block changes the width (the
    `small` model's 32 and 64 px) every new layer keeps its random draw (measured: identity convs beside random
    ones drew halos and merged colours at 64 px), unless `any_width`: then the block carries the smaller
    model's RGB directions through a few of its channels (`carry_rgb_through`). `skip` G: the new toRGB starts
    at zero, so the image is exactly the smaller one's, upsampled, whatever the widths. `smooth` (progan G): the
    block's first conv blurs what it carries (SMOOTH_TAPS), so the grown G draws the smaller one's image upsampled
    bilinearly, not in nearest-neighbour steps. Returns the names of the layers it set."""
    top = model.resolution
    if top == MIN_RESOLUTION:
        return []
    new, old = str(top), str(top // 2)
    if getattr(model, "architecture", "progan") == "skip":
        with torch.no_grad():
            model.to_rgb[new].weight.zero_()
            model.to_rgb[new].bias.zero_()
        return [f"to_rgb.{new}"]
    block = model.blocks[new]
    rgb_name = "to_rgb" if isinstance(model, Generator) else "from_rgb"
    rgb = getattr(model, rgb_name)
    names = [f"blocks.{new}.conv1", f"blocks.{new}.conv2", f"{rgb_name}.{new}"]
    square = all(conv.weight.shape[0] == conv.weight.shape[1] for conv in (block.conv1, block.conv2))
    generator = isinstance(model, Generator)
    taps = SMOOTH_TAPS if smooth and generator else None
    if square and rgb[new].weight.shape == rgb[old].weight.shape:
        with torch.no_grad():
            for conv in (block.conv1, block.conv2):
                eye = torch.eye(conv.weight.shape[0])
                _set_channel_map(
                    conv, eye, rows=slice(None), cols=slice(None), taps=taps if conv is block.conv1 else None
                )
                conv.bias.zero_()
            rgb[new].load_state_dict(rgb[old].state_dict())
        return names
    if any_width and carry_rgb_through(block, rgb[new], rgb[old], generator=generator, taps=taps):
        return names
    return []


def _set_channel_map(
    conv: EqualizedConv2d, matrix: torch.Tensor, rows: slice | int, cols: slice | int, taps: torch.Tensor | None = None
) -> None:
    """Make conv map input channels `cols` to output channels `rows` by `matrix` (run-time values, i.e. after the
    equalized learning rate's scale): `matrix` at the centre tap and zero at the others, so a 1x1 map; with `taps`
    (a k x k kernel summing to 1), `matrix` spread over the taps in those proportions (SMOOTH_TAPS: map, then blur)."""
    k = conv.weight.shape[-1]
    conv.weight[rows, cols] = 0.0
    if taps is None:
        conv.weight[rows, cols, k // 2, k // 2] = matrix.to(conv.weight) / conv.scale
    else:
        conv.weight[rows, cols] = (matrix[:, :, None, None] * taps).to(conv.weight) / conv.scale


def carry_rgb_through(
    block: nn.Module,
    rgb_new: EqualizedConv2d,
    rgb_old: EqualizedConv2d,
    generator: bool,
    taps: torch.Tensor | None = None,
) -> bool:
    """preserve_all's start for a new block whose width differs from the previous resolution's (`progan`): the
    grown model at alpha = 1 computes about what the smaller one did, through a few of the block's channels.

    The previous RGB layer is an affine map between the K image channels and the features, so K directions (+ a
    constant) are all the block must carry. It carries each direction u as a pair of channels (u, -u): through
    any chain of LeakyReLUs the pair's difference stays exactly linear, (1 + slope^2) u after two of them.
    - G: conv1 projects its input onto an orthonormal basis of the old toRGB's directions (the pairs) and adds
      a constant channel (the anchor), conv2 passes them on, the new toRGB reads the pairs' differences. The
      anchor keeps the two pixel norms' denominators about constant: they grow with the carried part u of the
      input, the image's colour shrinking by about (1 + slope^2) |u|^2 / (2 level^2) (ANCHOR_OVER_INPUT_NORM).
    - D: the new fromRGB writes the image channels as pairs and a constant, conv1 passes them on, conv2 writes
      the old fromRGB's features from them. Exact but for the order of the 2x pooling and the last LeakyReLU.
    The other channels start so that they change nothing yet and still learn: where they are read from an input
    that is zero (G) or written into an output that is zero (D) the layer keeps its random draw; the weights
    that would let them change the carried channels are zero. Returns False, changing nothing, where the block
    has fewer than 2K + 1 channels to carry them in. `taps`: G's conv1 spreads what it carries over these (the
    centre tap alone by default; SMOOTH_TAPS blurs)."""
    slope2 = 1.0 + LRELU_SLOPE**2  # a pair's difference grows by this through two LeakyReLUs
    inner = block.conv1.weight.shape[0]  # G: the block's output width; D: its input width
    if generator:
        W = rgb_old.weight[:, :, 0, 0].double() * rgb_old.scale  # [K, C_in]: the old toRGB's run-time weights
        Q, R = torch.linalg.qr(W.T)  # W = R^T Q^T: Q's K' orthonormal columns span its directions
    else:
        Q = torch.eye(rgb_new.weight.shape[1], dtype=torch.float64)  # D carries the image channels themselves
    pairs = Q.shape[1]
    used = slice(0, 2 * pairs + 1)  # channels 2k, 2k + 1: the pair of direction k; channel 2K: the anchor
    anchor, free = 2 * pairs, slice(2 * pairs + 1, None)
    if inner < 2 * pairs + 1:
        return False
    carried = torch.stack([Q.T, -Q.T], dim=1).reshape(2 * pairs, -1)  # rows u_0, -u_0, u_1, -u_1, ...
    with torch.no_grad():
        if generator:
            c_in = block.conv1.weight.shape[1]
            level = ANCHOR_OVER_INPUT_NORM * math.sqrt(c_in)  # a pixel-normalised input has norm sqrt(C_in)
            _set_channel_map(block.conv1, carried, rows=slice(0, 2 * pairs), cols=slice(None), taps=taps)
            block.conv1.weight[anchor:] = 0.0  # the anchor is its bias alone; the free channels start at zero
            block.conv1.bias.zero_()
            block.conv1.bias[anchor] = level
            _set_channel_map(block.conv2, torch.eye(anchor + 1), rows=used, cols=used)
            block.conv2.weight[free, used] = 0.0
            block.conv2.bias.zero_()
            # After the two pixel norms a pair's difference is (1 + slope^2) u sqrt(C_out) / level (|u| << level).
            gain = level / (slope2 * math.sqrt(inner))
            read = torch.stack([R.T, -R.T], dim=2).reshape(R.shape[1], -1) * gain  # [K, 2K']
            _set_channel_map(rgb_new, read, rows=slice(None), cols=slice(0, 2 * pairs))
            rgb_new.weight[:, anchor] = 0.0
            rgb_new.bias.copy_(rgb_old.bias)
        else:
            _set_channel_map(rgb_new, carried, rows=slice(0, 2 * pairs), cols=slice(None))
            rgb_new.weight[anchor] = 0.0
            rgb_new.bias[used] = 0.0
            rgb_new.bias[anchor] = 1.0
            _set_channel_map(block.conv1, torch.eye(anchor + 1, inner), rows=used, cols=slice(None))
            block.conv1.bias[used] = 0.0
            F = rgb_old.weight[:, :, 0, 0].double() * rgb_old.scale  # [C_out, K]
            write = torch.cat([torch.stack([F, -F], dim=2).reshape(F.shape[0], -1) / slope2, rgb_old.bias[:, None]], 1)
            _set_channel_map(block.conv2, write, rows=slice(None), cols=used)
            block.conv2.weight[:, free] = 0.0
            block.conv2.bias.zero_()
    return True
