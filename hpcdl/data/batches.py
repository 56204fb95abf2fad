"""One batch job: rows chosen by the sampler, read from a split, transformed into a caller's buffer.

A job is a pure function of its description, so the training thread, a
worker thread and a worker process all make the same bits from it:

* `TrainJob(epoch, step, micro)`: this rank's rows of one micro-step of the
  global batch, through the training transform keyed by global positions;
* `EvalJob(start, stop)`: test rows [start, stop) through the evaluation
  transform.

`BatchRecipe` holds what a worker needs (splits, sampler, transforms, the
largest batch) and pickles small: an HDF5 split pickles as its path and is
reopened, the sampler without its cached permutation. `BatchMaker` owns
the one scratch buffer of raw uint8 rows a worker reuses for every job.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcdl.data.augment import Normalize, PadCropFlip


@dataclass(frozen=True)
class TrainJob:
    epoch: int
    step: int
    micro: int


@dataclass(frozen=True)
class EvalJob:
    start: int
    stop: int


@dataclass
class BatchRecipe:
    train: object            # hpcdl.data.dataset split (ArraySplit | HDF5Split)
    test: object
    sampler: object          # hpcdl.data.sampler.ShardedSampler (its pure functions only)
    train_transform: object  # hpcdl.data.augment transform
    eval_transform: object
    max_rows: int            # the largest job: max(training micro-batch, evaluation batch)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        shape = self.train_transform.output_shape(self.train.image_shape)
        if self.eval_transform.output_shape(self.test.image_shape) != shape:
            raise ValueError("training and evaluation transforms disagree on the output shape")
        return shape

    @property
    def scratch_bytes(self) -> int:
        """Bytes one BatchMaker holds: its raw-row buffer plus the transforms' temporaries."""
        raw = self.max_rows * self.train.row_bytes
        return raw + max(transform_scratch(self.train_transform, self.max_rows, self.train.image_shape),
                         transform_scratch(self.eval_transform, self.max_rows, self.test.image_shape))


def transform_scratch(transform, rows: int, image_shape) -> int:
    """Temporaries a transform allocates per call: the vectorized NumPy ones build whole-batch arrays."""
    c, h, w = image_shape
    floats = rows * int(np.prod(transform.output_shape(image_shape))) * 4
    if isinstance(transform, PadCropFlip):  # padded canvas, gathered windows, the float32 result
        return rows * c * (h + 2 * transform.pad) * (w + 2 * transform.pad) + rows * c * h * w + floats
    if isinstance(transform, Normalize):
        return floats
    return 4 * h * w  # the resize kernel's one line of floats


class BatchMaker:
    """Runs jobs of one recipe into (x, y) buffers; one per worker (it owns the raw-row buffer)."""

    def __init__(self, recipe: BatchRecipe):
        self.recipe = recipe
        shape = recipe.train.image_shape
        self._raw = np.empty((recipe.max_rows, *shape), dtype=np.uint8)

    def __call__(self, job, x: np.ndarray, y: np.ndarray) -> int:
        """Fill x[:n] (float32 N×C×H×W) and y[:n] (int64) for `job`; returns n."""
        r = self.recipe
        if isinstance(job, TrainJob):
            indices = r.sampler.batch_indices(job.epoch, job.step)[job.micro]
            positions = r.sampler.batch_positions(job.epoch, job.step)[job.micro]
            split, transform, key = r.train, r.train_transform, (job.epoch, job.step)
        elif isinstance(job, EvalJob):
            indices = np.arange(job.start, job.stop, dtype=np.int64)
            positions = indices
            split, transform, key = r.test, r.eval_transform, (0, 0)
        else:
            raise TypeError(f"not a batch job: {job!r}")
        n = len(indices)
        if n > r.max_rows:
            raise ValueError(f"{job} has {n} rows; the buffers hold {r.max_rows}")
        rows = split.read(indices, out=self._raw[:n])
        transform(rows, *key, positions, x[:n])
        y[:n] = split.labels[indices]
        return n
