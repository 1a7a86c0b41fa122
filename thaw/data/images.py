"""Decode any image file to an RGB uint8 array, and resize it once to the model's input size.

Bad files raise `BadImage(reason)`; the caller lists them as skipped instead of failing the
whole dataset. Each decode briefly changes process-global state (`Image.MAX_IMAGE_PIXELS`,
a warnings filter), so decode in one thread per process (worker processes are fine).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from thaw.errors import ThawError

# Largest image accepted, in pixels (a 10,000 x 10,000 photo). Anything larger is treated as
# a decompression bomb: a small file that would expand to gigabytes of memory.
DEFAULT_MAX_PIXELS = 100_000_000

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)


class BadImage(Exception):
    """The file is not a usable image; `reason` is the text for the skip report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, upright per its EXIF orientation."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL warns above this and refuses above twice it.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # Decode now: truncated files fail here, not later.
                return to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image (unrecognised file format)") from exc
    except BadImage:
        raise
    except Exception as exc:  # PIL's decoders raise many types on corrupt input.
        raise BadImage(f"truncated or corrupt image: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an HxWx3 uint8 RGB array.

    Transparency is composited on white; 16-bit and float images are rescaled, not clipped.
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        gray = _gray_to_uint8(np.asarray(im), mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        im = Image.alpha_composite(Image.new("RGBA", im.size, _WHITE), im)
    try:
        rgb = im.convert("RGB")
    except ValueError as exc:
        raise BadImage(f"unsupported colour mode {mode}") from exc
    return np.asarray(rgb, dtype=np.uint8).copy()


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Rescale a 16-bit, 32-bit integer or float grayscale array to 0..255."""
    a = a.astype(np.float64)
    if mode in _SIXTEEN_BIT or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
        return np.rint(a / 257.0).astype(np.uint8)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (a.min(), a.max())
    scaled = (a - low) / (high - low) if high > low else np.zeros_like(a)
    return np.rint(scaled * 255.0).astype(np.uint8)


def resample_filter(interpolation: str) -> Image.Resampling:
    """The PIL filter for a timm interpolation name (`bicubic`, `bilinear`, ...)."""
    try:
        return _RESAMPLE[interpolation]
    except KeyError:
        raise ThawError(
            f"unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}"
        ) from None


def resize_to_square(img: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the shorter side to `size` and center-crop to `size` x `size` (HxWx3 uint8)."""
    resample = resample_filter(interpolation)
    height, width = img.shape[:2]
    if (height, width) == (size, size):
        return img
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    # Cropping in source coordinates and resizing in one step equals resize-then-crop.
    out = Image.fromarray(img).resize(
        (size, size), resample, box=(left, top, left + side, top + side)
    )
    return np.asarray(out, dtype=np.uint8).copy()
