"""`hpcdl data convert idx|folder` and `hpcdl data info`: build and inspect hpcdl HDF5 files.

    hpcdl data convert idx    [--data-dir DIR] --out fmnist.h5
    hpcdl data convert folder --root train/ [--val-root val/] --out imagenet.h5 --size 224 [--resize 256]
    hpcdl data info fmnist.h5

The folder converter is the ImageNet path: one subfolder per class (names
sorted -> labels 0..K-1; images at any depth below it), JPEG/PNG decoded by Pillow, shorter side resized
to --resize, centre crop --size × --size. It works through the files in
chunks written straight into the HDF5 file, so memory stays at a few chunks
whatever the data set size, and the file appears only once complete.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcdl.errors import ConfigError, DataError, UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MODES = {"RGB": 3, "L": 1}


# -- IDX -> HDF5 -----------------------------------------------------------------------

def convert_idx(data_dir, out, class_names: str = "auto", download: bool = True,
                chunk_rows: int = 256, compression=None) -> dict:
    """Fashion-MNIST/MNIST IDX directory -> HDF5; returns the counts written."""
    from hpcdl.data import fashion_mnist
    from hpcdl.data.dataset import dataset_from_idx_dir
    from hpcdl.data.hdf5 import write_hdf5

    directory = fashion_mnist.locate_fashion_mnist(data_dir, download=download) if not data_dir else Path(data_dir)
    dataset = dataset_from_idx_dir(directory)
    names = _idx_class_names(class_names, directory, dataset.num_classes)
    if len(names) < dataset.num_classes:
        raise ConfigError(f"--class-names: {len(names)} names for labels up to {dataset.num_classes - 1}")
    write_hdf5(out, {"train": (dataset.train_images, dataset.train_labels),
                     "test": (dataset.test_images, dataset.test_labels)},
               names, mean=dataset.mean, std=dataset.std, chunk_rows=chunk_rows, compression=compression)
    return {"train": len(dataset.train_images), "test": len(dataset.test_images), "classes": len(names),
            "shape": dataset.input_shape}


def _idx_class_names(spec: str, directory: Path, num_classes: int) -> list[str]:
    from hpcdl.data import fashion_mnist

    if spec == "auto":
        # Name the classes only when the bytes prove it is Fashion-MNIST; otherwise plain numbers.
        spec = "fashion-mnist" if not fashion_mnist.verify_fashion_mnist(directory) else "numbers"
    if spec == "fashion-mnist":
        return list(fashion_mnist.CLASS_NAMES)
    if spec in ("numbers", "mnist"):
        return [str(i) for i in range(num_classes)]
    return [name.strip() for name in spec.split(",")]


# -- image folder -> HDF5 ---------------------------------------------------------------

def list_image_folder(root: Path, class_names: Sequence[str] | None = None) -> tuple[list[str], list[Path], list[int], int]:
    """(class names, image paths, labels, skipped non-image files) of a one-subfolder-per-class tree."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = found
        if not class_names:
            raise DataError(f"{root}: no class subfolders (expected one subfolder of images per class)")
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown[:5])} not among the training classes")
    label_of = {name: i for i, name in enumerate(class_names)}
    paths, labels, skipped = [], [], 0
    for name in found:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label_of[name])
            elif not path.name.startswith("."):
                skipped += 1
    return list(class_names), paths, labels, skipped


def load_image(path: Path, size: int, resize: int, mode: str = "RGB") -> np.ndarray:
    """uint8 C×size×size: shorter side scaled to `resize` (bilinear), then the centre size×size crop."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; never below the size we resize to.
            img.draft(mode, (resize, resize))
            img = img.convert(mode)
            w, h = img.size
            scale = resize / min(w, h)
            new_w, new_h = max(resize, round(w * scale)), max(resize, round(h * scale))
            img = img.resize((new_w, new_h), Image.BILINEAR)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _load_job(job):
    return load_image(*job)


def split_holdout(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """bool mask: a seeded `fraction` of each class's files go to the test split."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * len(members)))
        test[rng.choice(members, size=take, replace=False)] = True
    return test


def _select(paths, labels, mask):
    return [p for p, m in zip(paths, mask) if m], [label for label, m in zip(labels, mask) if m]


