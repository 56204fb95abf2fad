"""`auto`: choose the allreduce algorithm by message size, from measurements where they apply.

Two sources, and `describe()` (the training banner, `hpcdl info`) says which
one is in use and from what data:

* **measured**: the crossover rules of a table measured at *this* world size
  P on this kind of machine (same logical CPU count and MPI library, see
  `machine_fingerprint`; every rank must match).
* **model**: otherwise, the α-β-γ cost model (`hpcdl.perfmodel`) with the
  costs the table was fitted to (saved by `--save-crossovers`), or
  perfmodel's defaults; the fastest modelled algorithm for each size at
  this P. A table measured at another P is never applied as it stands.

The table comes from `hpcdl bench allreduce --save-crossovers PATH`, which
records, for the world size it ran at, the fastest algorithm at each
measured size and puts the switch points halfway (geometrically) between
neighbouring sizes with different winners. Tables for several world sizes
merge into one file. Without a file, `DEFAULT_TABLE` (measured on the
2-core development host, see its `source`) is used: rerun the benchmark on
the target machine, because crossovers depend on the network and on p.

Shared windows: with `shared_window=True` (the trainer's `comm.shared_window`)
one algorithm holds the window that `zeros` allocates in: `shm` when the
rules name it (the bench times shm on a buffer in its window), otherwise the
algorithm of the last rule if it has a window transport (ring, hierarchical).
Where shm is named but no window may be used, or the ranks span nodes, the
ring takes its sizes, and `describe()` says so.

Format::

    {"format": "hpcdl-crossovers/1", "source": "...",
     "by_ranks": {"2": [{"up_to_bytes": 65536, "algorithm": "recursive_doubling"},
                        {"up_to_bytes": null,  "algorithm": "ring"}]}}
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from hpcdl.comm.base import Communicator
from hpcdl.comm.window import shares_memory
from hpcdl.errors import ConfigError

FORMAT = "hpcdl-crossovers/1"
CROSSOVERS_ENV = "HPCDL_CROSSOVERS"

# From `mpiexec -n P hpcdl bench allreduce --repeats 15 --json ...` on the 2-core development
# host (shared memory, MPICH 5.0, float32, machine otherwise idle), rounded by hand. The saved
# rules were, at P=2: recursive doubling <= 8 KiB, native <= 512 KiB, Rabenseifner <= 8 MiB,
# ring above; below 512 KiB the three small-message choices were within 6 % of each other and
# at P=2 Rabenseifner and the ring send the same messages (within 5 % from 1 MiB up), so the
# table keeps one name for each regime. P=3 ran oversubscribed (3 ranks on 2 cores): native
# up to 2 MiB, the ring above (0.16x native's time at 100 MiB).
DEFAULT_TABLE = {
    "format": FORMAT,
    "source": "shipped default: 2-core shared-memory dev host, MPICH 5.0, float32 (see hpcdl/comm/auto.py)",
    "machine": {"cpus": 2, "mpi": "MPICH Version: 5.0"},
    "by_ranks": {
        "2": [
            {"up_to_bytes": 524288, "algorithm": "native"},
            {"up_to_bytes": None, "algorithm": "ring"},
        ],
        "3": [
            {"up_to_bytes": 2097152, "algorithm": "native"},
            {"up_to_bytes": None, "algorithm": "ring"},
        ],
    },
}


def _validate(table: dict, where: str) -> dict:
    from hpcdl.comm import ALGORITHMS

    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("by_ranks"), dict):
        raise ConfigError(f"{where}: not a crossover table (expected format {FORMAT!r} with a 'by_ranks' object)")
    for p, rows in table["by_ranks"].items():
        if not str(p).isdigit() or not isinstance(rows, list) or not rows:
            raise ConfigError(f"{where}: by_ranks[{p!r}] must map a world size to a non-empty list of rules")
        for row in rows:
            name = row.get("algorithm") if isinstance(row, dict) else None
            if name not in ALGORITHMS or name == "auto":
                raise ConfigError(f"{where}: by_ranks[{p!r}] names unknown algorithm {name!r}")
        if rows[-1].get("up_to_bytes") is not None:
            raise ConfigError(f"{where}: by_ranks[{p!r}] must end with an 'up_to_bytes': null rule")
    return table


def load_table(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"comm.crossovers: file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"comm.crossovers: cannot read {path}: {exc}") from None
    return _validate(table, str(path))


def rules_from_timings(median_s: dict[int, dict[str, float]], margin: float = 0.05) -> list[dict]:
    """Rules for one world size from {nbytes: {algorithm: median seconds}}.

    The algorithm chosen for the previous size is kept unless another one is
    faster by more than `margin`: noisy ties must not produce a table that
    flips back and forth between sizes.
    """
    sizes = sorted(median_s)
    winners = []
    for n in sizes:
        times = median_s[n]
        best = min(times, key=times.get)
        keep = winners[-1] if winners else None
        winners.append(keep if keep in times and times[best] >= times[keep] * (1 - margin) else best)
    rules = []
    for i, (n, name) in enumerate(zip(sizes, winners)):
        if i + 1 < len(sizes) and winners[i + 1] != name:
            rules.append({"up_to_bytes": int(math.sqrt(n * sizes[i + 1])), "algorithm": name})
    rules.append({"up_to_bytes": None, "algorithm": winners[-1] if winners else "ring"})
    return rules


def machine_fingerprint() -> dict:
    """What makes measurements from one machine apply to another: logical CPUs, CPU model, MPI library."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mpi_version = ""
    try:
        from mpi4py import MPI

        mpi_version = " ".join(MPI.Get_library_version().split()[:3])
    except ImportError:
        pass
    return {"cpus": os.cpu_count() or 0, "cpu_model": model, "mpi": mpi_version}


