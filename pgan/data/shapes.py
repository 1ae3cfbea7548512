"""Procedural anti-aliased coloured shapes with 16 known modes (4 shapes x 4 colours), rendered at any resolution.

Item `i` draws everything from `np.random.default_rng([seed, i])` in normalised coordinates, so the same
index has the same geometry at every resolution. Mode = shape_index * len(COLOURS) + colour_index.
Nuisance factors: centre jitter, size, rotation and a dark background tint; the foreground colour is exact
so a mode can be read back from the pixels.

Rendering draws a mask at 4x supersampling with PIL.ImageDraw and box-filters it down. Measured on one
core of the 2-core dev machine (including the tensor conversion): about 0.27 ms per item at 32 px and
2.2 ms at 256 px.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from pgan.data.labels import ClassLabels
from pgan.data.pil import pil_mode, to_signed_tensor

SHAPES = ("circle", "square", "triangle", "cross")

# Well separated in hue AND in luma (PIL "L" = 0.299 R + 0.587 G + 0.114 B: about 78, 112, 165, 222), so
# with channels=1 the four colours stay four distinct grey levels, all above the background (luma <= 45).
COLOURS = ("blue", "red", "green", "yellow")
COLOUR_RGB = {
    "blue": (35, 65, 245),
    "red": (255, 55, 35),
    "green": (80, 225, 80),
    "yellow": (255, 235, 70),
}

NUM_MODES = len(SHAPES) * len(COLOURS)
MODE_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)

SUPERSAMPLING = 4

# Geometry in normalised units (image side = 1). With these bounds every shape stays inside the frame.
_CENTRE_JITTER = 0.08
_SIZE_RANGE = (0.24, 0.34)
_BACKGROUND_RANGE = (5.0, 45.0)


@dataclass(frozen=True)
class ShapeParams:
    """Everything that defines one item, drawn from its seed."""

    mode: int
    centre: tuple[float, float]
    size: float  # half-extent of the shape, normalised
    angle: float  # radians
    background: tuple[int, int, int]

    @property
    def shape(self) -> str:
        """The shape's name."""
        return SHAPES[self.mode // len(COLOURS)]

    @property
    def colour(self) -> str:
        """The foreground colour's name."""
        return COLOURS[self.mode % len(COLOURS)]


def draw_params(seed: int, index: int) -> ShapeParams:
    """The parameters of item `index` of the dataset with `seed` (resolution-independent)."""
    rng = np.random.default_rng([seed, index])
    mode = int(rng.integers(NUM_MODES))
    centre_x, centre_y = (0.5 + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, size=2)).tolist()
    size = float(rng.uniform(*_SIZE_RANGE))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    red, green, blue = rng.uniform(*_BACKGROUND_RANGE, size=3).round().astype(int).tolist()
    return ShapeParams(mode, (centre_x, centre_y), size, angle, (red, green, blue))


def _outline(shape: str, size: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` around the origin, before rotation (normalised units)."""
    if shape == "square":
        half = 0.85 * size  # slightly smaller so its area is close to the circle's
        return [(-half, -half), (half, -half), (half, half), (-half, half)]
    if shape == "triangle":
        radius = 1.15 * size  # equilateral, circumradius; centroid at the origin
        return [(radius * math.sin(k * 2 * math.pi / 3), -radius * math.cos(k * 2 * math.pi / 3)) for k in range(3)]
    if shape == "cross":
        arm, width = size, 0.36 * size
        quarter = [(width, -arm), (width, -width), (arm, -width)]
        # The outline is one quarter (end of an arm to the next arm) rotated four times by 90 degrees.
        points = []
        for turn in range(4):
            for x, y in quarter:
                for _ in range(turn):
                    x, y = -y, x
                points.append((x, y))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def render(params: ShapeParams, resolution: int) -> Image.Image:
    """Render `params` as an anti-aliased RGB PIL image of `resolution` x `resolution` px."""
    canvas = resolution * SUPERSAMPLING
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    centre_x, centre_y = params.centre[0] * canvas, params.centre[1] * canvas
    if params.shape == "circle":
        radius = params.size * canvas
        draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius), fill=255)
    else:
        cos, sin = math.cos(params.angle), math.sin(params.angle)
        vertices = [
            (centre_x + (x * cos - y * sin) * canvas, centre_y + (x * sin + y * cos) * canvas)
            for x, y in _outline(params.shape, params.size)
        ]
        draw.polygon(vertices, fill=255)
    # BOX over exact 4x4 blocks = the mean coverage of each output pixel: proper anti-aliasing.
    coverage = mask.resize((resolution, resolution), Image.Resampling.BOX)
    foreground = Image.new("RGB", coverage.size, COLOUR_RGB[params.colour])
    background = Image.new("RGB", coverage.size, params.background)
    return Image.composite(foreground, background, coverage)


class ShapesDataset(Dataset):
    """`size` procedural shape images at `resolution` px, 16 modes, a pure function of (seed, index)."""

    num_modes = NUM_MODES

    def __init__(self, resolution: int, size: int = 50000, seed: int = 0, channels: int = 3) -> None:
        if size <= 0:
            raise ValueError(f"ShapesDataset needs size > 0, got {size}")
        if seed < 0:
            raise ValueError(f"ShapesDataset needs seed >= 0, got {seed}")  # numpy seeds must be non-negative
        self.resolution = resolution
        self.size = size
        self.seed = seed
        self.channels = channels
        self.mode = pil_mode(channels)

    def __len__(self) -> int:
        return self.size

    def params(self, index: int) -> ShapeParams:
        """The parameters (mode, geometry, background) of item `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        return draw_params(self.seed, index)

    def mode_of(self, index: int) -> int:
        """The mode label of item `index`, in [0, num_modes): shape_index * len(COLOURS) + colour_index."""
        return self.params(index).mode

    def class_labels(self) -> ClassLabels:
        """The modes as classes (model.conditional=true): 16 classes named like "blue circle"."""
        modes = np.fromiter((draw_params(self.seed, i).mode for i in range(self.size)), dtype=np.int64, count=self.size)
        return ClassLabels(MODE_NAMES, modes)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = render(self.params(index), self.resolution)
        # channels=1 uses PIL's luma conversion; COLOURS are chosen to stay distinct in luma.
        return to_signed_tensor(image.convert(self.mode))
