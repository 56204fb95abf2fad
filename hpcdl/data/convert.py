"""`hpcdl data convert idx|folder` and `hpcdl data info`: build and inspect hpcdl HDF5 files.

    hpcdl data convert idx    [--data-dir DIR] --out fmnist.h5
    mpiexec -n P hpcdl data convert folder --root train/ [--val-root val/] --short-side 256 --out imagenet.h5
    hpcdl data info imagenet.h5

The folder converter is the ImageNet path. Rank 0 lists the tree, shuffles
each split's files with the seed and cuts the lists into shards of
--shard-images files; every rank converts its share of the shards, each into
its own file next to the output (see `hpcdl.data.shards`), and once all
exist rank 0 stitches them into the output with virtual datasets. The
output does not depend on the number of ranks. Rerun the same command after
an interruption and the finished shards are verified and kept.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hpcdl.errors import ConfigError, DataError, UserError

DEFAULT_SHARD_IMAGES = 5000


# -- IDX -> HDF5 -----------------------------------------------------------------------

def convert_idx(data_dir, out, class_names: str = "auto", download: bool = True, layout: str = "contiguous",
                chunk_rows: int | None = None, compression=None) -> dict:
    """Fashion-MNIST/MNIST IDX directory -> HDF5; returns the counts written."""
    from hpcdl.data import fashion_mnist
    from hpcdl.data.dataset import dataset_from_idx_dir
    from hpcdl.data.hdf5 import DEFAULT_CHUNK_ROWS, write_hdf5

    if layout != "chunked" and (chunk_rows is not None or compression):
        raise ConfigError("--chunk-rows and --compression apply to --layout chunked (format version 1) only; "
                          "contiguous rows are read by offset")
    directory = fashion_mnist.locate_fashion_mnist(data_dir, download=download) if not data_dir else Path(data_dir)
    dataset = dataset_from_idx_dir(directory)
    names = _idx_class_names(class_names, directory, dataset.num_classes)
    if len(names) < dataset.num_classes:
        raise ConfigError(f"--class-names: {len(names)} names for labels up to {dataset.num_classes - 1}")
    write_hdf5(out, {"train": (dataset.train_images, dataset.train_labels),
                     "test": (dataset.test_images, dataset.test_labels)},
               names, mean=dataset.mean, std=dataset.std, layout=layout,
               chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS, compression=compression)
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


# -- image folder -> sharded HDF5 ----------------------------------------------------------

class _OneProcess:
    """The few collectives `convert_folder` uses, for a run without an MPI launcher."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj):
        return [obj]

    def gather(self, obj, root: int = 0):
        return [obj]


def _world():
    """MPI.COMM_WORLD under a launcher with several ranks; otherwise no MPI at all."""
    from hpcdl.threads import launcher_world_size

    if launcher_world_size() > 1:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return _OneProcess()


def _collective(exc: UserError) -> UserError:
    exc.collective = True  # raised on every rank at once: printed once, no abort needed
    return exc


