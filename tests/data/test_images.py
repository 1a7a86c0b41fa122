"""Decoding real files of every common mode to RGB uint8, and refusing bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from thaw.data.images import BadImage, decode_image, resize_to_square
from thaw.errors import ThawError


def encode(im: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def check_rgb(a: np.ndarray, height: int, width: int) -> None:
    assert a.dtype == np.uint8 and a.shape == (height, width, 3)


def test_rgb_jpeg() -> None:
    a = decode_image(encode(Image.new("RGB", (7, 5), (10, 200, 30)), "JPEG", quality=100))
    check_rgb(a, 5, 7)
    assert np.abs(a.astype(int) - [10, 200, 30]).max() <= 3


def test_grayscale() -> None:
    a = decode_image(encode(Image.new("L", (4, 3), 100)))
    check_rgb(a, 3, 4)
    assert (a == 100).all()


def test_one_bit() -> None:
    a = decode_image(encode(Image.new("1", (4, 3), 1)))
    assert (a == 255).all()


def test_palette_with_and_without_transparency() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    check = decode_image(encode(im))
    assert check[0, 0].tolist() == [255, 0, 0] and check[0, 1].tolist() == [0, 0, 255]
    transparent = decode_image(encode(im, transparency=0))
    assert transparent[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert transparent[0, 1].tolist() == [0, 0, 255]


def test_rgba_is_composited_on_white() -> None:
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    a = decode_image(encode(im))
    check_rgb(a, 1, 3)
    assert a[0, 0].tolist() == [255, 255, 255]
    assert a[0, 1].tolist() == [0, 0, 255]
    assert a[0, 2, 0] == 255 and 120 <= a[0, 2, 1] <= 135


def test_gray_alpha() -> None:
    im = Image.new("LA", (2, 1))
    im.putdata([(0, 0), (0, 255)])
    a = decode_image(encode(im))
    assert a[0, 0].tolist() == [255, 255, 255] and a[0, 1].tolist() == [0, 0, 0]


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    a = decode_image(encode(im))
    check_rgb(a, 1, 4)
    assert a[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_image() -> None:
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    a = decode_image(encode(im, "TIFF"))
    assert a[0, :, 1].tolist() == [0, 128, 255]


def test_cmyk() -> None:
    a = decode_image(encode(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "TIFF"))
    check_rgb(a, 2, 2)
    assert (a == [255, 0, 0]).all()


def test_exif_orientation_is_applied() -> None:
    # Stored 20 wide x 10 tall: left half red, right half blue; EXIF 6 = rotate 90 CW.
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = [255, 0, 0]
    pixels[:, 10:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    a = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=100, exif=exif))
    check_rgb(a, 20, 10)  # upright: 20 tall x 10 wide
    assert a[2, 5, 0] > 200 and a[2, 5, 2] < 50  # top is red
    assert a[17, 5, 2] > 200 and a[17, 5, 0] < 50  # bottom is blue


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"\x89PNG garbage \x00\xff" * 20, "not an image"),
        (b"name,label\ncat.png,cat\n", "not an image"),
    ],
    ids=["zero-byte", "garbage", "text-file"],
)
def test_bad_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason) as info:
        decode_image(data)
    assert reason in info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(BadImage, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("side", [12, 40], ids=["above-limit", "above-twice-limit"])
def test_decompression_bomb(side: int) -> None:
    data = encode(Image.new("RGB", (side, side)))
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(data, max_pixels=100)
    assert decode_image(data, max_pixels=side * side).shape == (side, side, 3)


def test_resize_to_square_center_crops() -> None:
    img = np.zeros((10, 20, 3), dtype=np.uint8)
    img[:, :5] = [255, 0, 0]
    img[:, 5:15] = [0, 255, 0]
    img[:, 15:] = [0, 0, 255]
    same_scale = resize_to_square(img, 10, "bicubic")
    assert same_scale.shape == (10, 10, 3) and (same_scale == [0, 255, 0]).all()
    small = resize_to_square(img, 5, "bilinear")
    assert small.shape == (5, 5, 3) and small.dtype == np.uint8
    assert (small[:, :, 1] > 200).all()
    big = resize_to_square(np.full((3, 4, 3), 7, dtype=np.uint8), 32, "lanczos")
    assert big.shape == (32, 32, 3) and (big == 7).all()


def test_resize_unknown_interpolation() -> None:
    with pytest.raises(ThawError, match="unknown interpolation 'cubic'"):
        resize_to_square(np.zeros((4, 4, 3), dtype=np.uint8), 2, "cubic")
