"""Generate image-folder trees for converter tests and measurements: photo-like JPEGs and bad files.

    python tests/imagegen.py OUT --classes 10 --per-class 300 [--val-per-class 20] [--val-layout csv]

writes OUT/train/<class>/<class>_<i>.JPEG (and OUT/val/...), ImageNet's layout.
The images are not noise: a smooth colour field, a few hard-edged shapes and
fine grain, so that JPEG at quality 90 compresses them to about the size of
ImageNet photos (~110 KB at 500×375) and decoding costs what a photo costs.
Each class has its own palette and shape count, so a model can learn them.
Everything is a function of the seed: the same command writes the same bytes.

The `write_*` functions make the unusual files a converter must handle
(truncated and corrupt JPEGs, non-images, CMYK, grayscale, palette, alpha,
16-bit), for the tests.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

# ImageNet's most common sizes (landscape 4:3 dominates), then a spread of others.
TEXTURE, GRAIN = 50, 36  # half-ranges in pixel levels, tuned for ~110 KB per 500×375 JPEG at q90
IMAGENET_LIKE_SIZES = ((500, 375), (500, 375), (500, 375), (375, 500), (500, 333), (500, 500), (333, 500))


def photo_like(rng: np.random.Generator, width: int, height: int, label: int = 0):
    """A PIL RGB image of the given size: smooth field + shapes + grain, coloured by `label`."""
    from PIL import Image, ImageDraw

    palette = np.random.default_rng((label, 7)).integers(40, 216, size=(3,))
    coarse = rng.normal(0, 45, size=(5, 6, 3)) + palette
    field = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(3 + label % 5):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        colour = tuple(int(v) for v in np.clip(palette[::-1] + rng.normal(0, 60, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    # Texture at a quarter of the resolution plus per-pixel grain: what makes photos cost bytes.
    texture = Image.fromarray(rng.integers(0, 2 * TEXTURE, size=(height // 4 + 1, width // 4 + 1), dtype=np.uint8))
    texture = np.asarray(texture.resize((width, height), Image.BILINEAR), dtype=np.int16)
    grain = rng.integers(0, 2 * GRAIN, size=(height, width), dtype=np.uint8)
    pixels = np.asarray(field, dtype=np.int16) + (texture + grain - (TEXTURE + GRAIN))[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_jpeg(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def image_size(rng: np.random.Generator, size: str) -> tuple[int, int]:
    if size == "imagenet":
        return IMAGENET_LIKE_SIZES[int(rng.integers(len(IMAGENET_LIKE_SIZES)))]
    width, _, height = size.partition("x")
    return int(width), int(height)


def class_names(classes: int) -> list[str]:
    return [f"n{index:08d}" for index in range(classes)]  # WordNet-id-like, sorted = label order


def write_tree(out, classes: int, per_class: int, *, val_per_class: int = 0, val_layout: str = "folders",
               size: str = "imagenet", quality: int = 90, seed: int = 0) -> dict:
    """Write OUT/train (and OUT/val); returns counts and bytes written."""
    out = Path(out)
    total_bytes, names = 0, class_names(classes)
    splits = [("train", per_class)] + ([("val", val_per_class)] if val_per_class else [])
    rows = []
    for split_index, (split, count) in enumerate(splits):
        for label, name in enumerate(names):
            rng = np.random.default_rng((seed, split_index, label))
            folder = out / split / name if split == "train" or val_layout == "folders" else out / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = image_size(rng, size)
                data = encode_jpeg(photo_like(rng, width, height, label), quality)
                file_name = f"{name}_{i}.JPEG" if split == "train" else f"val_{label:04d}_{i:05d}.JPEG"
                (folder / file_name).write_bytes(data)
                total_bytes += len(data)
                if split == "val":
                    rows.append((file_name, name))
    if val_per_class and val_layout == "csv":
        with open(out / "val.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label"])
            writer.writerows(sorted(rows))
    images = classes * (per_class + val_per_class)
    return {"images": images, "bytes": total_bytes, "mean_kb": total_bytes / max(images, 1) / 1e3}


# -- unusual files, one per case the converter must handle --------------------------------

def smooth_rgb(width: int = 48, height: int = 36, seed: int = 0) -> np.ndarray:
    """uint8 H×W×3 with gentle gradients: JPEG keeps it within a few levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(30, 200, size=3)
    image = np.stack([base[0] + 50 * x / width, base[1] + 50 * y / height, base[2] + 25 * (x + y) / (width + height)], -1)
    return image.astype(np.uint8)


def write_jpeg(path, array: np.ndarray, quality: int = 95, mode: str | None = None) -> Path:
    from PIL import Image

    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, format="JPEG", quality=quality)
    return Path(path)


def write_truncated_jpeg(path, array: np.ndarray, keep: float = 0.5) -> Path:
    data = encode_jpeg(__import__("PIL.Image", fromlist=["Image"]).fromarray(array), 95)
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def write_corrupt_jpeg(path, array: np.ndarray) -> Path:
    """A JPEG whose header segments after the SOI marker are overwritten with noise."""
    from PIL import Image

    data = bytearray(encode_jpeg(Image.fromarray(array), 95))
    data[2:64] = np.random.default_rng(5).integers(0, 256, 62, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    return Path(path)


def write_png(path, array: np.ndarray, mode: str | None = None, **save) -> Path:
    from PIL import Image

    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(path, format="PNG", **save)
    return Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write an ImageNet-layout tree of photo-like JPEGs.")
    parser.add_argument("out", help="directory to create (train/ and val/ inside)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=0, help="validation images per class")
    parser.add_argument("--val-layout", choices=("folders", "csv"), default="folders",
                        help="val/<class>/ folders, or one flat val/ with val.csv (file,label)")
    parser.add_argument("--size", default="imagenet", help="'imagenet' (a mix of ImageNet's sizes) or WxH")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_tree(args.out, args.classes, args.per_class, val_per_class=args.val_per_class,
                        val_layout=args.val_layout, size=args.size, quality=args.quality, seed=args.seed)
    print(f"{args.out}: {counts['images']:,} JPEGs, {counts['bytes'] / 1e6:,.1f} MB, "
          f"{counts['mean_kb']:.0f} KB each on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
