"""Images from a folder tree, centre-cropped to a square and resized; plus the PIL helpers all sources share."""

from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from pgan.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# PIL mode for each supported channel count: "L" is ITU-R 601 luma, "RGB" drops any alpha channel.
PIL_MODES = {1: "L", 3: "RGB"}

# Resize first by an integer box reduction down to at most 3x the target, then LANCZOS the rest:
# PIL documents reducing_gap=3 as indistinguishable from fair resampling in most cases, and it is much faster
# when a large photo goes to a tiny early-stage resolution.
_REDUCING_GAP = 3.0


def pil_mode(channels: int) -> str:
    """The PIL mode ("L" or "RGB") that gives `channels` channels."""
    if channels not in PIL_MODES:
        raise UserError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return PIL_MODES[channels]


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop `image` to a square and resize it to `resolution` x `resolution` px."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop before resizing: resize(box=...) would let the filter read pixels outside the square,
    # leaking the cropped-away borders into the edge pixels.
    square = image.crop((left, top, left + side, top + side))
    # LANCZOS is the sharpest of PIL's filters and antialiases properly when downscaling.
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float32 CHW tensor in [-1, 1]."""
    unit = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    return unit * 2.0 - 1.0


def find_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, in a deterministic (sorted relative path) order."""
    files = (path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    # Sort on the POSIX relative path so the order (and thus the sampler's indices) is the same on every OS.
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


class FolderDataset(Dataset):
    """Every image under a folder (recursively), as [channels, resolution, resolution] tensors in [-1, 1]."""

    def __init__(self, path: str | Path, resolution: int, channels: int = 3) -> None:
        root = Path(path).expanduser()
        if not root.exists():
            raise UserError(f"data.path does not exist: {root}")
        extensions = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        if not root.is_dir():
            raise UserError(f"data.path is not a folder: {root} (expected a folder of {extensions} images)")
        self.files = find_images(root)
        if not self.files:
            raise UserError(f"no images found under data.path {root} (looked recursively for {extensions})")
        self.root = root
        self.resolution = resolution
        self.channels = channels
        self.mode = pil_mode(channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_signed_tensor(self.load(index))

    def load(self, index: int) -> Image.Image:
        """The PIL image at `index`, upright, in the configured mode, cropped and resized."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                # JPEGs can decode straight at 1/2, 1/4 or 1/8 scale; keep >= 3x the target like reducing_gap.
                image.draft(None, (self.resolution * 3, self.resolution * 3))
                upright = ImageOps.exif_transpose(image)
                converted = upright.convert(self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise UserError(f"cannot read image {path}: {error}") from error
        return square_resize(converted, self.resolution)
