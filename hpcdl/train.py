"""One training run, read top to bottom.

    batch shard → model.forward → loss → model.backward → gradient arena
      → communicator (bucketed allreduce, overlapped with backward)
      → fused optimizer kernel → parameter arena

`_setup()` builds the pieces (world, data, model + arena, reducer, optimizer,
schedule, guards, checkpoints) into a `Run`; `_train()` is the loop around
`_train_step()`, which is the whole step.

Invariants the step relies on:

* Every rank holds bit-identical parameters: same seed, same initialisation,
  checked by a start-up hash, and every allreduce algorithm returns the same
  bits on every rank.
* The loss of each micro-batch is summed over its samples and divided by the
  *global* batch size, so the allreduce *sum* of the gradients is the exact
  global mean, whatever the rank count and accumulation: a run on P ranks
  follows the run on 1 rank to rounding.
* Decisions that must be collective (stop on a signal, checkpoint by the
  clock, skip a non-finite step) come from values every rank shares: the
  per-step stats allreduce or the allreduced gradient.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdl import backend, checkpoint, comm, faults, guard, models, optim, trace
from hpcdl.arena import Arena
from hpcdl.config import Config
from hpcdl.data.augment import build_transforms
from hpcdl.data.dataset import load_dataset
from hpcdl.data.loader import BatchLoader
from hpcdl.data.sampler import ShardedSampler
from hpcdl.errors import ConfigError, DataError, UserError
from hpcdl.layers import attach_sync_batchnorm, count_correct, softmax_cross_entropy
from hpcdl.layers.dropout import key_dropout
from hpcdl.metrics import MetricsLog, PhaseTimer, Progress, plot_layer_stats, plot_run

# Positions in the small per-step stats vector that rides one allreduce.
LOSS, CORRECT, SAMPLES, STOP_VOTE, CHECKPOINT_VOTE = range(5)


@dataclass
class Run:
    """Everything one training run holds, set up once by `_setup`."""

    config: Config
    world: object  # hpcdl.comm Communicator
    data: object  # hpcdl.data.Dataset
    loader: BatchLoader
    model: object  # hpcdl.layers.Module
    arena: Arena
    reducer: object  # hpcdl.comm.BucketReducer
    optimizer: object  # hpcdl.optim.Optimizer
    schedule: object  # hpcdl.optim.Schedule
    checkpoints: checkpoint.CheckpointManager
    checkpoint_clock: checkpoint.CheckpointPolicy
    stop_signals: checkpoint.StopSignals
    watchdog: object | None  # hpcdl.guard.StallWatchdog
    out_dir: Path
    steps_per_epoch: int
    total_steps: int
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    tracer: object = field(default_factory=trace.NullTracer)  # hpcdl.trace.Tracer when a timeline is asked for
    injected: dict = field(default_factory=dict)  # HPCDL_FAULT_INJECT steps, for the test suite

    @property
    def rank(self) -> int:
        return self.world.rank

    def close(self) -> None:
        self.reducer.close()
        self.loader.close()
        self.data.close()
        if self.watchdog is not None:
            self.watchdog.close()
        self.stop_signals.restore()


def run(config: Config, out: str | None = None, resume: str | None = None,
        config_path: str | None = None, threads: int | None = None) -> dict | None:
    """Train as the config says; returns the summary on rank 0 and None elsewhere."""
    started = time.perf_counter()
    out_dir = Path(out or Path("runs") / (Path(config_path).stem if config_path else config.model.name))
    r = _setup(config, out_dir)
    try:
        return _train(r, started, resume, threads)
    finally:
        r.close()


def _setup(config: Config, out_dir: Path) -> Run:
    # -- world: communicator, device, guards ----------------------------------------------
    world = comm.create(config.comm.algorithm, crossovers=config.comm.crossovers or None,
                        ranks_per_node=config.comm.ranks_per_node or None, piece_kb=config.comm.piece_kb or None,
                        pipeline_depth=config.comm.pipeline_depth)
    xp = backend.use_device(config.runtime.device, local_rank=_local_rank(world))
    watchdog = guard.StallWatchdog(world.mpi_comm, timeout_s=config.comm.stall_timeout_s) \
        if world.size > 1 and config.comm.stall_timeout_s > 0 else None

    # -- data: the same permutation on every rank, each rank its slice of each global batch ---------
    data_cfg, train_cfg = config.data, config.train
    data = load_dataset(data_cfg.dataset, path=data_cfg.path or None, data_dir=data_cfg.data_dir or None,
                        download=data_cfg.download, synthetic_size=data_cfg.synthetic_samples,
                        synthetic_shape=tuple(data_cfg.synthetic_shape), seed=train_cfg.seed)
    try:
        sampler = ShardedSampler(data.train.count, train_cfg.global_batch, world.rank, world.size, train_cfg.seed,
                                 accumulate_steps=train_cfg.accumulate_steps)
        train_transform, eval_transform = build_transforms(
            data.input_shape, mean=data.mean, std=data.std, seed=train_cfg.seed, image_size=data_cfg.image_size,
            short_side=data.short_side, random_resized_crop=data_cfg.random_resized_crop,
            scale=data_cfg.crop_scale, ratio=data_cfg.crop_ratio, pad=data_cfg.random_crop_pad,
            flip=data_cfg.random_flip, eval_crop_fraction=data_cfg.eval_crop_fraction)
        loader = BatchLoader(data, sampler, train_transform, eval_transform, eval_batch=train_cfg.eval_batch,
                             prefetch=data_cfg.prefetch, workers=data_cfg.workers, worker_kind=data_cfg.worker_kind,
                             memory_bytes=int(data_cfg.memory_mb * 2**20), xp=xp)
    except ConfigError as exc:  # the same config and file give every rank the same plan, and the same error
        data.close()
        raise _collective(exc)
    except BaseException:
        data.close()
        raise
    input_shape = loader.output_shape

    # -- model and its arena: every parameter and gradient is a view into two flat buffers --------
    model_options = dict(config.model.options)
    if config.comm.sync_batchnorm:
        model_options.setdefault("sync_bn", True)
    model = models.build(config.model.name, input_shape=input_shape, num_classes=data.num_classes,
                         **model_options)
    arena = Arena(model.parameters(), xp=xp, seed=train_cfg.seed)
    if config.comm.sync_batchnorm and not attach_sync_batchnorm(model, lambda v: world.allreduce(v, op="sum")):
        raise _collective(ConfigError(f"comm.sync_batchnorm: model {config.model.name!r} has no batch norm "
                                      "layer to synchronise"))
    guard.check_consistency(world.mpi_comm, {
        "model": arena.signature(),
        "config": config.to_json(),
        "dataset": f"{data.train.count}:{input_shape}:{data.num_classes}",
        "hpcdl": _version(),
    })
    world.bcast(arena.params, root=0)  # identical already by seed; this makes it a fact

    # -- gradient path: buckets reduced during backward, then one fused optimizer pass -----------
    reducer = comm.BucketReducer(world, arena, bucket_bytes=int(config.comm.bucket_mb * 2**20),
                                 overlap=config.comm.overlap, op="sum", progress=_progress(config),
                                 budget_s=config.comm.progress_budget_ms / 1e3,
                                 poll_interval_s=config.comm.progress_interval_us / 1e6,
                                 taper=config.comm.bucket_taper)
    reducer.attach(model)
    optimizer = optim.create(config.optim.name, arena, **_optimizer_options(config))
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
    schedule = optim.build_schedule(config.schedule, global_batch=train_cfg.global_batch,
                                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    tracer = trace.for_run(list(config.log.trace_steps), config.log.trace_file, world, total_steps,
                           layers=model if config.log.trace_layers else None)
    reducer.clock = tracer.clock  # bucket start and completion times on the timeline's clock
    return Run(
        tracer=tracer,
        config=config, world=world, data=data, loader=loader, model=model, arena=arena, reducer=reducer,
        optimizer=optimizer, schedule=schedule,
        checkpoints=checkpoint.CheckpointManager(out_dir / "checkpoints", keep=config.checkpoint.keep,
                                                 rank=world.rank),
        checkpoint_clock=checkpoint.CheckpointPolicy(every_steps=config.checkpoint.every_steps,
                                                     every_minutes=config.checkpoint.every_minutes,
                                                     rank=world.rank),
        stop_signals=checkpoint.StopSignals(), watchdog=watchdog, out_dir=out_dir,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        injected={"raise": set(faults.requested("raise-at-step")),
                  "nan": set(faults.requested("nan-grad-at-step"))},
    )


def _train(r: Run, started: float, resume: str | None, threads: int | None) -> dict | None:
    config, train_cfg = r.config, r.config.train
    start_step, skipped_total = 0, 0
    resume_path = _resolve_resume(resume, r)
    if resume_path is not None:
        start_step, skipped_total = _restore(r, resume_path)
    elif r.rank == 0 and r.checkpoints.latest(quiet=True) is not None:
        raise ConfigError(f"{r.out_dir}: holds checkpoints of an earlier run; pass --resume auto to continue it "
                          "or choose another --out")

    log = MetricsLog(r.out_dir / "metrics.jsonl" if r.rank == 0 else None, truncate=resume_path is None)
    progress = Progress(r.total_steps, enabled=r.rank == 0 and config.log.progress)
    if r.rank == 0:
        progress.message(_banner(r, threads, resume_path))
        progress.message(f"hpcdl: {r.data.summary()}\nhpcdl: {r.loader.describe()}")
        log.write("start", world_size=r.world.size, global_batch=train_cfg.global_batch,
                  steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps, start_step=start_step,
                  algorithm=r.world.name, threads=threads, parameters=r.arena.num_parameters,
                  schedule=r.schedule.describe(), data=r.loader.plan.as_dict(), config=config.to_dict())

    eval_every = round(train_cfg.eval_every_epochs * r.steps_per_epoch) if train_cfg.eval_every_epochs else 0
    consecutive_skips, window_images, window_start = 0, 0, time.perf_counter()
    last_loss, last_eval = float("nan"), None
    step = start_step
    while step < r.total_steps:
        lr = r.schedule(step)
        stats, applied = _train_step(r, step, lr)
        step += 1
        last_loss = stats[LOSS]
        window_images += int(stats[SAMPLES])
        if applied:
            consecutive_skips = 0
        else:  # the gradient norm comes from the allreduced gradient: every rank skips together
            consecutive_skips += 1
            skipped_total += 1
            progress.message(f"hpcdl: warning: step {step}: non-finite gradient norm, update skipped "
                             f"({consecutive_skips} in a row, {skipped_total} in total)")
            log.write("skip", step=step, consecutive=consecutive_skips, total=skipped_total)
            if consecutive_skips >= train_cfg.max_nonfinite_steps:
                raise _collective(UserError(
                    f"train.max_nonfinite_steps: {consecutive_skips} consecutive steps had non-finite gradients "
                    f"(up to step {step}); lower schedule.base_lr or check the data; the last checkpoint is kept "
                    f"in {r.checkpoints.directory}"))

        if step % config.log.every_steps == 0 or step == r.total_steps:
            seconds = time.perf_counter() - window_start
            images_per_s = window_images / max(seconds, 1e-9)
            phases, slowest, compute_max = _window_phases(r, seconds)
            log.write("step", step=step, epoch=round(step / r.steps_per_epoch, 4), loss=last_loss,
                      train_accuracy=stats[CORRECT] / max(stats[SAMPLES], 1), lr=lr, images_per_s=images_per_s,
                      seconds=phases, seconds_max=slowest, compute_max=compute_max, comm=r.reducer.stats)
            progress.update(step, loss=last_loss, lr=lr, img_s=images_per_s)
            window_images, window_start = 0, time.perf_counter()
        if config.log.layer_stats_every and step % config.log.layer_stats_every == 0:
            _log_layer_stats(log, step, r)

        if (eval_every and step % eval_every == 0) or step == r.total_steps:
            last_eval = evaluate(r)
            log.write("eval", step=step, epoch=round(step / r.steps_per_epoch, 4), **last_eval)
            progress.message(f"step {step} epoch {step / r.steps_per_epoch:.2f}: test accuracy "
                             f"{100 * last_eval['test_accuracy']:.2f}%  test loss {last_eval['test_loss']:.4f}")
        elif step % r.steps_per_epoch == 0:
            log.write("epoch", step=step, epoch=step // r.steps_per_epoch)

        stop = stats[STOP_VOTE] > 0  # a signal on any rank stops all of them at the same step
        if stats[CHECKPOINT_VOTE] > 0 or stop or (step == r.total_steps and config.checkpoint.at_end):
            _save(r, step, skipped_total)
        if stop:
            progress.message(f"hpcdl: {r.stop_signals.signal_name or 'stop signal'} received: checkpoint written "
                             f"at step {step}; resume with --resume auto")
            log.write("stopped", step=step, reason=r.stop_signals.signal_name)
            break

    # -- the end --------------------------------------------------------------------------------
    if last_eval is None:
        last_eval = evaluate(r)
    trace_path = _write_trace(r)
    seconds = time.perf_counter() - started
    param_norm = float(np.linalg.norm(backend.to_host(r.arena.params).astype(np.float64)))
    peak_rss = r.world.allgather_obj(_peak_rss_mb(r.loader.worker_pids))
    progress.close()
    if r.rank != 0:
        return None
    summary = {
        "test_accuracy": last_eval["test_accuracy"],
        "test_loss": last_eval["test_loss"],
        "final_loss": last_loss,
        "param_norm": param_norm,
        "epochs": round(step / r.steps_per_epoch, 4),
        "steps": step,
        "global_batch": train_cfg.global_batch,
        "world_size": r.world.size,
        "seconds": round(seconds, 3),
        "images_per_s": round((step - start_step) * train_cfg.global_batch / seconds, 1),
        "skipped_steps": skipped_total,
        "stopped_early": step < r.total_steps,
        "peak_rss_mb": [rank_rss for rank_rss, _ in peak_rss],
        "worker_peak_rss_mb": [workers for _, workers in peak_rss],
        "out": str(r.out_dir),
    }
    if trace_path is not None:
        summary["trace"] = str(trace_path)
    log.write("summary", **summary)
    log.close()
    if config.log.plots:
        plot_run(r.out_dir / "metrics.jsonl", r.out_dir / "curves.png")
        if config.log.layer_stats_every:
            plot_layer_stats(r.out_dir / "metrics.jsonl", r.out_dir / "trust_ratios.png")
    return summary


def _train_step(r: Run, step: int, lr: float):
    """One optimizer step. Returns (global stats vector, whether the update was applied)."""
    if step + 1 in r.injected["raise"]:
        raise RuntimeError(f"{faults.FAULT_ENV}: raise-at-step:{step + 1}")
    rank_stats = np.zeros(5)
    r.tracer.begin_step(step + 1)
    r.timer.switch("forward")
    r.arena.zero_grads()
    batch = r.loader.next_step()
    last = batch.micro_steps - 1
    for micro in range(batch.micro_steps):
        r.timer.switch("data")  # only the wait for the prefetch workers, or the batch itself without prefetch
        _mark(r, step, "data")
        x, y = batch.take(micro)
        # masks keyed by global-batch position, as augmentation is: the same on any rank count
        key_dropout(r.model, r.config.train.seed, batch.epoch, batch.step,
                    r.loader.sampler.batch_positions(batch.epoch, batch.step)[micro])
        r.timer.switch("forward")
        _mark(r, step, "forward")
        logits = r.model.forward(x)
        loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=r.config.train.label_smoothing,
                                              normalizer=batch.global_count)
        if step + 1 in r.injected["nan"]:
            dlogits[...] = np.nan  # as if the loss had overflowed: NaN reaches every gradient
        rank_stats[LOSS] += float(loss)
        rank_stats[CORRECT] += int(count_correct(logits, y))
        rank_stats[SAMPLES] += len(y)

        r.timer.switch("backward")
        _mark(r, step, "backward")
        r.reducer.begin(sync=micro == last)  # buckets start during the last micro-batch's backward
        r.model.backward(dlogits)

    r.timer.switch("allreduce")
    _mark(r, step, "allreduce")
    rank_stats[STOP_VOTE] = float(r.stop_signals.requested)
    rank_stats[CHECKPOINT_VOTE] = float(r.checkpoint_clock.local_vote(step + 1, time.monotonic()))
    with _waiting(r, "gradient allreduce"):
        r.reducer.finish()
        r.tracer.record_buckets(r.reducer)
        r.world.allreduce(rank_stats, op="sum")

    r.timer.switch("optimizer")
    _mark(r, step, "optimizer")
    applied = r.optimizer.step(lr)  # False when the allreduced gradient is not finite: nothing changed
    r.timer.switch(None)
    r.tracer.end_step()
    return rank_stats, applied


def evaluate(r: Run) -> dict:
    """Test loss and accuracy over the whole test split, each rank its shard, streamed like training."""
    with r.tracer.span("evaluate", "evaluate"):
        return _evaluate(r)


def _evaluate(r: Run) -> dict:
    _average_buffers(r)
    r.model.eval()
    totals = np.zeros(3)
    for x, y in r.loader.eval_batches():
        logits = r.model.forward(x)
        loss, _ = softmax_cross_entropy(logits, y, normalizer=1)
        totals += (float(loss), int(count_correct(logits, y)), len(y))
    r.world.allreduce(totals, op="sum")
    r.model.train()
    return {"test_loss": totals[0] / max(totals[2], 1), "test_accuracy": totals[1] / max(totals[2], 1),
            "test_samples": int(totals[2])}


def _average_buffers(r: Run) -> None:
    """Batch-norm running statistics differ per rank unless BN is synchronised: average them,
    so evaluation and checkpoints see one model, the same on every rank."""
    if r.world.size == 1:
        return
    for _, buffer in r.model.named_buffers():
        host = np.ascontiguousarray(backend.to_host(buffer), dtype=np.float64).ravel()
        r.world.allreduce(host, op="mean")
        buffer[...] = backend.array_module(buffer).asarray(host.reshape(buffer.shape), dtype=buffer.dtype)


# -- checkpoints ----------------------------------------------------------------------------------

def _segment_table(arena: Arena) -> str:
    return "\n".join(f"{s.name} {s.shape} {s.offset}" for s in arena.segments)


def _checkpoint_state(r: Run, step: int, skipped_total: int) -> dict:
    return {
        "format": "hpcdl-checkpoint/1",
        "step": step,
        "world_size": r.world.size,
        "global_batch": r.config.train.global_batch,
        "config": r.config.to_json(),
        # written before the next step touches them, so host views are enough: no extra copies
        "params": backend.to_host(r.arena.params),
        "segments": _segment_table(r.arena),
        "buffers": {name: backend.to_host(b) for name, b in r.model.named_buffers()},
        "optimizer": r.optimizer.state_dict(),  # already host arrays
        "sampler": r.loader.state_dict(),
        "rng": {name: json.dumps(m.rng.bit_generator.state) for name, m in _modules_with_rng(r.model)},
        "skipped_steps": skipped_total,
    }


def _save(r: Run, step: int, skipped_total: int) -> None:
    with r.tracer.span("checkpoint", "checkpoint"):
        _average_buffers(r)
        if r.rank == 0:
            r.checkpoints.save(step, _checkpoint_state(r, step, skipped_total))
        r.checkpoint_clock.record_save()
        r.world.barrier()  # nobody races ahead of a checkpoint that a restart will depend on


def _resolve_resume(resume: str | None, r: Run) -> Path | None:
    """Rank 0 picks the checkpoint and tells the others, so all ranks load the same file."""
    if not resume:
        return None
    choice = error = None
    if r.rank == 0:
        try:
            choice = r.checkpoints.resolve(resume)
        except UserError as exc:
            error = str(exc)
    choice, error = r.world.mpi_comm.bcast((str(choice) if choice else None, error), root=0)
    if error:
        raise _collective(DataError(error))
    return Path(choice) if choice else None


def _restore(r: Run, path: Path) -> tuple[int, int]:
    state = checkpoint.load(path)
    if state["segments"] != _segment_table(r.arena):
        raise _collective(DataError(f"{path}: parameters do not match model {r.config.model.name!r} "
                                    "(different model or options than the run that wrote it)"))
    if int(state["global_batch"]) != r.config.train.global_batch:
        raise _collective(ConfigError(f"train.global_batch = {r.config.train.global_batch}, but {path} was "
                                      f"written with {int(state['global_batch'])}; resume with the same global batch"))
    r.arena.params[...] = r.arena.xp.asarray(state["params"])
    for name, value in state["buffers"].items():
        r.model.set_buffer(name, value)
    r.optimizer.load_state_dict(state["optimizer"])
    r.loader.load_state_dict(state["sampler"])
    rng_states = state.get("rng", {})
    for name, module in _modules_with_rng(r.model):
        if name in rng_states:
            module.rng.bit_generator.state = json.loads(rng_states[name])
    return int(state["step"]), int(state.get("skipped_steps", 0))


def _modules_with_rng(model):
    return [(f"module{i}", m) for i, m in enumerate(model.modules())
            if isinstance(getattr(m, "rng", None), np.random.Generator)]


# -- small helpers ----------------------------------------------------------------------------------

def _collective(exc: UserError) -> UserError:
    exc.collective = True  # raised on every rank at once: print once, no abort needed
    return exc


def _mark(r: Run, step: int, phase: str) -> None:
    """Entering `phase` of `step`: the stall watchdog and the timeline learn it (the timer is switched beside)."""
    if r.watchdog is not None:
        r.watchdog.mark(step, phase)
    r.tracer.phase(phase)


PHASES = ("data", "forward", "backward", "allreduce", "optimizer")


def _window_phases(r: Run, wall_s: float) -> tuple[dict, dict, float]:
    """This logging window's seconds per phase on this rank, the slowest rank's per phase, and the
    largest per-rank compute (every phase but the allreduce).

    `other` is the window's wall time the phases do not cover (logging, evaluation, checkpoints).
    A synchronous step runs at the pace of its slowest rank: the maxima show which phase holds it
    up, and the others wait for it in "allreduce". One small allreduce per logging step, at the
    same steps on every rank.
    """
    totals = r.timer.drain()
    local = np.array([totals.get(p, 0.0) for p in PHASES] + [0.0, 0.0])
    local[-2] = max(0.0, wall_s - local[:-2].sum())
    local[-1] = sum(totals.get(p, 0.0) for p in PHASES if p != "allreduce")
    slowest = local.copy()
    if r.world.size > 1:
        from mpi4py import MPI

        r.world.mpi_comm.Allreduce(local, slowest, op=MPI.MAX)
    names = PHASES + ("other",)
    return ({n: round(float(v), 4) for n, v in zip(names, local)},
            {n: round(float(v), 4) for n, v in zip(names, slowest)}, round(float(slowest[-1]), 4))


def _write_trace(r: Run):
    """Gather the timeline to rank 0 and write it (collective); its path on rank 0, else None."""
    if not r.tracer.enabled:
        return None
    path = Path(r.config.log.trace_file) if r.config.log.trace_file else r.out_dir / "trace.json"
    return trace.write(r.world.mpi_comm, r.tracer, r.tracer.offsets, path,
                       metadata={"model": r.config.model.name, "algorithm": r.world.name,
                                 "steps": [r.tracer.first, r.tracer.last], "world_size": r.world.size})


def _waiting(r: Run, what: str):
    return r.watchdog.waiting(what) if r.watchdog is not None else contextlib.nullcontext()


def _peak_rss_mb(worker_pids) -> tuple[float, list[float]]:
    """(this rank's peak resident set, each live data worker process's), in MiB, from VmHWM."""
    def vm_hwm(pid) -> float:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        if pid == "self":  # no /proc: getrusage's peak (KiB on Linux, bytes on macOS)
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
        return float("nan")

    return vm_hwm("self"), [vm_hwm(pid) for pid in worker_pids]


def _local_rank(world) -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return world.rank


def _progress(config: Config) -> str:
    """comm.progress = auto: a thread where backward leaves the core free (GPU), the hooks on the CPU."""
    if config.comm.progress != "auto":
        return config.comm.progress
    return "thread" if config.runtime.device == "gpu" else "hooks"


def _version() -> str:
    from hpcdl import __version__

    return __version__


def _optimizer_options(config: Config) -> dict:
    o = config.optim
    common = {"weight_decay": o.weight_decay, "no_decay": list(o.no_decay)}
    if o.name in ("sgd", "nesterov"):
        return {**common, "momentum": o.momentum}
    eps = {"eps": o.eps} if o.eps > 0 else {}  # 0: the optimizer's own default (adamw 1e-8, lamb 1e-6)
    if o.name == "adamw":
        return {**common, "betas": tuple(o.betas), **eps}
    if o.name == "lars":
        return {**common, "momentum": o.momentum, "trust_coefficient": o.trust_coefficient,
                "no_adapt": list(o.no_adapt), "trust_clamp": tuple(o.trust_clamp) or None}
    return {**common, "betas": tuple(o.betas), **eps, "mode": o.lamb_mode, "max_grad_norm": o.max_grad_norm,
            "no_adapt": list(o.no_adapt), "trust_clamp": tuple(o.trust_clamp) or None}


def _log_layer_stats(log: MetricsLog, step: int, r: Run) -> None:
    stats = r.optimizer.last_stats
    if not stats:
        return
    log.write("layers", step=step, names=[s.name for s in r.arena.segments],
              **{k: np.asarray(v).round(8).tolist() for k, v in stats.items() if hasattr(v, "__len__")})


def _banner(r: Run, threads, resume_path) -> str:
    config, world, arena = r.config, r.world, r.arena
    per_rank = config.train.global_batch // (world.size * config.train.accumulate_steps)
    lines = [
        f"hpcdl: {config.model.name}, {arena.num_parameters:,} parameters in {len(arena.segments)} tensors; "
        f"{world.size} rank(s) x {threads} thread(s), allreduce {world.name}, device {backend.device}",
        f"hpcdl: global batch {config.train.global_batch} = {per_rank} per rank x {world.size} ranks x "
        f"{config.train.accumulate_steps} accumulation; {r.steps_per_epoch} steps/epoch, {r.total_steps} steps",
        f"hpcdl: {config.optim.name}: {r.schedule.describe()}",
    ]
    if world.size > 1:  # which algorithm, and for auto whether from measurements or the model
        lines.append("hpcdl: " + world.describe().split("\n")[0] + "; " + r.reducer.describe())
    from hpcdl.threads import current as thread_plan

    plan = thread_plan()
    if plan is not None:  # how the count was chosen, and what looks wrong about it on any rank
        lines.append(f"hpcdl: threads {plan.why}")
        lines.extend(f"hpcdl: warning: {note}" for note in plan.notes)
    if resume_path:
        lines.append(f"hpcdl: resuming from {resume_path}")
    return "\n".join(lines)
