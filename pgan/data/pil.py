"""The PIL helpers every image source shares: decode a file by fixed conversion rules, pick the PIL mode for a
channel count, centre-crop and resize to a square, and turn the result into a [-1, 1] tensor.

Conversion rules, applied in this order to every decoded image (the names are those a FolderReport counts):

- first_frame: a multi-frame file (animated GIF, multi-page TIFF, MPO) gives its first frame only.
- exif_rotated: an EXIF orientation tag (2-8) is applied, so the image is upright as a viewer shows it.
- 16bit_scaled: 16-bit images (PIL modes I;16, I;16B, I;16L and I) become 8-bit by the full 16-bit range:
  round(value / 257), so 65535 is white (PIL's convert("L") would clip everything above 255 to white).
  Mode I values outside 0..65535 are clipped first. A transparency key on a 16-bit image is ignored.
  16-bit colour PNGs (RGB, RGBA) need no rule: PIL keeps the top byte of each sample when it opens them.
- float_scaled: 32-bit float images (PIL mode F, e.g. float TIFFs) become 8-bit L. An image whose values all lie
  in [0, 1] takes 1.0 as white (the float image convention); any other takes 255.0 as white. Values are clipped
  to that range and NaN is black (PIL's convert would clip every value to 0..255, a [0, 1] image to black).
- palette: palette images (P, PA) are expanded to RGB, or to RGBA when they have transparency.
- alpha_composited: images with an alpha channel or a transparency key (RGBA, LA, PA, and P, L or RGB with
  tRNS/GIF transparency) are composited onto a white background; dropping the alpha instead would show whatever
  colour the encoder left under transparent pixels. Grayscale stays grayscale.
- cmyk: CMYK is converted to RGB by PIL's formula (no ICC colour management).
- other_mode: any other mode (YCbCr, LAB, HSV, ...) goes through PIL's convert("RGB"); bilevel (1) becomes
  grayscale L without a rule of its own.
- grayscale_to_rgb: with channels=3, a grayscale image becomes RGB by repeating its luma in R, G and B.
- rgb_to_luma: with channels=1, a colour image becomes grayscale by ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B).
- cropped_non_square: a non-square image is centre-cropped to a square (on its shorter side).
- upscaled: with small_images="upscale", an image whose shorter side is below the resolution is kept and
  enlarged (LANCZOS) instead of skipped.
Every image is then resized to resolution x resolution px with LANCZOS (see square_resize). ICC profiles are
not applied (pixel values are taken as sRGB).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from pgan.data.prepared import uint8_to_signed
from pgan.errors import UserError

# Only the decoders for the image extensions the scan accepts: a hostile file named *.png must not reach e.g.
# the EPS plugin, which runs Ghostscript. "JPEG" also opens MPO (camera JPEGs with extra frames): PIL registers
# no opener for "MPO".
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

# PIL mode for each supported channel count: "L" is ITU-R 601 luma.
PIL_MODES = {1: "L", 3: "RGB"}

# Resize first by an integer box reduction down to at most 3x the target, then LANCZOS the rest:
# PIL documents reducing_gap=3 as indistinguishable from fair resampling in most cases, and it is much faster
# when a large photo goes to a tiny early-stage resolution.
_REDUCING_GAP = 3.0

_ORIENTATION = 0x0112  # EXIF tag
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_GREY_MODES = frozenset({"1", "L", "LA"})


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
    return uint8_to_signed(F.pil_to_tensor(image))


def _orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1-8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF blocks raise anything from struct.error to KeyError; the pixels are fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _scale_16bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit L by round(value / 257); PIL's convert("L") clips at 255 instead."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def _scale_float(image: Image.Image) -> Image.Image:
    """A float image as 8-bit L: white is 1.0 when every value lies in [0, 1], else 255.0; NaN is black."""
    values = np.asarray(image, dtype=np.float64)
    values = np.where(np.isnan(values), 0.0, values)  # +-inf stay, and are clipped below
    finite = values[np.isfinite(values)]
    unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
    scaled = np.clip(values * (255.0 if unit else 1.0), 0.0, 255.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def to_base(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """`image` as "L" or "RGB" by the module's colour rules, and the names of the rules applied."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _scale_16bit(image), ["16bit_scaled"]
    if mode == "F":
        return _scale_float(image), ["float_scaled"]
    rules = ["palette"] if mode in ("P", "PA") else []
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rules.append("alpha_composited")
        # convert("RGBA") honours palette transparency and tRNS colour keys; alpha_composite needs RGBA.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        # R = G = B for grey input, so ITU-R 601 luma gives back the grey exactly.
        return (flat.convert("L") if mode in _GREY_MODES else flat), rules
    if mode in ("L", "RGB"):
        return image, rules
    if mode in ("1", "P"):
        return image.convert("L" if mode == "1" else "RGB"), rules
    rules.append("cmyk" if mode == "CMYK" else "other_mode")
    return image.convert("RGB"), rules


def upright(image: Image.Image) -> tuple[Image.Image, int]:
    """`image` with its EXIF orientation applied, and that orientation."""
    orientation = _orientation(image)
    return (ImageOps.exif_transpose(image) if orientation != 1 else image), orientation


def read_image(path: Path | str, resolution: int, mode: str) -> Image.Image:
    """Decode `path` and apply every conversion rule: a `mode` image of `resolution` x `resolution` px."""
    with Image.open(path, formats=PIL_FORMATS) as image:
        # JPEGs can decode straight at 1/2, 1/4 or 1/8 scale; keep >= 3x the target like reducing_gap.
        image.draft(None, (resolution * 3, resolution * 3))
        base, _ = to_base(upright(image)[0])
        return square_resize(base.convert(mode), resolution)
