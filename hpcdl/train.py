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

Surviving a dead rank (`comm.fault_tolerance` = shrink | regrow, ULFM; the
mechanics are in `hpcdl.elastic`, the reasoning in docs/fault-tolerance.md):
everything that holds a communicator is built by `_connect()` and nothing
else; `_recover()` revokes, shrinks (and spawns), and calls `_connect()` on
the new world. The optimizer, the only thing that changes the model, runs
after every communication of its step and makes none itself, so a failure
always lands either before a rank's update of step s or after it: the
survivors that got furthest ((step, after-step work done) largest) hold the
exact state of the uninterrupted run and broadcast it to the rest, and the
interrupted step is redone from its first sample over the new world. No
copy is kept per step: the cost with no failure is one integer per step.
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

from hpcdl import backend, checkpoint, comm, elastic, faults, guard, models, optim, trace
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

# Seconds a recovery from a dead rank may take before the job is aborted instead (spawning and
# loading data in a replacement included; a shrink takes milliseconds).
RECOVERY_TIMEOUT_S = 60.0

# Positions in the small per-step stats vector that rides one allreduce.
LOSS, CORRECT, SAMPLES, STOP_VOTE, CHECKPOINT_VOTE = range(5)


@dataclass
class Run:
    """Everything one training run holds. `_setup` builds it; the fields marked "world" are
    built by `_connect` alone, again on the new world after a failure."""

    config: Config
    data: object  # hpcdl.data.Dataset
    transforms: tuple  # (train, eval) transforms
    model: object  # hpcdl.layers.Module
    arena: Arena
    optimizer: object  # hpcdl.optim.Optimizer
    schedule: object  # hpcdl.optim.Schedule
    stop_signals: checkpoint.StopSignals
    out_dir: Path
    steps_per_epoch: int
    total_steps: int
    fault_tolerance: str = "abort"
    world: object = None  # world: hpcdl.comm Communicator
    loader: BatchLoader = None  # world: this rank's share of each global batch
    reducer: object = None  # world: hpcdl.comm.BucketReducer
    watchdog: object | None = None  # world: hpcdl.guard.StallWatchdog
    checkpoints: checkpoint.CheckpointManager = None  # world: rank 0 writes
    checkpoint_clock: checkpoint.CheckpointPolicy = None  # world: rank 0 votes on time
    tracer: object = field(default_factory=trace.NullTracer)  # world: hpcdl.trace.Tracer when a timeline is asked for
    log: MetricsLog = None  # world: metrics.jsonl, open on rank 0 only
    progress: Progress = None  # world: the progress line, rank 0 only
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    injected: dict = field(default_factory=dict)  # HPCDL_FAULT_INJECT steps, for the test suite and drills
    phase: str = "start"  # where this rank is, for the failure log
    failures: list = field(default_factory=list)  # elastic.Failure records, in order
    graveyard: list = field(default_factory=list)  # worlds broken by a failure, kept so their buffers stay valid
    evaluations: int = 0
    start_size: int = 0
    replacement: Loop | None = None  # set in a spawned replacement until it has joined
    joined: bool = False  # this process is a spawned replacement

    @property
    def rank(self) -> int:
        return self.world.rank

    def close(self) -> None:
        _disconnect(self)
        self.data.close()
        self.stop_signals.restore()


@dataclass
class Loop:
    """The training loop's own state: what a survivor that got furthest hands the others."""

    step: int  # optimizer steps completed
    position: tuple  # (epoch, step in epoch) of the next step's global batch
    after: int = -1  # the step whose after-step work (log, eval, checkpoint) is done
    skipped_total: int = 0
    consecutive_skips: int = 0
    last_loss: float = float("nan")
    last_eval: dict | None = None
    stats: object = None  # the last step's global stats vector
    lr: float = float("nan")
    stop: bool = False

    def key(self) -> tuple:
        return (self.step, self.after)


