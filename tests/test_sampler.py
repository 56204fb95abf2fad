"""ShardedSampler: one permutation everywhere, rank slices, world-size/accumulation invariance, resume."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hpcdl.data.sampler import ShardedSampler, shard_range
from hpcdl.errors import ConfigError, DataError


def samplers(num_samples, global_batch, world, accumulate=1, seed=5, **kw):
    return [ShardedSampler(num_samples, global_batch, rank, world, seed, accumulate, **kw) for rank in range(world)]


def step_union(ranks, epoch, step):
    """All indices of one optimizer step, over ranks and micro-steps, placed at their global positions."""
    count = ranks[0].global_count(epoch, step)
    out = np.full(count, -1, dtype=np.int64)
    for sampler in ranks:
        for idx, pos in zip(sampler.batch_indices(epoch, step), sampler.batch_positions(epoch, step)):
            assert (out[pos] == -1).all(), "two parts claim the same position"
            out[pos] = idx
    assert (out >= 0).all(), "a position nobody holds"
    return out


def test_every_rank_draws_the_same_permutation_and_slices_it():
    ranks = samplers(100, 24, world=3, accumulate=2)
    for epoch in (0, 3):
        first = ranks[0].permutation(epoch)
        assert sorted(first.tolist()) == list(range(100))
        for sampler in ranks[1:]:
            np.testing.assert_array_equal(sampler.permutation(epoch), first)
    assert not np.array_equal(ranks[0].permutation(0), ranks[0].permutation(1))
    for step in range(ranks[0].steps_per_epoch):
        parts = [part for s in ranks for part in s.batch_indices(2, step)]
        assert [len(p) for p in parts] == [4] * 6  # 24 / (3 ranks × 2 micro-steps)
        flat = np.concatenate(parts)
        assert len(set(flat.tolist())) == 24  # disjoint
        assert set(flat.tolist()) == set(ranks[0].global_batch_indices(2, step).tolist())
        np.testing.assert_array_equal(step_union(ranks, 2, step), ranks[0].global_batch_indices(2, step))


def test_layout_is_micro_step_major_then_rank():
    sampler = ShardedSampler(64, 16, rank=1, world_size=2, seed=0, accumulate_steps=2)
    # parts of 4: micro-step 0 -> rank 0 [0,4), rank 1 [4,8); micro-step 1 -> rank 0 [8,12), rank 1 [12,16)
    assert [p.tolist() for p in sampler.batch_positions(0, 0)] == [[4, 5, 6, 7], [12, 13, 14, 15]]


@pytest.mark.parametrize("world, accumulate", [(2, 1), (4, 1), (1, 4), (2, 2), (3, 4), (12, 1)])
def test_optimizer_steps_see_the_same_samples_whatever_world_size_and_accumulation(world, accumulate):
    reference = samplers(500, 48, world=1)
    other = samplers(500, 48, world=world, accumulate=accumulate)
    assert other[0].steps_per_epoch == reference[0].steps_per_epoch == 10
    for epoch in (0, 1):
        for step in range(10):
            np.testing.assert_array_equal(step_union(other, epoch, step), step_union(reference, epoch, step))


def test_bad_divisibility_names_the_key():
    with pytest.raises(ConfigError) as excinfo:
        ShardedSampler(1000, 100, rank=0, world_size=3, seed=0, accumulate_steps=2)
    assert "train.global_batch = 100" in str(excinfo.value) and "3 × 2 = 6" in str(excinfo.value)
    with pytest.raises(ConfigError, match="train.global_batch = 64 exceeds the 50"):
        ShardedSampler(50, 64, rank=0, world_size=1, seed=0)


def test_drop_last_skips_the_same_tail_on_every_rank():
    ranks = samplers(103, 20, world=2, accumulate=2)
    assert all(s.steps_per_epoch == 5 for s in ranks)
    used = np.concatenate([step_union(ranks, 0, step) for step in range(5)])
    assert len(set(used.tolist())) == 100
    dropped = set(range(103)) - set(used.tolist())
    np.testing.assert_array_equal(sorted(dropped), np.sort(ranks[0].permutation(0)[100:]))
    with pytest.raises(IndexError):
        ranks[0].batch_indices(0, 5)


def test_kept_tail_gives_every_rank_the_same_number_of_micro_steps():
    ranks = samplers(103, 20, world=2, accumulate=2, drop_last=False)
    assert ranks[0].steps_per_epoch == 6 and ranks[0].global_count(0, 5) == 3
    sizes = [[len(part) for part in s.batch_indices(0, 5)] for s in ranks]
    assert all(len(per_rank) == 2 for per_rank in sizes)  # collectives stay matched
    assert sorted(n for per_rank in sizes for n in per_rank) == [0, 1, 1, 1]
    tail = step_union(ranks, 0, 5)
    np.testing.assert_array_equal(tail, ranks[0].permutation(0)[100:])
    used = np.concatenate([step_union(ranks, 0, step) for step in range(6)])
    assert sorted(used.tolist()) == list(range(103))


def test_shuffle_off_is_the_identity_order():
    sampler = ShardedSampler(10, 4, rank=0, world_size=1, seed=3, shuffle=False)
    np.testing.assert_array_equal(sampler.global_batch_indices(7, 1), [4, 5, 6, 7])


def _consume(ranks, steps):
    """Advance every rank `steps` optimizer steps; return the global batches they formed."""
    batches = []
    for _ in range(steps):
        per_rank = [s.next_batch() for s in ranks]
        assert len({(b.epoch, b.step) for b in per_rank}) == 1
        out = np.full(per_rank[0].global_count, -1, dtype=np.int64)
        for batch in per_rank:
            for idx, pos in zip(batch.indices, batch.positions):
                out[pos] = idx
        batches.append(out)
    return batches


def test_resume_on_a_different_world_size_continues_the_same_order():
    k = 7  # 100 samples / batch 12 = 8 steps per epoch: steps [k, 2k) cross an epoch boundary
    single = _consume(samplers(100, 12, world=1), 2 * k)
    two = samplers(100, 12, world=2)
    first_half = _consume(two, k)
    for a, b in zip(first_half, single[:k]):
        np.testing.assert_array_equal(a, b)
    state = json.loads(json.dumps(two[0].state_dict()))  # as a checkpoint would store it
    assert state == two[1].state_dict() == {"epoch": 0, "step_in_epoch": 7, "seed": 5,
                                             "num_samples": 100, "global_batch": 12}
    for a, b in zip(_consume(two, k), single[k:]):  # 2 ranks, steps [k, 2k) == 1 rank's
        np.testing.assert_array_equal(a, b)
    three = samplers(100, 12, world=3, accumulate=2, seed=999)  # the saved seed must win
    for sampler in three:
        sampler.load_state_dict(state)
    for a, b in zip(_consume(three, k), single[k:]):  # resumed at k on 3 ranks × 2 micro-steps
        np.testing.assert_array_equal(a, b)


def test_resume_rejects_a_different_dataset_or_batch():
    state = ShardedSampler(100, 12, 0, 1, 5).state_dict()
    with pytest.raises(DataError, match="saved for 100 training samples"):
        ShardedSampler(90, 12, 0, 1, 5).load_state_dict(state)
    with pytest.raises(ConfigError, match="train.global_batch = 24"):
        ShardedSampler(100, 24, 0, 1, 5).load_state_dict(state)


def test_shard_range_splits_evaluation_exactly():
    for count, world in ((10, 3), (2, 4), (10000, 7)):
        ranges = [shard_range(count, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


MPI_SCRIPT = textwrap.dedent("""
    import hashlib, numpy as np
    from mpi4py import MPI
    from hpcdl.data.sampler import ShardedSampler
    comm = MPI.COMM_WORLD
    sampler = ShardedSampler(1000, 96, comm.rank, comm.size, seed=11, accumulate_steps=2)
    digest = hashlib.sha256(sampler.permutation(4).tobytes()).hexdigest()
    mine = [np.concatenate(sampler.batch_indices(4, step)) for step in range(3)]
    gathered = comm.gather((digest, mine), root=0)
    if comm.rank == 0:
        assert len({d for d, _ in gathered}) == 1, "ranks drew different permutations"
        for step in range(3):
            union = np.concatenate([m[step] for _, m in gathered])
            assert len(set(union.tolist())) == 96
            assert set(union.tolist()) == set(sampler.global_batch_indices(4, step).tolist())
        print("SAMPLER-MPI-OK", comm.size)
""")


@pytest.mark.mpi
def test_ranks_agree_under_mpiexec(tmp_path):
    script = tmp_path / "sampler_mpi.py"
    script.write_text(MPI_SCRIPT)
    result = subprocess.run(["mpiexec", "-n", "3", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SAMPLER-MPI-OK 3" in result.stdout
