"""The `hpcdl` command.

    hpcdl train --config jobs/configs/fmnist_cnn.toml            one process
    mpiexec -n 4 hpcdl train --config FILE --set train.epochs=3   four ranks
    srun hpcdl train --config FILE --resume auto                  under Slurm
    hpcdl bench layers | allreduce | optimizer                   measurements
    hpcdl scaling --compute-json ... --comm-json ...              predicted scaling
    hpcdl data convert idx|folder ...                            datasets to HDF5
    hpcdl info                                                   what this machine has

Start-up order matters: the config is parsed and the thread count pinned
before NumPy is imported (BLAS reads its thread count once, at load), and
MPI is initialised only by subcommands that need it.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from hpcdl.errors import UserError

BENCHMARKS = ("layers", "allreduce", "optimizer", "data")

EXAMPLES = """\
examples:
  hpcdl train --config jobs/configs/fmnist_cnn.toml
  mpiexec -n 2 hpcdl train --config jobs/configs/fmnist_cnn.toml --set train.epochs=2
  hpcdl train --config jobs/configs/fmnist_cnn.toml --set optim.name=lamb --set schedule.base_lr=0.002
  hpcdl train --help-config                 every config key, its type, default and meaning
  mpiexec -n 2 hpcdl bench allreduce --sizes 4KiB,1MiB,100MiB
  hpcdl bench optimizer --sizes 25M
  hpcdl study large-batch --grid quick --out runs/study-quick
  hpcdl info
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcdl",
        description="MPI data-parallel deep learning on NumPy/CuPy, with our own allreduce algorithms "
        "and fused LARS/LAMB kernels. Run under mpiexec/mpirun/srun for several ranks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model (data-parallel under MPI)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Train a model described by a TOML config. Every rank runs forward and backward on
            its slice of each global batch, gradients are averaged with an allreduce, and every
            rank applies the same update. The global batch is fixed by the config whatever the
            number of ranks: per-rank batch = global_batch / (ranks x accumulate_steps).

            Output (rank 0): a progress line on stderr, OUT/metrics.jsonl, OUT/checkpoints/,
            OUT/curves.png, and a final line of JSON on stdout with test_accuracy, final_loss,
            param_norm, epochs, steps, global_batch, world_size and seconds."""
        ),
        epilog="examples:\n  mpiexec -n 2 hpcdl train --config jobs/configs/fmnist_cnn.toml --out runs/fmnist\n"
        "  hpcdl train --config jobs/configs/fmnist_cnn.toml --set train.max_steps=20 --set comm.algorithm=ring\n"
        "  srun hpcdl train --config jobs/configs/resnet18_cifar_lars.toml --resume auto\n",
    )
    train.add_argument("--config", metavar="FILE", help="TOML config (see jobs/configs/); defaults apply without one")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key with a TOML value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>)")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="continue from a checkpoint: 'auto' = newest valid one in OUT/checkpoints (start fresh if none)")
    train.add_argument("--data-dir", metavar="DIR", help="shortcut for --set data.data_dir=DIR")
    train.add_argument("--device", choices=["cpu", "gpu"], help="shortcut for --set runtime.device=...")
    train.add_argument("--threads", type=int, metavar="N", help="shortcut for --set runtime.threads=N")
    train.add_argument("--trace", metavar="FILE", help="write a Chrome-trace timeline (one track per rank) of "
                       "log.trace_steps, default steps 1-20; open it in ui.perfetto.dev or chrome://tracing")
    train.add_argument("--help-config", action="store_true", help="print every config key with type, default and meaning")

    bench = sub.add_parser("bench", help="measure layers, allreduce or optimizer kernels (prints a table and JSON)")
    bench.add_argument("what", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark (try: hpcdl bench layers --help)")

    scaling = sub.add_parser("scaling", help="fit the alpha-beta model to benchmarks and predict step time at P ranks")
    scaling.add_argument("args", nargs=argparse.REMAINDER, help="options (try: hpcdl scaling --help)")

    data = sub.add_parser("data", help="convert datasets to hpcdl's HDF5 format, or describe one")
    data.add_argument("args", nargs=argparse.REMAINDER, help="convert idx|folder ... or info FILE (try: hpcdl data convert --help)")

    study = sub.add_parser("study", help="the large-batch study: SGD/LARS/LAMB/AdamW, batch 128 to 16K, tables, figures")
    study.add_argument("args", nargs=argparse.REMAINDER,
                       help="large-batch --grid quick|standard|full --out DIR (try: hpcdl study large-batch --help)")

    info = sub.add_parser("info", help="versions, MPI library, CUDA-awareness, threads, models, allreduce crossovers")
    info.add_argument("--models", action="store_true", help="list model names only")
    return parser


def main(argv: list[str] | None = None) -> int:
    from hpcdl import guard

    guard.install_abort_on_exception()
    parser = _build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "bench":
            return _bench(args.what, args.args)
        if args.command == "scaling":
            from hpcdl import launcher
            from hpcdl.threads import pin_threads

            launcher.check()
            pin_threads(settle_with_mpi=True)  # it times compute: BLAS must not oversubscribe the node
            from hpcdl.scaling import main as scaling_main

            return scaling_main(args.args)
        if args.command == "data":
            from hpcdl.data.convert import main as data_main

            return data_main(args.args)
        if args.command == "study":
            from hpcdl.threads import pin_threads

            pin_threads()  # before NumPy: in-process cells train with these threads
            from hpcdl.study import main as study_main

            return study_main(args.args)
        if args.command == "info":
            return _info(args)
        parser.print_help()
        return 2
    except UserError as exc:
        return _report_user_error(exc)
    except KeyboardInterrupt:
        print("hpcdl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `hpcdl data info FILE | head` closed our stdout: quiet, as other Unix tools are.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Subcommands with parsers of their own get their arguments untouched.

    argparse's REMAINDER drops a leading "--option", so `hpcdl scaling --model x`
    is split off here; the subparsers above still document these commands.
    """
    if argv[:1] in (["scaling"], ["data"], ["study"]):
        return argparse.Namespace(command=argv[0], args=argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHMARKS:
        return argparse.Namespace(command="bench", what=argv[1], args=argv[2:])
    return parser.parse_args(argv)


def _report_user_error(exc: UserError) -> int:
    """One line, exit 2. Errors every rank hits together are printed once; one rank's alone aborts the job."""
    from hpcdl import guard

    rank, size = guard.world_position()
    if getattr(exc, "quiet", False):  # another process prints the same line
        return exc.exit_code
    if getattr(exc, "collective", False) or size == 1:
        if rank == 0:
            print(f"hpcdl: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    guard.abort(str(exc), code=exc.exit_code)
    return exc.exit_code  # not reached when MPI aborts


def _train(args) -> int:
    from hpcdl import config as config_mod

    if args.help_config:
        print(config_mod.reference())
        return 0
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir!r}")
    if args.device:
        overrides.append(f"runtime.device={args.device!r}")
    if args.threads is not None:
        overrides.append(f"runtime.threads={args.threads}")
    if args.trace:
        overrides.append(f"log.trace_file={args.trace!r}")
    try:
        config = config_mod.load(args.config, overrides)
    except UserError as exc:
        exc.collective = True  # every rank reads the same file before MPI starts: rank 0 speaks for all
        raise

    from hpcdl import launcher
    from hpcdl.threads import pin_threads

    if config.runtime.device == "gpu":
        from hpcdl.comm.gpu import select_device_before_mpi

        select_device_before_mpi()  # the launcher's local rank picks the device before MPI_Init
    launcher.check()  # before anything else touches MPI: a world of 1 must not start training
    threads = pin_threads(config.runtime.threads or None, settle_with_mpi=True)

    from hpcdl import train

    summary = train.run(config, out=args.out, resume=args.resume, config_path=args.config, threads=threads)
    if summary is not None:  # rank 0 only
        import json

        print(json.dumps(summary), flush=True)
    return 0


def _bench(what: str, argv: list[str]) -> int:
    from hpcdl import launcher
    from hpcdl.threads import pin_threads

    launcher.check()

    # Pinned before NumPy loads, so BLAS honours it. `bench optimizer` takes a
    # list (--threads 1,2,4): Numba's pool must hold the largest.
    threads = _largest_thread_count(argv)
    pin_threads(threads or (1 if what in ("layers", "data") else None), settle_with_mpi=True)
    if what == "layers":
        from hpcdl.bench.layers import main as bench_main
    elif what == "allreduce":
        from hpcdl.bench.allreduce import main as bench_main
    elif what == "data":
        from hpcdl.bench.data import main as bench_main
    else:
        from hpcdl.bench.optimizer import main as bench_main
    return bench_main(argv)


def _largest_thread_count(argv: list[str]) -> int | None:
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--threads"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--threads=")]
    counts = [int(part) for value in values for part in value.split(",") if part.strip().isdigit()]
    return max(counts) if counts else None


def _info(args) -> int:
    if args.models:
        from hpcdl import models

        print("\n".join(models.names()))
        return 0
    from hpcdl.threads import pin_threads

    pin_threads(settle_with_mpi=True)  # what `hpcdl train` would choose here, ranks compared under MPI
    from hpcdl.info import collect, format_info

    info = collect()
    if info.get("mpi_rank", 0) == 0:
        print(format_info(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
