"""α-β-γ (Hockney) cost model of the allreduce algorithms, fit from `hpcdl bench allreduce`.

A message of n bytes costs α + n·β; reducing n bytes costs n·γ. Each
algorithm's time is a·α + b·β + c·γ with coefficients that depend only on
n and p (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009). For
p' = 2^floor(log2 p) and a fold f = 1 when p is not a power of two:

    ring                2(p-1)·α + 2(p-1)/p·nβ + (p-1)/p·nγ
    recursive_doubling  (log2 p' + 2f)·α + (log2 p' + 2f)·nβ + (log2 p' + f)·nγ
    rabenseifner        (2 log2 p' + 2f)·α + (2(p'-1)/p' + 2f)·nβ + ((p'-1)/p' + f)·nγ
    hierarchical, p = m·k (m nodes of k ranks, as `hpcdl.comm.hierarchical` runs it):
                        ring reduce-scatter in the node, ring allreduce of the n/k shard across
                        the m nodes, ring allgather in the node:
                        (2(k-1) + 2(m-1))·α + 2(p-1)/p·nβ + (p-1)/p·nγ
    hierarchical, k ∤ p (nodes of unequal size): binomial reduce onto a leader, ring over
                        the m = ceil(p/k) leaders, binomial broadcast; d = ceil(log2 k):
                        (2d + 2(m-1))·α + (2d + 2(m-1)/m)·nβ + (d + (m-1)/m)·nγ
    native              modelled as rabenseifner (MPICH's and Open MPI's large-message choice)

The β coefficient is the bytes on the critical path, which is what each rank
sends and receives at once in every step (full-duplex links) except in the
fold: there the extra rank's receive and its send-back are two one-way
steps. `wire_bytes` gives what one rank itself sends and receives, which
`comm.traffic` counts; tests/test_perfmodel*.py hold both against hand-worked
costs and against the communicators.

`fit` finds α and β (and γ when the samples can tell it apart) by least
squares on relative error, so 4 KiB and 100 MiB points weigh alike.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

MODELLED = ("ring", "recursive_doubling", "rabenseifner", "hierarchical", "native")


@dataclass(frozen=True)
class Costs:
    alpha: float  # seconds per message
    beta: float  # seconds per byte on the wire
    gamma: float = 0.0  # seconds per byte reduced

    def as_dict(self) -> dict:
        return asdict(self)


# `fit_bench(result, large_bytes=16 * 2**20)` of `mpiexec -n 2 hpcdl bench allreduce --repeats 15
# --json ...` on the 2-core development host (shared memory, MPICH 5.0, float32, machine idle):
# α from all sizes, β from the DRAM-sized ones, γ the measured local add. Refit on real hardware.
DEFAULT_COSTS = {
    "ring": Costs(alpha=8.5e-6, beta=6.3e-11, gamma=3.4e-11),
    "recursive_doubling": Costs(alpha=9.1e-6, beta=9.6e-11, gamma=3.4e-11),
    "rabenseifner": Costs(alpha=9.1e-6, beta=6.6e-11, gamma=3.4e-11),
    "hierarchical": Costs(alpha=6.3e-6, beta=1.3e-10, gamma=3.4e-11),
    "native": Costs(alpha=4.6e-6, beta=1.4e-10, gamma=3.4e-11),
}


def _power_of_two_below(p: int) -> tuple[int, int]:
    """(p', fold): the power-of-two group and whether a fold step is needed."""
    group = 1 << (int(p).bit_length() - 1)
    return group, int(group != p)


def coefficients(algorithm: str, nbytes: float, p: int, ranks_per_node: int = 1) -> tuple[float, float, float]:
    """(a, b, c) with time = a·α + b·β + c·γ for one allreduce of `nbytes` over `p` ranks."""
    n, p = float(nbytes), int(p)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if p == 1 or n == 0:
        return 0.0, 0.0, 0.0
    if algorithm == "ring":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p * n, (p - 1) / p * n
    group, fold = _power_of_two_below(p)
    steps = math.log2(group)
    if algorithm == "recursive_doubling":
        return steps + 2 * fold, (steps + 2 * fold) * n, (steps + fold) * n
    if algorithm in ("rabenseifner", "native"):
        share = (group - 1) / group
        return 2 * steps + 2 * fold, (2 * share + 2 * fold) * n, (share + fold) * n
    if algorithm == "hierarchical":
        k = max(1, min(int(ranks_per_node), p))
        nodes = -(-p // k)
        if p % k == 0:
            # the sharded form: every rank drives its own n/k shard across the nodes
            a_in, b_in, c_in = coefficients("ring", n, k)
            a_x, b_x, c_x = coefficients("ring", n / k, nodes)
            return a_in + a_x, b_in + b_x, c_in + c_x
        depth = math.ceil(math.log2(k)) if k > 1 else 0
        ring = coefficients("ring", n, nodes)
        return 2 * depth + ring[0], 2 * depth * n + ring[1], depth * n + ring[2]
    raise ValueError(f"no cost model for algorithm {algorithm!r}; modelled: {MODELLED}")


def wire_bytes(algorithm: str, nbytes: float, p: int, rank: int, ranks_per_node: int = 1) -> tuple[float, float]:
    """(sent, received) bytes of rank `rank` in one allreduce of `nbytes` over `p` ranks, as the schedules
    in `hpcdl.comm` post them (`comm.traffic` counts the same; exact when p divides the element count).

    Ranks of a hierarchical run sit in nodes of `ranks_per_node` consecutive ranks, as with
    `comm.ranks_per_node`; the last node is smaller when it does not divide p.
    """
    n, p, rank = float(nbytes), int(p), int(rank)
    if not 0 <= rank < p:
        raise ValueError(f"rank {rank} is outside 0..{p - 1}")
    if p == 1 or n == 0:
        return 0.0, 0.0
    if algorithm == "ring":
        return 2 * (p - 1) / p * n, 2 * (p - 1) / p * n
    if algorithm in ("recursive_doubling", "rabenseifner", "native"):
        group, _ = _power_of_two_below(p)
        rem = p - group
        inside = math.log2(group) * n if algorithm == "recursive_doubling" else 2 * (group - 1) / group * n
        if rank < 2 * rem and rank % 2 == 0:
            return n, n  # folded out: its vector goes up, the sum comes back
        if rank < 2 * rem:
            return inside + n, inside + n  # the partner that folds it in and sends the sum back
        return inside, inside
    if algorithm == "hierarchical":
        k = max(1, min(int(ranks_per_node), p))
        if p % k == 0:
            return 2 * (p - 1) / p * n, 2 * (p - 1) / p * n
        nodes = -(-p // k)
        size = k if rank // k < nodes - 1 else p - (nodes - 1) * k
        q = rank % k
        sent = received = 0.0
        mask = 1
        while mask < size:  # binomial reduce onto local rank 0, then its mirror image, the broadcast
            if q & mask:
                sent, received = sent + n, received + n
                break
            if q + mask < size:
                sent, received = sent + n, received + n
            mask <<= 1
        if q == 0:
            ring = 2 * (nodes - 1) / nodes * n
            sent, received = sent + ring, received + ring
        return sent, received
    raise ValueError(f"no cost model for algorithm {algorithm!r}; modelled: {MODELLED}")


def allreduce_time(algorithm: str, nbytes: float, p: int, costs: Costs | None = None, ranks_per_node: int = 1) -> float:
    costs = costs or DEFAULT_COSTS[algorithm]
    a, b, c = coefficients(algorithm, nbytes, p, ranks_per_node)
    return a * costs.alpha + b * costs.beta + c * costs.gamma


def _column_scale(A: np.ndarray) -> np.ndarray:
    scale = np.abs(A).max(axis=0)
    return np.where(scale > 0, scale, 1.0)


def _identifiable(A: np.ndarray, columns: list[int]) -> bool:
    """Whether the samples determine every coefficient in `columns` (no two proportional)."""
    sub = A[:, columns] / _column_scale(A[:, columns])
    return np.linalg.matrix_rank(sub, tol=1e-9) == len(columns)


def fit(samples: Iterable[tuple[int, float, float]], algorithm: str, gamma: float | None = None,
        ranks_per_node: int = 1, alpha: float | None = None) -> Costs:
    """Least-squares α, β (and γ) from (p, nbytes, seconds) samples of one algorithm.

    The ring's and Rabenseifner's β and γ coefficients are always 2 : 1, so
    their samples cannot tell the two apart; recursive doubling's can, given
    both power-of-two and other p. γ is fitted only when `gamma` is None and
    the samples separate it; otherwise it is held at `gamma` (the benchmark
    measures it directly as the time per byte of a local add; 0 folds the
    reduction cost into β). A given `alpha` is held too, and only β (γ) fitted.
    """
    rows, times = [], []
    for p, nbytes, seconds in samples:
        coef = coefficients(algorithm, nbytes, p, ranks_per_node)
        if seconds > 0 and any(coef):
            rows.append(coef)
            times.append(seconds)
    if len(rows) < 2:
        raise ValueError(f"need at least two samples with p > 1 and n > 0 to fit {algorithm}")
    A, t = np.asarray(rows, dtype=float), np.asarray(times, dtype=float)
    A, rhs = A / t[:, None], np.ones_like(t)  # relative error: every sample counts alike
    held = {} if alpha is None else {0: float(alpha)}  # column index -> value held fixed
    if gamma is not None:
        held[2] = float(gamma)
    elif not _identifiable(A, [i for i in range(3) if i not in held]):
        held[2] = 0.0
    free = [i for i in range(3) if i not in held]
    for i, value in held.items():
        rhs = rhs - A[:, i] * value
    scale = _column_scale(A[:, free])
    solution = np.linalg.lstsq(A[:, free] / scale, rhs, rcond=None)[0] / scale
    values = dict(held)
    values.update(zip(free, (float(x) for x in solution)))
    return Costs(values[0], values[1], values[2])


def fit_bench(result: dict | list[dict], gamma: float | None = None, large_bytes: int | None = None) -> dict[str, Costs]:
    """Costs per algorithm from one or more `hpcdl bench allreduce --json` results.

    γ defaults to the local add cost the benchmark measured (`gamma_s_per_byte`).
    Where mid-size messages stay in cache, one straight line through all
    sizes underestimates large transfers several-fold (seen on the
    development host above ~8 MiB). `large_bytes` then refits β on the
    messages of at least that size with α held from the all-size fit, so both
    ends of the curve, latency and DRAM bandwidth, are right.
    """
    results = result if isinstance(result, list) else [result]
    if gamma is None:
        measured = [r["gamma_s_per_byte"] for r in results if r.get("gamma_s_per_byte")]
        gamma = float(np.median(measured)) if measured else None
    samples: dict[str, list] = {}
    for res in results:
        for row in res["sweep"]:
            if row["algorithm"] in MODELLED:
                samples.setdefault(row["algorithm"], []).append((res["world"], row["bytes"], row["median_s"]))
    costs = {name: fit(s, name, gamma) for name, s in samples.items() if len(s) >= 2}
    if large_bytes:
        for name, s in samples.items():
            large = [x for x in s if x[1] >= large_bytes]
            if name in costs and len(large) >= 2:
                costs[name] = fit(large, name, costs[name].gamma, alpha=costs[name].alpha)
    return costs


def predict_step_time(P: int, compute_s: float, grad_bytes: float, algorithm: str = "ring",
                      costs: dict[str, Costs] | Costs | None = None, overlap: float = 0.0) -> float:
    """Step time on P ranks: compute plus the allreduce of the gradients.

    `overlap` in [0, 1] is the share of the allreduce hidden behind backward
    (0: none, as measured on the development host); `algorithm="auto"` takes
    the fastest modelled algorithm.
    """
    if algorithm == "auto":
        return min(predict_step_time(P, compute_s, grad_bytes, name, costs, overlap) for name in MODELLED if name != "hierarchical")
    if isinstance(costs, dict):
        costs = costs.get(algorithm)
    comm_s = allreduce_time(algorithm, grad_bytes, P, costs)
    hidden = min(max(0.0, min(1.0, overlap)) * comm_s, compute_s)
    return compute_s + comm_s - hidden


# -- ranks that time-share cores ----------------------------------------------------------------

def core_occupancy(p: int, cores: int) -> list[int]:
    """Ranks on each core when p ranks spread as evenly as the scheduler can: p mod cores cores hold one more."""
    p, cores = int(p), max(1, int(cores))
    base, extra = divmod(p, cores)
    return [base + 1] * extra + [base] * (cores - extra)


def shared_core_pace(p: int, cores: int, mean_wall_s: float, mean_cpu_s: float) -> tuple[float, float]:
    """(seconds per step the slowest rank computes, pinned weight) for p ranks time-sharing `cores` cores.

    A synchronous step waits for the slowest rank of *that step*; per-rank means
    understate it when the slow ranks change from step to step. Two limits,
    from ranks ÷ cores alone:

    * pinned: within a step each rank stays on its core. A core holding k_j ranks
      stretches each of them k_j-fold, so with CPU seconds c per rank the mean
      wall compute is c·Σk_j²/p while the step waits for ceil(p/cores)·c;
    * fair: the scheduler moves ranks within the step, every rank gets
      cores/p of a core, and every rank's wall compute is (p/cores)·c: the
      mean is the maximum.

    The measured stretch (mean wall ÷ mean CPU seconds of compute per rank)
    places the run between the two: weight w = 0 at p/cores, 1 at Σk_j²/p,
    clipped. The pace is the measured mean wall compute times
    1 + w·(ceil(p/cores)·p/Σk_j² - 1), the pinned limit's max ÷ mean. Nothing is fitted: when cores divide p
    (or p <= cores) the limits coincide and the pace is the mean wall compute;
    stretch beyond either limit (context switches, caches refilled after each)
    is in the measured wall time and carried along.
    """
    k = core_occupancy(p, cores)
    fair = p / max(1, int(cores))
    pinned_mean = sum(x * x for x in k) / p
    busiest = max(k)
    if pinned_mean <= fair + 1e-12 or mean_cpu_s <= 0:
        return float(mean_wall_s), 0.0
    stretch = mean_wall_s / mean_cpu_s
    weight = min(1.0, max(0.0, (stretch - fair) / (pinned_mean - fair)))
    return float(mean_wall_s) * (1.0 + weight * (busiest / pinned_mean - 1.0)), weight
