"""Input pipeline benchmark: one worker making RandomResizedCrop batches, beside torchvision; read amplification.

    hpcdl bench data                                   # generated JPEG folder, converted to HDF5
    hpcdl bench data --images 2048 --batch 64 --batches 24 --repeats 3
    hpcdl bench data --jpeg-root imagenet/train --h5 imagenet.h5 --no-amplification

Every variant makes batches of `--batch` images: RandomResizedCrop to
`--size` (scale 0.08–1, ratio 3/4–4/3), horizontal flip, normalization,
float32 N×C×H×W, in random order, with one worker (one core):

* `hpcdl thread` / `hpcdl process`: `BatchLoader` over the HDF5 file
  (uint8 stored at a short side, read by pread), one worker thread or
  process, prefetch 4; the consumer only takes batches;
* `hpcdl inline`: the same jobs run in the consumer's thread (prefetch 0),
  split into read (pread + CRC-32) and transform (the resize kernel);
* `hpcdl jpeg`: the other storage route: decode each JPEG with Pillow
  (`draft` mode scales down in the decoder where the image allows), then
  the same crop kernel, in the consumer's thread;
* `torchvision`: `ImageFolder` + `DataLoader(num_workers=1)` with
  RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize on the
  same JPEG folder (skipped when torch is not importable).

The first `--warmup` batches of each repeat are not timed (worker start,
JIT load); variants take turns repeat by repeat, so a noisy neighbour slows
all of them. Images/s are median [min, max] over repeats.

Read amplification = bytes fetched from storage ÷ bytes of images
delivered, under the training access pattern (a seeded permutation, one
batch at a time), with the page cache of the file dropped before every
batch (POSIX_FADV_DONTNEED: as for a file much larger than RAM) and
storage bytes from /proc/self/io `read_bytes`; "counted" is what the
reader asked the file system for (`ImageRows.bytes_read`).
The same rows are also read from a copy in the version-1 layout (chunks of
256 rows), to show what per-chunk storage costs.

Roofline. From the page cache a row read is a copy at memory bandwidth
(the read column's GB/s); the transform is arithmetic-bound: per output
pixel ~2 taps per axis when upscaling and ~2·in/out when downscaling.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEAN = (0.485, 0.456, 0.406)  # the ImageNet statistics torchvision's references normalize with
STD = (0.229, 0.224, 0.225)
VARIANTS = ("hpcdl-thread", "hpcdl-process", "hpcdl-inline", "hpcdl-jpeg", "torchvision")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="hpcdl bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--jpeg-root", help="JPEG folder (ROOT/<class>/*.jpg); default: generate --images of them")
    p.add_argument("--h5", help="the same images as an hpcdl HDF5 file; default: convert --jpeg-root")
    p.add_argument("--images", type=int, default=1024, help="JPEGs to generate when no --jpeg-root (default 1024)")
    p.add_argument("--workdir", help="where generated data goes and stays (default: a temporary directory)")
    p.add_argument("--short-side", type=int, default=256, help="stored side when converting (default 256)")
    p.add_argument("--size", type=int, default=224, help="output side of the crops (default 224)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=16, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=6,
                   help="untimed batches at the start of each repeat (≥ prefetch + 1, so every slot is paged in)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    p.add_argument("--no-torch", action="store_true", help="skip the torchvision comparison")
    p.add_argument("--no-amplification", action="store_true", help="skip the cold-cache read measurement")
    p.add_argument("--amplification-batches", type=int, default=8)
    p.add_argument("--compute-ms", type=float, default=0.0,
                   help="also time thread and process workers beside a consumer that computes this long per "
                        "batch (small GEMMs, as a training step's layers do), to see what the GIL costs")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.no_torch and "torchvision" in args.variants:
        args.variants.remove("torchvision")
    for name in ("batch", "batches", "repeats", "images", "size", "short_side"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# -- data ---------------------------------------------------------------------------------------

def prepare(args, workdir: Path) -> tuple[Path, Path]:
    """(JPEG root, HDF5 file): given, or generated and converted into `workdir` (reused when present)."""
    from hpcdl.data.synthetic import write_jpeg_tree

    root = Path(args.jpeg_root) if args.jpeg_root else workdir / "jpeg"
    if not args.jpeg_root and not root.is_dir():
        print(f"generating {args.images} JPEGs in {root}", file=sys.stderr, flush=True)
        write_jpeg_tree(root, args.images, num_classes=10, seed=0)
    h5 = Path(args.h5) if args.h5 else workdir / f"images-{args.short_side}.h5"
    if not args.h5 and not h5.exists():
        from hpcdl.data.convert import convert_folder

        print(f"converting {root} -> {h5} (short side {args.short_side})", file=sys.stderr, flush=True)
        convert_folder(root, h5, short_side=args.short_side, test_fraction=0.02, log=lambda *a: None)
    return root, h5


def _loader(h5: Path, args, *, prefetch: int, kind: str = "thread"):
    from hpcdl.data.augment import build_transforms
    from hpcdl.data.dataset import dataset_from_hdf5
    from hpcdl.data.loader import BatchLoader
    from hpcdl.data.sampler import ShardedSampler

    data = dataset_from_hdf5(h5)
    train, evaluation = build_transforms(data.input_shape, mean=MEAN, std=STD, seed=0, image_size=args.size,
                                         short_side=data.short_side, random_resized_crop=True, flip=True)
    sampler = ShardedSampler(data.train.count, args.batch, 0, 1, seed=0)
    loader = BatchLoader(data, sampler, train, evaluation, prefetch=prefetch, workers=1, worker_kind=kind,
                         memory_bytes=1 << 34)
    return data, loader


def _rate(next_batch, args) -> float:
    for _ in range(args.warmup):
        next_batch()
    started = time.perf_counter()
    for _ in range(args.batches):
        next_batch()
    return args.batches * args.batch / (time.perf_counter() - started)


def hpcdl_variant(h5: Path, args, kind: str):
    """A callable timing one repeat: images/s of a BatchLoader with one worker (or none, inline)."""
    def repeat():
        prefetch = 0 if kind == "inline" else 4
        data, loader = _loader(h5, args, prefetch=prefetch, kind="thread" if kind == "inline" else kind)
        try:
            return _rate(lambda: loader.next_step().take(0), args)
        finally:
            loader.close()
            data.close()
    return repeat


def inline_stages(h5: Path, args) -> dict:
    """ms per image of read (pread + CRC-32) and of the transform, timed apart on the same jobs."""
    from hpcdl.data.augment import random_resized_crop_boxes
    from hpcdl.data.resize import resize_crops

    data, loader = _loader(h5, args, prefetch=0)
    try:
        sampler, split = loader.sampler, data.train
        raw = np.empty((args.batch, *split.image_shape), np.uint8)
        out = np.empty((args.batch, split.image_shape[0], args.size, args.size), np.float32)
        jobs = [(e, s) for e in range(4) for s in range(sampler.steps_per_epoch)][:args.batches + args.warmup]
        read_s = transform_s = 0.0
        for k, (epoch, step) in enumerate(jobs):
            indices = sampler.batch_indices(epoch, step)[0]
            t0 = time.perf_counter()
            split.read(indices, out=raw)
            t1 = time.perf_counter()
            boxes, flips = random_resized_crop_boxes(0, epoch, step, np.arange(args.batch), *split.image_shape[1:])
            resize_crops(raw, boxes, flips, out, MEAN, STD)
            t2 = time.perf_counter()
            if k >= args.warmup:
                read_s, transform_s = read_s + t1 - t0, transform_s + t2 - t1
        images = (len(jobs) - args.warmup) * args.batch
        return {"read_ms_per_image": 1e3 * read_s / images, "transform_ms_per_image": 1e3 * transform_s / images,
                "read_GB_per_s": images * split.row_bytes / read_s / 1e9,
                "output_Mpixel_per_s": images * args.size * args.size / transform_s / 1e6}
    finally:
        loader.close()
        data.close()


def jpeg_variant(root: Path, args):
    """Decode-on-the-fly route: Pillow decode (draft) + hpcdl's RandomResizedCrop kernel, in this thread."""
    from PIL import Image

    from hpcdl.data.augment import random_resized_crop_boxes
    from hpcdl.data.resize import resize_crops

    files = sorted(root.rglob("*.jpg")) + sorted(root.rglob("*.JPEG"))
    rng = np.random.default_rng(0)

    def repeat():
        order = iter(rng.permutation(len(files)).tolist() * 64)
        out = np.empty((1, 3, args.size, args.size), np.float32)
        batch = np.empty((args.batch, 3, args.size, args.size), np.float32)

        def next_batch():
            for k in range(args.batch):
                with Image.open(files[next(order)]) as img:
                    img.draft("RGB", (args.size, args.size))  # the decoder scales by 1/2..1/8 where it can
                    pixels = np.ascontiguousarray(np.asarray(img.convert("RGB")).transpose(2, 0, 1))[None]
                box, flip = random_resized_crop_boxes(0, 0, 0, [k], *pixels.shape[2:])
                resize_crops(pixels, box, flip, out, MEAN, STD)
                batch[k] = out[0]
        return _rate(next_batch, args)
    return repeat


