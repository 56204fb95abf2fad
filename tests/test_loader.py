"""BatchLoader: bit-identical batches whatever the prefetch and workers, resume, evaluation, memory budget."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from hpcdl.data.augment import Augmenter, build_transforms, normalize
from hpcdl.data.dataset import dataset_from_hdf5, in_memory_dataset, synthetic_dataset
from hpcdl.data.hdf5 import write_hdf5
from hpcdl.data.loader import BatchLoader
from hpcdl.data.sampler import ShardedSampler
from hpcdl.errors import ConfigError, DataError


def _sampler(num=50, batch=12, rank=1, world=2, accumulate=2, drop_last=False, seed=4):
    return ShardedSampler(num, batch, rank, world, seed, accumulate_steps=accumulate, drop_last=drop_last)


def _steps(loader, count):
    """(epoch, step, global_count, [(x, y) copies per micro-step]) for `count` steps."""
    out = []
    for _ in range(count):
        batch = loader.next_step()
        out.append((batch.epoch, batch.step, batch.global_count, batch.take_all()))
    return out


def _assert_same(a, b):
    assert [s[:3] for s in a] == [s[:3] for s in b]
    for (*_, micro_a), (*_, micro_b) in zip(a, b):
        for (xa, ya), (xb, yb) in zip(micro_a, micro_b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


@pytest.fixture(scope="module")
def small():
    return synthetic_dataset((50, 10), (1, 6, 6), num_classes=3, seed=1)


def test_batches_are_the_sampler_rows_through_the_position_keyed_augmenter(small):
    train, evaluation = build_transforms(small.input_shape, mean=small.mean, std=small.std, seed=5, pad=1,
                                         flip=True)
    augment = Augmenter(mean=small.mean, std=small.std, pad=1, flip=True, seed=5)
    reference = _sampler()
    for prefetch in (0, 3):
        with BatchLoader(small, _sampler(), train, evaluation, prefetch=prefetch) as loader:
            steps = _steps(loader, 7)
            assert loader.state_dict() == {"epoch": 1, "step_in_epoch": 2, "seed": 4, "num_samples": 50,
                                           "global_batch": 12}
        assert [s[2] for s in steps] == [12, 12, 12, 12, 2, 12, 12]  # the kept short tail is step 4
        for epoch, step, _, micro in steps:
            assert len(micro) == 2
            for (x, y), idx, pos in zip(micro, reference.batch_indices(epoch, step),
                                        reference.batch_positions(epoch, step)):
                np.testing.assert_array_equal(x, augment(small.train_images[idx], epoch, step, pos))
                np.testing.assert_array_equal(y, small.train_labels[idx])


def test_resume_mid_epoch_restarts_the_stream_in_place(small):
    train, evaluation = build_transforms(small.input_shape, mean=small.mean, std=small.std, seed=5, pad=1)
    with BatchLoader(small, _sampler(), train, evaluation, prefetch=0) as loader:
        uninterrupted = _steps(loader, 7)
    with BatchLoader(small, _sampler(), train, evaluation, prefetch=3) as loader:
        _steps(loader, 2)  # the workers are now several micro-batches ahead of step 2
        state = {"epoch": 0, "step_in_epoch": 4, "seed": 4, "num_samples": 50, "global_batch": 12}
        loader.load_state_dict(state)
        _assert_same(_steps(loader, 3), uninterrupted[4:])


def test_evaluation_covers_the_test_split_once_and_training_continues(tiny_split):
    images, labels = tiny_split(23, (1, 3, 3))
    data = in_memory_dataset(images[:12], labels[:12], images, labels, [0.5], [0.5], ["a", "b", "c", "d"], "tiny")
    train, evaluation = build_transforms(data.input_shape, mean=data.mean, std=data.std, seed=0, flip=True)
    seen = []
    for rank in range(3):
        with BatchLoader(data, ShardedSampler(12, 3, rank, 3, seed=0), train, evaluation, eval_batch=4,
                         prefetch=2) as loader:
            before = _steps(loader, 1)
            for x, y in loader.eval_batches():
                assert x.dtype == np.float32 and 0 < len(x) <= 4
                start = len(seen)
                seen.extend(y.tolist())
                np.testing.assert_array_equal(x, normalize(images[start:len(seen)], [0.5], [0.5]))
            after = _steps(loader, 1)
        with BatchLoader(data, ShardedSampler(12, 3, rank, 3, seed=0), train, evaluation, prefetch=0) as plain:
            _assert_same(before + after, _steps(plain, 2))
    assert seen == labels.tolist()


@pytest.fixture(scope="module")
def rgb_file(tmp_path_factory):
    """A streamed HDF5 file of 3×40×36 images (non-square, to catch transposes)."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("stream") / "rgb.h5"
    split = lambda n: (rng.integers(0, 256, (n, 3, 40, 36), dtype=np.uint8), rng.integers(0, 5, n))
    write_hdf5(path, {"train": split(96), "test": split(20)}, [f"k{i}" for i in range(5)], short_side=40)
    return path


def _rrc(data, size=24):
    return build_transforms(data.input_shape, mean=data.mean, std=data.std, seed=3, image_size=size,
                            short_side=data.short_side, random_resized_crop=True, flip=True)