def run(config: Config, out: str | None = None, resume: str | None = None,
        config_path: str | None = None, threads: int | None = None) -> dict | None:
    """Train as the config says; returns the summary on rank 0 and None elsewhere."""
    started = time.perf_counter()
    out_dir = Path(out or Path("runs") / (Path(config_path).stem if config_path else config.model.name))
    r = _setup(config, out_dir)
    try:
        summary = _train(r, started, resume, threads)
    finally:
        r.close()
    if r.failures or r.joined:  # a replacement ends like the survivors it joined
        elastic.end_without_finalize(r.world.mpi_comm)
    return summary


def _setup(config: Config, out_dir: Path) -> Run:
    # -- fault tolerance: a spawned replacement joins the survivors instead of starting a job ----
    ft = config.comm.fault_tolerance
    replacement = ft != "abort" and elastic.parent() is not None
    try:
        elastic.require(ft)
    except ConfigError as exc:  # the same library and launch on every rank: the same error
        raise _collective(exc)
    from mpi4py import MPI

    mpi_comm = elastic.join_parent() if replacement else MPI.COMM_WORLD
    xp = backend.use_device(config.runtime.device, local_rank=_local_rank(mpi_comm.Get_rank()))

    # -- data: the same permutation on every rank, each rank its slice of each global batch ---------
    data_cfg, train_cfg = config.data, config.train
    data = load_dataset(data_cfg.dataset, path=data_cfg.path or None, data_dir=data_cfg.data_dir or None,
                        download=data_cfg.download, synthetic_size=data_cfg.synthetic_samples,
                        synthetic_shape=tuple(data_cfg.synthetic_shape), seed=train_cfg.seed)
    try:
        transforms = build_transforms(
            data.input_shape, mean=data.mean, std=data.std, seed=train_cfg.seed, image_size=data_cfg.image_size,
            short_side=data.short_side, random_resized_crop=data_cfg.random_resized_crop,
            scale=data_cfg.crop_scale, ratio=data_cfg.crop_ratio, pad=data_cfg.random_crop_pad,
            flip=data_cfg.random_flip, eval_crop_fraction=data_cfg.eval_crop_fraction)
        input_shape = tuple(transforms[0].output_shape(data.train.image_shape))
        # steps per epoch depend on the data and the global batch, not on the world
        steps_per_epoch = ShardedSampler(data.train.count, train_cfg.global_batch, 0, 1, train_cfg.seed,
                                         accumulate_steps=train_cfg.accumulate_steps).steps_per_epoch
    except ConfigError as exc:  # the same config and file give every rank the same plan, and the same error
        data.close()
        raise _collective(exc)
    except BaseException:
        data.close()
        raise

    # -- model and its arena: every parameter and gradient is a view into two flat buffers --------
    model_options = dict(config.model.options)
    if config.comm.sync_batchnorm:
        model_options.setdefault("sync_bn", True)
    model = models.build(config.model.name, input_shape=input_shape, num_classes=data.num_classes,
                         **model_options)
    arena = Arena(model.parameters(), xp=xp, seed=train_cfg.seed)
    optimizer = optim.create(config.optim.name, arena, **_optimizer_options(config))
    total_steps = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
    schedule = optim.build_schedule(config.schedule, global_batch=train_cfg.global_batch,
                                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    r = Run(config=config, data=data, transforms=transforms, model=model, arena=arena, optimizer=optimizer,
            schedule=schedule, stop_signals=checkpoint.StopSignals(), out_dir=out_dir,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, fault_tolerance=ft,
            start_size=mpi_comm.Get_size())
    # Sync-BN reaches the world through the run, so it follows the world across a rebuild.
    if config.comm.sync_batchnorm and not attach_sync_batchnorm(model, lambda v: r.world.allreduce(v, op="sum")):
        raise _collective(ConfigError(f"comm.sync_batchnorm: model {config.model.name!r} has no batch norm "
                                      "layer to synchronise"))
    if not replacement:  # a replacement's drills would fire again: only the original ranks take them
        r.injected = {kind: set(faults.requested(kind)) for kind in
                      ("raise-at-step", "nan-grad-at-step", "kill-at-step", "kill-in-bucket", "kill-in-stats",
                       "kill-in-eval")}
    else:
        r.injected = {kind: set() for kind in ("raise-at-step", "nan-grad-at-step", "kill-at-step",
                                               "kill-in-bucket", "kill-in-stats", "kill-in-eval")}
    r.replacement = Loop(step=-1, position=(0, 0), after=-1) if replacement else None
    r.joined = replacement
    try:
        _connect(r, mpi_comm, r.replacement)
        if not replacement:
            guard.check_consistency(r.world.mpi_comm, {
                "model": arena.signature(),
                "config": config.to_json(),
                "dataset": f"{data.train.count}:{input_shape}:{data.num_classes}",
                "hpcdl": _version(),
            })
            r.world.bcast(arena.params, root=0)  # identical already by seed; this makes it a fact
    except BaseException:
        r.close()
        raise
    return r


def _connect(r: Run, mpi_comm, loop: Loop | None) -> None:
    """Build everything that holds a communicator, over `mpi_comm`: the one place that does.

    Collective over `mpi_comm`, in the same order on every rank: at start-up,
    after a shrink, and in a spawned replacement joining the survivors. With
    `loop` (after a failure), the ranks first agree on the furthest state and
    take it (`_agree`), so the data stream starts at the step they will redo.
    """
    config, train_cfg, data_cfg = r.config, r.config.train, r.config.data
    world = comm.create(config.comm.algorithm, mpi_comm=mpi_comm, crossovers=config.comm.crossovers or None,
                        ranks_per_node=config.comm.ranks_per_node or None, piece_kb=config.comm.piece_kb or None,
                        pipeline_depth=config.comm.pipeline_depth, shared_window=_windows_allowed(config))
    r.world = world
    if world.shared_memory and world.size > 1:
        _share_gradients(r, world)
    if loop is not None:
        _agree(r, loop)
    r.watchdog = guard.StallWatchdog(world.mpi_comm, timeout_s=config.comm.stall_timeout_s) \
        if world.size > 1 and config.comm.stall_timeout_s > 0 else None
    try:
        sampler = ShardedSampler(r.data.train.count, train_cfg.global_batch, world.rank, world.size, train_cfg.seed,
                                 accumulate_steps=train_cfg.accumulate_steps, uneven=world.size != r.start_size)
        if loop is not None:
            sampler.load_state_dict({**sampler.state_dict(), "epoch": loop.position[0],
                                     "step_in_epoch": loop.position[1]})
        r.loader = BatchLoader(r.data, sampler, *r.transforms, eval_batch=train_cfg.eval_batch,
                               prefetch=data_cfg.prefetch, workers=data_cfg.workers, worker_kind=data_cfg.worker_kind,
                               memory_bytes=int(data_cfg.memory_mb * 2**20), xp=r.arena.xp)
    except ConfigError as exc:
        raise _collective(exc)
    # -- gradient path: buckets reduced during backward, then one fused optimizer pass -----------
    r.reducer = comm.BucketReducer(world, r.arena, bucket_bytes=int(config.comm.bucket_mb * 2**20),
                                   overlap=config.comm.overlap, op="sum", progress=_progress(config),
                                   budget_s=config.comm.progress_budget_ms / 1e3,
                                   poll_interval_s=config.comm.progress_interval_us / 1e6,
                                   taper=config.comm.bucket_taper)
    r.reducer.attach(r.model)
    r.tracer = trace.for_run(list(config.log.trace_steps), config.log.trace_file, world, r.total_steps,
                             layers=r.model if config.log.trace_layers else None)
    r.reducer.clock = r.tracer.clock  # bucket start and completion times on the timeline's clock
    # -- rank 0's jobs: checkpoints, the clock vote, metrics and progress ------------------------
    r.checkpoints = checkpoint.CheckpointManager(r.out_dir / "checkpoints", keep=config.checkpoint.keep,
                                                 rank=world.rank)
    r.checkpoint_clock = checkpoint.CheckpointPolicy(every_steps=config.checkpoint.every_steps,
                                                     every_minutes=config.checkpoint.every_minutes, rank=world.rank)
    if r.log is not None and world.rank == 0 and r.log.path is None:  # rank 0 died: its log moves here
        r.log = MetricsLog(r.out_dir / "metrics.jsonl", truncate=False)
        r.progress = Progress(r.total_steps, enabled=config.log.progress)


def _windows_allowed(config) -> bool:
    """comm.shared_window, where a window can work: it belongs to one MPI world, which a shrink or
    regrow replaces, and to host memory (for shm itself config validation refuses both combinations)."""
    return (config.comm.shared_window and config.comm.fault_tolerance == "abort"
            and config.runtime.device != "gpu")


def _share_gradients(r: Run, world) -> None:
    """The gradient arena moves into the node's shared window (comm.algorithm = shm, or ring and
    hierarchical with comm.shared_window), so the peers read each other's gradients in place
    (hpcdl.comm.window)."""
    r.arena.rehome_grads(world.zeros(r.arena.total, r.arena.dtype))


def _disconnect(r: Run, broken: bool = False) -> None:
    """Stop what `_connect` started. `broken`: the communicators are revoked, so nothing may use MPI."""
    if r.reducer is not None:
        r.reducer.close()
    if r.loader is not None:
        r.loader.close()
    if r.watchdog is not None:
        r.watchdog.close(abandon=broken)
    r.reducer = r.loader = r.watchdog = None


def _train(r: Run, started: float, resume: str | None, threads: int | None) -> dict | None:
    config, train_cfg = r.config, r.config.train
    if r.replacement is not None:  # a spawned replacement: the survivors' state arrived in _connect
        loop, r.replacement = r.replacement, None
        start_step, resume_path = loop.step, None
    else:
        start_step, skipped_total = 0, 0
        resume_path = _resolve_resume(resume, r)
        if resume_path is not None:
            start_step, skipped_total = _restore(r, resume_path)
        elif r.rank == 0 and r.checkpoints.latest(quiet=True) is not None:
            raise ConfigError(f"{r.out_dir}: holds checkpoints of an earlier run; pass --resume auto to continue it "
                              "or choose another --out")
        s = r.loader.sampler
        loop = Loop(step=start_step, position=(s.epoch, s.step_in_epoch), after=start_step,
                    skipped_total=skipped_total)

    r.log = MetricsLog(r.out_dir / "metrics.jsonl" if r.rank == 0 else None, truncate=resume_path is None
                       and r.replacement is None and start_step == 0)
    r.progress = Progress(r.total_steps, enabled=r.rank == 0 and config.log.progress)
    if r.rank == 0:
        r.progress.message(_banner(r, threads, resume_path))
        r.progress.message(f"hpcdl: {r.data.summary()}\nhpcdl: {r.loader.describe()}")
        r.log.write("start", world_size=r.world.size, global_batch=train_cfg.global_batch,
                    steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps, start_step=start_step,
                    algorithm=r.world.name, threads=threads, parameters=r.arena.num_parameters,
                    schedule=r.schedule.describe(), data=r.loader.plan.as_dict(), config=config.to_dict(),
                    fault_tolerance=r.fault_tolerance)

    r.window = [0, time.perf_counter()]  # images and start of this logging window
    while loop.step < r.total_steps and not loop.stop:
        try:
            if loop.after < loop.step:  # only after a recovery that landed between a step and its after-work
                _after_step(r, loop)
                continue
            _train_step(r, loop)
            _after_step(r, loop)
        except Exception as exc:
            _recover_or_raise(r, loop, exc)

    # -- the end --------------------------------------------------------------------------------
    while True:
        try:
            return _finish(r, loop, started, start_step)
        except Exception as exc:
            _recover_or_raise(r, loop, exc)


def _after_step(r: Run, loop: Loop) -> None:
    """Logging, evaluation and checkpoints after step `loop.step`; collective where they need to be."""
    config, step, stats = r.config, loop.step, loop.stats
    r.phase = "log"
    eval_every = round(config.train.eval_every_epochs * r.steps_per_epoch) if config.train.eval_every_epochs else 0
    if step % config.log.every_steps == 0 or step == r.total_steps:
        seconds = time.perf_counter() - r.window[1]
        images_per_s = r.window[0] / max(seconds, 1e-9)
        phases, slowest, compute_max = _window_phases(r, seconds)
        r.log.write("step", step=step, epoch=round(step / r.steps_per_epoch, 4), loss=loop.last_loss,
                    train_accuracy=stats[CORRECT] / max(stats[SAMPLES], 1), lr=loop.lr, images_per_s=images_per_s,
                    seconds=phases, seconds_max=slowest, compute_max=compute_max, comm=r.reducer.stats)
        r.progress.update(step, loss=loop.last_loss, lr=loop.lr, img_s=images_per_s)
        r.window = [0, time.perf_counter()]
    if config.log.layer_stats_every and step % config.log.layer_stats_every == 0:
        _log_layer_stats(r.log, step, r)

    if (eval_every and step % eval_every == 0) or step == r.total_steps:
        loop.last_eval = evaluate(r)
        r.log.write("eval", step=step, epoch=round(step / r.steps_per_epoch, 4), **loop.last_eval)
        r.progress.message(f"step {step} epoch {step / r.steps_per_epoch:.2f}: test accuracy "
                           f"{100 * loop.last_eval['test_accuracy']:.2f}%  test loss {loop.last_eval['test_loss']:.4f}")
    elif step % r.steps_per_epoch == 0:
        r.log.write("epoch", step=step, epoch=step // r.steps_per_epoch)

    stop = stats[STOP_VOTE] > 0  # a signal on any rank stops all of them at the same step
    if stats[CHECKPOINT_VOTE] > 0 or stop or (step == r.total_steps and config.checkpoint.at_end):
        _save(r, step, loop.skipped_total)
    if stop:
        r.progress.message(f"hpcdl: {r.stop_signals.signal_name or 'stop signal'} received: checkpoint written "
                           f"at step {step}; resume with --resume auto")
        r.log.write("stopped", step=step, reason=r.stop_signals.signal_name)
    loop.stop = bool(stop)
    loop.after = step
    r.phase = "between steps"


def _finish(r: Run, loop: Loop, started: float, start_step: int) -> dict | None:
    config, train_cfg, step = r.config, r.config.train, loop.step
    if loop.last_eval is None:
        loop.last_eval = evaluate(r)
    r.phase = "finish"
    trace_path = _write_trace(r)
    seconds = time.perf_counter() - started
    param_norm = float(np.linalg.norm(backend.to_host(r.arena.params).astype(np.float64)))
    peak_rss = r.world.allgather_obj(_peak_rss_mb(r.loader.worker_pids))
    r.progress.close()
    if r.rank != 0:
        return None
    last_eval = loop.last_eval
    summary = {
        "test_accuracy": last_eval["test_accuracy"],
        "test_loss": last_eval["test_loss"],
        "final_loss": loop.last_loss,
        "param_norm": param_norm,
        "epochs": round(step / r.steps_per_epoch, 4),
        "steps": step,
        "global_batch": train_cfg.global_batch,
        "world_size": r.world.size,
        "seconds": round(seconds, 3),
        "images_per_s": round((step - start_step) * train_cfg.global_batch / seconds, 1),
        "skipped_steps": loop.skipped_total,
        "stopped_early": step < r.total_steps,
        "peak_rss_mb": [rank_rss for rank_rss, _ in peak_rss],
        "worker_peak_rss_mb": [workers for _, workers in peak_rss],
        "out": str(r.out_dir),
    }
    if r.fault_tolerance != "abort":
        summary["fault_tolerance"] = r.fault_tolerance
        summary["failures"] = len(r.failures)
        summary["failure_log"] = [f.as_dict() for f in r.failures]
    if trace_path is not None:
        summary["trace"] = str(trace_path)
    r.log.write("summary", **summary)
    r.log.close()
    if config.log.plots:
        plot_run(r.out_dir / "metrics.jsonl", r.out_dir / "curves.png")
        if config.log.layer_stats_every:
            plot_layer_stats(r.out_dir / "metrics.jsonl", r.out_dir / "trust_ratios.png")
    return summary


def _train_step(r: Run, loop: Loop) -> None:
    """One optimizer step: step `loop.step + 1`, applied to the model and counted in `loop`."""
    step, lr = loop.step, r.schedule(loop.step)
    injected = r.injected
    if step + 1 in injected["raise-at-step"]:
        raise RuntimeError(f"{faults.FAULT_ENV}: raise-at-step:{step + 1}")
    if step + 1 in injected["kill-at-step"]:
        faults.kill_self(f"at the start of step {step + 1}")
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
        if step + 1 in injected["nan-grad-at-step"]:
            dlogits[...] = np.nan  # as if the loss had overflowed: NaN reaches every gradient
        rank_stats[LOSS] += float(loss)
        rank_stats[CORRECT] += int(count_correct(logits, y))
        rank_stats[SAMPLES] += len(y)

        r.timer.switch("backward")
        _mark(r, step, "backward")
        if micro == last and step + 1 in injected["kill-in-bucket"]:
            _arm(r.world, faults.KillInSchedule(f"in a gradient bucket's allreduce of step {step + 1}", blocking=False))
        r.reducer.begin(sync=micro == last)  # buckets start during the last micro-batch's backward
        r.model.backward(dlogits)

    r.timer.switch("allreduce")
    _mark(r, step, "allreduce")
    rank_stats[STOP_VOTE] = float(r.stop_signals.requested)
    rank_stats[CHECKPOINT_VOTE] = float(r.checkpoint_clock.local_vote(step + 1, time.monotonic()))
    with _waiting(r, "gradient allreduce"):
        r.reducer.finish()
        r.tracer.record_buckets(r.reducer)
        if step + 1 in injected["kill-in-stats"]:
            _arm(r.world, faults.KillInSchedule(f"in the stats allreduce of step {step + 1}", blocking=True))
        r.world.allreduce(rank_stats, op="sum")

    if r.fault_tolerance != "abort":
        # Agree before apply: ULFM's agreement fails on every survivor alike when any rank of the
        # world has died, so either all update or none does. Without it a reduction can end
        # without a peer's data (seen here: Open MPI let a 3-rank ring finish a step after a
        # rank's death, 1 run in 6 under load), and survivors would apply a partial gradient.
        _mark(r, step, "agree")
        elastic.agree(r.world.mpi_comm)
    r.timer.switch("optimizer")
    _mark(r, step, "optimizer")
    # Past the last communication of the step: from here to `loop.step += 1` nothing can fail on a peer.
    applied = r.optimizer.step(lr)  # False when the allreduced gradient is not finite: nothing changed
    r.timer.switch(None)
    r.tracer.end_step()
    loop.step, loop.stats, loop.lr, loop.last_loss = step + 1, rank_stats, lr, rank_stats[LOSS]
    loop.position = r.loader.sampler.position_after(batch.epoch, batch.step)
    r.window[0] += int(rank_stats[SAMPLES])
    if r.failures and not r.failures[-1].first_step_at:
        _log_failure(r, r.failures[-1])
    if applied:
        loop.consecutive_skips = 0
        return
    # the gradient norm comes from the allreduced gradient: every rank skips together
    loop.consecutive_skips += 1
    loop.skipped_total += 1
    r.progress.message(f"hpcdl: warning: step {loop.step}: non-finite gradient norm, update skipped "
                       f"({loop.consecutive_skips} in a row, {loop.skipped_total} in total)")
    r.log.write("skip", step=loop.step, consecutive=loop.consecutive_skips, total=loop.skipped_total)
    if loop.consecutive_skips >= r.config.train.max_nonfinite_steps:
        raise _collective(UserError(
            f"train.max_nonfinite_steps: {loop.consecutive_skips} consecutive steps had non-finite gradients "
            f"(up to step {loop.step}); lower schedule.base_lr or check the data; the last checkpoint is kept "
            f"in {r.checkpoints.directory}"))


def _arm(world, fault) -> None:
    """Arm a fault drill on the communicator that runs the schedules (auto delegates to its algorithms)."""
    for c in [world, *getattr(world, "algorithms", {}).values()]:
        c.fault = fault


# -- surviving a dead rank ---------------------------------------------------------------------

def _recover_or_raise(r: Run, loop: Loop, exc: BaseException) -> None:
    """Recover from a dead rank when the config allows it; re-raise anything else."""
    if r.fault_tolerance == "abort" or not elastic.is_process_failure(exc, r.world, r.watchdog):
        raise exc
    detected = elastic.now()
    old = r.world.mpi_comm
    old_size = old.Get_size()
    record = elastic.Failure(step=loop.step + 1, phase=r.phase, failed_ranks=[], old_size=old_size, new_size=0,
                             detected_at=detected, mode=r.fault_tolerance,
                             error=guard._one_line(exc, 160))
    # A recovery that does not finish (seen about once in 60 test runs: one survivor in MPI_Comm_shrink
    # while another had left it for the next step's MPI_Comm_dup) ends the job instead of hanging it.
    import threading

    deadline = threading.Timer(RECOVERY_TIMEOUT_S, guard.abort, args=(
        f"comm.fault_tolerance: recovery from the failure at step {loop.step + 1} did not finish in "
        f"{RECOVERY_TIMEOUT_S:.0f} s; resume from the last checkpoint with --resume auto", 1))
    deadline.daemon = True
    deadline.start()
    elastic.revoke_all(r.world, r.watchdog, old)  # wakes every survivor still blocked on any of them
    _abandon(r)
    while True:  # another rank may die while we recover: shrink again
        try:
            new = elastic.shrink(old)
            record.failed_ranks = elastic.failed_ranks(old, new)
            if r.fault_tolerance == "regrow" and new.Get_size() < r.start_size:
                grown = elastic.spawn(new, r.start_size - new.Get_size(), _argv())
                record.spawned = r.start_size - new.Get_size()
                new = grown
            record.new_size = new.Get_size()
            _connect(r, new, loop)
            break
        except Exception as again:
            # Only a failure on the new world itself means another rank died during recovery.
            if not elastic.is_process_failure(again, new):
                raise
            import sys

            print(f"hpcdl: rank {new.Get_rank()}: recovery interrupted ({guard._one_line(again, 120)}); "
                  "shrinking again", file=sys.stderr, flush=True)
            elastic.revoke_all(r.world, new)
            _abandon(r)
            old = new
    deadline.cancel()
    record.recovered_at = elastic.now()
    record.resumed_step = loop.step
    r.failures.append(record)
    r.window = [0, time.perf_counter()]
    if r.rank == 0:
        r.progress.message(f"hpcdl: rank(s) {record.failed_ranks} of {old_size} failed at step {record.step} "
                           f"({record.phase}); {record.mode}: continuing on {record.new_size} ranks from step "
                           f"{loop.step} after {1e3 * record.recovery_s:.1f} ms")


def _abandon(r: Run) -> None:
    """Stop the broken world's helpers and complete its requests in flight, so no late message can
    land in a buffer the new world uses; the old objects are kept, never freed (freeing is collective)."""
    from hpcdl.comm import base

    reducer = r.reducer
    _disconnect(r, broken=True)  # joins the progress thread first: then nobody else drives these handles
    for handle in (reducer._pending if reducer is not None else ()):
        if handle is not None:
            handle.abandon()
    requests, base.ABANDONED[:] = list(base.ABANDONED), []
    elastic.settle(requests)
    r.graveyard.append(r.world)


def _agree(r: Run, loop: Loop) -> None:
    """The survivors (and replacements) take the state of the rank that got furthest.

    Every rank's (completed step, after-step work done) goes round in one
    allgather on the new world; the lowest rank holding the largest sends
    its state to the others when they differ. Equal keys mean equal
    parameters and optimizer state, bit for bit (the step invariant).
    """
    keys = r.world.mpi_comm.allgather(loop.key())
    best = max(keys)
    root = keys.index(best)
    if all(k == best for k in keys):
        return
    state = elastic.bcast_state(r.world.mpi_comm, root, _live_state(r, loop) if r.world.rank == root else None)
    if r.world.rank != root and keys[r.world.rank] != best:
        _take_state(r, loop, state)


def _live_state(r: Run, loop: Loop) -> dict:
    return {
        "params": backend.to_host(r.arena.params),
        "buffers": {name: backend.to_host(b) for name, b in r.model.named_buffers()},
        "optimizer": r.optimizer.state_dict(),
        "rng": {name: json.dumps(m.rng.bit_generator.state) for name, m in _modules_with_rng(r.model)},
        "loop": {k: getattr(loop, k) for k in ("step", "position", "after", "skipped_total", "consecutive_skips",
                                               "last_loss", "last_eval", "stats", "lr", "stop")},
        "evaluations": r.evaluations,
    }


def _take_state(r: Run, loop: Loop, state: dict) -> None:
    r.arena.params[...] = r.arena.xp.asarray(state["params"])
    for name, value in state["buffers"].items():
        r.model.set_buffer(name, value)
    r.optimizer.load_state_dict(state["optimizer"])
    for name, module in _modules_with_rng(r.model):
        if name in state["rng"]:
            module.rng.bit_generator.state = json.loads(state["rng"][name])
    for k, v in state["loop"].items():
        setattr(loop, k, v)
    loop.position = tuple(loop.position)
    r.evaluations = state["evaluations"]


def _log_failure(r: Run, record) -> None:
    """After the first step completed on the new world: the record, complete, in metrics.jsonl."""
    record.first_step_at = elastic.now()
    r.log.write("failure", **record.as_dict())


def _argv() -> list[str]:
    import sys

    return [sys.argv[0], *sys.argv[1:]]


def evaluate(r: Run) -> dict:
    """Test loss and accuracy over the whole test split, each rank its shard, streamed like training."""
    with r.tracer.span("evaluate", "evaluate"):
        return _evaluate(r)


def _evaluate(r: Run) -> dict:
    r.phase, r.evaluations = "evaluate", r.evaluations + 1
    dies = r.evaluations in r.injected.get("kill-in-eval", ())
    _average_buffers(r)
    r.model.eval()
    totals = np.zeros(3)
    try:
        for x, y in r.loader.eval_batches():
            logits = r.model.forward(x)
            loss, _ = softmax_cross_entropy(logits, y, normalizer=1)
            totals += (float(loss), int(count_correct(logits, y)), len(y))
            if dies:
                faults.kill_self(f"in evaluation {r.evaluations}, after its first batch")
        r.world.allreduce(totals, op="sum")
        if r.fault_tolerance != "abort":  # as before an update: a sum that missed a dead rank is never used
            elastic.agree(r.world.mpi_comm)
    finally:  # a failure mid-evaluation must not leave the model in eval mode for the redone step
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
    r.phase = "checkpoint"
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
    r.phase = phase
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


def _local_rank(rank: int) -> int:
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return rank


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
