"""End to end: `hpcdl train` on 1 and several ranks, invariance, resume, failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from trainer_runs import HPCDL, TINY, child_pids_running, launch, mpiexec, relative_difference

pytestmark = pytest.mark.mpi


def _read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -- same global batch, any rank count: the same training ----------------------------------------

@pytest.mark.parametrize("model_args", [
    pytest.param([], id="fmnist_cnn"),
    pytest.param(["--set", "model.name='fmnist_cnn_bn'", "--set", "comm.sync_batchnorm=true"], id="fmnist_cnn_bn-syncbn"),
])
def test_two_ranks_follow_one_rank(tmp_path, model_args):
    one = launch([*TINY, *model_args, "--out", str(tmp_path / "one")])
    two = launch([*TINY, *model_args, "--out", str(tmp_path / "two"), "--set", "comm.algorithm='ring'"], ranks=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = one.summary, two.summary
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["global_batch"] == b["global_batch"] == 32
    assert a["steps"] == b["steps"] == 20
    assert relative_difference(a["param_norm"], b["param_norm"]) <= 1e-5
    assert relative_difference(a["final_loss"], b["final_loss"]) <= 1e-5
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1e-3
    # the run really trained: the loss fell from its first logged value
    first_logged = next(r for r in _read_metrics(tmp_path / "one") if r["kind"] == "step")
    assert a["final_loss"] < first_logged["loss"]


def test_shared_window_gradients_train_like_the_point_to_point_ring(tmp_path):
    """The gradient arena moves into the node's shared window for shm, and for the ring with
    comm.shared_window (the default, also for auto's ring). The ring over the window adds in the point-to-point ring's
    order, so at 3 ranks the runs must match bit for bit; at p = 2 each of shm's (and MPI_Allreduce's)
    sums is one addition too, so shm and auto (window ring for large buckets, MPI for small) must match
    the ring there."""
    p2p = "comm.shared_window=false"
    runs = {
        "ring2": launch([*TINY, "--out", str(tmp_path / "r2"), "--set", "comm.algorithm='ring'", "--set", p2p], ranks=2),
        "shm2": launch([*TINY, "--out", str(tmp_path / "s2"), "--set", "comm.algorithm='shm'"], ranks=2),
        "auto2": launch([*TINY, "--out", str(tmp_path / "a2")], ranks=2),
        "ring3": launch([*TINY, "--out", str(tmp_path / "r3"), "--set", "comm.algorithm='ring'", "--set", p2p, "--set", "train.global_batch=48"], ranks=3),
        "window3": launch([*TINY, "--out", str(tmp_path / "w3"), "--set", "comm.algorithm='ring'", "--set", "train.global_batch=48"], ranks=3),
    }
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr[-3000:]}"
        assert run.summary["steps"] == 20
    assert "through a shared window" in runs["window3"].stderr and "point-to-point" in runs["ring3"].stderr
    assert "ring reduces buffers in its shared window" in runs["auto2"].stderr
    for a, b in (("shm2", "ring2"), ("auto2", "ring2"), ("window3", "ring3")):
        assert runs[a].summary["param_norm"] == runs[b].summary["param_norm"], (a, b)
        assert runs[a].summary["final_loss"] == runs[b].summary["final_loss"], (a, b)


def test_gradient_accumulation_matches_more_ranks(tmp_path):
    accumulated = launch([*TINY, "--set", "train.accumulate_steps=2", "--out", str(tmp_path / "acc")])
    three_ranks = launch([*TINY, "--set", "train.global_batch=48", "--out", str(tmp_path / "three")], ranks=3)
    plain = launch([*TINY, "--set", "train.global_batch=48", "--out", str(tmp_path / "plain")])
    reference = launch([*TINY, "--out", str(tmp_path / "ref")])
    for result in (accumulated, three_ranks, plain, reference):
        assert result.returncode == 0, result.stderr[-3000:]
    assert relative_difference(accumulated.summary["param_norm"], reference.summary["param_norm"]) <= 1e-5
    assert relative_difference(three_ranks.summary["param_norm"], plain.summary["param_norm"]) <= 1e-5
    assert relative_difference(three_ranks.summary["final_loss"], plain.summary["final_loss"]) <= 1e-5


def test_summary_and_metrics(tmp_path):
    result = launch([*TINY, "--out", str(tmp_path)], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.summary
    for key in ("test_accuracy", "final_loss", "param_norm", "epochs", "steps", "global_batch", "world_size",
                "seconds"):
        assert key in summary, key
    assert summary["epochs"] == pytest.approx(20 * 32 / 640)
    records = _read_metrics(tmp_path)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "start" and kinds[-1] == "summary"
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert all(r["images_per_s"] > 0 and set(r["seconds"]) >= {"forward", "backward", "allreduce", "optimizer"}
               for r in steps)
    assert any(r["kind"] == "eval" for r in records)
    # only rank 0 prints progress: the banner appears once
    assert result.stderr.count("hpcdl: fmnist_cnn,") == 1


# -- failures bring the job down fast, with the reason ------------------------------------------

def test_exception_on_one_rank_aborts_the_job(tmp_path):
    result = launch([*TINY, "--out", str(tmp_path)], ranks=2,
                    rank_env={"HPCDL_FAULT_INJECT": "raise-at-step:3"}, timeout=60)
    assert result.returncode != 0
    assert result.seconds < 10, f"took {result.seconds:.1f} s"
    assert "rank 1/2" in result.stderr and "RuntimeError" in result.stderr


def test_model_mismatch_between_ranks_is_a_clear_error(tmp_path):
    command = [mpiexec(), "-n", "1", *HPCDL, "train", *TINY, "--out", str(tmp_path / "x"), ":",
               "-n", "1", *HPCDL, "train", *TINY, "--out", str(tmp_path / "x"), "--set", "model.name='lenet5'"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 10
    assert "rank 1" in proc.stderr and "model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_rank_brings_the_job_down(tmp_path):
    command = [mpiexec(), "-n", "2", *HPCDL, "train", *TINY, "--set", "train.max_steps=100000",
               "--set", "schedule.warmup_epochs=0", "--set", "log.every_steps=1", "--out", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 60
        metrics = tmp_path / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3):
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before the kill"
        ranks = child_pids_running("hpcdl", proc.pid)
        assert len(ranks) == 2, ranks
        killed_at = time.perf_counter()
        os.kill(ranks[-1], signal.SIGKILL)
        proc.wait(timeout=30)
        elapsed = time.perf_counter() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert elapsed <= 10, f"mpiexec took {elapsed:.1f} s to exit"


def test_non_finite_gradient_skips_the_step(tmp_path):
    clean = launch([*TINY, "--out", str(tmp_path / "clean")])
    poisoned = launch([*TINY, "--out", str(tmp_path / "nan")], ranks=2,
                      rank_env={"HPCDL_FAULT_INJECT": "nan-grad-at-step:7"})
    assert clean.returncode == 0 and poisoned.returncode == 0, poisoned.stderr[-3000:]
    assert poisoned.summary["skipped_steps"] == 1 and clean.summary["skipped_steps"] == 0
    assert "step 7: non-finite gradient norm, update skipped" in poisoned.stderr
    skips = [r for r in _read_metrics(tmp_path / "nan") if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [7]
    assert all(r == r for r in (poisoned.summary["param_norm"], poisoned.summary["final_loss"]))  # finite, not NaN
    assert poisoned.summary["param_norm"] != clean.summary["param_norm"]


def test_too_many_non_finite_steps_stop_with_an_error(tmp_path):
    result = launch([*TINY, "--out", str(tmp_path), "--set", "train.max_nonfinite_steps=2"], ranks=2,
                    env={"HPCDL_FAULT_INJECT": "nan-grad-at-step:4,nan-grad-at-step:5"}, timeout=60)
    assert result.returncode == 2
    assert "train.max_nonfinite_steps" in result.stderr
    assert result.stderr.count("hpcdl: error:") == 1  # printed once, by rank 0


# -- bad input: one line naming the culprit, exit 2 ------------------------------------------------

def _single(args, tmp_path, **kw):
    result = launch([*args, "--out", str(tmp_path / "run")], **kw)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result, lines


@pytest.mark.parametrize("override, expected", [
    ("train.epoch=3", "unknown key train.epoch (did you mean train.epochs?)"),
    ("model.name='resnet19'", "resnet19"),
    ("optim.name='lamp'", "optim.name"),
    ("schedule.base_lr=-0.1", "schedule.base_lr"),
    ("train.global_batch='big'", "train.global_batch"),
    ("train.accumulate_steps=3", "train.global_batch"),
])
def test_bad_config_values(tmp_path, override, expected):
    result, lines = _single([*TINY, "--set", override], tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_bad_config_under_mpiexec_is_reported_once(tmp_path):
    result = launch([*TINY, "--set", "train.epoch=3", "--out", str(tmp_path)], ranks=2, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["hpcdl: error: config + --set: unknown key train.epoch (did you mean train.epochs?)"]


def test_bad_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nepochs = 3\nglobal_bacth = 64\n")
    result, lines = _single(["--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and str(config) in lines[0] and "train.global_bacth" in lines[0]
    assert "did you mean train.global_batch" in lines[0]


def test_global_batch_not_divisible_by_ranks(tmp_path):
    result = launch([*TINY, "--set", "train.global_batch=32", "--out", str(tmp_path)], ranks=3, timeout=60)
    assert result.returncode == 2
    assert "train.global_batch" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_says_how_to_get_it(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    result, lines = _single(["--set", "data.download=false", "--data-dir", str(empty)], tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and str(empty) in lines[0]


def test_corrupt_idx_file(tmp_path):
    from hpcdl.data.idx import write_idx
    import numpy as np

    data = tmp_path / "fm"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data / "train-images-idx3-ubyte", rng.integers(0, 255, (64, 28, 28), dtype=np.uint8))
    write_idx(data / "train-labels-idx1-ubyte", rng.integers(0, 10, 64, dtype=np.uint8))
    write_idx(data / "t10k-images-idx3-ubyte", rng.integers(0, 255, (16, 28, 28), dtype=np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 16, dtype=np.uint8))
    truncated = data / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    result, lines = _single(["--set", "data.dataset='idx'", "--data-dir", str(data)], tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0] and "truncated" in lines[0], result.stderr


def test_corrupt_hdf5_file(tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    result, lines = _train_on_hdf5(broken, tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and str(broken) in lines[0], result.stderr


def _train_on_hdf5(path, tmp_path):
    return _single(["--set", "data.dataset='hdf5'", "--set", f"data.path='{path}'"], tmp_path)


def test_labels_out_of_range_in_hdf5(tiny_hdf5, tmp_path):
    import h5py

    with h5py.File(tiny_hdf5, "r+") as f:  # corrupt after writing: a label the class list does not have
        f["train/labels"][5] = 7
    result, lines = _train_on_hdf5(tiny_hdf5, tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and str(tiny_hdf5) in lines[0] and "labels" in lines[0], result.stderr


def test_wrong_image_dtype_in_hdf5(tiny_hdf5, tmp_path):
    import h5py
    import numpy as np

    with h5py.File(tiny_hdf5, "r+") as f:  # the same pixels stored as float32: not what the format promises
        images = f["train/images"][...]
        del f["train/images"]
        f["train/images"] = images.astype(np.float32)
    result, lines = _train_on_hdf5(tiny_hdf5, tmp_path)
    assert result.returncode == 2
    assert len(lines) == 1 and str(tiny_hdf5) in lines[0] and "images" in lines[0] and "uint8" in lines[0], \
        result.stderr


@pytest.mark.parametrize("optimizer, lr", [
    ("sgd", 0.05), ("nesterov", 0.05), ("adamw", 0.002), ("lars", 10.0), ("lamb", 0.03),
])
def test_every_optimizer_trains_by_name(tmp_path, optimizer, lr):
    result = launch([*TINY, "--set", f"optim.name='{optimizer}'", "--set", f"schedule.base_lr={lr}",
                     "--set", "schedule.base_batch=32", "--set", "optim.weight_decay=1e-4",
                     "--set", "log.layer_stats_every=10", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"hpcdl: {optimizer}:" in result.stderr  # the banner states the effective LR rule
    records = _read_metrics(tmp_path)
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert losses[-1] < 0.5 * losses[0], losses
    layer_stats = [r for r in records if r["kind"] == "layers"]
    assert [r["step"] for r in layer_stats] == [10, 20]
    if optimizer in ("lars", "lamb"):
        trust = layer_stats[-1]["trust"]
        assert len(trust) == len(layer_stats[-1]["names"]) and any(t != 1.0 for t in trust)