@pytest.mark.parametrize("kind, workers", [("thread", 2), ("process", 2)])
def test_streamed_batches_match_across_worker_kinds(rgb_file, kind, workers):
    data = dataset_from_hdf5(rgb_file)
    try:
        train, evaluation = _rrc(data)
        sampler = lambda: ShardedSampler(96, 16, 0, 2, seed=2, accumulate_steps=2)
        with BatchLoader(data, sampler(), train, evaluation, prefetch=0) as loader:
            inline = _steps(loader, 5)
            inline_eval = [tuple(np.array(a) for a in b) for b in loader.eval_batches()]
        with BatchLoader(data, sampler(), train, evaluation, prefetch=3, workers=workers, worker_kind=kind) as loader:
            assert len(loader.worker_pids) == (workers if kind == "process" else 0)
            _assert_same(_steps(loader, 5), inline)
            for (xa, ya), (xb, yb) in zip(loader.eval_batches(), inline_eval):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)
        assert inline[0][3][0][0].shape == (4, 3, 24, 24)
        assert inline_eval[0][0].shape[1:] == (3, 24, 24)
    finally:
        data.close()


def test_streaming_reads_exactly_the_rows_delivered(rgb_file):
    data = dataset_from_hdf5(rgb_file)
    try:
        train, evaluation = _rrc(data)
        with BatchLoader(data, ShardedSampler(96, 16, 0, 1, seed=2), train, evaluation, prefetch=2,
                         worker_kind="thread") as loader:  # a thread's reads count in this process
            _steps(loader, 6)
        assert data.train.bytes_read == 6 * 16 * 3 * 40 * 36 + 2 * 16 * 3 * 40 * 36  # and the 2 read ahead
    finally:
        data.close()


def test_memory_budget_too_small_names_the_key(rgb_file):
    data = dataset_from_hdf5(rgb_file)
    try:
        train, evaluation = _rrc(data, size=32)
        sampler = ShardedSampler(96, 16, 0, 1, seed=2)
        with pytest.raises(ConfigError) as excinfo:
            BatchLoader(data, sampler, train, evaluation, memory_bytes=64 * 1024)
        message = str(excinfo.value)
        assert "\n" not in message and "data.memory_mb" in message and "16 images 3×32×32" in message
        slot = 16 * 3 * 32 * 32 * 4  # float32 images of one micro-batch, plus labels, page-rounded
        with BatchLoader(data, sampler, train, evaluation, prefetch=8, memory_bytes=int(4.5 * slot) + 150_000) \
                as loader:
            assert 1 <= loader.plan.depth < 8 and loader.plan.total <= loader.plan.budget
            assert "lowered to fit data.memory_mb" in loader.describe()
    finally:
        data.close()


def test_process_workers_refuse_in_memory_data(small):
    train, evaluation = build_transforms(small.input_shape, mean=small.mean, std=small.std, seed=0)
    with pytest.raises(ConfigError, match="data.worker_kind = 'process'"):
        BatchLoader(small, _sampler(), train, evaluation, worker_kind="process")


def test_a_damaged_row_read_by_a_worker_process_is_a_one_line_data_error(rgb_file, tmp_path):
    import h5py

    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(rgb_file.read_bytes())
    with h5py.File(damaged, "r") as f:
        offset = f["train/images"].id.get_offset()
    raw = bytearray(damaged.read_bytes())
    for row in range(96):
        raw[offset + row * 3 * 40 * 36 + 5] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    data = dataset_from_hdf5(damaged)
    try:
        train, evaluation = _rrc(data)
        with BatchLoader(data, ShardedSampler(96, 16, 0, 1, seed=2), train, evaluation, prefetch=2,
                         worker_kind="process") as loader:
            with pytest.raises(DataError) as excinfo:
                loader.next_step().take(0)
        message = str(excinfo.value)
        assert "\n" not in message and str(damaged) in message and "CRC-32 mismatch" in message
    finally:
        data.close()


def test_a_killed_worker_process_is_an_error_naming_it_not_a_hang(rgb_file):
    data = dataset_from_hdf5(rgb_file)
    try:
        train, evaluation = _rrc(data)
        with BatchLoader(data, ShardedSampler(96, 16, 0, 1, seed=2), train, evaluation, prefetch=2,
                         worker_kind="process") as loader:
            loader.next_step().take(0)
            pid = loader.worker_pids[0]
            os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(DataError, match=f"data worker process {pid} died \\(killed by SIGKILL\\)"):
                for _ in range(4):
                    loader.next_step().take(0)
            assert time.monotonic() - started < 10
    finally:
        data.close()


def test_data_info_states_layout_offsets_and_page_alignment(rgb_file, tmp_path):
    from hpcdl.data.hdf5 import describe_hdf5

    text = describe_hdf5(rgb_file)
    assert "stored at short side 40" in text and "contiguous at byte" in text
    assert "not page-aligned" in text  # 3×40×36 = 4,320 B rows straddle pages
    aligned = tmp_path / "aligned.h5"
    rng = np.random.default_rng(0)
    split = lambda n: (rng.integers(0, 256, (n, 1, 64, 64), dtype=np.uint8), rng.integers(0, 2, n))
    write_hdf5(aligned, {"train": split(20), "test": split(4)}, ["a", "b"])  # 4,096 B rows, 80 KiB dataset
    assert "start on page boundaries (cold reads fetch exactly a row)" in describe_hdf5(aligned)