def same_machine(recorded: dict | None, here: dict) -> bool:
    """Every field the table recorded matches here (a recorded MPI version may be a prefix)."""
    if not recorded:
        return False
    for key, value in recorded.items():
        have = here.get(key)
        if key == "mpi" and isinstance(value, str) and isinstance(have, str):
            if not " ".join(have.split()).startswith(" ".join(value.split())):
                return False
        elif have != value:
            return False
    return True


def save_rules(path: str | os.PathLike, world_size: int, rules: list[dict], source: str,
               machine: dict | None = None, costs: dict | None = None) -> dict:
    """Write (or merge into) a crossover file; other world sizes measured on the same machine are kept."""
    path = Path(path)
    table = load_table(path) if path.exists() else {"format": FORMAT, "source": source, "by_ranks": {}}
    if machine is not None and table.get("machine") not in (None, machine):
        table = {"format": FORMAT, "source": source, "by_ranks": {}}  # another machine's rules do not merge
    if machine is not None:
        table["machine"] = machine
    if costs:
        table["costs"] = costs
        table["costs_from"] = f"P={world_size}: {source}"
    table["by_ranks"][str(world_size)] = rules
    table["source"] = source
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    return table


def rules_for(table: dict, world_size: int) -> tuple[int, list[dict]] | None:
    """(P, rules) when the table was measured at exactly `world_size`, else None."""
    rules = table["by_ranks"].get(str(world_size))
    return (world_size, rules) if rules else None


# Sizes the model is evaluated at to turn it into rules: 64 B .. 2 GiB, four per octave.
_MODEL_SIZES = [int(2 ** (e / 4)) for e in range(24, 125)]


def model_rules(world_size: int, costs: dict | None = None, candidates=("native", "ring", "recursive_doubling",
                                                                          "rabenseifner")) -> list[dict]:
    """Rules from the α-β-γ model at `world_size`: the cheapest candidate at each size, switch points halfway."""
    from hpcdl import perfmodel

    fitted = {name: perfmodel.Costs(**c) if isinstance(c, dict) else c for name, c in (costs or {}).items()}
    table = {}
    for n in _MODEL_SIZES:
        table[n] = {name: perfmodel.allreduce_time(name, n, world_size, fitted.get(name) or perfmodel.DEFAULT_COSTS[name])
                    for name in candidates}
    return rules_from_timings(table, margin=0.0)


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


