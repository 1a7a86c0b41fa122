"""Decode any image file to an RGB uint8 array, and resize it once to the model's input size.

Bad files raise `BadImage(reason)`; the caller lists them as skipped instead of failing the
whole dataset. Sizes are checked from the file header before anything is decoded, with
thaw's own limits: no process-wide Pillow setting (`Image.MAX_IMAGE_PIXELS`) is read or
changed, so decoding is safe from any thread and leaves the caller's Pillow as it was.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from thaw.errors import ThawError

# Largest image accepted, in pixels: Pillow's own default `Image.MAX_IMAGE_PIXELS`
# (about 9,500 x 9,500), so thaw refuses every image Pillow would call a decompression bomb
# (a small file that expands to gigabytes of memory), whatever the process has set.
DEFAULT_MAX_PIXELS = 89_478_485
# Smallest side accepted, in pixels. Smaller images (icons, tracking pixels, thumbnails
# saved by mistake) carry no usable detail; they are skipped, not silently upsampled.
MIN_IMAGE_SIDE = 8

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Transparent pixels are composited on white, the background of most product photos and
# scanned documents (and what a browser shows behind a transparent PNG).
_WHITE = (255, 255, 255, 255)
# The compact prepared format re-encodes resized images at this JPEG quality with 4:2:0
# chroma subsampling (libjpeg's usual photo setting): about 10 KB per 224 px photo instead of
# 150 KB raw, for a mean absolute error of about 2/255 (benchmarks/prepared_format.py).
JPEG_QUALITY = 90


class BadImage(Exception):
    """The file is not a usable image; `reason` is the text for the skip report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    reduce_to: int | None = None,
) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, upright per its EXIF orientation.

    The header's size is checked first (`check_size`), so a bomb is refused unread. With
    `reduce_to`, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    as `Image.thumbnail` does) while both sides stay at least `reduce_to`: a 24-megapixel
    photo then needs a few MB instead of 72.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(*im.size, max_pixels=max_pixels, min_side=min_side)
            if reduce_to is not None:
                im.draft(None, (reduce_to, reduce_to))  # a no-op except for JPEG
            im.load()  # Decode now: truncated files fail here, not later.
            return to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own check, should the process have set a stricter limit than ours.
        raise BadImage(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image (unrecognised file format)") from exc
    except BadImage:
        raise
    except Exception as exc:  # PIL's decoders raise many types on corrupt input.
        raise BadImage(f"truncated or corrupt image: {exc}") from exc


def check_size(width: int, height: int, *, max_pixels: int, min_side: int) -> None:
    """Refuse an image of more than `max_pixels` pixels or with a side below `min_side`."""
    if width * height > max_pixels:
        raise BadImage(
            f"decompression bomb: {width}x{height} = {width * height:,} pixels, more than "
            f"the limit of {max_pixels:,} (max_pixels)"
        )
    if min(width, height) < min_side:
        raise BadImage(
            f"too small: {width}x{height} px, a side below the minimum of {min_side} px "
            "(min_side); not upsampled"
        )


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
    if mode in _SIXTEEN_BIT or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
        # round(a * 255 / 65535) in integers: no float copy of a large image, and no ties.
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (a.min(), a.max())
    scaled = (a - low) / (high - low) if high > low else np.zeros_like(a)
    return np.rint(scaled * 255.0).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """An HxWx3 uint8 RGB array as baseline JPEG bytes (4:2:0, no metadata)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


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
