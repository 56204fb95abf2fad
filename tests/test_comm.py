"""Communicators, the `auto` crossover table, the allreduce benchmark and the cost model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hpcdl.comm
from hpcdl import perfmodel
from hpcdl.comm import auto
from hpcdl.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi_scripts"


def mpiexec(n: int, *command: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `command` on n real MPI ranks; a hang becomes a test failure, not a stuck suite."""
    return subprocess.run(["mpiexec", "-n", str(n), *command], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# -- real ranks --------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("ranks, extra", [
    (2, []),
    (3, ["--ranks-per-node", "2", "--piece-kb", "4", "--pipeline-depth", "3"]),
], ids=["p2-one-node", "p3-two-fake-nodes-4KiB-pieces"])
def test_every_algorithm_is_exact_and_identical_on_all_ranks(ranks, extra):
    """Sizes 0, 1, p-1, p+1, 1001, 300007, 2^20+3; float32/64; sum/mean; twice; non-blocking; bcast; allgather_obj.

    Tiny pieces at p = 3 put hundreds of pieces in every step, three in flight."""
    proc = mpiexec(ranks, sys.executable, str(SCRIPTS / "comm_exact.py"), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = last_json_line(proc.stdout)
    assert report["world"] == ranks
    assert report["failures"] == []
    assert report["cases"] > 200


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, extra", [
    (4, []),
    (5, ["--piece-kb", "64", "--pipeline-depth", "1"]),
    (6, ["--piece-kb", "16"]),
    (7, ["--pipeline-depth", "4"]),
    (8, []),
], ids=["p4", "p5-unpipelined", "p6-16KiB-pieces", "p7-depth4", "p8"])
def test_every_algorithm_is_exact_and_identical_at_four_to_eight_ranks(ranks, extra):
    """Oversubscribed on purpose: recursive halving with several levels (p >= 4), folds with a
    remainder of 1..3 (p = 5, 6, 7), sharded hierarchical on 2 and 3 fake nodes, the unequal-node
    fallback (p = 5, 7); one launch per world size."""
    proc = mpiexec(ranks, sys.executable, str(SCRIPTS / "comm_exact.py"), "--quick", *extra, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = last_json_line(proc.stdout)
    assert report["world"] == ranks
    assert report["failures"] == []
    assert report["cases"] > 300


@pytest.mark.mpi
def test_benchmark_runs_and_its_crossovers_drive_auto(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "crossovers.json"
    proc = mpiexec(2, sys.executable, "-m", "hpcdl.bench.allreduce", "--sizes", "4KiB,256KiB", "--repeats", "2",
                   "--algorithms", "native,ring,rabenseifner,ring+window", "--bucketed", "ring,ring+window",
                   "--overlap", "ring,ring+window", "--json", str(out),
                   "--save-crossovers", str(table), "--backward-ms", "20")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    rows = {(r["algorithm"], r["bytes"]): r for r in result["sweep"]}
    assert set(rows) == {(a, n) for a in ("native", "ring", "rabenseifner", "ring+window", "memcpy")
                         for n in (4096, 262144)}
    # a window reduction puts nothing on the wire, so it is not counted; it never enters auto's rules
    assert "traffic_vs_optimal" not in rows[("ring+window", 262144)]
    assert all(rule["algorithm"] != "ring+window" for rule in result["crossover_rules"])
    # the counted wire bytes of hpcdl's own algorithms: 2(p-1)/p·n = n at p = 2
    assert rows[("ring", 262144)]["traffic_vs_optimal"] == pytest.approx(1.0, rel=0.01)
    assert rows[("memcpy", 262144)]["vs_memcpy"] == 1.0
    for r in rows.values():
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"])  # 2(p-1)/p = 1 at p = 2
    assert all(rows[("native", n)]["vs_native"] == 1.0 for n in (4096, 262144))
    resnet = result["resnet50"]
    assert resnet["tensors"] == 161 and resnet["parameters"] == 25_557_032
    assert set(resnet["times"]) == {"per_tensor_native", "flat_native", "bucketed_ring", "bucketed_ring+window"}
    assert set(resnet["overlap_by_algorithm"]) == {"ring", "ring+window"}
    assert resnet["overlap"] == resnet["overlap_by_algorithm"]["ring"]
    for name, overlap in resnet["overlap_by_algorithm"].items():
        assert overlap["algorithm"] == name
        for kind in ("sleep", "compute"):
            o = overlap[kind]
            assert set(o) >= {"step_s", "backward_s", "allreduce_s", "hidden_fraction"}
            assert 0.0 <= o["hidden_fraction"] <= 1.0 and o["backward_s"] > 0.015 and o["allreduce_s"] > 0
            assert set(o["modes"]) == {"thread", "hooks", "hooks+2ms"}
    saved = auto.load_table(table)
    assert saved["by_ranks"]["2"] == result["crossover_rules"]
    chosen = hpcdl.comm.create("auto", crossovers=str(table))
    p_used, rules = auto.rules_for(saved, 2)
    assert p_used == 2 and chosen.table["by_ranks"]["2"] == rules
    assert saved["machine"] == auto.machine_fingerprint() and set(saved["costs"]) >= {"ring", "native"}
    # at the P it was measured, on this machine, auto follows the measured rules and says so
    proc = mpiexec(2, sys.executable, "-c", "import hpcdl.comm as c, sys; a = c.create('auto', crossovers=sys.argv[1]);"
                   " print(a.mode, a.table_ranks) if a.rank == 0 else None", str(table))
    assert proc.returncode == 0 and proc.stdout.split() == ["measured", "2"], proc.stdout + proc.stderr


AUTO_WITH_SHM = """
import json
import numpy as np
import hpcdl.comm as c
from hpcdl.comm import auto
table = {"format": auto.FORMAT, "source": "test", "machine": auto.machine_fingerprint(),
         "by_ranks": {"2": [{"up_to_bytes": 4096, "algorithm": "native"}, {"up_to_bytes": None, "algorithm": "shm"}]}}
out = {}
for windowed in (True, False):
    a = c.create("auto", crossovers=table, shared_window=windowed)
    buf = a.zeros(300007)
    buf[:] = a.rank + 1
    a.allreduce(buf)
    out[str(windowed)] = [a.mode, sorted(a.algorithms), a.shared_memory, bool(np.all(buf == 3)),
                          a.describe().splitlines()[0]]
if a.rank == 0:
    print(json.dumps(out))
"""


@pytest.mark.mpi
def test_auto_runs_measured_shm_rules_in_its_window_or_as_the_ring():
    """A table measured with shm names it; auto then allocates in shm's window, and where no window
    may be used (comm.shared_window off, fault tolerance, GPU) the ring takes shm's sizes, and says so."""
    proc = mpiexec(2, sys.executable, "-c", AUTO_WITH_SHM)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = last_json_line(proc.stdout)
    mode, names, shared, summed, line = report["True"]
    assert (mode, names, shared, summed) == ("measured", ["native", "shm"], True, True)
    assert "shm reduces buffers in its shared window" in line
    mode, names, shared, summed, line = report["False"]
    assert (mode, names, shared, summed) == ("measured", ["native", "ring"], False, True)
    assert "its shm rules run as ring (comm.shared_window is off" in line


# -- one rank, in process ----------------------------------------------------------------------

def test_unknown_algorithm_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"comm\.algorithm.*'rign'.*did you mean 'ring'"):
        hpcdl.comm.create("rign")
    with pytest.raises(TypeError, match="unknown communicator options"):
        hpcdl.comm.create("ring", bucket=3)


def test_importing_hpcdl_comm_loads_neither_mpi_nor_the_algorithms():
    code = "import sys, hpcdl.comm; print(sorted(m for m in sys.modules if m.startswith(('mpi4py', 'hpcdl.comm.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", list(hpcdl.comm.ALGORITHMS))