def convert_folder(root, out, size: int, resize: int | None = None, val_root=None, test_fraction: float = 0.1,
                   mode: str = "RGB", workers: int = 1, seed: int = 0, chunk_rows: int = 256,
                   compression=None, log=print) -> dict:
    """Image-folder tree(s) -> HDF5 with train/test splits; returns the counts written."""
    from hpcdl.data.hdf5 import hdf5_writer

    resize = resize or size
    if size < 1 or resize < size:
        raise ConfigError(f"--resize {resize} must be ≥ --size {size} ≥ 1")
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: choose RGB or L")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    root = Path(root)
    class_names, paths, labels, skipped = list_image_folder(root)
    if val_root:
        _, test_paths, test_labels, skipped_val = list_image_folder(Path(val_root), class_names)
        skipped += skipped_val
        splits = {"train": (paths, labels), "test": (test_paths, test_labels)}
    else:
        held = split_holdout(labels, test_fraction, seed)
        splits = {"train": _select(paths, labels, ~held), "test": _select(paths, labels, held)}
    if not splits["train"][0]:
        raise DataError(f"{root}: no JPEG/PNG images found under the class folders")

    rng = np.random.default_rng((seed, 1))
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with hdf5_writer(out) as writer:
            for split, (split_paths, split_labels) in splits.items():
                # Shuffled once, so any contiguous block of rows (a rank's shard, a quick subset) mixes classes.
                order = rng.permutation(len(split_paths))
                split_paths = [split_paths[i] for i in order]
                split_labels = np.asarray(split_labels, dtype=np.int64)[order]
                writer.create_split(split, len(split_paths), (MODES[mode], size, size), chunk_rows, compression)
                for start in range(0, len(split_paths), chunk_rows):
                    jobs = [(p, size, resize, mode) for p in split_paths[start:start + chunk_rows]]
                    images = list(pool.map(_load_job, jobs, chunksize=8) if pool else map(_load_job, jobs))
                    writer.write(split, start, np.stack(images), split_labels[start:start + len(jobs)])
                log(f"  {split}: {len(split_paths):,} images")
            writer.finish(class_names)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {"train": len(splits["train"][0]), "test": len(splits["test"][0]), "classes": len(class_names),
            "skipped": skipped, "shape": (MODES[mode], size, size)}


# -- command line -----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcdl data convert", description="Build an hpcdl HDF5 dataset file.")
    sub = parser.add_subparsers(dest="source", required=True)
    idx = sub.add_parser("idx", help="Fashion-MNIST/MNIST IDX files -> HDF5")
    idx.add_argument("--data-dir", help="directory with the four IDX files (default: search like `hpcdl train`)")
    idx.add_argument("--out", required=True, help="HDF5 file to write")
    idx.add_argument("--class-names", default="auto",
                     help="'auto' (Fashion-MNIST names if the checksums say so, else numbers), "
                          "'fashion-mnist', 'mnist', or a comma-separated list")
    idx.add_argument("--no-download", action="store_true", help="never download Fashion-MNIST")
    folder = sub.add_parser("folder", help="one-subfolder-per-class JPEG/PNG tree -> HDF5 (the ImageNet path)")
    folder.add_argument("--root", required=True, help="training tree: ROOT/<class>/<image>")
    folder.add_argument("--out", required=True, help="HDF5 file to write")
    folder.add_argument("--size", type=int, required=True, help="side of the stored square images")
    folder.add_argument("--resize", type=int, help="shorter side before the centre crop (default: --size)")
    folder.add_argument("--val-root", help="test tree with the same class folders (default: hold out --test-fraction)")
    folder.add_argument("--test-fraction", type=float, default=0.1, help="per-class holdout without --val-root")
    folder.add_argument("--mode", default="RGB", choices=sorted(MODES), help="RGB (3 channels) or L (grayscale)")
    folder.add_argument("--workers", type=int, default=1, help="decoding processes")
    folder.add_argument("--seed", type=int, default=0, help="seed of the holdout and of the stored order")
    for sp in (idx, folder):
        sp.add_argument("--chunk-rows", type=int, default=256, help="images per HDF5 chunk (and per write)")
        sp.add_argument("--compression", choices=("gzip", "lzf"), help="HDF5 compression (default none: fastest reads)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`hpcdl data ARGS`: ARGS is `convert idx|folder ...`, `info FILE`, or just `idx|folder ...`.

    Returns the exit status; user errors propagate as UserError (the CLI prints them, exit 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        return info_main(argv[1:])
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    return convert_main(argv)


def convert_main(argv: Sequence[str]) -> int:
    """`hpcdl data convert idx|folder ...`."""
    args = _parser().parse_args(argv)
    if args.source == "idx":
        counts = convert_idx(args.data_dir, args.out, args.class_names, download=not args.no_download,
                             chunk_rows=args.chunk_rows, compression=args.compression)
    else:
        print(f"converting {args.root} -> {args.out}")
        counts = convert_folder(args.root, args.out, args.size, args.resize, args.val_root, args.test_fraction,
                                args.mode, args.workers, args.seed, args.chunk_rows, args.compression)
    shape = "×".join(str(d) for d in counts["shape"])
    skipped = f", {counts['skipped']} non-image files skipped" if counts.get("skipped") else ""
    print(f"wrote {args.out}: {counts['train']:,} train + {counts['test']:,} test images {shape}, "
          f"{counts['classes']} classes{skipped}")
    return 0


def info_main(argv: Sequence[str] | None = None) -> int:
    """`hpcdl data info FILE`: print the summary of an hpcdl HDF5 file."""
    from hpcdl.data.hdf5 import describe_hdf5

    parser = argparse.ArgumentParser(prog="hpcdl data info", description="Summarise an hpcdl HDF5 dataset file.")
    parser.add_argument("file")
    print(describe_hdf5(parser.parse_args(argv).file))
    return 0



if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