@dataclass
class _Plan:
    """What rank 0 decided and every rank follows."""

    class_names: list[str]
    splits: dict            # split -> ImageList, in stored order
    specs: list             # ShardSpec, train shards then test shards
    existing: list[str]     # shard file names already present
    geometry: object        # imagefolder.Geometry
    short_side: int
    conversion: dict        # provenance stored in the output
    ignored: int            # non-image files under the folders
    unlisted: int           # files in --val-dir that --val-csv does not name
    folder_of: dict         # split -> the class-folder root its labels come from (None for a CSV)
    reset: int              # files removed by --restart


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert_folder(root, out, *, short_side: int | None = None, size: int | None = None, resize: int | None = None,
                   val_root=None, val_csv=None, val_dir=None, test_fraction: float | None = None,
                   mode: str = "RGB", workers: int = 1, seed: int = 0, shard_images: int = DEFAULT_SHARD_IMAGES,
                   restart: bool = False, comm=None, log: Callable[[str], None] = _stderr,
                   warn: Callable[[str], None] | None = None) -> dict:
    """Image-folder tree(s) -> a sharded, stitched HDF5 file; returns the counts (on every rank).

    `short_side=S` stores the centre S×S square of each image scaled to short
    side S (train-time RandomResizedCrop takes its crops from it);
    `size=N, resize=R` stores the centre N×N of the image scaled to short side
    R (the final size, as before format version 2). Validation images come
    from `val_root` (class subfolders), from `val_csv` (file,label lines, files
    relative to `val_dir`, default the CSV's folder), or else a per-class
    `test_fraction` (default 0.1) of the training tree is held out.
    Collective: call it on every rank of `comm` (default: COMM_WORLD under
    a launcher).
    """
    comm = comm or _world()
    ranks = comm.Get_size()
    if warn is None:
        warn = lambda message: _stderr(f"hpcdl: warning: {message}")  # noqa: E731
    started = time.perf_counter()
    request = _bcast_or_raise(comm, lambda: _check_request(root, out, short_side, size, resize, val_root, val_csv,
                                                           val_dir, test_fraction, mode, shard_images, workers))
    listings = _list_class_folders(comm, request)
    plan = _bcast_or_raise(comm, lambda: _make_plan(request, listings, seed, shard_images, restart))
    if ranks > 1:
        from hpcdl import __version__, guard
        from hpcdl.data.imagefolder import decoder_versions

        # Shards from ranks with other decoders would differ from one another: refuse up front.
        guard.check_consistency(comm, {"decoder": json.dumps(decoder_versions(), sort_keys=True),
                                       "hpcdl": __version__})
    with _abort_all_on_user_error(comm):
        done = _reuse_finished_shards(comm, plan, out, log)
        stats = _convert_remaining_shards(comm, plan, out, done, shard_images, workers, log, warn)
    stats["wall"] = time.perf_counter() - started
    per_rank = comm.gather(stats, root=0)
    return _bcast_or_raise(comm, lambda: _finish(out, plan, done, per_rank, started, log, warn))


# A rank that writes its last line and calls MPI_Abort at once can lose that
# line: hydra's proxy may tear down before it forwards the rank's stderr
# (seen about once in ten runs here). A moment's pause lets it through.
_LAUNCHER_FLUSH_S = 0.5


@contextmanager
def _abort_all_on_user_error(comm):
    """An error only this rank sees (its shard cannot be written) stops every rank now, with the reason."""
    try:
        yield
    except UserError as exc:
        if comm.Get_size() > 1:
            line = (f"hpcdl: rank {comm.Get_rank()}/{comm.Get_size()} on {socket.gethostname()}: "
                    f"{' '.join(str(exc).split())} — aborting all ranks\n")
            sys.stdout.flush()
            os.write(2, line.encode("utf-8", "replace"))
            time.sleep(_LAUNCHER_FLUSH_S)
            comm.Abort(exc.exit_code)
        raise


def _reuse_finished_shards(comm, plan: _Plan, out, log) -> set[str]:
    """Names of the shards an earlier run finished that check out; the ranks share the checking."""
    from hpcdl.data.shards import StaleShard, shard_dir, verify_shard

    rank, ranks = comm.Get_rank(), comm.Get_size()
    directory = shard_dir(out)
    if rank == 0:
        if plan.reset:
            log(f"--restart: removed {plan.reset} files of the earlier conversion from {directory}")
        if plan.existing:
            log(f"resuming: checking {len(plan.existing)} existing shard(s) in {directory}")
    existing = set(plan.existing)
    verified = []
    for spec in [s for s in plan.specs if s.name in existing][rank::ranks]:
        try:
            verify_shard(directory, spec, plan.geometry)
            verified.append(spec.name)
        except StaleShard as exc:
            log(f"{directory / spec.name}: {exc}; converting it again")
    return {name for names in comm.allgather(verified) for name in names}


