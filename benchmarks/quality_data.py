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

Each builder is deterministic (fixed seed): the benchmark's seeds vary training, not data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
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
                   test_per_class: int = 100) -> None:
    rng = np.random.default_rng(0)
    images, labels = load_split(DEFAULT_IDX_DIR, "train")
    test_images, test_labels = load_split(DEFAULT_IDX_DIR, "test")
    for label, name in enumerate(CLASS_NAMES):
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


def glyphs(root: Path, per_class: tuple[int, int, int] = (150, 40, 100)) -> None:
    fonts = sorted(FONT_DIR.rglob("*.ttf"))
    if not fonts:
        raise SystemExit(f"no fonts under {FONT_DIR}: apt-get install fonts-dejavu-core "
                         "fonts-liberation")
    rng = np.random.default_rng(0)
    counter = 0
    for split, count in zip(("train", "val", "test"), per_class, strict=True):
        for letter in GLYPHS:
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


BUILDERS: dict[str, Callable[[Path], None]] = {
    "fmnist-1k": fmnist_1k, "fmnist-2k": fmnist_2k, "digits": digits, "glyphs": glyphs,
}


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
