"""The [data] keys of the streaming pipeline: each bad value is one line naming the key, before any data is read."""
from __future__ import annotations

import pytest

from hpcdl import config
from hpcdl.errors import ConfigError

from trainer_runs import TINY, launch


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as excinfo:
        config.load(None, list(overrides))
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_defaults_stream_with_prefetch_on():
    data = config.load(None).data
    assert data.prefetch == 4 and data.workers == 1 and data.worker_kind == "auto" and data.memory_mb == 1024
    assert config.load(None).train.eval_batch == 0  # the training micro-batch


def test_misspelt_key_suggests_the_real_one():
    assert "unknown key data.memory (did you mean data.memory_mb?)" in _error("data.memory=512")


def test_worker_kind_typo_suggests_the_choice():
    assert "data.worker_kind: 'proces' is not one of 'auto', 'thread', 'process' (did you mean process?)" in \
        _error("data.worker_kind='proces'")


def test_memory_budget_must_be_positive():
    assert "data.memory_mb: 0.0 must be > 0.0" in _error("data.memory_mb=0")


def test_memory_budget_must_be_a_number():
    assert "data.memory_mb: expected a number, got '1GB'" in _error("data.memory_mb='1GB'")


def test_prefetch_cannot_be_negative():
    assert "data.prefetch: -1 must be >= 0" in _error("data.prefetch=-1")


def test_prefetch_must_be_an_integer():
    assert "data.prefetch: expected an integer, got 2.5" in _error("data.prefetch=2.5")


def test_at_least_one_worker():
    assert "data.workers: 0 must be >= 1" in _error("data.workers=0")


def test_image_size_cannot_be_negative():
    assert "data.image_size: -224 must be >= 0" in _error("data.image_size=-224")


def test_crop_scale_needs_an_ordered_pair_within_one():
    assert "data.crop_scale: expected [low, high] with 0 < low <= high <= 1" in _error("data.crop_scale=[0.5, 0.1]")
    assert "data.crop_scale" in _error("data.crop_scale=[0.08, 1.5]")


def test_crop_ratio_needs_an_ordered_positive_pair():
    assert "data.crop_ratio: expected [low, high] with 0 < low <= high" in _error("data.crop_ratio=[0.75]")
    assert "data.crop_ratio" in _error("data.crop_ratio=[0, 1.3]")


def test_eval_crop_fraction_within_zero_and_one():
    assert "data.eval_crop_fraction: 1.2 must be <= 1.0" in _error("data.eval_crop_fraction=1.2")
    assert "data.eval_crop_fraction: 0.0 must be > 0.0" in _error("data.eval_crop_fraction=0")


def test_two_crop_augmentations_at_once():
    assert "choose random_crop_pad or random_resized_crop" in \
        _error("data.random_resized_crop=true", "data.random_crop_pad=4")


def test_process_workers_need_an_hdf5_dataset():
    assert "data.worker_kind: 'process' workers read HDF5 files; dataset 'fashion_mnist' is in memory" in \
        _error("data.worker_kind='process'")


def test_eval_batch_cannot_be_negative():
    assert "train.eval_batch: -1 must be >= 0" in _error("train.eval_batch=-1")


@pytest.mark.mpi
def test_a_budget_too_small_for_one_batch_stops_every_rank_with_one_line(tmp_path):
    result = launch([*TINY, "--set", "data.memory_mb=0.05", "--out", str(tmp_path)], ranks=2, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "data.memory_mb = 0.05" in lines[0] and "raise data.memory_mb" in lines[0]
    assert "Traceback" not in result.stderr