def _convert_remaining_shards(comm, plan: _Plan, out, done: set, shard_images: int, workers: int, log,
                              warn) -> dict:
    """Convert this rank's share of the shards not yet done; returns its statistics."""
    from hpcdl.data.imagefolder import DecodePool
    from hpcdl.data.shards import shard_dir, write_shard

    rank, ranks = comm.Get_rank(), comm.Get_size()
    directory = shard_dir(out)
    remaining = [s for s in plan.specs if s.name not in done]
    if rank == 0:
        reused = f", {len(done)} reused" if done else ""
        log(f"{len(plan.specs)} shards of ≤ {shard_images:,} images{reused}; "
            f"{len(remaining)} to convert on {ranks} rank(s)")
        if len(remaining) and len(remaining) < ranks:
            log(f"note: {ranks - len(remaining)} rank(s) have no shard to convert; "
                f"a smaller --shard-images spreads the work (the result does not depend on it)")
    halfway = _fault_hook()
    stats = {"rank": rank, "shards": 0, "images": 0, "skipped": 0, "decode": 0.0, "resize": 0.0, "write": 0.0,
             "convert_wall": 0.0}
    who = f"rank {rank}/{ranks}: " if ranks > 1 else ""
    with DecodePool(workers) as pool:
        for spec in remaining[rank::ranks]:
            info = write_shard(directory, spec, plan.splits[spec.split], plan.geometry, plan.class_names,
                               plan.short_side, pool, warn=warn, halfway=halfway(spec))
            seconds = info.seconds
            for key in ("decode", "resize", "write"):
                stats[key] += seconds[key]
            stats["convert_wall"] += seconds["wall"]
            stats["shards"] += 1
            stats["images"] += spec.planned
            stats["skipped"] += len(info.skipped)
            skipped = f" ({len(info.skipped)} skipped)" if info.skipped else ""
            log(f"{who}{spec.name}: {info.rows:,} images{skipped} in {seconds['wall']:.1f} s, "
                f"{spec.planned / max(seconds['wall'], 1e-9):,.0f} files/s")
    return stats


def _bcast_or_raise(comm, work: Callable):
    """Run `work` on rank 0 and hand its result to every rank; its UserError is raised on every rank."""
    outcome = None
    if comm.Get_rank() == 0:
        try:
            outcome = ("ok", work())
        except UserError as exc:
            outcome = ("error", exc)
    status, value = comm.bcast(outcome, root=0)
    if status == "error":
        raise _collective(value)
    return value


def _geometry(short_side, size, resize, mode):
    from hpcdl.data.imagefolder import CHANNELS, Geometry

    if mode not in CHANNELS:
        raise ConfigError(f"--mode {mode!r}: choose {' or '.join(CHANNELS)}")
    if (short_side is None) == (size is None):
        raise ConfigError("give --short-side S (store the centre S×S at short side S, for RandomResizedCrop) "
                          "or --size N [--resize R] (store the final N×N crop)")
    if short_side is not None:
        if resize is not None:
            raise ConfigError("--resize goes with --size; --short-side S is the resize target itself")
        if short_side < 1:
            raise ConfigError(f"--short-side {short_side}: must be ≥ 1")
        return Geometry(short_side, short_side, mode), short_side
    resize = size if resize is None else resize
    if size < 1 or resize < size:
        raise ConfigError(f"--resize {resize} must be ≥ --size {size} ≥ 1")
    geometry, stored_short_side = Geometry(size, resize, mode), 0
    return geometry, stored_short_side


@dataclass
class _Request:
    """The checked arguments, and the class folders to list."""

    out: Path
    root: Path
    geometry: object
    short_side: int
    test_fraction: float
    val_root: Path | None
    val_csv: Path | None
    val_dir: Path | None
    class_names: list[str]
    val_folders: list[str]


