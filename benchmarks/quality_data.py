"""The quality benchmark's datasets, written as ImageFolder trees with fixed
``train/``, ``val/`` and ``test/`` folders, so thaw and the textbook script train on the
very same images and are tested on the very same images.

All of them exist offline on this machine:

- ``fmnist-1k`` / ``fmnist-2k``: Fashion-MNIST (Debian ``dataset-fashion-mnist``), 100 or 200
  training images per class and 30 or 50 validation images from the official training set,
  100 test images per class from the official test set.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), a fixed
  stratified 80/20 train/test split, 15 % of the training part held out for validation.
- ``glyphs``: lowercase letters rendered here from the 38 DejaVu and Liberation font files
  (Debian ``fonts-dejavu-core``, ``fonts-liberation``) in random size, weight, rotation,
  position and colours, on noisy backgrounds: synthetic text, far from ImageNet's photos.
  Mirror pairs (b/d, p/q, n/u) make horizontal flips label-changing.

Sets made for the reference comparison (``REPORT`` below; thaw's defaults were never tuned on
them):

- ``fmnist-tops``: fine-grained, three similar Fashion-MNIST classes (T-shirt/top, Pullover,
  Shirt), 150 training, 40 validation and 150 test images per class.
- ``shapes-clutter``: colour objects in clutter, six shapes drawn here (circle, square,
  triangle, star, cross, ring) in random colour, size, rotation and place over random strokes
  and blobs, 120 / 30 / 80 per class.
- ``scenes-imbalanced``: colour, imbalanced: random patches of seven photos bundled with
  scikit-image (``skimage/data``: astronaut, chelsea, coffee, rocket, motorcycle_left, ihc,
  retina), the class being the photo; training counts fall from 240 to 15 per class, validation
  and test hold 20 and 60 per class.
- ``symbols-fewshot``: few-shot text, ten digits and symbols rendered from the font files like
  ``glyphs``, 15 training images per class, 10 validation, 60 test.

And ``textures`` (tuning group, with the four above): six grayscale textures bundled with
scikit-image (brick, grass, gravel, moon, cell, the Hubble deep field in gray), random patches,
100 / 30 / 80 per class. Patches of a photo or texture come from disjoint vertical bands of it
per split (train 0-60 %, val 60-75 %, test 75-100 % of the width), so no test patch overlaps a
training patch.

Each builder is deterministic (fixed seed): the benchmark's seeds vary training, not data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from thaw.data.fashion_mnist import CLASS_NAMES, DEFAULT_IDX_DIR, load_split

FONT_DIR = Path("/usr/share/fonts/truetype")
GLYPHS = "bdpqnuaeoc"


def _write(root: Path, split: str, class_name: str, index: int, image: Image.Image) -> None:
    folder = root / split / class_name
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{index:05d}.png")


def _fashion_mnist(root: Path, train_per_class: int, val_per_class: int,
                   test_per_class: int = 100, classes: Sequence[str] = CLASS_NAMES) -> None:
    rng = np.random.default_rng(0)
    images, labels = load_split(DEFAULT_IDX_DIR, "train")
    test_images, test_labels = load_split(DEFAULT_IDX_DIR, "test")
    for name in classes:
        label = CLASS_NAMES.index(name)
        picked = rng.choice(np.flatnonzero(labels == label),
                            train_per_class + val_per_class, replace=False)
        for i, index in enumerate(picked):
            split = "train" if i < train_per_class else "val"
            _write(root, split, name, int(index), Image.fromarray(images[index]))
        for index in rng.choice(np.flatnonzero(test_labels == label), test_per_class,
                                replace=False):
            _write(root, "test", name, int(index), Image.fromarray(test_images[index]))


def fmnist_1k(root: Path) -> None:
    _fashion_mnist(root, train_per_class=100, val_per_class=30)


def fmnist_2k(root: Path) -> None:
    _fashion_mnist(root, train_per_class=200, val_per_class=50)


def digits(root: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = (bunch.images * (255 / 16)).round().astype(np.uint8)
    index = np.arange(len(pixels))
    train_val, test = train_test_split(index, test_size=0.2, stratify=bunch.target,
                                       random_state=0)
    train, val = train_test_split(train_val, test_size=0.15, stratify=bunch.target[train_val],
                                  random_state=0)
    for split, members in (("train", train), ("val", val), ("test", test)):
        for i in members:
            _write(root, split, str(bunch.target[i]), int(i), Image.fromarray(pixels[i]))


def glyphs(root: Path, per_class: tuple[int, int, int] = (150, 40, 100),
           letters: str = GLYPHS, seed: int = 0) -> None:
    fonts = sorted(FONT_DIR.rglob("*.ttf"))
    if not fonts:
        raise SystemExit(f"no fonts under {FONT_DIR}: apt-get install fonts-dejavu-core "
                         "fonts-liberation")
    rng = np.random.default_rng(seed)
    counter = 0
    for split, count in zip(("train", "val", "test"), per_class, strict=True):
        for letter in letters:
            for _ in range(count):
                _write(root, split, letter, counter, _render(letter, fonts, rng))
                counter += 1


def _render(letter: str, fonts: list[Path], rng: np.random.Generator, size: int = 64
            ) -> Image.Image:
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(90, 166, 3) * rng.choice([-1, 1], 3)) % 256
    noise = rng.normal(0, rng.uniform(5, 30), (size, size, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 3)):  # clutter strokes
        xy = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=2)
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]),
                              int(rng.integers(size * 4 // 10, size * 8 // 10)))
    glyph = Image.new("L", (size, size), 0)
    ImageDraw.Draw(glyph).text((size / 2, size / 2), letter, font=font, fill=255, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR,
                         translate=tuple(int(v) for v in rng.integers(-8, 9, 2)))
    image.paste(tuple(int(v) for v in foreground), mask=glyph)
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


def fmnist_tops(root: Path) -> None:
    _fashion_mnist(root, train_per_class=150, val_per_class=40, test_per_class=150,
                   classes=("T-shirt_top", "Pullover", "Shirt"))


SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "triangle":
        corners, radii = 3, [r]
    elif shape == "square":
        corners, radii = 4, [r]
    elif shape == "star":
        corners, radii = 10, [r, r * 0.45]
    else:  # cross: twelve corners of a plus sign
        arm = r * 0.35
        base = [(arm, r), (arm, arm), (r, arm), (r, -arm), (arm, -arm), (arm, -r),
                (-arm, -r), (-arm, -arm), (-r, -arm), (-r, arm), (-arm, arm), (-arm, r)]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    return [(cx + radii[k % len(radii)] * np.cos(angle + 2 * np.pi * k / corners),
             cy + radii[k % len(radii)] * np.sin(angle + 2 * np.pi * k / corners))
            for k in range(corners)]


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _draw_shape(rng: np.random.Generator, shape: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), _random_colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):  # clutter: strokes and blobs
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            draw.line([(x, y), tuple(int(v) for v in rng.integers(0, size, 2))],
                      fill=_random_colour(rng), width=int(rng.integers(1, 4)))
        else:
            e = int(rng.integers(3, 9))
            draw.ellipse([x - e, y - e * 2 // 3, x + e, y + e * 2 // 3], fill=_random_colour(rng))
    r = float(rng.uniform(size * 0.18, size * 0.32))
    cx, cy = (float(v) for v in rng.uniform(r, size - r, 2))
    colour, angle = _random_colour(rng), float(rng.uniform(0, 2 * np.pi))
    if shape in ("circle", "ring"):
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=max(2, int(r * 0.3)))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=colour)
    return image


def shapes_clutter(root: Path, per_class: tuple[int, int, int] = (120, 30, 80)) -> None:
    rng = np.random.default_rng(0)
    counter = 0
    for split, count in zip(("train", "val", "test"), per_class, strict=True):
        for shape in SHAPES:
            for _ in range(count):
                _write(root, split, shape, counter, _draw_shape(rng, shape))
                counter += 1


SKIMAGE_BANDS = {"train": (0.0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}


def _skimage_photo(name: str, mode: str) -> Image.Image:
    import skimage

    return Image.open(Path(skimage.__file__).parent / "data" / name).convert(mode)


def _patches(root: Path, sources: dict[str, str], counts: dict[str, dict[str, int]],
             mode: str, size: int = 64) -> None:
    """Random square patches (32 px to three quarters of the band's width, at most 128 px) of
    each class's photo, from its split's vertical band, resized to ``size``."""
    rng = np.random.default_rng(0)
    counter = 0
    for class_name, file in sources.items():
        photo = _skimage_photo(file, mode)
        width, height = photo.size
        for split, (start, stop) in SKIMAGE_BANDS.items():
            left, right = int(width * start), int(width * stop)
            band = right - left
            for _ in range(counts[split][class_name]):
                side = int(rng.integers(32, min(band * 3 // 4, height, 128) + 1))
                x = int(rng.integers(left, right - side + 1))
                y = int(rng.integers(0, height - side + 1))
                patch = photo.crop((x, y, x + side, y + side)).resize((size, size),
                                                                       Image.BILINEAR)
                _write(root, split, class_name, counter, patch)
                counter += 1


TEXTURES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png",
            "moon": "moon.png", "cell": "cell.png", "hubble": "hubble_deep_field.jpg"}


def textures(root: Path, per_class: tuple[int, int, int] = (100, 30, 80)) -> None:
    counts = {split: dict.fromkeys(TEXTURES, n)
              for split, n in zip(SKIMAGE_BANDS, per_class, strict=True)}
    _patches(root, TEXTURES, counts, "L")


SCENES = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
          "rocket": "rocket.jpg", "motorcycle": "motorcycle_left.png", "ihc": "ihc.png",
          "retina": "retina.jpg"}
SCENE_TRAIN_COUNTS = (240, 150, 90, 55, 35, 25, 15)


def scenes_imbalanced(root: Path) -> None:
    counts = {"train": dict(zip(SCENES, SCENE_TRAIN_COUNTS, strict=True)),
              "val": dict.fromkeys(SCENES, 20), "test": dict.fromkeys(SCENES, 60)}
    _patches(root, SCENES, counts, "RGB")


SYMBOLS = "0123456789"


def symbols_fewshot(root: Path) -> None:
    glyphs(root, per_class=(15, 10, 60), letters=SYMBOLS, seed=1)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "fmnist-1k": fmnist_1k, "fmnist-2k": fmnist_2k, "digits": digits, "glyphs": glyphs,
    "textures": textures, "fmnist-tops": fmnist_tops, "shapes-clutter": shapes_clutter,
    "scenes-imbalanced": scenes_imbalanced, "symbols-fewshot": symbols_fewshot,
}
# Defaults are chosen on TUNING only; REPORT is scored, never tuned on (benchmarks/README.md).
TUNING = ("fmnist-1k", "fmnist-2k", "digits", "glyphs", "textures")
REPORT = ("fmnist-tops", "shapes-clutter", "scenes-imbalanced", "symbols-fewshot")


def build(name: str, cache: Path) -> Path:
    """The dataset's folder under ``cache``, written once (a complete tree or none)."""
    target = cache / name
    if not target.exists():
        partial = cache / f".{name}.partial"
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        BUILDERS[name](partial)
        partial.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"of {list(BUILDERS)} (default: all)")
    parser.add_argument("--cache", type=Path, default=Path(".thaw/bench-data"))
    args = parser.parse_args()
    for name in args.names or list(BUILDERS):
        folder = build(name, args.cache)
        counts = {s: sum(1 for _ in (folder / s).rglob("*.png")) for s in ("train", "val", "test")}
        print(name, folder, counts)


if __name__ == "__main__":
    main()
