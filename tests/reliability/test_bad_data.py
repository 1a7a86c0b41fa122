"""Bad data in preprocessing: every problem is refused with a ThawError naming it, or the
image is skipped and the dataset prepared with the problem in the manifest and the report.

Tiny real image folders, written with PIL in tmp_path, prepared for EfficientNet-Lite0 at
64 px; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thaw.backbones import data_config
from thaw.data.images import DEFAULT_MAX_PIXELS, BadImage, decode_image, resize_to_square
from thaw.data.prepare import prepare_dataset
from thaw.data.prepared import Manifest, open_prepared
from thaw.errors import ThawError
from thawctl.cli import main as thaw_cli

SIZE = 64
CONFIG = data_config("efficientnet_lite0", SIZE)
WHITE = [255, 255, 255]
# Pillow's default Image.MAX_IMAGE_PIXELS, as Pillow computes it.
PILLOW_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def noise(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> Path:
    """A PNG of random pixels, distinct for each seed."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def folder(root: Path, layout: dict[str, int]) -> Path:
    """`{"cat": 5, "train/dog": 3}`: that many distinct PNGs in each folder."""
    for number, (name, count) in enumerate(layout.items()):
        for i in range(count):
            noise(root / name / f"img{i:03d}.png", seed=1000 * number + i)
    return root


def save(im: Image.Image, path: Path, fmt: str = "PNG", **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **params)
    return path


def prepare(src: Path, out: Path, **kwargs) -> Manifest:
    return prepare_dataset(str(src), out, data_config=CONFIG, **kwargs)


def report(out: Path) -> str:
    return (out / "validation_report.md").read_text(encoding="utf-8")


def stored(out: Path, src: Path, split: str) -> dict[str, np.ndarray]:
    """A pre-split source's `split` as {source path: stored image} (kept files, path order)."""
    dataset = open_prepared(out)
    skipped = {s["path"] for s in dataset.manifest.skipped}
    paths = sorted(p.relative_to(src).as_posix() for p in (src / split).rglob("*") if p.is_file())
    kept = [p for p in paths if p not in skipped]
    images = dataset.images(split)
    assert len(kept) == len(images)
    return dict(zip(kept, images, strict=True))


