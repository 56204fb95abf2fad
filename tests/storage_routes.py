"""Train-time cost per image of the two storage routes, on one core: stored S² uint8 rows vs JPEG bytes.

    flock -x /tmp/hpcdl-cpu.lock python tests/storage_routes.py /tmp/photos/train --short-side 256

Both routes end in the same RandomResizedCrop to 224² (area U(0.08, 1),
log-uniform aspect in [3/4, 4/3], bilinear, Pillow), so the difference is
what each must do first: route "rows" reads one S×S×3 row by offset from a
converted file (`ImageRows`), route "jpeg" decodes the original file's bytes
(already in memory; Pillow's `draft` where the crop allows it). The crops
are drawn from one seeded generator, the same for both routes.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def random_box(rng, width: int, height: int) -> tuple[float, float, float, float]:
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x, y, x + w, y + h
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def crop_from_jpeg(data: bytes, rng, out: int):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        box = random_box(rng, width, height)
        # The decoder may scale down by 2, 4, 8 only while the crop stays ≥ out pixels.
        scale = max(1, min(8, int(min(box[2] - box[0], box[3] - box[1]) // out)))
        scale = 1 << (scale.bit_length() - 1)
        image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        factor = image.size[0] / width
        image = image.convert("RGB")
        return image.resize((out, out), Image.BILINEAR, box=tuple(v * factor for v in box))


def crop_from_row(row: np.ndarray, rng, out: int):
    from PIL import Image

    image = Image.fromarray(row.transpose(1, 2, 0))
    return image.resize((out, out), Image.BILINEAR, box=random_box(rng, *image.size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="training tree ROOT/<class>/<image>")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from hpcdl.data.convert import convert_folder
    from hpcdl.data.hdf5 import ImageRows

    files = sorted(Path(args.root).glob("*/*"))[: args.images]
    jpegs = [f.read_bytes() for f in files]
    with tempfile.TemporaryDirectory(prefix="hpcdl-routes-") as work:
        subset = Path(work) / "subset"
        for f in files:
            (subset / f.parent.name).mkdir(parents=True, exist_ok=True)
            (subset / f.parent.name / f.name).symlink_to(f.resolve())
        out = Path(work) / "rows.h5"
        convert_folder(subset, out, short_side=args.short_side, test_fraction=0.0, log=lambda *_: None)
        with ImageRows(out, "train") as rows:
            order = np.random.default_rng(0).permutation(rows.count)
            results = {"rows": [], "jpeg": []}
            for _ in range(args.repeats):
                rng = np.random.default_rng(1)
                started = time.perf_counter()
                for i in order:
                    crop_from_row(rows.read([i])[0], rng, args.crop)
                results["rows"].append((time.perf_counter() - started) / len(order))
                rng = np.random.default_rng(1)
                started = time.perf_counter()
                for i in order:
                    crop_from_jpeg(jpegs[i % len(jpegs)], rng, args.crop)
                results["jpeg"].append((time.perf_counter() - started) / len(order))
            row_kb = rows.row_bytes / 1e3
    jpeg_kb = sum(map(len, jpegs)) / len(jpegs) / 1e3
    best = {k: min(v) * 1e3 for k, v in results.items()}
    print(f"{len(files)} images, RandomResizedCrop to {args.crop}², one core, best of {args.repeats}:")
    print(f"  stored {args.short_side}² uint8 rows: {best['rows']:.2f} ms/image, {row_kb:.0f} KB read per image")
    print(f"  JPEG bytes, decoded per use:     {best['jpeg']:.2f} ms/image, {jpeg_kb:.0f} KB read per image")
    print(f"  ratio {best['jpeg'] / best['rows']:.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