class AutoCommunicator(Communicator):
    """Dispatches each allreduce to the algorithm its size calls for."""

    name = "auto"

    def __init__(self, mpi_comm=None, crossovers: str | os.PathLike | dict | None = None, **options):
        super().__init__(mpi_comm, **{k: v for k, v in options.items() if k in ("piece_kb", "pipeline_depth")})
        from hpcdl.comm import create

        crossovers = crossovers or os.environ.get(CROSSOVERS_ENV) or None
        if crossovers is None:
            self.table, self.table_path = DEFAULT_TABLE, "shipped default"
        elif isinstance(crossovers, dict):
            self.table, self.table_path = _validate(crossovers, "crossover table"), "given table"
        else:
            self.table, self.table_path = load_table(crossovers), str(crossovers)
        here = machine_fingerprint()
        found = rules_for(self.table, self.size)
        # Collective: every rank must take the same decision, or they would run different algorithms.
        matches = same_machine(self.table.get("machine"), here)
        if self.size > 1:
            matches = all(self._comm.allgather(matches))
        measured_at = sorted(int(p) for p in self.table["by_ranks"])
        if found is not None and matches:
            self.mode = "measured"
            self.table_ranks, self.rules = found
            self.why = f"crossovers measured at P={self.size} on this kind of machine ({self.table.get('source', '?')})"
        else:
            self.mode = "model"
            self.table_ranks = None
            costs = self.table.get("costs") if matches else None
            self.rules = model_rules(self.size, costs)
            if found is None:
                reason = f"no crossovers measured at P={self.size} (the table has P={','.join(map(str, measured_at))})"
            else:
                reason = (f"the table's P={self.size} crossovers were measured on another kind of machine "
                          f"({self.table.get('machine') or 'not recorded'}, here {here})")
            source = (f"costs fitted {self.table.get('costs_from', '')}" if costs
                      else "perfmodel.DEFAULT_COSTS (fitted on the 2-core development host)")
            self.why = f"alpha-beta-gamma model: {reason}; {source}"
        windowed = bool(options.pop("shared_window", None))
        if any(rule["algorithm"] == "shm" for rule in self.rules):
            # A measured table may name shm (the bench times it on a buffer in its window). Where it cannot
            # run, the ring takes its sizes (collective: every rank holds the same rules).
            reason = ("comm.shared_window is off or not allowed here (fault tolerance, GPU)" if not windowed
                      else "the ranks span nodes" if self.size > 1 and not shares_memory(self._comm.raw) else None)
            if reason:
                self.rules = [{**rule, "algorithm": "ring"} if rule["algorithm"] == "shm" else rule
                              for rule in self.rules]
                self.why += f"; its shm rules run as ring ({reason})"
        names = sorted({rule["algorithm"] for rule in self.rules})
        # A buffer lives in one window, so one algorithm gets the shared window: shm where the rules name
        # it (it was measured that way), otherwise the one for the largest messages (the gradient buckets)
        # when it has a window transport. The others reduce a window buffer as ordinary memory.
        owner = "shm" if "shm" in names else self.rules[-1]["algorithm"]
        self.algorithms = {name: create(name, self.mpi_comm, **options,
                                        **({"shared_window": windowed} if name == owner and windowed else {}))
                           for name in names}
        self.window_owner = self.algorithms[owner] if self.algorithms[owner].shared_memory else None

    @property
    def shared_memory(self) -> bool:
        return self.window_owner is not None

    def zeros(self, n: int, dtype=np.float32):
        """A zeroed buffer in the shared window of `window_owner`, when there is one (collective)."""
        return self.window_owner.zeros(n, dtype) if self.window_owner is not None else np.zeros(n, dtype=dtype)

    def choose(self, nbytes: int) -> str:
        for rule in self.rules:
            if rule["up_to_bytes"] is None or nbytes <= rule["up_to_bytes"]:
                return rule["algorithm"]
        raise AssertionError("validated tables end with an open rule")

    def _start_checked(self, buf, op, tag, blocking):
        return self.algorithms[self.choose(buf.nbytes)]._start_checked(buf, op, tag, blocking)

    def describe(self) -> str:
        where = f"; {self.window_owner.name} reduces buffers in its shared window" if self.window_owner else ""
        lines = [f"auto: {self.size} ranks, {self.mode}: {self.why} [{self.table_path}]{where}"]
        low = 0
        for rule in self.rules:
            high = rule["up_to_bytes"]
            span = f"{_fmt_bytes(low)} .. {_fmt_bytes(high)}" if high is not None else f"> {_fmt_bytes(low)}"
            lines.append(f"  {span:>24}  {rule['algorithm']}")
            low = high if high is not None else low
        return "\n".join(lines)
