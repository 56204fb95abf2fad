"""This rank's batches, prepared ahead within a memory budget: the last stage of the data path.

    loader = BatchLoader(dataset, sampler, train_transform, eval_transform, eval_batch=64,
                         prefetch=4, workers=1, worker_kind="thread", memory_bytes=1 << 30)
    batch = loader.next_step()             # StepBatch of the sampler's cursor; the cursor moves on
    for micro in range(batch.micro_steps):
        x, y = batch.take(micro)           # waits only for what the workers have not finished
    for x, y in loader.eval_batches():     # this rank's shard of the test split
        ...

A batch is a pure function of its job, (epoch, step, micro-step) or a test
row range: the sampler fixes the rows and the transforms key their draws by
global-batch position. Prefetch on or off, threads or processes, one worker
or eight, the batches are bit-identical, and a checkpoint's sampler state
resumes the same stream on any rank count.

Memory (`MemoryPlan`). Everything the data path holds counts against the
budget: the slots (depth + 1 micro-batches of float32 images and int64
labels, each sized for the larger of the training micro-batch and the
evaluation batch), each worker's raw-row buffer and transform temporaries,
and what is resident per process (an in-memory dataset's arrays, or a
streamed one's labels and CRC-32s, plus two epochs of sampler
permutation). A budget too small for the minimum (one slot held and one
being filled) is a config error naming `data.memory_mb`; a budget between
that and the requested depth lowers the depth and says so.

A micro-batch's (x, y) are views into its slot, valid until the next take:
the model reads x during forward and keeps references only until its
backward is done, which is before the next take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hpcdl.data.batches import BatchRecipe, EvalJob, TrainJob
from hpcdl.data.prefetch import Prefetcher, SlotLayout
from hpcdl.data.sampler import ShardedSampler, shard_range
from hpcdl.errors import ConfigError

MB = 2**20


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step on one rank: `micro_steps` micro-batches, taken in order with `take`."""

    epoch: int
    step: int
    micro_steps: int
    global_count: int        # samples in the global batch over all ranks: divide the summed loss by this
    loader: "BatchLoader"

    def take(self, micro: int):
        """(x float32 N×C×H×W, y int64 N) of micro-step `micro`; N may be 0 in a kept epoch tail."""
        return self.loader._take_train(self.epoch, self.step, micro)

    def take_all(self) -> list:
        """Every micro-batch, as copies that outlive their slots (tests; the trainer takes them one at a time)."""
        return [tuple(np.array(a) for a in self.take(m)) for m in range(self.micro_steps)]


@dataclass(frozen=True)
class MemoryPlan:
    """How the data path uses its budget on this rank (bytes)."""

    budget: int
    depth: int
    requested_depth: int
    workers: int
    kind: str
    rows: int
    slot_bytes: int
    worker_bytes: int
    resident_bytes: int
    resident_copies: int

    @property
    def slots(self) -> int:
        return self.depth + 1

    @property
    def total(self) -> int:
        return self.total_at(self.depth)

    def total_at(self, depth: int) -> int:
        makers = self.workers if depth else 1
        return (depth + 1) * self.slot_bytes + makers * self.worker_bytes + self.resident_copies * self.resident_bytes

    def describe(self) -> str:
        how = (f"{self.depth} micro-batches ahead on {self.workers} {self.kind} worker(s)" if self.depth
               else "prepared in the training thread (data.prefetch = 0)")
        lowered = (f" (data.prefetch {self.requested_depth} lowered to fit data.memory_mb)"
                   if self.depth < self.requested_depth else "")
        return (f"data: {how}{lowered}; {self.slots} slots × {self.slot_bytes / MB:.1f} MB + buffers "
                f"{(self.workers if self.depth else 1) * self.worker_bytes / MB:.1f} MB + resident "
                f"{self.resident_copies * self.resident_bytes / MB:.1f} MB = {self.total / MB:.1f} MB "
                f"of {self.budget / MB:.0f} MB")

    def as_dict(self) -> dict:
        return {"depth": self.depth, "workers": self.workers, "kind": self.kind, "rows": self.rows,
                "slot_mb": round(self.slot_bytes / MB, 3), "total_mb": round(self.total / MB, 3),
                "budget_mb": round(self.budget / MB, 3)}


def plan_memory(recipe: BatchRecipe, sampler: ShardedSampler, dataset, *, budget: int, depth: int, workers: int,
                kind: str) -> MemoryPlan:
    """The deepest prefetch ≤ `depth` that fits `budget`, or a ConfigError naming data.memory_mb."""
    layout = SlotLayout(1, recipe.max_rows, tuple(recipe.output_shape))
    copies = 1 + (workers if kind == "process" and depth else 0)
    plan = MemoryPlan(budget=int(budget), depth=int(depth), requested_depth=int(depth), workers=int(workers),
                      kind=kind, rows=int(recipe.max_rows), slot_bytes=layout.slot_bytes,
                      worker_bytes=int(recipe.scratch_bytes),
                      resident_bytes=int(dataset.resident_bytes + sampler.resident_bytes), resident_copies=copies)
    minimum = min(depth, 1)
    if plan.total_at(minimum) > budget:
        c, h, w = recipe.output_shape
        need = plan.total_at(minimum)
        raise ConfigError(
            f"data.memory_mb = {budget / MB:.4g}: the data path needs at least {need / MB:.1f} MB here "
            f"({minimum + 1} slot(s) of {plan.slot_bytes / MB:.1f} MB for batches of {recipe.max_rows} images "
            f"{c}×{h}×{w} float32, worker buffers {plan.worker_bytes / MB:.1f} MB, resident labels/images "
            f"{copies * plan.resident_bytes / MB:.1f} MB); raise data.memory_mb or lower the per-rank batch")
    fitted = depth
    while fitted > minimum and plan.total_at(fitted) > budget:
        fitted -= 1
    return MemoryPlan(**{**plan.__dict__, "depth": fitted})


