"""Measure `hpcdl data convert folder` on 1 vs P ranks, side by side, and check the outputs are identical.

    python tests/imagegen.py /tmp/photos --classes 10 --per-class 400        # once: 4,000 JPEGs, ~430 MB
    flock -x /tmp/hpcdl-cpu.lock python tests/convert_speed.py /tmp/photos/train --short-side 256

Runs alternate (1, P, 1, P, ...) so that drift on a shared machine hits
both alike. Each run is a fresh conversion (its output removed first), timed
from launch to exit, and reports the converter's own per-rank phase times
(decode, resize, write: CPU-seconds summed over the decoding processes).
Every run's stitched file and shards must be byte-identical to the first's.

    flock -x /tmp/hpcdl-cpu.lock python tests/convert_speed.py /tmp/photos/train --decode-only

measures the ceiling instead: `decode` alone (no HDF5, no MPI) over the
first 1,200 files in 1 vs P plain processes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def digests(out: Path) -> dict[str, str]:
    shards = out.with_name(out.name + ".shards")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [out, *sorted(shards.iterdir())]}


def run(ranks: int, root: str, work: Path, args: list[str]) -> dict:
    folder = work / f"ranks{ranks}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out, summary = folder / "out.h5", folder / "summary.json"
    command = [sys.executable, "-m", "hpcdl", "data", "convert", "folder", "--root", root, "--out", str(out),
               "--json", str(summary), *args]
    if ranks > 1:
        command = [shutil.which("mpiexec"), "-n", str(ranks), *command]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(summary.read_text())
    return {"ranks": ranks, "wall": wall, "digests": digests(out), "files": result["train"] + result["test"]
            + result["skipped"], "per_rank": result["ranks"], "stitch": result["seconds"]["stitch"]}


def _decode_files(paths: list[str], short_side: int) -> None:
    from hpcdl.data.imagefolder import Geometry, decode

    for path in paths:
        decode(path, Geometry(short_side, short_side))


def decode_ceiling(root: str, short_side: int, processes: int, repeats: int, files: int = 1200) -> None:
    import multiprocessing

    paths = sorted(str(p) for p in Path(root).glob("*/*"))[:files]
    context = multiprocessing.get_context("spawn")
    best = {}
    for _ in range(repeats):
        for n in (1, processes):
            workers = [context.Process(target=_decode_files, args=(paths[i::n], short_side)) for i in range(n)]
            started = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - started)
    print(f"decode of {len(paths)} files at short side {short_side} (process start included): "
          f"1 process {best[1]:.2f} s, {processes} processes {best[processes]:.2f} s, "
          f"ratio {best[1] / best[processes]:.2f}× (best of {repeats})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="training tree ROOT/<class>/<image>")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--shard-images", type=int, default=250)
    parser.add_argument("--ranks", type=int, default=2, help="compared with 1 rank")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", help="where the outputs go (default: a temp folder, removed at the end)")
    parser.add_argument("--json", help="write the runs as JSON")
    parser.add_argument("--decode-only", action="store_true", help="measure decoding alone in plain processes")
    args = parser.parse_args(argv)
    if args.decode_only:
        decode_ceiling(args.root, args.short_side, args.ranks, args.repeats)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="hpcdl-convert-speed-"))
    options = ["--short-side", str(args.short_side), "--shard-images", str(args.shard_images)]
    runs = []
    try:
        for _ in range(args.repeats):
            for ranks in (1, args.ranks):
                runs.append(run(ranks, args.root, work, options))
                r = runs[-1]
                print(f"{ranks} rank(s): {r['wall']:.2f} s, {r['files'] / r['wall']:.0f} files/s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    identical = all(r["digests"] == runs[0]["digests"] for r in runs)
    best = {ranks: min(r["wall"] for r in runs if r["ranks"] == ranks) for ranks in (1, args.ranks)}
    print(f"\n{'ranks':>5} {'best wall s':>11} {'files/s':>8} | per rank: files/s in shards, "
          "decode / resize / write s")
    for ranks in (1, args.ranks):
        r = min((r for r in runs if r["ranks"] == ranks), key=lambda r: r["wall"])
        phases = "; ".join(f"{p['images'] / p['convert_wall']:.0f} files/s, {p['decode']:.1f} / {p['resize']:.1f} / "
                           f"{p['write']:.1f}" for p in r["per_rank"])
        print(f"{ranks:>5} {r['wall']:>11.2f} {r['files'] / r['wall']:>8.0f} | {phases}")
    print(f"speed-up {args.ranks} vs 1 rank: {best[1] / best[args.ranks]:.2f}× (best of {args.repeats}); "
          f"outputs byte-identical: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "speedup": best[1] / best[args.ranks],
                                               "identical": identical}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
