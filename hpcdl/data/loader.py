"""Ready-to-use batches: sampler indices -> gathered rows -> augmented float32 on the compute device.

A batch is a pure function of (epoch, step): the sampler fixes the rows, the
augmenter's randomness is keyed by position. That is what lets the optional
prefetch thread build step k+1 while step k trains without changing a single
value: prefetch on or off, the batches are bit-identical.

On two cores, prefetch mostly competes with the compute for the same CPU; it
pays off when there are spare cores per rank or the model runs on a GPU.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hpcdl.data.augment import Augmenter, normalize
from hpcdl.data.sampler import ShardedSampler, shard_range


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step on one rank: (x, y) per micro-step, and the loss normaliser."""

    epoch: int
    step: int
    micro_batches: list      # [(x float32 N×C×H×W, y int64 N)], one per accumulate step; N may be 0 in a kept tail
    global_count: int        # samples in the global batch over all ranks: divide the summed loss by this


class BatchLoader:
    """Produces this rank's StepBatch for each optimizer step, in sampler order."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, sampler: ShardedSampler, augmenter: Augmenter,
                 *, xp=np, prefetch: bool = False):
        if len(images) != sampler.num_samples or len(labels) != sampler.num_samples:
            raise ValueError(f"sampler covers {sampler.num_samples} samples, arrays hold {len(images)}/{len(labels)}")
        self.images = images
        self.labels = labels
        self.sampler = sampler
        self.augmenter = augmenter
        self.xp = xp
        self._device = xp.cuda.Device() if hasattr(xp, "cuda") else None  # CuPy's current device is per thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcdl-prefetch") if prefetch else None
        self._pending = None  # (position, future) of the batch being built ahead

    def build(self, epoch: int, step: int) -> StepBatch:
        """The batch of (epoch, step), independent of any cursor."""
        rank_batch = self.sampler.rank_batch(epoch, step)
        micro = []
        for indices, positions in zip(rank_batch.indices, rank_batch.positions):
            rows = self.xp.asarray(self.images[indices])  # move uint8, 4× fewer bytes than float32
            x = self.augmenter(rows, epoch, step, positions)
            micro.append((x, self.xp.asarray(self.labels[indices])))
        return StepBatch(epoch, step, micro, rank_batch.global_count)

    def _build_on_worker(self, epoch: int, step: int) -> StepBatch:
        if self._device is None:
            return self.build(epoch, step)
        with self._device:
            return self.build(epoch, step)

    def next_step(self) -> StepBatch:
        """The batch at the sampler's cursor; advances the cursor (and starts building the next one)."""
        position = (self.sampler.epoch, self.sampler.step_in_epoch)
        if self._executor is None:
            batch = self.build(*position)
        else:
            if self._pending is None or self._pending[0] != position:
                self._pending = (position, self._executor.submit(self._build_on_worker, *position))
            batch = self._pending[1].result()
            following = self.sampler.position_after(*position)
            self._pending = (following, self._executor.submit(self._build_on_worker, *following))
        self.sampler.epoch, self.sampler.step_in_epoch = self.sampler.position_after(*position)
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._drain()
        self.sampler.load_state_dict(state)

    def _drain(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            try:
                self._pending[1].result()
            except Exception:  # a batch nobody will use; its error is not the caller's
                pass
            self._pending = None

    def close(self) -> None:
        self._drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rank: int, world_size: int,
                 mean, std, *, xp=np) -> Iterator[tuple]:
    """Normalized (x, y) batches of this rank's contiguous shard; over all ranks every sample once.

    Shards differ by at most one sample, so sum correct counts and sample
    counts across ranks (not per-rank accuracies) to get the accuracy.
    """
    start, stop = shard_range(len(images), rank, world_size)
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        yield normalize(xp.asarray(images[lo:hi]), mean, std), xp.asarray(labels[lo:hi])
