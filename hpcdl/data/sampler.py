"""Which samples each rank uses at each step: the same permutation everywhere, sliced by rank.

Every rank draws the epoch's permutation from (seed, epoch) alone, so ranks
agree on the order without any communication. One optimizer step consumes
the next `global_batch` entries of that permutation: its *global batch*.

Layout of a global batch of L samples (L = global_batch, except possibly the
last one of an epoch when drop_last is off)::

    |<-------------------------- global batch, positions 0 .. L-1 ------------------------->|
    |<------- micro-step 0 ------->|<------- micro-step 1 ------->| ... (accumulate_steps)
    | rank 0 | rank 1 | … | rank P-1 | rank 0 | rank 1 | … | rank P-1 |

It is cut into accumulate_steps × world_size contiguous parts, part
k = micro_step × world_size + rank spanning positions
[k·L // parts, (k+1)·L // parts). For a full batch every part holds exactly
global_batch / parts samples. Whatever P and accumulate_steps, the union of
one step's parts is the same global batch, so a run on P ranks takes the
optimizer step on the same samples as a run on one rank; only the
floating-point summation order differs.

After a rank failure (`comm.fault_tolerance`, hpcdl/elastic.py) the survivors
keep the global batch, which the new world size need not divide: a sampler
made with `uneven=True` cuts it into parts that differ by at most one sample
(the same `part_bounds`), and the loss is still normalised by the global count,
so the step's summed gradient is the same global mean.

The position of a sample inside its global batch (not its rank or micro-step)
is what seeds its augmentation, which keeps augmentation invariant to P too.

End of an epoch. With drop_last (the default) an epoch has
floor(N / global_batch) steps and the tail is skipped on every rank alike, so
no rank waits in a collective for a peer that ran out of data. Without it the
last global batch is short: it is still cut into the same number of parts, so
every rank runs the same number of micro-steps (collectives stay matched), but
parts differ by one sample and may be empty. The loss must then be
normalised by the actual global count L (`global_count`), not by the nominal
batch: each rank sums its per-sample losses and scales by 1/L, and the
gradient allreduce *sums* (or, with an averaging allreduce, scales by P/L).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcdl.errors import ConfigError, DataError


@dataclass(frozen=True)
class RankBatch:
    """What one rank uses in one optimizer step."""

    epoch: int
    step: int
    indices: list            # one int64 array of sample indices per micro-step
    positions: list          # matching positions inside the global batch (augmentation keys)
    global_count: int        # samples in the whole global batch, over all ranks and micro-steps


class ShardedSampler:
    """Rank `rank`'s share of a seeded per-epoch permutation of range(num_samples).

    Holds a cursor (epoch, step_in_epoch) that `next_batch` advances; the pure
    functions `global_batch_indices` and `batch_indices` never touch it.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                 accumulate_steps: int = 1, drop_last: bool = True, shuffle: bool = True,
                 uneven: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if accumulate_steps < 1:
            raise ConfigError(f"train.accumulate_steps = {accumulate_steps}: must be ≥ 1")
        if global_batch < 1 or (global_batch % (world_size * accumulate_steps) and not uneven):
            raise ConfigError(
                f"train.global_batch = {global_batch} is not a multiple of world_size × accumulate_steps = "
                f"{world_size} × {accumulate_steps} = {world_size * accumulate_steps}")
        if num_samples < 1:
            raise DataError("the training split is empty")
        if drop_last and num_samples < global_batch:
            raise ConfigError(f"train.global_batch = {global_batch} exceeds the {num_samples} training samples "
                              "(with drop_last an epoch would have no step)")
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.accumulate_steps = int(accumulate_steps)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.uneven = bool(uneven)
        # the largest part: with uneven parts some hold one sample fewer
        self.micro_batch = -(-self.global_batch // (self.world_size * self.accumulate_steps))
        self.epoch = 0
        self.step_in_epoch = 0
        # ((epoch, permutation), ...) of the last two epochs used, replaced as one tuple so worker
        # threads never see a mix; two, because prefetching runs ahead across an epoch boundary.
        self._cache = ()

    # -- the order ----------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        full, tail = divmod(self.num_samples, self.global_batch)
        return full + (1 if tail and not self.drop_last else 0)

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's sample order, identical on every rank (cached for the current epoch)."""
        for cached_epoch, order in self._cache:
            if cached_epoch == epoch:
                return order
        if self.shuffle:
            order = np.random.default_rng((self.seed, int(epoch))).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = order.astype(np.int64, copy=False)
        order.flags.writeable = False  # shared by every caller: nobody may shuffle it in place
        self._cache = ((epoch, order),) + self._cache[:1]
        return order

    @property
    def resident_bytes(self) -> int:
        """Memory the cached permutations take at most (two epochs of int64 indices)."""
        return 2 * 8 * self.num_samples

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = ()  # a worker process draws its own; pickling it would copy 8 bytes per sample
        return state

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch}) of an epoch")

    def global_batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """All sample indices of one optimizer step, in global-batch position order."""
        self._check_step(step)
        start = step * self.global_batch
        return self.permutation(epoch)[start:start + self.global_batch]

    def part_bounds(self, count: int) -> np.ndarray:
        """int64 [parts + 1]: boundaries of the accumulate_steps × world_size parts of `count` positions."""
        parts = self.accumulate_steps * self.world_size
        return np.arange(parts + 1, dtype=np.int64) * count // parts

    def batch_positions(self, epoch: int, step: int) -> list[np.ndarray]:
        """This rank's positions inside the global batch, one array per micro-step."""
        bounds = self.part_bounds(self.global_count(epoch, step))
        parts = [m * self.world_size + self.rank for m in range(self.accumulate_steps)]
        return [np.arange(bounds[k], bounds[k + 1], dtype=np.int64) for k in parts]

    def batch_indices(self, epoch: int, step: int) -> list[np.ndarray]:
        """This rank's sample indices, one array per micro-step."""
        batch = self.global_batch_indices(epoch, step)
        return [batch[p] for p in self.batch_positions(epoch, step)]

    def rank_batch(self, epoch: int, step: int) -> RankBatch:
        batch = self.global_batch_indices(epoch, step)
        positions = self.batch_positions(epoch, step)
        return RankBatch(epoch, step, [batch[p] for p in positions], positions, len(batch))

    # -- the cursor -----------------------------------------------------------------------
    def next_batch(self) -> RankBatch:
        """The batch at the cursor; then move the cursor on (into the next epoch when this one ends)."""
        batch = self.rank_batch(self.epoch, self.step_in_epoch)
        self.epoch, self.step_in_epoch = self.position_after(self.epoch, self.step_in_epoch)
        return batch

    def position_after(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)

    def global_count(self, epoch: int, step: int) -> int:
        """Samples in that step's global batch: the loss normaliser (short only for a kept tail)."""
        self._check_step(step)
        return min(self.global_batch, self.num_samples - step * self.global_batch)

    def state_dict(self) -> dict:
        """The position, independent of world size and accumulation: resumable on any rank count."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The saved seed wins: resuming must replay the same order."""
        if int(state["num_samples"]) != self.num_samples:
            raise DataError(f"sampler state: saved for {int(state['num_samples'])} training samples, "
                            f"this dataset has {self.num_samples}")
        if int(state["global_batch"]) != self.global_batch:
            raise ConfigError(f"train.global_batch = {self.global_batch}, but the checkpoint was taken with "
                              f"{int(state['global_batch'])}; resume with the same global batch")
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise DataError(f"sampler state: position epoch {epoch}, step {step} is outside an epoch of "
                            f"{self.steps_per_epoch} steps")
        self.seed = int(state["seed"])
        self._cache = ()
        self.epoch, self.step_in_epoch = epoch, step


def shard_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `count` items (evaluation: every item exactly once)."""
    return rank * count // world_size, (rank + 1) * count // world_size