def presplit_with(src: Path, specials: dict[str, Image.Image], fmt: str = "PNG") -> Path:
    """A small train/val/test source with each special image in test/cat under its name."""
    folder(src, {"train/cat": 3, "train/dog": 3, "val/cat": 1, "val/dog": 1, "test/dog": 1})
    for name, im in specials.items():
        save(im, src / "test" / "cat" / name, fmt)
    return src


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written chunk by chunk; `rows` None writes the header only (no pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = b"" if rows is None else chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


# --- class folders ------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["fox", "train/fox"])
def test_empty_class_folder_is_an_error_naming_it(tmp_path: Path, empty: str) -> None:
    layout = {"cat": 5, "dog": 5} if "/" not in empty else {
        "train/cat": 5, "train/dog": 5, "val/cat": 1, "val/dog": 1}  # fmt: skip
    src = folder(tmp_path / "src", layout)
    (src / empty / "nested").mkdir(parents=True)
    (src / empty / ".DS_Store").write_bytes(b"\x00")  # hidden files do not count
    with pytest.raises(ThawError, match=rf"\['{empty}/'\] in .* hold no files"):
        prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_class_folder_fails_the_cli_with_exit_code_2(tmp_path: Path, capsys) -> None:
    src = folder(tmp_path / "src", {"cat": 5, "dog": 5})
    (src / "fox").mkdir()
    argv = ["prepare", str(src), str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
            "--image-size", str(SIZE)]  # fmt: skip
    assert thaw_cli(argv) == 2
    assert "thaw: error: class folders ['fox/']" in capsys.readouterr().err


def test_class_whose_files_are_all_unusable_is_an_error(tmp_path: Path) -> None:
    src = folder(tmp_path / "src", {"cat": 5, "dog": 5})
    (src / "fox").mkdir()
    (src / "fox" / "scan.png").write_bytes(b"not a png")
    with pytest.raises(
        ThawError,
        match=r"classes \['fox'\] .* no usable training images: "
        r"all 1 of their files were skipped .*fox/scan.png: not an image",
    ):
        prepare(src, tmp_path / "out", max_bad_fraction=0.5)


@pytest.mark.parametrize("missing_from", ["val", "test"])
def test_class_missing_from_given_split_keeps_indices_and_is_reported(
    tmp_path: Path, missing_from: str
) -> None:
    layout = {f"{s}/{c}": 4 if s == "train" else 2
              for s in ("train", "val", "test") for c in ("cat", "dog", "fox")}  # fmt: skip
    full = folder(tmp_path / "full", layout)
    reference = prepare(full, tmp_path / "ref")
    src = tmp_path / "src"
    shutil.copytree(full, src)
    shutil.rmtree(src / missing_from / "cat")  # the first class: every index would shift
    (src / missing_from / "cat").mkdir()  # an empty folder left behind
    manifest = prepare(src, tmp_path / "out")

    assert manifest.classes == reference.classes == ["cat", "dog", "fox"]
    assert manifest.class_to_idx == reference.class_to_idx
    assert manifest.counts[missing_from] == {"cat": 0, "dog": 2, "fox": 2}
    images = stored(tmp_path / "out", src, missing_from)
    labels = open_prepared(tmp_path / "out").labels(missing_from)
    for (path, image), label in zip(images.items(), labels, strict=True):
        assert manifest.classes[label] == path.split("/")[1]
        source = decode_image((src / path).read_bytes())
        assert np.array_equal(image, resize_to_square(source, SIZE, CONFIG["interpolation"]))
    assert f"empty class folder {missing_from}/cat/ (ignored)" in manifest.warnings
    text = report(tmp_path / "out")
    assert f"classes ['cat'] have no {missing_from} images" in text
    row = {"val": "| cat | 4 | 0 | 2 | 6 |", "test": "| cat | 4 | 2 | 0 | 6 |"}[missing_from]
    assert row in text and "## Warnings (2)" in text


# --- label conflicts ----------------------------------------------------------------------


@pytest.mark.parametrize("presplit", [False, True], ids=["unsplit", "train-val-test"])
def test_same_image_under_two_classes_is_kept_out_of_every_split(
    tmp_path: Path, presplit: bool
) -> None:
    if presplit:
        src = folder(tmp_path / "src", {"train/cat": 4, "train/dog": 4, "val/cat": 1,
                                        "val/dog": 1, "test/cat": 1, "test/dog": 1})  # fmt: skip
        first, second = "train/cat/img000.png", "test/dog/same.png"
    else:
        src = folder(tmp_path / "src", {"cat": 6, "dog": 6})
        first, second = "cat/img000.png", "dog/same.png"
    shutil.copy(src / first, src / second)
    out = tmp_path / "out"
    manifest = prepare(src, out)

    conflicts = {s["path"]: s["reason"] for s in manifest.skipped}
    assert sorted(conflicts) == sorted([first, second])
    assert conflicts[second].startswith(f"label conflict: the same image is also {first}")
    assert "['cat', 'dog']" in conflicts[second]
    dataset = open_prepared(out)
    pixels = resize_to_square(decode_image((src / first).read_bytes()), SIZE)
    for split in ("train", "val", "test"):
        assert not any(np.array_equal(pixels, image) for image in dataset.images(split))
    kept = sum(manifest.split_size(s) for s in ("train", "val", "test"))
    assert kept == sum(1 for p in src.rglob("*.png")) - 2
    text = report(out)
    assert "2 files hold an image that also appears under another class" in text
    assert f"- `{second}`: label conflict" in text


# --- class names --------------------------------------------------------------------------


def test_class_names_are_kept_exactly_in_code_point_order(tmp_path: Path) -> None:
    names = ["日本", "émeu", "a dog", "Zebra", "Ärger", "x|y"]
    src = folder(tmp_path / "src", dict.fromkeys(names, 4))
    manifest = prepare(src, tmp_path / "out")
    expected = ["Zebra", "a dog", "x|y", "Ärger", "émeu", "日本"]
    assert manifest.classes == expected == sorted(names)
    assert manifest.class_to_idx == {name: i for i, name in enumerate(expected)}
    assert open_prepared(tmp_path / "out").manifest == manifest  # survives JSON
    text = report(tmp_path / "out")
    assert "| 日本 | 2 | 1 | 1 | 4 |" in text and "| a dog | 2 |" in text
    assert "| x\\|y | 2 |" in text  # escaped, so the table keeps its columns

    # Another listing order (folders created in reverse) gives the same classes and data.
    again = tmp_path / "again"
    for name in reversed(names):
        (again / name).mkdir(parents=True)
    for path in src.rglob("*.png"):
        shutil.copy(path, again / path.relative_to(src))
    other = prepare(again, tmp_path / "out2")
    assert other.classes == expected and other.fingerprint == manifest.fingerprint


@pytest.mark.parametrize(
    ("first", "second"),
    [("Cat", "cat"), ("train/Cat", "val/cat"), ("caf\u00e9", "cafe\u0301")],
    ids=["case", "case-across-splits", "nfc-nfd"],
)
def test_class_names_equal_but_for_case_or_normalisation_are_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    split = "train/" if "/" in first else ""
    src = folder(tmp_path / "src", {first: 4, second: 4, f"{split}dog": 4})
    a, b = sorted([first.split("/")[-1], second.split("/")[-1]])
    with pytest.raises(
        ThawError,
        match=f"class folders '{a}' and '{b}' .* differ only in "
        "letter case or Unicode normalisation",
    ):
        prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- image sizes --------------------------------------------------------------------------


def test_tiny_images_are_skipped_not_upsampled(tmp_path: Path) -> None:
    src = folder(tmp_path / "src", {"cat": 5, "dog": 5})
    noise(src / "cat" / "sliver.png", 1, size=(5, 40))
    noise(src / "cat" / "pixel.png", 2, size=(7, 7))
    noise(src / "dog" / "smallest.png", 3, size=(8, 8))
    manifest = prepare(src, tmp_path / "out", max_bad_fraction=0.2)
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert reasons == {
        "cat/pixel.png": "too small: 7x7 px, a side below the minimum of 8 px (min_side); "
                         "not upsampled",
        "cat/sliver.png": "too small: 5x40 px, a side below the minimum of 8 px (min_side); "
                          "not upsampled",
    }  # fmt: skip
    assert sum(manifest.counts[s]["dog"] for s in manifest.counts) == 6  # 8 px is enough
    assert "`cat/sliver.png`: too small: 5x40 px" in report(tmp_path / "out")
    assert prepare(src, tmp_path / "lenient", min_side=5).skipped == []


def test_tiny_images_count_towards_the_bad_fraction(tmp_path: Path) -> None:
    src = folder(tmp_path / "src", {"cat": 5, "dog": 5})
    for i in range(3):
        noise(src / "cat" / f"icon{i}.png", 10 + i, size=(4, 4))
    with pytest.raises(ThawError, match=r"3 of 13 files .* cat/icon0.png: too small"):
        prepare(src, tmp_path / "out")


def test_large_jpeg_is_decoded_reduced_and_prepares_correctly(tmp_path: Path) -> None:
    # 4000 x 3000 (12 MP): top half red, bottom half blue.
    pixels = np.zeros((3000, 4000, 3), dtype=np.uint8)
    pixels[:1500] = [255, 0, 0]
    pixels[1500:] = [0, 0, 255]
    big = Image.fromarray(pixels)
    data = io.BytesIO()
    big.save(data, "JPEG", quality=90)
    # Both sides stay >= 2 x 64; DCT scaling decodes 1/8 of each side: 64x fewer pixels.
    assert decode_image(data.getvalue(), reduce_to=2 * SIZE).shape == (375, 500, 3)

    src = presplit_with(tmp_path / "src", {"big.jpg": big}, fmt="JPEG")
    manifest = prepare(src, tmp_path / "out")
    assert manifest.skipped == []
    image = stored(tmp_path / "out", src, "test")["test/cat/big.jpg"].astype(int)
    assert image.shape == (SIZE, SIZE, 3)
    assert np.abs(image[: SIZE // 2 - 4] - [255, 0, 0]).max() <= 12
    assert np.abs(image[SIZE // 2 + 4 :] - [0, 0, 255]).max() <= 12


# --- colour modes -------------------------------------------------------------------------


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, SIZE).round().astype(np.uint16)
    gray16 = Image.fromarray(np.tile(ramp, (SIZE, 1)))
    assert gray16.mode.startswith("I")
    src = presplit_with(tmp_path / "src", {"gray16.png": gray16})
    rgb16 = np.repeat(np.tile(ramp, (SIZE, 1))[:, :, None], 3, axis=2)  # 16-bit RGB PNG
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    (src / "test" / "cat" / "rgb16.png").write_bytes(png(SIZE, SIZE, 16, 2, rows))
    prepare(src, tmp_path / "out")
    images = stored(tmp_path / "out", src, "test")

    expected = (ramp.astype(np.uint32) + 128) // 257  # round(v * 255 / 65535)
    gray = images["test/cat/gray16.png"]
    assert len(np.unique(gray)) == SIZE  # every one of the 64 grey levels survives
    assert (gray == expected[None, :, None]).all()
    colour = images["test/cat/rgb16.png"].astype(int)
    assert len(np.unique(colour)) > SIZE // 2
    assert np.abs(colour - expected[None, :, None]).max() <= 1


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    clear_red = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    half_red = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    clear_gray = Image.new("LA", (16, 16), (0, 0))
    palette = Image.new("P", (16, 16), 0)  # left half index 0 (transparent), right half 1
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    src = presplit_with(tmp_path / "src", {
        "clear_red.png": clear_red, "half_red.png": half_red, "clear_gray.png": clear_gray,
    })  # fmt: skip
    save(palette, src / "test" / "cat" / "palette.png", transparency=0)
    assert Image.open(src / "test" / "cat" / "palette.png").mode == "P"
    prepare(src, tmp_path / "out")
    images = stored(tmp_path / "out", src, "test")

    assert (images["test/cat/clear_red.png"] == WHITE).all()
    assert (images["test/cat/clear_gray.png"] == WHITE).all()
    half = images["test/cat/half_red.png"].astype(int)
    assert (half[..., 0] == 255).all() and (np.abs(half[..., 1:] - 127) <= 1).all()
    mixed = images["test/cat/palette.png"].astype(int)
    edge = 10  # bicubic reaches 2 source pixels (8 output pixels) past the boundary
    assert (mixed[:, : SIZE // 2 - edge] == WHITE).all()
    assert (np.abs(mixed[:, SIZE // 2 + edge :] - [0, 0, 255]) <= 2).all()


def test_cmyk_and_palette_images_are_converted(tmp_path: Path) -> None:
    red_cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    cyan_cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    green = Image.new("P", (16, 16), 2)
    green.putpalette([0, 0, 0, 255, 255, 255, 10, 200, 30] + [0] * 759)
    src = presplit_with(tmp_path / "src", {"green.png": green})
    save(cyan_cmyk, src / "test" / "cat" / "cyan.tif", "TIFF")
    save(red_cmyk, src / "test" / "cat" / "red.jpg", "JPEG", quality=95)
    assert Image.open(src / "test" / "cat" / "red.jpg").mode == "CMYK"
    prepare(src, tmp_path / "out")
    images = stored(tmp_path / "out", src, "test")

    assert (images["test/cat/green.png"] == [10, 200, 30]).all()
    assert (images["test/cat/cyan.tif"] == [0, 255, 255]).all()
    assert np.abs(images["test/cat/red.jpg"].astype(int) - [255, 0, 0]).max() <= 8


# --- decompression bombs --------------------------------------------------------------------


class _NoPillowLimitChanges(types.ModuleType):
    """Installed as PIL.Image's class: any assignment to MAX_IMAGE_PIXELS fails the test."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "MAX_IMAGE_PIXELS":
            raise AssertionError("thaw changed Pillow's process-wide MAX_IMAGE_PIXELS")
        super().__setattr__(name, value)


def test_bomb_header_is_refused_unread_and_pillow_state_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEFAULT_MAX_PIXELS <= PILLOW_DEFAULT_MAX_PIXELS
    before = Image.MAX_IMAGE_PIXELS
    src = folder(tmp_path / "src", {"cat": 10, "dog": 10})
    # 10,000 x 9,000 = 90 MP, just over Pillow's default limit (which Pillow itself only
    # warns about); the file is 57 bytes: a header and no pixel data, so had it been
    # decoded it would be reported as truncated, not as a bomb.
    (src / "cat" / "bomb.png").write_bytes(png(10_000, 9_000, 8, 2, None))
    small = png(40, 40, 8, 0, b"".join(b"\x00" + bytes(40) for _ in range(40)))
    (src / "dog" / "big-for-the-limit.png").write_bytes(small)
    monkeypatch.setattr(Image, "__class__", _NoPillowLimitChanges)
    manifest = prepare(src, tmp_path / "out", max_bad_fraction=0.1)
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert reasons == {
        "cat/bomb.png": "decompression bomb: 10000x9000 = 90,000,000 pixels, "
        "more than the limit of 89,478,485 (max_pixels)"
    }
    strict = prepare(src, tmp_path / "strict", max_bad_fraction=0.1, max_pixels=1_000)
    assert sorted(s["path"] for s in strict.skipped) == [
        "cat/bomb.png",
        "dog/big-for-the-limit.png",
    ]
    assert before == Image.MAX_IMAGE_PIXELS  # unchanged
    assert "`cat/bomb.png`: decompression bomb" in report(tmp_path / "out")


def test_bomb_is_refused_even_with_pillows_own_check_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller's choice, not thaw's
    with pytest.raises(BadImage, match=r"decompression bomb: 10000x9000 = 90,000,000"):
        decode_image(png(10_000, 9_000, 8, 2, None))
    assert Image.MAX_IMAGE_PIXELS is None


def test_the_cli_prepares_jpeg_and_refuses_an_unknown_format(tmp_path: Path, capsys) -> None:
    src = folder(tmp_path / "src", {"cat": 5, "dog": 5})
    argv = ["prepare", str(src), str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
            "--image-size", str(SIZE), "--workers", "0"]  # fmt: skip
    assert thaw_cli([*argv, "--image-format", "png"]) == 2
    assert "image_format must be one of raw, jpeg, got 'png'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert thaw_cli([*argv, "--image-format", "jpeg"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["image_format"] == "jpeg"