def _check_request(root, out, short_side, size, resize, val_root, val_csv, val_dir, test_fraction, mode,
                   shard_images, workers) -> _Request:
    """Rank 0: every argument checked, and the class folders of the trees (one listing each)."""
    from hpcdl.data.imagefolder import class_folders

    geometry, stored_short_side = _geometry(short_side, size, resize, mode)
    if shard_images < 1:
        raise ConfigError(f"--shard-images {shard_images}: must be ≥ 1")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be ≥ 1")
    if val_root and val_csv:
        raise ConfigError("--val-root and --val-csv both give validation labels; choose one")
    if val_dir and not val_csv:
        raise ConfigError("--val-dir names the folder of the files in --val-csv; it needs --val-csv")
    if (val_root or val_csv) and test_fraction:
        raise ConfigError("--test-fraction holds out training images when there is no --val-root or --val-csv")
    test_fraction = 0.1 if test_fraction is None else float(test_fraction)
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    out = Path(out)
    if not out.parent.is_dir():
        raise DataError(f"{out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise DataError(f"{out}: is a directory; --out names the HDF5 file to write")
    class_names = class_folders(root)
    val_folders = class_folders(val_root, class_names) if val_root else []
    return _Request(out, Path(root), geometry, stored_short_side, test_fraction, val_root and Path(val_root),
                    val_csv and Path(val_csv), val_csv and Path(val_dir or Path(val_csv).parent), class_names,
                    val_folders)


def _list_class_folders(comm, request: _Request) -> list | None:
    """Every rank walks a share of the class folders (a metadata load a parallel file system spreads);
    rank 0 receives them all, in class order, as (tree, listing or DataError)."""
    from hpcdl.data.imagefolder import list_class_folder

    folders = [(0, name) for name in request.class_names] + [(1, name) for name in request.val_folders]
    mine = []
    for index in range(comm.Get_rank(), len(folders), comm.Get_size()):
        tree, name = folders[index]
        try:
            mine.append((index, tree, list_class_folder(request.val_root if tree else request.root, name)))
        except DataError as exc:
            mine.append((index, tree, exc))
    gathered = comm.gather(mine, root=0)
    if gathered is None:
        return None
    return [(tree, listing) for _, tree, listing in sorted((item for part in gathered for item in part),
                                                            key=lambda item: item[0])]


def _make_plan(request: _Request, listings: list, seed: int, shard_images: int, restart: bool) -> _Plan:
    """Rank 0: the files of each split in stored order, the shards, and the manifest check."""
    from hpcdl import __version__
    from hpcdl.data import shards
    from hpcdl.data.imagefolder import decoder_versions, join_listings, read_label_csv, split_holdout

    for _, listing in listings:
        if isinstance(listing, DataError):
            raise listing
    class_names, root = request.class_names, request.root
    train, ignored = join_listings(root, [listing for tree, listing in listings if tree == 0], class_names)
    unlisted = 0
    folder_of = {"train": root}
    if request.val_root:
        test, ignored_val = join_listings(request.val_root, [listing for tree, listing in listings if tree == 1],
                                          class_names)
        ignored += ignored_val
        folder_of["test"] = request.val_root
        validation = "folders"
    elif request.val_csv:
        test, unlisted = read_label_csv(request.val_csv, request.val_dir, class_names)
        folder_of["test"] = None
        validation = "csv"
    else:
        held = split_holdout(train.labels, request.test_fraction, seed)
        test = train.take(np.flatnonzero(held))
        train = train.take(np.flatnonzero(~held))
        folder_of["test"] = root
        validation = f"holdout {request.test_fraction}"
    rng = np.random.default_rng((seed, 1))
    # Shuffled once, so that any contiguous block of rows (a shard, a quick subset) mixes the classes.
    splits = {"train": train.take(rng.permutation(len(train))), "test": test.take(rng.permutation(len(test)))}

    geometry = request.geometry
    arguments = {"size": geometry.size, "resize": geometry.resize, "short_side": request.short_side,
                 "mode": geometry.mode, "seed": int(seed), "shard_images": int(shard_images),
                 "validation": validation}
    core = {"arguments": arguments, "decoder": decoder_versions(), "class_names": class_names}
    specs = shards.plan_shards(splits, core, shard_images)
    manifest = dict(core, files={split: {"count": len(images), "sha256": shards.file_list_digest(images)}
                                 for split, images in splits.items()})
    out = request.out
    directory = shards.shard_dir(out)
    reset = 0
    if restart:
        reset = shards.remove_conversion_files(directory)
        if out.is_file():  # it reads its pixels from the shards just removed
            out.unlink()
            reset += 1
    try:
        directory.mkdir(exist_ok=True)
    except OSError as exc:
        raise DataError(f"{directory}: cannot create the shard folder: {exc.strerror or exc}") from None
    old = shards.read_manifest(directory)
    if old is not None:
        differences = shards.manifest_differences(old, manifest)
        if differences:
            raise DataError(f"{directory / shards.MANIFEST_NAME}: the earlier conversion into {out} used other "
                            f"settings: {'; '.join(differences)}. Rerun it with its arguments to resume it, "
                            "or add --restart to start over")
    else:
        shards.write_manifest(directory, manifest)
    shards.remove_partial_files(directory)
    existing = shards.shard_files(directory)
    val_source = request.val_root or request.val_csv
    conversion = {"tool": "hpcdl data convert folder", "hpcdl": __version__, **core,
                  "root": str(root.resolve()), "val": str(val_source.resolve()) if val_source else None,
                  "shards": directory.name}
    conversion.pop("class_names")  # the root attribute class_names holds them already
    return _Plan(class_names, splits, specs, existing, geometry, request.short_side, conversion, ignored, unlisted,
                 folder_of, reset)


def _fault_hook():
    """`HPCDL_FAULT_INJECT=convert-shard:n`: SIGKILL this process halfway through its n-th shard."""
    from hpcdl import faults

    wanted = {n or 1 for n in faults.requested("convert-shard")}
    count = 0

    def for_shard(spec):
        nonlocal count
        count += 1
        if count not in wanted:
            return None

        def kill(temp_path):
            os.write(2, f"hpcdl: {faults.FAULT_ENV}: killing pid {os.getpid()} halfway through {temp_path}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)

        return kill

    return for_shard


def _finish(out, plan: _Plan, reused: set, per_rank: list[dict], started: float, log, warn) -> dict:
    """Rank 0, after every shard exists: check the classes, stitch, report."""
    from hpcdl.data.shards import StaleShard, read_shard, shard_dir, stitch

    directory = shard_dir(out)
    infos = []
    for spec in plan.specs:
        try:
            infos.append(read_shard(directory, spec, plan.geometry))
        except StaleShard as exc:
            raise DataError(f"{directory / spec.name}: {exc} (changed while converting?)") from None
    for info in infos:  # files skipped in this run were reported when they were met
        if info.spec.name in reused:
            for path, reason in info.skipped:
                warn(f"skipped {os.path.join(plan.splits[info.spec.split].base, path)}: {reason} "
                     "(in a shard from the earlier run)")
    _check_every_class_usable(plan, infos)
    conversion = dict(plan.conversion, skipped=sum(len(i.skipped) for i in infos),
                      source_modes=_sum_modes(infos))
    t = time.perf_counter()
    stitched = stitch(Path(out), infos, plan.splits, plan.geometry, plan.class_names, plan.short_side, conversion)
    stitch_s = time.perf_counter() - t
    skipped = conversion["skipped"]
    shape = "×".join(str(d) for d in plan.geometry.shape)
    stored = f"centre {plan.geometry.size}² at short side {plan.short_side}" if plan.short_side else \
        f"centre {plan.geometry.size}² of short side {plan.geometry.resize}"
    log(f"wrote {out}: {stitched['train']:,} train + {stitched['test']:,} test images {shape} ({stored}), "
        f"{len(plan.class_names)} classes, {len(infos)} shards in {directory}")
    if skipped:
        log(f"skipped {skipped:,} unusable file(s) (each named above)")
    converted = {m: n for m, n in conversion["source_modes"].items() if m != plan.geometry.mode}
    if converted:
        log(f"converted to {plan.geometry.mode}: " + ", ".join(f"{n:,} from {m}" for m, n in converted.items()))
    if plan.ignored:
        log(f"ignored {plan.ignored:,} non-image file(s) (suffix not one of the image suffixes)")
    if plan.unlisted:
        log(f"ignored {plan.unlisted:,} image file(s) in the validation folder that the CSV does not list")
    for stats in per_rank:
        if stats["shards"]:
            wall = stats["convert_wall"]
            log(f"  rank {stats['rank']}: {stats['shards']} shard(s), {stats['images']:,} files in {wall:.1f} s = "
                f"{stats['images'] / max(wall, 1e-9):,.0f} files/s; decode {stats['decode']:.1f} s, "
                f"resize {stats['resize']:.1f} s, write {stats['write']:.1f} s")
    wall = time.perf_counter() - started
    return {"train": stitched["train"], "test": stitched["test"], "classes": len(plan.class_names),
            "skipped": skipped, "ignored": plan.ignored, "unlisted": plan.unlisted, "shape": plan.geometry.shape,
            "shards": len(infos), "reused": len(reused), "source_modes": conversion["source_modes"],
            "mean": [float(v) for v in stitched["mean"]], "std": [float(v) for v in stitched["std"]],
            "seconds": {"total": wall, "stitch": stitch_s}, "ranks": per_rank}


def _sum_modes(infos) -> dict[str, int]:
    modes: dict[str, int] = {}
    for info in infos:
        for mode, n in info.source_modes.items():
            modes[mode] = modes.get(mode, 0) + n
    return dict(sorted(modes.items()))


def _check_every_class_usable(plan: _Plan, infos) -> None:
    """A class folder whose every image was skipped is an error naming the folder."""
    usable: dict[Path, np.ndarray] = {}
    for info in infos:
        folder = plan.folder_of.get(info.spec.split)
        if folder is None:
            continue
        counts = usable.setdefault(folder, np.zeros(len(plan.class_names), np.int64))
        counts += np.bincount(info.labels, minlength=len(plan.class_names))
    for folder, counts in usable.items():
        present = {int(label) for split, f in plan.folder_of.items() if f == folder
                   for label in np.unique(plan.splits[split].labels)}
        empty = [plan.class_names[k] for k in sorted(present) if counts[k] == 0]
        if empty:
            more = f" (and {len(empty) - 1} more: {', '.join(empty[1:6])})" if len(empty) > 1 else ""
            raise DataError(f"{folder / empty[0]}: class folder has no usable image: every file in it was "
                            f"skipped (see the warnings){more}")


# -- command line -----------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Prints help and usage errors on rank 0 only: every rank parses the same arguments."""

    def _print_message(self, message, file=None):
        from hpcdl.guard import world_position

        if world_position()[0] == 0:
            super()._print_message(message, file)


FOLDER_EXAMPLES = """\
examples:
  one process, 4 decoding processes:
    hpcdl data convert folder --root imagenet/train --val-root imagenet/val \\
        --short-side 256 --out imagenet.h5 --workers 4
  16 ranks (on one node or several; the output is the same for any count):
    mpiexec -n 16 hpcdl data convert folder --root imagenet/train \\
        --val-csv imagenet/val.csv --val-dir imagenet/val --short-side 256 --out /scratch/imagenet.h5
  Slurm (--kill-on-bad-exit stops every rank when one fails):
    srun -n 64 --kill-on-bad-exit=1 hpcdl data convert folder --root ... --short-side 256 --out ...
  resume after a crash, a kill or the time limit: run the same command again;
    finished shards are verified (CRC-32 of every row) and kept, the rest are converted
  start over: add --restart

The output X.h5 reads its images from the shard files in X.h5.shards/:
keep (move, copy) the two together.
"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpcdl data convert", description="Build an hpcdl HDF5 dataset file.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n  Fashion-MNIST from Debian's package:\n"
                            "    hpcdl data convert idx --data-dir /usr/share/datasets/fashion-mnist --out fmnist.h5\n"
                            + FOLDER_EXAMPLES.replace("examples:\n", "", 1))
    sub = parser.add_subparsers(dest="source", required=True, parser_class=_Parser)
    idx = sub.add_parser("idx", help="Fashion-MNIST/MNIST IDX files -> HDF5")
    idx.add_argument("--data-dir", help="directory with the four IDX files (default: search like `hpcdl train`)")
    idx.add_argument("--out", required=True, help="HDF5 file to write")
    idx.add_argument("--class-names", default="auto",
                     help="'auto' (Fashion-MNIST names if the checksums say so, else numbers), "
                          "'fashion-mnist', 'mnist', or a comma-separated list")
    idx.add_argument("--no-download", action="store_true", help="never download Fashion-MNIST")
    idx.add_argument("--layout", choices=("contiguous", "chunked"), default="contiguous",
                     help="contiguous rows read by offset (format version 2, the default), or the older "
                          "chunked layout with Fletcher-32 (version 1)")
    idx.add_argument("--chunk-rows", type=int, help="images per chunk, with --layout chunked (default 256)")
    idx.add_argument("--compression", choices=("gzip", "lzf"), help="HDF5 compression, with --layout chunked")

    folder = sub.add_parser(
        "folder", help="one-subfolder-per-class image tree -> sharded HDF5 (the ImageNet path), under MPI",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FOLDER_EXAMPLES,
        description="Convert ROOT/<class>/<image> (JPEG, PNG, ...; labels = sorted folder names) into an hpcdl\n"
                    "HDF5 file. Under mpiexec or srun the shards are spread over the ranks. Unusable files are\n"
                    "skipped with a warning naming each; CMYK, grayscale, palette, alpha and 16-bit images\n"
                    "are converted to RGB. See docs/convert.md.")
    folder.add_argument("--root", required=True, help="training tree: ROOT/<class>/<image>, at any depth")
    folder.add_argument("--out", required=True, help="HDF5 file to write; its shards go to OUT.shards/")
    size = folder.add_mutually_exclusive_group()
    size.add_argument("--short-side", type=int, metavar="S",
                      help="store the centre S×S square of each image scaled to short side S "
                           "(e.g. 160 or 256): train-time RandomResizedCrop crops from it")
    size.add_argument("--size", type=int, metavar="N", help="store the final centre N×N crop instead")
    folder.add_argument("--resize", type=int, metavar="R", help="with --size: short side before the crop (default N)")
    folder.add_argument("--val-root", help="validation tree with the same class folders")
    folder.add_argument("--val-csv", metavar="FILE", help="validation labels: lines of file,label "
                        "(label = class name or index; a header line is allowed)")
    folder.add_argument("--val-dir", metavar="DIR", help="folder the --val-csv files are in (default: the CSV's)")
    folder.add_argument("--test-fraction", type=float,
                        help="without validation images: hold out this fraction of each class (default 0.1)")
    folder.add_argument("--mode", default="RGB", choices=("RGB", "L"), help="RGB (3 channels) or L (grayscale)")
    folder.add_argument("--shard-images", type=int, default=DEFAULT_SHARD_IMAGES, metavar="N",
                        help=f"files per shard (default {DEFAULT_SHARD_IMAGES:,}); the unit of work and of resume")
    folder.add_argument("--workers", type=int, default=1, help="decoding processes per rank (default 1)")
    folder.add_argument("--seed", type=int, default=0, help="seed of the holdout and of the stored order")
    folder.add_argument("--restart", action="store_true", help="discard an earlier conversion's shards and start over")
    folder.add_argument("--json", metavar="FILE", help="also write the summary (counts, seconds per rank) as JSON")
    for old in ("--chunk-rows", "--compression"):
        folder.add_argument(old, dest=old[2:].replace("-", "_"), help=argparse.SUPPRESS)
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
                             layout=args.layout, chunk_rows=args.chunk_rows, compression=args.compression)
        shape = "×".join(str(d) for d in counts["shape"])
        print(f"wrote {args.out}: {counts['train']:,} train + {counts['test']:,} test images {shape}, "
              f"{counts['classes']} classes")
        return 0
    if args.chunk_rows is not None or args.compression is not None:
        raise ConfigError("--chunk-rows/--compression: folder conversions write contiguous rows "
                          "(format version 2), read by offset; HDF5 chunking no longer applies")
    counts = convert_folder(args.root, args.out, short_side=args.short_side, size=args.size, resize=args.resize,
                            val_root=args.val_root, val_csv=args.val_csv, val_dir=args.val_dir,
                            test_fraction=args.test_fraction, mode=args.mode, workers=args.workers, seed=args.seed,
                            shard_images=args.shard_images, restart=args.restart)
    from hpcdl.guard import world_position

    if world_position()[0] == 0:
        if args.json:
            Path(args.json).write_text(json.dumps(counts, default=list, indent=1) + "\n")
        print(json.dumps({k: counts[k] for k in ("train", "test", "classes", "skipped", "shards", "reused")}
                         | {"shape": list(counts["shape"]), "seconds": round(counts["seconds"]["total"], 3)}),
              flush=True)
    return 0


def info_main(argv: Sequence[str] | None = None) -> int:
    """`hpcdl data info FILE`: print the summary of an hpcdl HDF5 file."""
    from hpcdl.data.hdf5 import describe_hdf5

    parser = _Parser(prog="hpcdl data info", description="Summarise an hpcdl HDF5 dataset file.")
    parser.add_argument("file")
    path = parser.parse_args(argv).file
    print(describe_hdf5(path))
    provenance = _conversion_lines(path)
    if provenance:
        print(provenance)
    return 0


def _conversion_lines(path) -> str:
    """What `hpcdl data convert folder` recorded about how the file was made, or ''."""
    import h5py

    from hpcdl.data.shards import CONVERSION_ATTR, SHARD_ATTR

    try:
        with h5py.File(path, "r", locking=False) as f:
            conversion = json.loads(f.attrs[CONVERSION_ATTR]) if CONVERSION_ATTR in f.attrs else None
            shard = json.loads(f.attrs[SHARD_ATTR]) if SHARD_ATTR in f.attrs else None
    except (OSError, ValueError, TypeError):
        return ""
    if shard:
        return (f"  shard {shard['index']} of the {shard['split']} split: {shard['rows']:,} of "
                f"{shard['planned']:,} files usable; its mean/std are its own pixels'")
    if not conversion:
        return ""
    args = conversion.get("arguments", {})
    geometry = (f"centre {args.get('size')}² at short side {args['short_side']}" if args.get("short_side")
                else f"centre {args.get('size')}² of short side {args.get('resize')}")
    modes = ", ".join(f"{m} {n:,}" for m, n in conversion.get("source_modes", {}).items())
    return (f"  made by {conversion.get('tool')} (hpcdl {conversion.get('hpcdl')}) from {conversion.get('root')}: "
            f"{geometry}, {args.get('validation')} validation, seed {args.get('seed')}, "
            f"shards in {conversion.get('shards')}/\n"
            f"  source modes {modes}; {conversion.get('skipped', 0):,} unusable file(s) skipped "
            "(listed in <split>/skipped)")


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
