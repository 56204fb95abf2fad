"""The α-β-γ cost model against costs worked out by hand, and against the bytes the communicators send.

Formulas: Thakur, Rabenseifner & Gropp (2005), "Optimization of Collective
Communication Operations in MPICH" (recursive doubling, Rabenseifner's
reduce-scatter + allgather, the fold of p - p' extra ranks into a power-of-two
group); Patarasuk & Yuan (2009) for the ring. Each table row below is the
count of α, and the multiples of n for β and γ, derived in the comment beside
it, not by calling the model's own helpers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdl import perfmodel
from hpcdl.perfmodel import Costs

SCRIPTS = Path(__file__).parent / "mpi_scripts"
N = 3 * 2**20  # bytes; divisible by 3, 8 and 1024, so every share below is exact

# (algorithm, p, ranks_per_node) -> (α count, β coefficient / n, γ coefficient / n)
BY_HAND = {
    # ring: 2(p-1) messages; each rank sends 2(p-1)/p of the vector and adds (p-1)/p of it
    ("ring", 1, 1): (0, 0, 0),
    ("ring", 2, 1): (2, 1, 1 / 2),
    ("ring", 3, 1): (4, 4 / 3, 2 / 3),
    ("ring", 8, 1): (14, 7 / 4, 7 / 8),
    ("ring", 1024, 1): (2046, 1023 / 512, 1023 / 1024),
    # recursive doubling: log2 p exchanges of the whole vector, each followed by an add
    ("recursive_doubling", 1, 1): (0, 0, 0),
    ("recursive_doubling", 2, 1): (1, 1, 1),
    # p = 3: p' = 2; the fold-in (send n, add n), one exchange (n, add n), the fold-out (send n)
    ("recursive_doubling", 3, 1): (3, 3, 2),
    ("recursive_doubling", 8, 1): (3, 3, 3),
    ("recursive_doubling", 1024, 1): (10, 10, 10),
    # Rabenseifner: log2 p halving + log2 p doubling steps, moving (p-1)/p of n in each phase
    ("rabenseifner", 1, 1): (0, 0, 0),
    ("rabenseifner", 2, 1): (2, 1, 1 / 2),
    # p = 3: the fold adds α + nβ + nγ in and α + nβ out around the p' = 2 algorithm (2α + nβ + n/2 γ)
    ("rabenseifner", 3, 1): (4, 3, 3 / 2),
    ("rabenseifner", 8, 1): (6, 7 / 4, 7 / 8),
    ("rabenseifner", 1024, 1): (20, 1023 / 512, 1023 / 1024),
    # hierarchical, nodes of k dividing p (the sharded form): ring reduce-scatter over k (k-1 steps,
    # (k-1)/k·n), ring allreduce of the n/k shard over m = p/k nodes (2(m-1) steps, 2(m-1)/m · n/k),
    # ring allgather over k (k-1 steps, (k-1)/k·n)
    ("hierarchical", 1, 4): (0, 0, 0),
    ("hierarchical", 2, 4): (2, 1, 1 / 2),  # k = min(4, p) = 2: one node, a ring of 2
    ("hierarchical", 8, 4): (3 + 3 + 2, 3 / 4 + 3 / 4 + 1 / 4, 3 / 4 + 1 / 8),
    ("hierarchical", 1024, 4): (3 + 3 + 510, 3 / 4 + 3 / 4 + 2 * 255 / 256 / 4, 3 / 4 + 255 / 256 / 4),
    ("hierarchical", 8, 1): (14, 7 / 4, 7 / 8),  # one rank per node: the ring
    # nodes of unequal size (k does not divide p): binomial reduce of depth d = ceil(log2 k) onto a
    # leader (d·(α + nβ + nγ)), ring over m = ceil(p/k) leaders, binomial broadcast (d·(α + nβ))
    ("hierarchical", 3, 2): (2 + 2, 2 + 1, 1 + 1 / 2),  # nodes of 2 + 1: d = 1, m = 2
    ("hierarchical", 8, 3): (4 + 4, 4 + 4 / 3, 2 + 2 / 3),  # nodes of 3 + 3 + 2: d = 2, m = 3
}


@pytest.mark.parametrize("case", sorted(BY_HAND), ids=lambda c: f"{c[0]}-p{c[1]}-k{c[2]}")
def test_coefficients_match_the_hand_worked_costs(case):
    algorithm, p, k = case
    a, b, c = BY_HAND[case]
    got = perfmodel.coefficients(algorithm, N, p, ranks_per_node=k)
    assert got == pytest.approx((a, b * N, c * N), rel=1e-12, abs=1e-12)


def test_native_is_modelled_as_rabenseifner():
    for p in (1, 2, 3, 8, 1024):
        assert perfmodel.coefficients("native", N, p) == perfmodel.coefficients("rabenseifner", N, p)


def test_times_with_chosen_alpha_beta_gamma_by_hand():
    costs = Costs(alpha=1e-5, beta=1e-9, gamma=2.5e-10)
    # ring, p = 3: 4·1e-5 + (4/3)·3145728·1e-9 + (2/3)·3145728·2.5e-10
    assert perfmodel.allreduce_time("ring", N, 3, costs) == pytest.approx(4e-5 + 4.194304e-3 + 5.24288e-4)
    # recursive doubling, p = 1024: 10·1e-5 + 10·3145728·1e-9 + 10·3145728·2.5e-10
    assert perfmodel.allreduce_time("recursive_doubling", N, 1024, costs) == pytest.approx(1e-4 + 3.145728e-2 + 7.86432e-3)
    # Rabenseifner, p = 8: 6·1e-5 + (7/4)·3145728·1e-9 + (7/8)·3145728·2.5e-10
    assert perfmodel.allreduce_time("rabenseifner", N, 8, costs) == pytest.approx(6e-5 + 5.505024e-3 + 6.88128e-4)
    # hierarchical, p = 1024 in nodes of 4: 516·1e-5 + (2·1023/1024)·3145728·1e-9 + (1023/1024)·3145728·2.5e-10
    assert perfmodel.allreduce_time("hierarchical", N, 1024, costs, ranks_per_node=4) == pytest.approx(
        5.16e-3 + 6.285312e-3 + 7.85664e-4)
    assert perfmodel.allreduce_time("ring", N, 1, costs) == 0.0
    assert perfmodel.allreduce_time("ring", 0, 8, costs) == 0.0


def test_ring_beats_recursive_doubling_for_large_and_loses_for_small_messages_at_1024():
    costs = Costs(alpha=1e-5, beta=1e-9, gamma=2.5e-10)
    assert perfmodel.allreduce_time("ring", N, 1024, costs) < perfmodel.allreduce_time("recursive_doubling", N, 1024, costs)
    assert perfmodel.allreduce_time("ring", 64, 1024, costs) > perfmodel.allreduce_time("recursive_doubling", 64, 1024, costs)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="p must be >= 1"):
        perfmodel.coefficients("ring", N, 0)
    with pytest.raises(ValueError, match="no cost model for algorithm 'tree'"):
        perfmodel.coefficients("tree", N, 4)
    with pytest.raises(ValueError, match="rank 5 is outside 0..3"):
        perfmodel.wire_bytes("ring", N, 4, 5)


# (algorithm, p, ranks_per_node) -> each rank's (sent, received) as a multiple of n, by hand
WIRE_BY_HAND = {
    ("ring", 3, 1): [(4 / 3, 4 / 3)] * 3,
    # p = 3, p' = 2: rank 0 folds out (n up, n back), rank 1 folds it in, exchanges with rank 2, sends back
    ("recursive_doubling", 3, 1): [(1, 1), (2, 2), (1, 1)],
    ("rabenseifner", 3, 1): [(1, 1), (2, 2), (1, 1)],
    ("recursive_doubling", 8, 1): [(3, 3)] * 8,
    ("rabenseifner", 8, 1): [(7 / 4, 7 / 4)] * 8,
    # nodes 2 + 1: leader 0 takes n from rank 1 and gives it back, and rings with leader 2 (n each way)
    ("hierarchical", 3, 2): [(2, 2), (1, 1), (1, 1)],
    ("hierarchical", 8, 4): [(7 / 4, 7 / 4)] * 8,
}


@pytest.mark.parametrize("case", sorted(WIRE_BY_HAND), ids=lambda c: f"{c[0]}-p{c[1]}-k{c[2]}")
def test_wire_bytes_match_the_hand_worked_counts(case):
    algorithm, p, k = case
    got = [perfmodel.wire_bytes(algorithm, N, p, r, k) for r in range(p)]
    expected = [(s * N, r * N) for s, r in WIRE_BY_HAND[case]]
    # flattened: pytest.approx takes no nested sequences
    assert [v for pair in got for v in pair] == pytest.approx([v for pair in expected for v in pair])


@pytest.mark.parametrize("algorithm,k", [("ring", 1), ("recursive_doubling", 1), ("rabenseifner", 1),
                                         ("hierarchical", 2), ("hierarchical", 3)])
@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8, 12])
def test_beta_term_is_the_busiest_ranks_bytes_plus_the_folds_one_way_steps(algorithm, k, p):
    """Full-duplex steps cost the bytes each way once; a fold's two steps and a tree's levels go one way."""
    sent = max(perfmodel.wire_bytes(algorithm, N, p, r, k)[0] for r in range(p))
    beta = perfmodel.coefficients(algorithm, N, p, k)[1]
    one_way = 0.0
    if algorithm in ("recursive_doubling", "rabenseifner") and p & (p - 1):
        one_way = N  # the fold-in the partner only receives, the fold-out it only sends
    if algorithm == "hierarchical" and p % min(k, p):
        depth = (min(k, p) - 1).bit_length()
        one_way = depth * N  # the leader receives d times going up and sends d times coming down
    assert beta == pytest.approx(sent + one_way)


@pytest.mark.mpi
def test_model_bytes_equal_comm_traffic_at_two_three_and_four_ranks():
    from trainer_runs import mpiexec

    proc = subprocess.run([mpiexec(), "-n", "4", sys.executable, str(SCRIPTS / "perfmodel_traffic.py")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    seen = {(c["p"], c["algorithm"]) for c in result["cases"]}
    assert {p for p, _ in seen} == {2, 3, 4} and len(seen) == 15
    # the fold really happened at p = 3: the partner rank moved twice what the others did
    fold = next(c for c in result["cases"] if c["p"] == 3 and c["algorithm"] == "rabenseifner")
    assert fold["traffic"][1][0] == 2 * fold["traffic"][0][0]