class BatchLoader:
    """This rank's training micro-batches in sampler order, and its evaluation shard, prepared ahead."""

    def __init__(self, dataset, sampler: ShardedSampler, train_transform, eval_transform, *, eval_batch: int = 0,
                 prefetch: int = 4, workers: int = 1, worker_kind: str = "auto", memory_bytes: int = 1 << 30,
                 xp=np):
        if len(dataset.train.labels) != sampler.num_samples:
            raise ValueError(f"sampler covers {sampler.num_samples} samples, the training split holds "
                             f"{len(dataset.train.labels)}")
        if worker_kind == "auto":
            # Processes keep the workers' Python off the training thread's GIL (measured: `hpcdl bench
            # data --compute-ms`); in-memory arrays would have to be copied into each, so those use threads.
            worker_kind = "process" if dataset.streams else "thread"
        if worker_kind == "process" and prefetch and not dataset.streams:
            raise ConfigError(f"data.worker_kind = 'process': {dataset.source} is in memory; process workers read "
                              "HDF5 files (use 'thread')")
        self.dataset = dataset
        self.sampler = sampler
        self.xp = xp
        self.eval_batch = int(eval_batch or sampler.micro_batch)
        self.recipe = BatchRecipe(dataset.train, dataset.test, sampler, train_transform, eval_transform,
                                  max(sampler.micro_batch, self.eval_batch))
        self.output_shape = self.recipe.output_shape
        self.plan = plan_memory(self.recipe, sampler, dataset, budget=int(memory_bytes), depth=int(prefetch),
                                workers=int(workers), kind=worker_kind)
        self._prefetcher = None
        self._stream_next = None  # the TrainJob the prefetch stream delivers next, None when not streaming
        self._start()

    def _start(self) -> None:
        self._prefetcher = Prefetcher(self.recipe, depth=self.plan.depth, workers=self.plan.workers,
                                      kind=self.plan.kind)
        self._stream_next = None

    @property
    def worker_pids(self) -> list[int]:
        return self._prefetcher.worker_pids if self._prefetcher else []

    def describe(self) -> str:
        return self.plan.describe()

    # -- training -------------------------------------------------------------------------------
    def next_step(self) -> StepBatch:
        """The step at the sampler's cursor; advances the cursor. Take its micro-batches before the next call."""
        s = self.sampler
        epoch, step = s.epoch, s.step_in_epoch
        if self._stream_next != TrainJob(epoch, step, 0):
            self._prefetcher.begin(self._train_jobs(epoch, step))
            self._stream_next = TrainJob(epoch, step, 0)
        s.epoch, s.step_in_epoch = s.position_after(epoch, step)
        return StepBatch(epoch, step, s.accumulate_steps, s.global_count(epoch, step), self)

    def _train_jobs(self, epoch: int, step: int, micro: int = 0) -> Iterator[TrainJob]:
        while True:
            for m in range(micro, self.sampler.accumulate_steps):
                yield TrainJob(epoch, step, m)
            epoch, step, micro = *self.sampler.position_after(epoch, step), 0

    def _take_train(self, epoch: int, step: int, micro: int):
        wanted = TrainJob(epoch, step, micro)
        if self._stream_next != wanted:
            self._prefetcher.begin(self._train_jobs(epoch, step, micro))
        job, x, y = self._prefetcher.take()
        assert job == wanted, (job, wanted)
        following = self.sampler.position_after(epoch, step)
        self._stream_next = (TrainJob(epoch, step, micro + 1) if micro + 1 < self.sampler.accumulate_steps
                             else TrainJob(*following, 0))
        return self.xp.asarray(x), self.xp.asarray(y)

    # -- evaluation -----------------------------------------------------------------------------
    def eval_batches(self, rank: int | None = None, world_size: int | None = None):
        """(x, y) over this rank's contiguous shard of the test split; over all ranks every sample once.

        Shards differ by at most one sample, so sum correct counts and sample
        counts across ranks (not per-rank accuracies) to get the accuracy.
        """
        rank = self.sampler.rank if rank is None else rank
        world_size = self.sampler.world_size if world_size is None else world_size
        start, stop = shard_range(self.dataset.test.count, rank, world_size)
        jobs = [EvalJob(lo, min(lo + self.eval_batch, stop)) for lo in range(start, stop, self.eval_batch)]
        self._stream_next = None  # training restarts its stream after evaluation
        self._prefetcher.begin(jobs)
        for _ in jobs:
            _, x, y = self._prefetcher.take()
            yield self.xp.asarray(x), self.xp.asarray(y)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (any rank count): the stream restarts there."""
        self._prefetcher.begin(())
        self.sampler.load_state_dict(state)
        if self.plan.kind == "process" and self.plan.depth:
            self._prefetcher.close()  # its workers hold a copy of the sampler with the old seed
            self._start()
        self._stream_next = None

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

