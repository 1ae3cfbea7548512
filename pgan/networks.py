"""Progressive generator and discriminator, parameterised by output resolution.

A model at resolution R is a plain module with stable parameter names (`blocks.<res>.*`, `to_rgb.<res>.*`,
`from_rgb.<res>.*`), so a model at 2R is *built* fresh and *initialised* from one at R (`grow_from`):
shared layers are copied, the new block and the new RGB layer keep their fresh initialisation. Nothing is
mutated in place, so optimizers and EMA copies are never silently reset.

alpha (fade-in weight) is an argument of `forward`, never stored state:
alpha = 0 -> only the previous resolution's path (its output upsampled / its input downsampled),
alpha = 1 -> only the new block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pgan.layers import (
    HE_GAIN,
    EqualizedConv2d,
    EqualizedLinear,
    at_least_fp32,
    downsample_2x,
    fade,
    lrelu,
    minibatch_stddev,
    pixel_norm,
    upsample_2x,
)

MIN_RESOLUTION = 4
MAX_RESOLUTION = 1024


def check_resolution(resolution: int, minimum: int = MIN_RESOLUTION) -> int:
    """Return log2(resolution); raise ValueError unless it is a power of two in [minimum, 1024]."""
    log2 = int(math.log2(resolution)) if resolution > 0 else -1
    if resolution < minimum or resolution > MAX_RESOLUTION or 2**log2 != resolution:
        raise ValueError(f"resolution must be a power of two in [{minimum}, {MAX_RESOLUTION}], got {resolution}")
    return log2


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


def model_kwargs_from(model: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments shared by G and D from a model config section (a DictConfig or a checkpoint's dict)."""
    channels = model.get("channels")
    return dict(
        image_channels=int(model["image_channels"]),
        fmap_base=int(model["fmap_base"]),
        fmap_max=int(model["fmap_max"]),
        fmap_min=int(model["fmap_min"]),
        channels={int(k): int(v) for k, v in channels.items()} if channels else None,
    )


class Generator(nn.Module):
    """ProGAN generator producing `resolution` x `resolution` images in [-1, 1] (not clamped).

    forward(z, alpha): alpha in [0, 1] fades in the highest-resolution block. alpha = 0 returns exactly the
    previous resolution's output (its toRGB) upsampled 2x by nearest neighbour; alpha = 1 returns only the
    new block's toRGB. Parameter names are stable across resolutions (see `grow_from`).
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
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.latent_dim = latent_dim
        self.image_channels = image_channels
        width = functools.partial(
            channels_for, fmap_base=fmap_base, fmap_max=fmap_max, fmap_min=fmap_min, table=channels
        )
        self.resolutions = resolutions_up_to(resolution)
        self.blocks = nn.ModuleDict({"4": GeneratorInput(latent_dim, width(4))})
        for res in self.resolutions[1:]:
            self.blocks[str(res)] = GeneratorBlock(width(res // 2), width(res))
        # toRGB for this resolution and the previous one (the fade-in's old path); linear, gain 1.
        self.to_rgb = nn.ModuleDict(
            {str(res): EqualizedConv2d(width(res), image_channels, 1, gain=1.0) for res in self.resolutions[-2:]}
        )

    def forward(self, z: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """Generate images [N, image_channels, R, R] from latents [N, latent_dim]; alpha: 0 old path, 1 new."""
        x = self.blocks["4"](z)
        for res in self.resolutions[1:-1]:
            x = self.blocks[str(res)](x)
        top = self.resolution
        if top == MIN_RESOLUTION:
            return self.to_rgb[str(top)](x)
        new = self.to_rgb[str(top)](self.blocks[str(top)](x))
        if alpha >= 1.0:  # stable phase: the old toRGB is not evaluated at all
            return new
        old = upsample_2x(self.to_rgb[str(top // 2)](x))
        return fade(old, new, alpha)


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
    """4x4 head: minibatch stddev, 3x3 conv, dense 4x4xC -> C, dense C -> 1 score."""

    def __init__(self, channels: int, mbstd_group_size: int) -> None:
        super().__init__()
        self.mbstd_group_size = mbstd_group_size
        self.conv = EqualizedConv2d(channels + 1, channels, 3)
        self.dense = EqualizedLinear(channels * 16, channels)
        self.out = EqualizedLinear(channels, 1, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, 4, 4] -> scores [N]."""
        x = minibatch_stddev(x, self.mbstd_group_size)
        x = lrelu(self.conv(x))
        x = lrelu(self.dense(x.flatten(1)))
        # The score itself in (at least) fp32 even under bf16 autocast: scores reach the hundreds, where
        # bf16's spacing is 2-4, and the losses and drift term are computed from them.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.out(at_least_fp32(x)).squeeze(1)


class Discriminator(nn.Module):
    """ProGAN discriminator (critic) for `resolution` x `resolution` images, returning one score per image.

    forward(images, alpha): alpha = 0 scores only the 2x-downsampled images through the previous
    resolution's fromRGB; alpha = 1 uses only the new block. Mirrors `Generator`.
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
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.image_channels = image_channels
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

    def forward(self, images: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """Score images [N, image_channels, R, R] -> [N]; alpha: 0 old path only, 1 new block only."""
        top = self.resolution
        x = lrelu(self.from_rgb[str(top)](images))
        if top > MIN_RESOLUTION:
            x = self.blocks[str(top)](x)
            if alpha < 1.0:
                old = lrelu(self.from_rgb[str(top // 2)](downsample_2x(images)))
                x = fade(old, x, alpha)
            for res in reversed(self.resolutions[1:-1]):
                x = self.blocks[str(res)](x)
        return self.blocks["4"](x)


def networks_from(model: Mapping[str, Any], resolution: int) -> tuple[Generator, Discriminator]:
    """Fresh G and D at `resolution` from a model config section (a DictConfig or a checkpoint's dict)."""
    kwargs = model_kwargs_from(model)
    G = Generator(resolution, latent_dim=int(model["latent_dim"]), **kwargs)
    D = Discriminator(resolution, mbstd_group_size=int(model["mbstd_group_size"]), **kwargs)
    return G, D


def grow_from(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Initialise `model` from the state of the same kind of model at half (or the same) resolution.

    Every parameter present in both is copied (shapes must agree); parameters only in `model` (the new
    block and the new RGB layer) keep their fresh initialisation; parameters only in `state_dict` may only
    be the older RGB layer, which the bigger model no longer needs. Returns the names left fresh.
    """
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
    return fresh
