"""Sampling a trained generator: latents from a seed (optionally truncated), spherical interpolation, and
images in batches; and the time-lapse of a run's sample grids (a GIF, or an H.264 MP4 through imageio and
PyAV, the optional `video` extra). What `pgan-sample` does, as functions.

Latents: image i of seed s is row i of `torch.randn(n, latent_dim)` drawn from a generator seeded with s, so
the first k images of a seed are the same whatever n is ("seed + how many", as in the CryptoPunks demo).

Truncation: ProGAN's generator pixel-normalises z before anything else, so only the direction of z matters
and scaling it toward the mean (StyleGAN's psi on w) would change nothing. Here `psi` truncates the normal
distribution instead, as BigGAN does, by inverse-CDF sampling: each component z maps to
Phi^-1(Phi(-psi) + Phi(z) (Phi(psi) - Phi(-psi))), an exact draw from N(0, 1) restricted to [-psi, psi].
Unlike redrawing the components outside (BigGAN's way, and ours until a redraw stream shared by the batch
made image i depend on n), the map is per component: image i of a seed stays the same for any n, any psi > 0
works, and the images move continuously with psi. Smaller psi: more typical, less varied images; None: none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pgan.errors import UserError
from pgan.networks import Generator, generate_chunks
from pgan.schedule import Stage, alpha_at


def truncate(z: torch.Tensor, psi: float) -> torch.Tensor:
    """Standard normal `z` mapped monotonically onto N(0, 1) truncated to [-psi, psi] (inverse-CDF sampling)."""
    if psi <= 0:
        raise ValueError(f"psi must be > 0 (or null for no truncation), got {psi}")
    z64 = z.double()  # float32 Phi saturates at |z| ~ 5.4; the map is computed in float64 and returned as z's dtype
    low = torch.special.ndtr(torch.tensor(-float(psi), dtype=torch.float64))
    mapped = torch.special.ndtri(low + torch.special.ndtr(z64) * (1 - 2 * low))
    return mapped.clamp(-psi, psi).to(z.dtype)


def seeded_latents(seed: int, n: int, latent_dim: int, psi: float | None = None) -> torch.Tensor:
    """[n, latent_dim] standard normal latents of `seed`; with `psi`, truncated to [-psi, psi] (see `truncate`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return z if psi is None else truncate(z, psi)


def class_index(G: Generator, choice: int | str | None) -> int | None:
    """The class index `choice` names for a class-conditional G: a class name (a folder name, "blue circle"),
    or else an index 0..num_classes-1; None stays None (every class in turn). A UserError for a bad choice, or
    any choice for an unconditional G."""
    if choice is None:
        return None
    if not G.num_classes:
        raise UserError(f"class={choice}: this generator is unconditional (trained without model.conditional=true)")
    names = list(G.class_names)
    if str(choice) in names:  # a name first: folder classes may be called "1", "2", ... in another order
        return names.index(str(choice))
    try:
        index = int(str(choice))
    except ValueError:
        index = -1
    if not 0 <= index < G.num_classes:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(
            f"class={choice} is not one of this generator's {len(names)} classes ({shown}) or 0..{len(names) - 1}"
        )
    return index


def class_choice_labels(G: Generator, choice: int | str | None, n: int) -> torch.Tensor | None:
    """Labels [n] all of the class `choice` names (see `class_index`), or None: every class in turn."""
    index = class_index(G, choice)
    return None if index is None else torch.full((n,), index)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `a` to `b` ([latent_dim] each) at the fractions `t` ([k]): [k, latent_dim].

    Along the great circle between the two directions, with the norm interpolated linearly (the generator
    only sees the direction). Nearly parallel latents fall back to linear interpolation.
    """
    a_unit, b_unit = a / a.norm(), b / b.norm()
    omega = torch.arccos((a_unit * b_unit).sum().clamp(-1.0, 1.0))
    t = t.reshape(-1, 1).to(a.dtype)
    if omega.abs() < 1e-6:
        direction = torch.lerp(a_unit, b_unit, t)
    else:
        direction = (torch.sin((1 - t) * omega) * a_unit + torch.sin(t * omega) * b_unit) / torch.sin(omega)
    norm = torch.lerp(a.norm(), b.norm(), t)
    return direction * norm


@torch.no_grad()
def generate(
    G: Generator, z: torch.Tensor, alpha: float = 1.0, batch_size: int | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """G(z) in batches (default: sized for G's device, pgan.networks.eval_chunk), on G's device, as float images
    in [-1, 1] on the CPU. A class-conditional G takes `labels` [N] (default: sample i in class i mod
    num_classes, pgan.networks.cycle_labels)."""
    return torch.cat([part.float().cpu() for part in generate_chunks(G, z, alpha, batch_size, labels)])


@dataclass(frozen=True)
class Frame:
    """One fixed-latent sample grid of a run, where the training stood when it was written."""

    path: Path
    kimg: float
    resolution: int
    alpha: float

    @property
    def caption(self) -> str:
        """What the time-lapse prints above the frame."""
        return f"{self.kimg:.3f} kimg   {self.resolution} px   alpha {self.alpha:.2f}"


_GRID_NAME = re.compile(r"^fakes-stage-(\d+)-(\d+\.\d+)kimg\.png$")


def run_frames(run_dir: Path, stages: list[Stage]) -> list[Frame]:
    """The run's sample grids (`samples/fakes-<stage>-<kimg>kimg.png`) in training order, each with its
    resolution and the alpha at that point (from the run's own schedule)."""
    by_resolution = {st.resolution: st for st in stages}
    frames = []
    for path in sorted((run_dir / "samples").glob("fakes-stage-*kimg.png")):
        match = _GRID_NAME.match(path.name)
        if match is None or int(match[1]) not in by_resolution:
            continue
        stage, kimg = by_resolution[int(match[1])], float(match[2])
        nimg = round(kimg * 1000) - stage.start_nimg
        frames.append(Frame(path, kimg, stage.resolution, alpha_at(stage, nimg)))
    return sorted(frames, key=lambda f: f.kimg)


def timelapse_images(frames: list[Frame], caption_px: int = 14) -> list[Image.Image]:
    """Every frame scaled (nearest neighbour, so early low-resolution grids look like what G made) to the
    size of the last one, with its caption in a bar above it."""
    with Image.open(frames[-1].path) as last:
        size = last.size
    out = []
    for frame in frames:
        with Image.open(frame.path) as grid:
            scaled = grid.convert("RGB").resize(size, Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (size[0], size[1] + caption_px), (0, 0, 0))
        canvas.paste(scaled, (0, caption_px))
        ImageDraw.Draw(canvas).text((2, 1), frame.caption, fill=(255, 255, 255))
        out.append(canvas)
    return out


HOLD_LAST = 10  # the time-lapse rests on its last frame (the finished run) for this many frame durations


def mp4_codec() -> str:
    """The encoder for MP4 time-lapses: H.264 (libx264) where PyAV's FFmpeg has it, else MPEG-4 part 2."""
    try:
        import av
    except ImportError as exc:
        raise UserError("MP4 output needs PyAV: pip install 'pgan[video]' (or write out=FILE.gif)") from exc
    # PyAV's wheels bundle an FFmpeg with libx264; an FFmpeg built without GPL parts lacks it, and mpeg4 is
    # FFmpeg's own encoder, always there, which ordinary players also read.
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _even(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] padded with a black row / column at the bottom / right to an even height and width."""
    # yuv420p keeps colour at half resolution, so H.264 (and MPEG-4) want even sizes. Padding, not scaling,
    # keeps the nearest-neighbour pixels sharp.
    height, width = pixels.shape[:2]
    return np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)))


def save_timelapse(images: list[Image.Image], out: Path, frame_ms: int) -> None:
    """The time-lapse frames as a looping GIF or an MP4 (by `out`'s suffix), `frame_ms` each, the last held
    HOLD_LAST times as long."""
    if out.suffix.lower() == ".gif":
        # Pillow writes the GIF (imageio's GIF writer is this same call: byte-identical output, one more copy).
        # A GIF has per-frame durations, so the last frame is held without repeating it.
        durations = [frame_ms] * (len(images) - 1) + [frame_ms * HOLD_LAST]
        images[0].save(out, save_all=True, append_images=images[1:], duration=durations, loop=0)
        return
    codec = mp4_codec()
    import imageio.v3 as iio

    frames = [_even(np.asarray(image.convert("RGB"))) for image in images]
    frames += [frames[-1]] * (HOLD_LAST - 1)  # a video's frames all last 1 / fps: the hold is the frame repeated
    # yuv420p is what ordinary players (browsers, QuickTime, phones) decode. Named, not left to the default:
    # PyAV happens to pick it for libx264, but the ffmpeg tool would keep 4:4:4 for RGB input (High 4:4:4).
    iio.imwrite(out, frames, plugin="pyav", codec=codec, fps=1000 / frame_ms, out_pixel_format="yuv420p")
