"""Checkpoints: exact round trip, atomic saves under SIGKILL, corruption detection, run directories, triggers."""
from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from hpcdl import checkpoint, faults
from hpcdl.checkpoint import CheckpointManager, CheckpointPolicy, CheckpointWarning, StopSignals
from hpcdl.errors import ConfigError, DataError


def rich_state() -> dict:
    rng = np.random.default_rng(7)
    return {
        "step": 1200,
        "lr": 0.1,
        "finite": True,
        "nothing": None,
        "name": "fmnist_cnn / ünïcode",
        "empty_text": "",
        "text_with_nul": "a\0b\0",
        "long_text": "config line\n" * 3000,  # above the inline limit: stored as a dataset
        "blob": b"\x00\x01binary\xff",
        "empty_blob": b"",
        "tags": ["bias", "norm"],
        "mixed": (1, 2.5, None, "x", False),
        "wide_int": -(2**100) + 3,
        "np_scalar": np.float32(1.25),
        "np_int": np.int16(-7),
        "rng": rng.bit_generator.state,  # nested dict with 128-bit ints
        "model": {
            "params": rng.standard_normal(1000).astype(np.float32),
            "momentum": rng.standard_normal((10, 7)),
            "counts": np.arange(12, dtype=np.int64).reshape(3, 4),
            "zero_d": np.array(3.5),
            "empty": np.zeros((0, 4), dtype=np.float32),
            "strided": np.arange(20.0).reshape(4, 5)[:, ::2],
            "mask": np.array([True, False, True]),
            "layers.0.bn.running_mean": np.ones(3, dtype=np.float32),
        },
        "empty_group": {},
    }


def assert_identical(expected, actual, where="state"):
    """Same keys in the same order, same types, same dtypes and shapes, same values."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype and actual == expected, where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def dataset_offset(path, name) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return f[name].id.get_offset()


# -- format ------------------------------------------------------------------------------------


def test_round_trip_keeps_keys_order_types_dtypes_and_values(tmp_path):
    state = rich_state()
    path = checkpoint.save(tmp_path / "c.h5", state)
    assert path == tmp_path / "c.h5"
    assert_identical(state, checkpoint.load(path))
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]  # no temp file left behind


def test_file_is_plain_hdf5_readable_without_hpcdl(tmp_path):
    import h5py

    state = rich_state()
    checkpoint.save(tmp_path / "c.h5", state)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["model/params"][...], state["model"]["params"])
        assert f["model/params"].dtype == np.float32
        assert int(f.attrs["step"]) == 1200
        assert bool(f.attrs["hpcdl.complete"])


@pytest.mark.parametrize("state, message", [
    ({"a/b": np.ones(2)}, "'a/b'"),
    ({"hpcdl.kinds": 1}, "reserved"),
    ({"x": {"": 1}}, "non-empty"),
    ({"obj": np.array([object()])}, "/obj"),
    ({"arrays": [np.ones(2)]}, "/arrays"),
    ({"g": {"unicode_array": np.array(["a", "b"])}}, "/g/unicode_array"),
    ({"s": {1, 2}}, "set"),
])
def test_unsupported_values_name_the_key_and_leave_no_file(tmp_path, state, message):
    with pytest.raises((TypeError, ValueError), match=message):
        checkpoint.save(tmp_path / "c.h5", state)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "c.h5"
    checkpoint.save(target, {"w": np.arange(4.0), "step": 1})

    def fail_midway(temp_path):
        assert temp_path.exists() and temp_path.name.startswith(".c.h5.tmp-")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        checkpoint.save(target, {"w": np.arange(8.0), "v": np.ones(3), "step": 2}, fault_hook=fail_midway)
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]
    assert checkpoint.load(target)["step"] == 1


def test_a_file_cut_off_mid_write_is_reported_incomplete(tmp_path):
    """What a crash leaves: the partial temp file (flushed halfway) must never load."""
    partial = tmp_path / "partial.h5"

    def copy_partial(temp_path):
        shutil.copy(temp_path, partial)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "c.h5", {"a": np.ones(3), "b": np.ones(3), "c": np.ones(3)}, fault_hook=copy_partial)
    with pytest.raises(DataError, match=r"partial\.h5: incomplete"):
        checkpoint.load(partial)


def test_load_names_the_file_and_the_problem(tmp_path):
    import h5py

    with pytest.raises(DataError, match=r"missing\.h5: no such file"):
        checkpoint.load(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5 at all")
    with pytest.raises(DataError, match=r"text\.h5: not an HDF5 file"):
        checkpoint.load(tmp_path / "text.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.h5: empty file"):
        checkpoint.load(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.ones(3)
    with pytest.raises(DataError, match=r"foreign\.h5: not an hpcdl checkpoint"):
        checkpoint.load(tmp_path / "foreign.h5")

    good = checkpoint.save(tmp_path / "good.h5", {"params": np.arange(2000, dtype=np.float32)})
    truncated = tmp_path / "truncated.h5"
    shutil.copy(good, truncated)
    os.truncate(truncated, truncated.stat().st_size // 2)
    with pytest.raises(DataError, match=r"truncated\.h5: truncated"):
        checkpoint.load(truncated)
    flipped = tmp_path / "flipped.h5"
    shutil.copy(good, flipped)
    flip_byte(flipped, dataset_offset(flipped, "params") + 1234)
    with pytest.raises(DataError, match=r"flipped\.h5: checksum mismatch on dataset /params"):
        checkpoint.load(flipped)


def test_every_single_byte_flip_is_reported_or_harmless_never_silent_or_hanging(tmp_path):
    """Flip each byte of a small checkpoint in turn: load must raise DataError or return the exact state.

    HDF5 alone does not give this: with variable-length strings a flipped
    heap length makes it loop forever, and it checksums no data.
    """
    state = {"w": np.arange(6, dtype=np.float32), "step": 17, "meta": {"name": "run-7", "lr": 0.5, "tags": ["a"]}}
    good = checkpoint.save(tmp_path / "good.h5", state)
    data = good.read_bytes()
    probe = tmp_path / "probe.h5"
    silent, detected = [], 0
    faulthandler.dump_traceback_later(120, exit=True)  # a hang here must not hang pytest
    try:
        for offset in range(len(data)):
            damaged = bytearray(data)
            damaged[offset] ^= 0x5A
            probe.write_bytes(damaged)
            try:
                loaded = checkpoint.load(probe)
            except DataError:
                detected += 1
                continue
            try:
                assert_identical(state, loaded)
            except AssertionError:
                silent.append(offset)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert silent == []
    assert detected > len(data) // 4  # most bytes matter; the rest is padding HDF5 never reads


# -- atomicity under SIGKILL --------------------------------------------------------------------

KILLED_SAVE = textwrap.dedent("""
    import sys
    import numpy as np
    from hpcdl.checkpoint import CheckpointManager
    manager = CheckpointManager(sys.argv[1], keep=3)
    for step in (10, 20):
        state = {"params": np.full(50_000, step, dtype=np.float32), "opt": {"m": np.full(50_000, -step, dtype=np.float32),
                 "v": np.ones(10)}, "step": step}
        manager.save(step, state)
        print("saved", step, flush=True)