def torchvision_variant(root: Path, args):
    try:
        import torch
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms
    except ImportError:
        return None
    torch.set_num_threads(1)
    recipe = transforms.Compose([transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(root), transform=recipe)

    def repeat():
        loader = DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=1, drop_last=True,
                            prefetch_factor=4)
        state = {"it": iter(loader)}

        def next_batch():
            try:
                return next(state["it"])
            except StopIteration:  # a small folder: start the next epoch
                state["it"] = iter(loader)
                return next(state["it"])
        try:
            return _rate(next_batch, args)
        finally:
            del state["it"]
    return repeat


# -- beside a computing consumer ------------------------------------------------------------------

def _gemm_work(ms: float):
    """A callable that computes for about `ms` milliseconds in 256×256 GEMMs, returning to Python between them."""
    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    b = a.T.copy()

    def gemms(count):
        for _ in range(count):
            np.dot(a, b)

    gemms(20)
    started = time.perf_counter()
    gemms(200)
    per_gemm = (time.perf_counter() - started) / 200
    count = max(1, round(ms / 1e3 / per_gemm))
    return lambda: gemms(count)


def overlap_variant(h5: Path, args, kind: str, compute) -> dict:
    """Per batch: time waiting for the loader and time computing, beside a worker of `kind`."""
    data, loader = _loader(h5, args, prefetch=4, kind=kind)
    try:
        for _ in range(args.warmup):
            loader.next_step().take(0)
            compute()
        wait = busy = 0.0
        for _ in range(args.batches):
            t0 = time.perf_counter()
            loader.next_step().take(0)
            t1 = time.perf_counter()
            compute()
            t2 = time.perf_counter()
            wait, busy = wait + t1 - t0, busy + t2 - t1
        return {"wait_ms": 1e3 * wait / args.batches, "compute_ms": 1e3 * busy / args.batches}
    finally:
        loader.close()
        data.close()


