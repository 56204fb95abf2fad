"""α-β-γ (Hockney) cost model of the allreduce algorithms, fit from `hpcdl bench allreduce`.

A message of n bytes costs α + n·β; reducing n bytes costs n·γ. Each
algorithm's time is a·α + b·β + c·γ with coefficients that depend only on
n and p (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009). For
p' = 2^floor(log2 p) and a fold f = 1 when p is not a power of two:

    ring                2(p-1)·α + 2(p-1)/p·nβ + (p-1)/p·nγ
    recursive_doubling  (log2 p' + 2f)·α + (log2 p' + 2f)·nβ + (log2 p' + f)·nγ
    rabenseifner        (2 log2 p' + 2f)·α + (2(p'-1)/p' + 2f)·nβ + ((p'-1)/p' + f)·nγ
    hierarchical        binomial reduce + bcast in a node of k ranks, ring over p/k leaders
    native              modelled as rabenseifner (MPICH's and Open MPI's large-message choice)

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
        depth = math.ceil(math.log2(k)) if k > 1 else 0
        ring = coefficients("ring", n, nodes)
        return 2 * depth + ring[0], 2 * depth * n + ring[1], depth * n + ring[2]
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
