"""`hpcdl scaling predict`: the projection's algebra against costs worked out by hand."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from hpcdl import projection
from hpcdl.perfmodel import Costs

NET = Costs(alpha=2e-6, beta=1e-10)
NODE = Costs(alpha=5e-7, beta=2e-11)
GAMMA = 3e-11


def machine(k=1):
    return projection.Machine(network=NET, node=NODE, ranks_per_node=k, gamma=GAMMA)


def test_flat_ring_between_nodes_by_hand():
    n, nodes = 1e6, 8
    # 2(p-1) messages, 2(p-1)/p·n bytes on the wire, (p-1)/p·n bytes reduced
    expected = 14 * NET.alpha + 1.75e6 * NET.beta + 0.875e6 * GAMMA
    assert projection.allreduce_s("ring", n, nodes, machine()) == pytest.approx(expected)
    # two ranks per node share one NIC: the wire term doubles, over p = 16 ranks
    expected_shared = 30 * NET.alpha + 2 * 15 / 16 * n * 2 * NET.beta + 15 / 16 * n * GAMMA
    assert projection.allreduce_s("ring", n, nodes, machine(2)) == pytest.approx(expected_shared)


def test_one_node_uses_shared_memory_costs_and_one_rank_costs_nothing():
    assert projection.allreduce_s("rabenseifner", 4e6, 1, machine(1)) == 0.0
    n = 4e6  # p = 4 in one node: Rabenseifner, 2 log2 4 = 4 messages, 2·3/4·n bytes, 3/4·n reduced
    expected = 4 * NODE.alpha + 1.5 * n * NODE.beta + 0.75 * n * GAMMA
    assert projection.allreduce_s("rabenseifner", n, 1, machine(4)) == pytest.approx(expected)


def test_recursive_doubling_at_1024_nodes_by_hand():
    n = 1e5  # log2 1024 = 10 exchanges of the whole vector, each reduced
    expected = 10 * NET.alpha + 10 * n * NET.beta + 10 * n * GAMMA
    assert projection.allreduce_s("recursive_doubling", n, 1024, machine()) == pytest.approx(expected)


def test_hierarchical_is_local_ring_plus_concurrent_shard_rings_through_one_nic():
    n, k, nodes = 8e6, 4, 2
    local = 6 * NODE.alpha + 1.5 * n * NODE.beta + 0.75 * n * GAMMA  # ring over 4 ranks of the node
    # each of the 4 local ranks reduces n/4 over 2 nodes: 2 messages, n/4 bytes each, all 4 share the NIC
    inter = 2 * NET.alpha + (n / 4) * 4 * NET.beta + (n / 8) * GAMMA
    assert projection.allreduce_s("hierarchical", n, nodes, machine(k)) == pytest.approx(local + inter)
    # the NIC carries n per node, as one flat ring with one rank per node would: never more than flat
    assert projection.allreduce_s("hierarchical", n, 64, machine(k)) < projection.allreduce_s("ring", n, 64, machine(k))
    assert "hierarchical" not in projection.algorithms(machine(1))


def test_table_rows_follow_the_definitions():
    rows = projection.table(model_bytes=1e8, compute_per_sample_s=0.05, dataset_size=1_281_167, epochs=90,
                            batches=[32768], nodes=[1024, 8192], machine=machine(), backward_share=0.5,
                            min_per_rank_batch=8, bucket_bytes=25 * 2**20)
    row = rows[0]
    assert row["iterations"] == math.ceil(90 * 1_281_167 / 32768) == 3519
    assert row["per_rank_batch"] == 32 and row["compute_s"] == pytest.approx(1.6)
    ring = projection.allreduce_s("ring", 1e8, 1024, machine())
    assert row["allreduce_s"]["ring"] == pytest.approx(ring)
    last_bucket = projection.allreduce_s("ring", 25 * 2**20, 1024, machine())
    assert row["exposed_allreduce_s"]["ring"] == pytest.approx(max(ring - 0.8, last_bucket))
    best = row["best_algorithm"]
    assert row["iteration_s"] == pytest.approx(row["compute_s"] + row["exposed_allreduce_s"][best])
    assert row["iteration_no_overlap_s"] == pytest.approx(row["compute_s"] + min(row["allreduce_s"].values()))
    assert row["total_s"] == pytest.approx(row["iterations"] * row["iteration_s"])
    assert row["efficiency"] == pytest.approx(row["compute_s"] / row["iteration_s"])
    assert row["valid"] and not rows[1]["valid"]  # 4 images per rank at 8192 nodes < 8
    assert rows[1]["efficiency_no_overlap"] < row["efficiency_no_overlap"]  # t1 shrinks, t2 does not


def test_network_presets_and_bad_input():
    costs, source = projection.parse_network("alpha=1.5e-6,beta=8e-11")
    assert costs == Costs(1.5e-6, 8e-11) and "12.5 GB/s" in source
    assert projection.parse_network("hdr")[0].beta == pytest.approx(4e-11)
    for bad in ("fast", "alpha=1", "alpha=1,beta=x", "alpha=1,beta=2,gamma=3"):
        with pytest.raises(Exception, match="--network"):
            projection.parse_network(bad)


def test_command_prints_the_table_with_its_assumptions():
    run = subprocess.run([sys.executable, "-m", "hpcdl", "scaling", "predict", "--model-bytes", "102197440",
                          "--compute-per-sample-s", "0.06", "--batches", "32K", "--nodes", "1024",
                          "--network", "edr"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "InfiniBand EDR" in run.stdout and "assumptions:" in run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert (row["batch"], row["nodes"], row["iterations"]) == (32768, 1024, 3519)
    bad = subprocess.run([sys.executable, "-m", "hpcdl", "scaling", "predict", "--network", "fast",
                          "--model-bytes", "1", "--compute-per-sample-s", "1"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--network" in bad.stderr.strip().splitlines()[-1]