""")


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, HPCDL_FAULT_INJECT="checkpoint-write:2")
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split("\n")[0] == "saved 10" and "saved 20" not in proc.stdout
    assert "killing pid" in proc.stderr

    names = sorted(os.listdir(run_dir))
    assert names[0].startswith(".ckpt-00000020.h5.tmp-") and names[1:] == ["ckpt-00000010.h5"]
    stray = run_dir / names[0]
    assert stray.stat().st_size > 0  # the kill came mid-write, after some data reached the file
    with pytest.raises(DataError):
        checkpoint.load(stray)

    manager = CheckpointManager(run_dir, keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stray temp file is not even looked at
        assert manager.latest() == run_dir / "ckpt-00000010.h5"
    state = checkpoint.load(manager.latest())
    assert state["step"] == 10 and np.all(state["params"] == 10) and np.all(state["opt"]["m"] == -10)

    with pytest.warns(CheckpointWarning, match=r"removed .*\.ckpt-00000020\.h5\.tmp-\d+: temp file of an interrupted"):
        manager.save(30, {"step": 30})
    assert sorted(os.listdir(run_dir)) == ["ckpt-00000010.h5", "ckpt-00000030.h5"]
    assert manager.latest() == run_dir / "ckpt-00000030.h5"


def test_fault_spec_is_validated_and_counts_saves(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.FAULT_ENV, "checkpoint-write:zero")
    with pytest.raises(ConfigError, match="HPCDL_FAULT_INJECT='checkpoint-write:zero'"):
        checkpoint.save(tmp_path / "c.h5", {"a": np.ones(1)})
    monkeypatch.setenv(faults.FAULT_ENV, "no-such-fault")
    with pytest.raises(ConfigError, match="unknown fault 'no-such-fault'"):
        checkpoint.save(tmp_path / "c.h5", {"a": np.ones(1)})
    # Other faults in the list and a later save number leave this save alone.
    monkeypatch.setenv(faults.FAULT_ENV, f"raise-at-step:3,checkpoint-write:{checkpoint._saves_in_this_process + 5}")
    checkpoint.save(tmp_path / "c.h5", {"a": np.ones(1)})
    assert checkpoint.load(tmp_path / "c.h5")["a"][0] == 1.0


# -- a run directory ----------------------------------------------------------------------------


def test_latest_skips_truncated_and_corrupt_files_with_one_warning_each(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    for step in (1, 2, 3):
        manager.save(step, {"params": np.full(1000, step, dtype=np.float32), "step": step})
    newest, middle = manager.path_for(3), manager.path_for(2)
    os.truncate(newest, newest.stat().st_size - 100)
    flip_byte(middle, dataset_offset(middle, "params") + 10)

    fresh = CheckpointManager(tmp_path, keep=5)  # a restarted process: nothing cached
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh.latest() == manager.path_for(1)
    messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(messages) == 2
    assert "ckpt-00000003.h5: truncated" in messages[0] and "\n" not in messages[0]
    assert "ckpt-00000002.h5: checksum mismatch on dataset /params" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.latest(quiet=True) == manager.path_for(1)


def test_keep_prunes_to_the_newest_valid_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in range(1, 6):
        manager.save(step, {"step": step, "w": np.full(3, step)})
    assert [s for s, _ in manager.checkpoints()] == [4, 5]

    # A damaged newer file does not count towards `keep`: two valid ones stay.
    manager.path_for(6).write_text("garbage from a broken copy")
    manager.save(7, {"step": 7})
    assert [s for s, _ in manager.checkpoints()] == [5, 6, 7]
    assert CheckpointManager(tmp_path).latest() == manager.path_for(7)
    manager.path_for(7).unlink()
    with pytest.warns(CheckpointWarning, match="ckpt-00000006.h5: not an HDF5 file"):
        assert CheckpointManager(tmp_path).latest() == manager.path_for(5)


def test_only_rank_zero_writes(tmp_path):
    assert CheckpointManager(tmp_path / "run", rank=1).save(5, {"step": 5}) is None
    assert not (tmp_path / "run").exists()
    assert CheckpointManager(tmp_path / "run", rank=0).save(5, {"step": 5}) == tmp_path / "run" / "ckpt-00000005.h5"


def test_resolve_auto_explicit_directory_and_errors(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    assert manager.resolve("auto") is None  # no directory yet
    assert manager.resolve(None) is None and manager.resolve("") is None
    with pytest.raises(DataError, match=r"resume checkpoint .*nope\.h5: no such file"):
        manager.resolve(str(tmp_path / "nope.h5"))

    first = manager.save(100, {"step": 100})
    second = manager.save(200, {"step": 200})
    assert manager.resolve("auto") == second
    assert manager.resolve(str(first)) == first
    assert CheckpointManager(tmp_path / "elsewhere").resolve(str(tmp_path / "run")) == second
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir: no valid checkpoint"):
        manager.resolve(str(tmp_path / "empty_dir"))
    os.truncate(first, 100)
    with pytest.raises(DataError, match=r"ckpt-00000100\.h5: truncated"):
        manager.resolve(str(first))


def test_keep_must_be_positive():
    with pytest.raises(ConfigError, match="keep = 0"):
        CheckpointManager("/tmp/unused", keep=0)


# -- when to save -----------------------------------------------------------------------------------


def test_step_trigger_votes_the_same_on_every_rank():
    policies = [CheckpointPolicy(every_steps=50, rank=r, clock=lambda: 0.0) for r in range(3)]
    for step in (0, 1, 49, 50, 51, 100):
        votes = {p.local_vote(step, now=0.0) for p in policies}
        assert votes == {step in (50, 100)}


def test_time_trigger_is_decided_by_rank_zero_only():
    clock = {"now": 1000.0}
    rank0 = CheckpointPolicy(every_minutes=2, rank=0, clock=lambda: clock["now"])
    rank1 = CheckpointPolicy(every_minutes=2, rank=1, clock=lambda: clock["now"] - 500.0)  # a skewed clock
    clock["now"] += 119.0
    assert max(rank0.local_vote(7), rank1.local_vote(7)) is False
    clock["now"] += 1.0
    assert rank0.local_vote(8) and not rank1.local_vote(8)  # the max across ranks is rank 0's vote
    assert rank0.due(8)
    for policy in (rank0, rank1):
        policy.record_save()
    assert not rank0.local_vote(9)


def test_policy_rejects_negative_intervals():
    with pytest.raises(ConfigError, match="every_steps = -1"):
        CheckpointPolicy(every_steps=-1)
    with pytest.raises(ConfigError, match="every_minutes = -0.5"):
        CheckpointPolicy(every_minutes=-0.5)
    assert not CheckpointPolicy().local_vote(1000, now=1e12)  # both off


def test_stop_signal_sets_the_flag_instead_of_killing():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        assert not stop.requested and stop.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first name
        time.sleep(0.05)
        assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


STOPPABLE_LOOP = textwrap.dedent("""
    import time
    from hpcdl.checkpoint import StopSignals
    stop = StopSignals()
    print("ready", flush=True)
    step = 0
    while not stop.requested:
        step += 1
        time.sleep(0.01)
    print(f"stopping cleanly after {stop.signal_name}", flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signalled_process_finishes_its_step_and_exits_cleanly(sig):
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE_LOOP], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert f"stopping cleanly after {sig.name}" in out


@pytest.mark.gpu
def test_device_arrays_are_saved_from_the_host(tmp_path, cupy):
    params = cupy.arange(1000, dtype=cupy.float32)
    checkpoint.save(tmp_path / "c.h5", {"params": params})
    loaded = checkpoint.load(tmp_path / "c.h5")["params"]
    assert isinstance(loaded, np.ndarray)
    np.testing.assert_array_equal(loaded, params.get())