def test_single_rank_is_a_no_op_and_arguments_are_checked(name):
    comm = hpcdl.comm.create(name)
    assert (comm.size, comm.rank, comm.name) == (1, 0, name)
    buf = np.arange(7, dtype=np.float32)
    assert comm.allreduce(buf, op="mean") is buf
    np.testing.assert_array_equal(buf, np.arange(7, dtype=np.float32))
    assert comm.start(buf, tag=5).test()
    assert comm.allgather_obj("x") == ["x"]
    np.testing.assert_array_equal(comm.bcast(buf.copy()), buf)
    with pytest.raises(TypeError, match="float32 and float64"):
        comm.allreduce(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="1-D"):
        comm.allreduce(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        comm.allreduce(np.zeros(8, np.float32)[::2])
    with pytest.raises(ValueError, match="op must be"):
        comm.allreduce(buf, op="max")


def test_cuda_awareness_is_a_tri_state_with_an_override(monkeypatch):
    from hpcdl.comm import gpu

    gpu.cuda_aware.cache_clear()
    assert hpcdl.comm.cuda_aware() in (True, False, None)
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("HPCDL_CUDA_AWARE", value)
        gpu.cuda_aware.cache_clear()
        assert hpcdl.comm.cuda_aware() is expected
    gpu.cuda_aware.cache_clear()


def test_gpu_details_that_can_be_checked_without_a_device(monkeypatch):
    from hpcdl import backend
    from hpcdl.comm import gpu
    from hpcdl.metrics import PhaseTimer

    assert gpu.launcher_local_rank({"SLURM_LOCALID": "3"}) == 3 and gpu.launcher_local_rank({}) is None
    assert gpu.select_device_before_mpi({}) is None  # no launcher: the choice waits for backend.use_device
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("HPCDL_DEVICE_NBC", value)
        assert gpu.device_nonblocking_collectives() is expected
    # the phase timer waits for the device before reading the clock, only on the GPU
    synced = []
    monkeypatch.setattr(backend, "synchronize", lambda *a: synced.append(1))
    timer = PhaseTimer()
    timer.switch("backward")
    assert synced == []
    monkeypatch.setattr(backend, "device", "gpu")
    timer.switch("allreduce")
    assert synced == [1]


def test_pieces_come_from_the_cache_and_are_powers_of_two():
    from hpcdl.comm import base

    cache, where = base.cache_bytes()
    assert cache > 0 and where
    assert base.piece_bytes_for_cache(2 * 2**20) == 512 * 2**10
    assert base.piece_bytes_for_cache(48 * 2**10) == base.MIN_PIECE_BYTES
    assert base.piece_bytes_for_cache(10**9) == base.MAX_PIECE_BYTES
    assert base.piece_bytes_for_cache(3 * 2**20) == 512 * 2**10
    plan = base.Pieces(bytes=4096, depth=3)
    assert plan.count(1025, 4) == 2 and plan.capacity(1025, 4) == 1024 and plan.scratch(1025, 4) == 3072
    comm = hpcdl.comm.create("ring", piece_kb=8, pipeline_depth=1)
    assert comm.pieces == base.Pieces(8192, 1) and "8 KiB (comm.piece_kb), 1 in flight" in comm.describe()
    with pytest.raises(ConfigError, match="pipeline_depth"):
        hpcdl.comm.create("ring", pipeline_depth=0)


# -- the crossover table -----------------------------------------------------------------------

def test_rules_switch_halfway_between_measured_sizes():
    medians = {
        4096: {"native": 1e-5, "ring": 3e-5},
        65536: {"native": 5e-5, "ring": 6e-5},
        2**20: {"native": 9e-4, "ring": 4e-4},
        2**24: {"native": 2e-2, "ring": 6e-3},
    }
    rules = auto.rules_from_timings(medians)
    assert rules == [{"up_to_bytes": int((65536 * 2**20) ** 0.5), "algorithm": "native"},
                     {"up_to_bytes": None, "algorithm": "ring"}]
    # a 2 % "win" at one size is a tie, not a reason to switch back and forth
    medians[2**22] = {"native": 1.00e-2, "ring": 1.02e-2}
    medians[2**23] = {"native": 1.50e-2, "ring": 1.00e-2}
    assert auto.rules_from_timings(medians) == rules
    assert auto.rules_from_timings(medians, margin=0.0)[-1] == {"up_to_bytes": None, "algorithm": "ring"}
    assert len(auto.rules_from_timings(medians, margin=0.0)) == 4


def test_auto_dispatches_by_size_and_describes_its_table():
    table = {"format": auto.FORMAT, "source": "test", "machine": auto.machine_fingerprint(), "by_ranks": {
        "1": [{"up_to_bytes": 1000, "algorithm": "recursive_doubling"}, {"up_to_bytes": None, "algorithm": "ring"}],
        "8": [{"up_to_bytes": None, "algorithm": "native"}]}}
    comm = hpcdl.comm.create("auto", crossovers=table)
    assert comm.mode == "measured"
    assert comm.choose(8) == "recursive_doubling" and comm.choose(1000) == "recursive_doubling"
    assert comm.choose(1001) == "ring"
    text = comm.describe()
    assert "measured at P=1 on this kind of machine" in text and "recursive_doubling" in text and "> 1000 B" in text
    assert auto.rules_for(table, 1)[0] == 1 and auto.rules_for(table, 5) is None


def test_a_table_from_another_world_size_or_machine_is_never_applied_silently():
    rules = [{"up_to_bytes": None, "algorithm": "native"}]
    costs = {name: {"alpha": 1e-6, "beta": 1e-10, "gamma": 0.0} for name in ("ring", "native", "rabenseifner",
                                                                              "recursive_doubling")}
    costs["native"]["beta"] = 1e-9  # native much slower per byte: the model must not pick it for big messages
    other_p = {"format": auto.FORMAT, "source": "bench at P=2", "machine": auto.machine_fingerprint(),
               "by_ranks": {"2": rules}, "costs": costs, "costs_from": "P=2: bench"}
    comm = hpcdl.comm.create("auto", crossovers=other_p)  # this process is a world of 1
    assert comm.mode == "model" and comm.table_ranks is None
    assert "no crossovers measured at P=1 (the table has P=2)" in comm.describe()
    assert "costs fitted P=2: bench" in comm.describe()
    other_machine = {**other_p, "machine": {"cpus": 4096, "mpi": "Some MPI 9"}, "by_ranks": {"1": rules}}
    comm = hpcdl.comm.create("auto", crossovers=other_machine)
    assert comm.mode == "model" and "another kind of machine" in comm.describe()
    assert "DEFAULT_COSTS" in comm.describe()  # another machine's costs are not used either


def test_model_rules_follow_the_fitted_costs():
    from hpcdl.perfmodel import Costs

    cheap_latency = {"native": Costs(1e-7, 1e-9), "ring": Costs(1e-5, 1e-11),
                     "rabenseifner": Costs(1e-5, 1e-10), "recursive_doubling": Costs(1e-5, 1e-9)}
    rules = auto.model_rules(8, cheap_latency)
    assert rules[0]["algorithm"] == "native" and rules[-1] == {"up_to_bytes": None, "algorithm": "ring"}


def test_default_table_is_valid_and_used_without_a_file(monkeypatch):
    monkeypatch.delenv(auto.CROSSOVERS_ENV, raising=False)
    comm = hpcdl.comm.create("auto")
    assert comm.table is auto.DEFAULT_TABLE
    auto._validate(auto.DEFAULT_TABLE, "default")


def test_crossover_files_merge_by_world_size_and_bad_files_name_themselves(tmp_path):
    path = tmp_path / "x.json"
    auto.save_rules(path, 2, [{"up_to_bytes": None, "algorithm": "ring"}], "a")
    auto.save_rules(path, 4, [{"up_to_bytes": 10, "algorithm": "native"}, {"up_to_bytes": None, "algorithm": "rabenseifner"}], "b")
    table = auto.load_table(path)
    assert sorted(table["by_ranks"]) == ["2", "4"]
    with pytest.raises(ConfigError, match="not found"):
        auto.load_table(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": auto.FORMAT, "by_ranks": {"2": [{"up_to_bytes": None, "algorithm": "tree"}]}}))
    with pytest.raises(ConfigError, match=r"bad\.json.*'tree'"):
        auto.load_table(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        auto.load_table(bad)


# -- benchmark helpers -------------------------------------------------------------------------

def test_resnet50_gradient_set_matches_the_published_model():
    from hpcdl.bench.allreduce import resnet50_shapes

    shapes = resnet50_shapes()
    assert len(shapes) == 161
    assert sum(int(np.prod(s)) for _, s in shapes) == 25_557_032
    assert len({n for n, _ in shapes}) == 161
    assert shapes[0] == ("conv1.weight", (64, 3, 7, 7)) and shapes[-2] == ("fc.weight", (1000, 2048))


def test_sizes_parse_with_binary_and_decimal_units():
    from hpcdl.bench.allreduce import parse_size

    assert [parse_size(s) for s in ("4KiB", "100MiB", "1000", "2kb", "1.5MiB")] == [4096, 104857600, 1000, 2000, 1572864]
    with pytest.raises(UserError, match="'12 parsecs'"):
        parse_size("12 parsecs")


# -- cost model --------------------------------------------------------------------------------

def test_cost_formulas_match_the_textbook_expressions():
    n, p = 1e6, 8
    assert perfmodel.coefficients("ring", n, p) == (14.0, 2 * 7 / 8 * n, 7 / 8 * n)
    assert perfmodel.coefficients("recursive_doubling", n, p) == (3.0, 3 * n, 3 * n)
    assert perfmodel.coefficients("rabenseifner", n, p) == (6.0, 2 * 7 / 8 * n, 7 / 8 * n)
    # p = 6 folds into a group of 4: one extra message pair and a full-vector reduce
    assert perfmodel.coefficients("recursive_doubling", n, 6) == (4.0, 4 * n, 3 * n)
    assert perfmodel.coefficients("ring", n, 1) == (0.0, 0.0, 0.0)
    # two nodes of four, sharded: ring reduce-scatter and allgather in the node, a 2-node ring of n/4
    a, b, c = perfmodel.coefficients("hierarchical", n, 8, ranks_per_node=4)
    assert (a, b, c) == pytest.approx((3 + 3 + 2.0, 2 * 7 / 8 * n, 7 / 8 * n))


def synthetic(algorithm, truth, worlds, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return [(p, n, perfmodel.allreduce_time(algorithm, n, p, truth) * (1 + noise * rng.standard_normal()))
            for p in worlds for n in 4.0 ** np.arange(5, 14)]


def test_fit_recovers_alpha_beta_gamma_from_synthetic_samples():
    truth = perfmodel.Costs(alpha=3e-6, beta=1.5e-10, gamma=4e-11)
    # recursive doubling over power-of-two and folded p separates all three
    got = perfmodel.fit(synthetic("recursive_doubling", truth, (2, 3, 4, 6, 8, 12, 16)), "recursive_doubling")
    assert got.alpha == pytest.approx(truth.alpha, rel=0.05)
    assert got.beta == pytest.approx(truth.beta, rel=0.05)
    assert got.gamma == pytest.approx(truth.gamma, rel=0.2)
    # the ring's beta and gamma coefficients are 2:1 at every p: with gamma known, beta comes out
    ring = synthetic("ring", truth, (2, 4, 8, 16))
    known = perfmodel.fit(ring, "ring", gamma=truth.gamma)
    assert (known.alpha, known.beta) == (pytest.approx(truth.alpha, rel=0.05), pytest.approx(truth.beta, rel=0.05))
    # without it, gamma is held at 0 and beta absorbs half of it
    folded = perfmodel.fit(ring, "ring")
    assert folded.gamma == 0.0
    assert folded.beta == pytest.approx(truth.beta + truth.gamma / 2, rel=0.05)
    with pytest.raises(ValueError, match="two samples"):
        perfmodel.fit([(1, 100, 1.0)], "ring")


def test_large_message_refit_keeps_alpha_and_takes_beta_from_dram_sizes():
    cached, dram = perfmodel.Costs(5e-6, 5e-11), perfmodel.Costs(5e-6, 3e-10)
    sweep = [{"algorithm": "ring", "bytes": n,
              "median_s": perfmodel.allreduce_time("ring", n, 2, cached if n < 2**23 else dram)}
             for n in 4 ** np.arange(6, 14)]
    two_regimes = perfmodel.fit_bench({"world": 2, "sweep": sweep}, gamma=0.0, large_bytes=2**23)["ring"]
    assert two_regimes.beta == pytest.approx(dram.beta, rel=1e-6)
    one_line = perfmodel.fit_bench({"world": 2, "sweep": sweep}, gamma=0.0)["ring"]
    assert two_regimes.alpha == one_line.alpha and one_line.beta < dram.beta / 2


def test_fit_bench_and_step_time_prediction():
    truth = {"ring": perfmodel.Costs(1e-5, 2e-10), "native": perfmodel.Costs(4e-6, 6e-10)}
    sweep = [{"algorithm": a, "bytes": n, "median_s": perfmodel.allreduce_time(a, n, 2, c)}
             for a, c in truth.items() for n in (4096, 2**20, 2**26)]
    fitted = perfmodel.fit_bench({"world": 2, "sweep": sweep, "gamma_s_per_byte": 0.0})
    assert fitted["ring"].beta == pytest.approx(2e-10, rel=1e-6)
    assert fitted["native"].alpha == pytest.approx(4e-6, rel=1e-6)
    compute, grad = 0.25, 102e6
    step = perfmodel.predict_step_time(8, compute, grad, "ring", fitted)
    assert step == pytest.approx(compute + perfmodel.allreduce_time("ring", grad, 8, fitted["ring"]))
    assert perfmodel.predict_step_time(8, compute, grad, "ring", fitted, overlap=1.0) == pytest.approx(compute)
    assert perfmodel.predict_step_time(1, compute, grad, "ring") == compute
    assert perfmodel.predict_step_time(8, compute, grad, "auto") <= perfmodel.predict_step_time(8, compute, grad, "native")


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("polite", [False, True])
@pytest.mark.parametrize("targets", ["all", "owner"])
def test_window_shard_sum_matches_the_numpy_reference_bit_for_bit(k, polite, targets):
    """`sum_into` for every owner's shard, stored into every buffer (shm) or only the owner's (the
    hierarchical node phase; in place for owners 0 and 1, through scratch for the others), blocked and
    yielding or not, against `reference_sum`'s left-to-right rank order. Random floats, so any other
    order would show; and nothing outside the shard, or in a buffer not targeted, may change."""
    from hpcdl.comm import window

    n = 300007
    rng = np.random.default_rng(k)
    original = [rng.standard_normal(n).astype(np.float32) for _ in range(k)]
    want = window.reference_sum(original)
    bounds = [n * i // k for i in range(k + 1)]
    for owner in range(k):
        buffers = [b.copy() for b in original]
        scratch = np.full(window.BLOCK_BYTES // 4, np.nan, np.float32)
        chosen = list(range(k)) if targets == "all" else [owner]
        lo, hi = bounds[owner], bounds[owner + 1]
        window.sum_into(buffers, lo, hi, targets=chosen, scratch=scratch, polite=polite)
        for j in range(k):
            assert np.array_equal(np.delete(buffers[j], np.s_[lo:hi]), np.delete(original[j], np.s_[lo:hi]))
            assert np.array_equal(buffers[j][lo:hi], want[lo:hi] if j in chosen else original[j][lo:hi])


def test_window_copy_reaches_every_destination_and_only_the_range():
    from hpcdl.comm import window

    n = 3 * window.BLOCK_BYTES // 4 + 11  # several blocks and a ragged end
    source = np.arange(n, dtype=np.float64)
    destinations = [np.zeros(n), source, np.full(n, -1.0)]
    window.copy_into(source, destinations, 5, n - 3, polite=True)
    assert np.array_equal(destinations[0][5:n - 3], source[5:n - 3]) and not destinations[0][:5].any()
    assert np.all(destinations[2][n - 3:] == -1) and np.array_equal(destinations[2][5:n - 3], source[5:n - 3])
    assert np.array_equal(source, np.arange(n, dtype=np.float64))