def overlap(h5: Path, args) -> list[dict]:
    compute = _gemm_work(args.compute_ms)
    alone = []
    rows = {"thread": [], "process": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        for _ in range(args.batches):
            compute()
        alone.append(1e3 * (time.perf_counter() - started) / args.batches)
        for kind in rows:
            rows[kind].append(overlap_variant(h5, args, kind, compute))
    base = statistics.median(alone)
    out = [{"worker": "none (compute alone)", "compute_ms": base, "wait_ms": 0.0, "slowdown": 1.0}]
    for kind, runs in rows.items():
        compute_ms = statistics.median(r["compute_ms"] for r in runs)
        out.append({"worker": kind, "compute_ms": compute_ms, "wait_ms": statistics.median(r["wait_ms"] for r in runs),
                    "slowdown": compute_ms / base})
    return out


# -- read amplification -------------------------------------------------------------------------

def _storage_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes")


def _drop_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_amplification(path: Path, args) -> dict:
    """Storage bytes and counted bytes ÷ delivered bytes for the training access pattern, cold cache."""
    from hpcdl.data.hdf5 import ImageRows
    from hpcdl.data.sampler import ShardedSampler

    with ImageRows(path, "train", random_access=True) as rows:
        files = sorted({e.file for e in rows.extents}) if rows.extents else [str(path)]
        sampler = ShardedSampler(rows.count, args.batch, 0, 1, seed=1)
        batches = [sampler.global_batch_indices(0, s) for s in range(min(args.amplification_batches,
                                                                          sampler.steps_per_epoch))]
        out = np.empty((args.batch, *rows.image_shape), np.uint8)
        storage, counted = 0, rows.bytes_read
        for indices in batches:
            _drop_cache(files)  # as if the file were far larger than RAM: nothing read earlier is cached
            before = _storage_read_bytes()
            rows.read(indices, out=out)
            storage += _storage_read_bytes() - before
        counted = rows.bytes_read - counted
        delivered = len(batches) * args.batch * rows.row_bytes
        return {"layout": rows.layout, "chunk_rows": rows.chunk_rows, "rows": rows.count,
                "delivered_bytes": delivered, "storage_bytes": storage, "counted_bytes": counted,
                "storage_amplification": storage / delivered, "counted_amplification": counted / delivered}


def chunked_copy(h5: Path, target: Path, chunk_rows: int = 256) -> Path:
    """The same training rows in the version-1 layout (Fletcher-32 chunks), for the comparison."""
    from hpcdl.data.hdf5 import read_hdf5, read_hdf5_meta, write_hdf5

    if not target.exists():
        meta = read_hdf5_meta(h5)
        write_hdf5(target, {"train": read_hdf5(h5, "train"), "test": read_hdf5(h5, "test")}, meta["class_names"],
                   mean=meta["mean"], std=meta["std"], layout="chunked", chunk_rows=chunk_rows)
    return target


# -- main ---------------------------------------------------------------------------------------

def _summary(name: str, rates: list[float]) -> dict:
    return {"variant": name, "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "repeats": [round(r, 1) for r in rates]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hpcdl.threads import pin_threads

    pin_threads(1)
    scratch = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = scratch = Path(tempfile.mkdtemp(prefix="hpcdl-bench-data-"))
    try:
        root, h5 = prepare(args, workdir)
        contenders = {}
        for name in args.variants:
            if name.startswith("hpcdl-") and name != "hpcdl-jpeg":
                contenders[name] = hpcdl_variant(h5, args, name.split("-", 1)[1])
            elif name == "hpcdl-jpeg":
                contenders[name] = jpeg_variant(root, args)
            else:
                theirs = torchvision_variant(root, args)
                if theirs is not None:
                    contenders[name] = theirs
        rates = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, repeat in contenders.items():
                rates[name].append(repeat())
        results = [_summary(name, r) for name, r in rates.items()]
        baseline = next((r["images_per_s"] for r in results if r["variant"] == "torchvision"), None)
        stages = inline_stages(h5, args)
        beside = overlap(h5, args) if args.compute_ms > 0 else []
        amplification = []
        if not args.no_amplification:
            amplification.append(cold_amplification(h5, args))
            amplification.append(cold_amplification(chunked_copy(h5, workdir / "chunked-v1.h5"), args))

        from hpcdl.data.hdf5 import read_hdf5_meta

        meta = read_hdf5_meta(h5)
        shape = meta["splits"]["train"]["shape"]
        jpeg_bytes = [p.stat().st_size for p in list(root.rglob("*.jpg"))[:2000]]
        print(f"RandomResizedCrop {args.size} + flip + normalize, batch {args.batch}, one worker, "
              f"{args.batches} batches × {args.repeats} repeats; HDF5 {meta['splits']['train']['count']:,} images "
              f"stored {'×'.join(map(str, shape))} uint8 ({int(np.prod(shape)):,} B each), JPEG mean "
              f"{np.mean(jpeg_bytes) / 1e3:.0f} KB")
        print(f"{'variant':<16} {'images/s':>10} {'spread':>20} {'vs torchvision':>15}")
        for r in results:
            ratio = f"{r['images_per_s'] / baseline:.2f}" if baseline else ""
            spread = f"[{r['min']:.0f}, {r['max']:.0f}]"
            print(f"{r['variant']:<16} {r['images_per_s']:>10.1f} {spread:>20} {ratio:>15}")
        print(f"inline stages: read {stages['read_ms_per_image']:.3f} ms/image ({stages['read_GB_per_s']:.2f} GB/s "
              f"from the page cache), transform {stages['transform_ms_per_image']:.3f} ms/image "
              f"({stages['output_Mpixel_per_s']:.0f} Mpixel/s out)")
        if beside:
            print(f"beside a consumer computing {args.compute_ms:g} ms per batch (median per batch):")
            for b in beside:
                print(f"  {b['worker']:<22} compute {b['compute_ms']:8.1f} ms ({b['slowdown']:.3f}× alone), "
                      f"waiting for data {b['wait_ms']:7.2f} ms")
        for a in amplification:
            layout = a["layout"] + (f" ({a['chunk_rows']} rows per chunk)" if a["chunk_rows"] else "")
            print(f"read amplification, cold cache, {layout}: storage {a['storage_amplification']:.3f}×, "
                  f"counted {a['counted_amplification']:.3f}× ({a['delivered_bytes'] / 1e6:.1f} MB delivered)")
        report = {"bench": "data", "size": args.size, "batch": args.batch, "batches": args.batches,
                  "repeats": args.repeats, "stored_shape": list(shape), "jpeg_mean_bytes": float(np.mean(jpeg_bytes)),
                  "results": results, "stages": stages, "amplification": amplification, "beside_compute": beside,
                  "ratio_over_torchvision": {r["variant"]: r["images_per_s"] / baseline for r in results}
                  if baseline else {}}
        line = json.dumps(report)
        if args.json:
            Path(args.json).write_text(line + "\n")
        print(line)
        return 0
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
