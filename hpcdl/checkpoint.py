"""Checkpoints: an atomic, self-verifying HDF5 file per save, and when to save.

File format (one HDF5 file, readable with plain h5py):

* a nested state dict maps onto the file tree: dicts are groups, arrays (and
  `bytes`) are datasets, everything else (Python/NumPy scalars, str, None,
  flat lists/tuples of plain scalars) is an attribute of its group;
* every group carries `hpcdl.kinds`, a JSON object {key: kind} in insertion
  order, so `load` returns exactly the keys, order and Python types it was
  given (a Python int stays an int, even one wider than 64 bits such as a
  PCG64 state; a `np.float32` scalar stays a `np.float32`);
* every dataset carries `hpcdl.crc32`, a CRC-32 of its bytes, dtype and shape,
  and every group one over its key table and attribute values, all checked
  on load (zlib's CRC-32 runs at ~7 GB/s here, 3x SHA-256, and a checkpoint
  needs corruption detection, not an adversary-proof digest);
* the file uses HDF5 1.8+ object headers, which HDF5 checksums itself, and
  no variable-length strings (see `_INLINE_TEXT_LIMIT`), so flipping any
  single byte of a checkpoint is either harmless or reported, never a hang
  or a silently wrong value (tests/test_checkpoint.py flips every byte);
* the root attribute `hpcdl.complete = True` is written last.

A save never exposes a partial file: it writes `.name.tmp-<pid>` in the
target directory, fsyncs it, renames it over the target (atomic on POSIX),
then fsyncs the directory so the rename itself survives a crash.

Nothing here depends on the world size: the trainer saves replicated state
from rank 0 and any number of ranks can resume from it.

Testing hook: `HPCDL_FAULT_INJECT=checkpoint-write` (or `checkpoint-write:<n>`
for the n-th `save` call in the process, counting from 1) SIGKILLs the
process halfway through writing the temp file, after some datasets are on
disk and before the rename. Use it to prove that a crash mid-save leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from hpcdl import faults
from hpcdl.atomic import atomic_output
from hpcdl.errors import ConfigError, DataError, UserError

FORMAT_VERSION = 1
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_RESERVED_PREFIX = "hpcdl."
# Lowest HDF5 format with checksummed object headers; highest readable by HDF5 1.10.
_LIBVER = ("v108", "v110")
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.h5$")
_TEMP_NAME = re.compile(r"^\.ckpt-\d+\.h5\.tmp-(\d+)$")

_saves_in_this_process = 0


class CheckpointWarning(UserWarning):
    """A checkpoint file was skipped or cleaned up; the message names it."""


# -- encoding one state tree -------------------------------------------------------

# Text is stored as fixed-length strings inside the (checksummed) object
# header, never as HDF5 variable-length strings: those live in the global
# heap, which has no checksum, and a flipped length byte there can make
# HDF5 loop forever on read. Long text goes to a CRC-checked uint8 dataset.
_INLINE_TEXT_LIMIT = 16 * 1024


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # CuPy (or any device array with a host copy method): save from the host.
    return value.get()


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or (
        type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "get")
    )


def _plain_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool, int, float))


def _crc32(array: np.ndarray) -> int:
    """CRC-32 over dtype, shape and bytes, so a damaged header cannot pass either."""
    header = f"{array.dtype.str}|{array.shape}".encode()
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return zlib.crc32(flat, zlib.crc32(header))


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _leaf_text(kind: str, value) -> str:
    """Canonical text of an attribute leaf; equal before saving and after loading."""
    if kind == "none":
        return ""
    if kind in ("bool", "int"):
        return str(int(value))
    if kind == "float":
        return float(value).hex()
    if kind in ("list", "tuple"):
        return json.dumps(list(value))
    if kind.startswith("numpy:"):
        return np.asarray(value).tobytes().hex()
    return value


def _group_crc32(table: str, kinds: dict, attributes: dict) -> int:
    """CRC-32 over a group's key table and its attribute leaves.

    HDF5 checksums object headers but not everything attributes may point
    to (heaps), so attributes get a check of their own, computed from the
    Python values before encoding and again after decoding.
    """
    crc = zlib.crc32(_encode_text(table))
    for key, value in attributes.items():
        kind = kinds[key]
        crc = zlib.crc32(_encode_text(f"{key}\0{kind}\0{_leaf_text(kind, value)}\0"), crc)
    return crc


def _check_key(key, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"checkpoint state key {key!r} at {where or '/'}: keys must be non-empty str")
    if "/" in key or key in (".", ".."):
        raise ValueError(f"checkpoint state key {key!r} at {where or '/'}: '/', '.' and '..' are not allowed")
    if key.startswith(_RESERVED_PREFIX):
        raise ValueError(f"checkpoint state key {key!r} at {where or '/'}: prefix {_RESERVED_PREFIX!r} is reserved")
    return key


def _count_datasets(state: dict) -> int:
    count = 0
    for value in state.values():
        if isinstance(value, dict):
            count += _count_datasets(value)
        elif _is_array(value) or isinstance(value, bytes):
            count += 1
    return count


def _create_checked_dataset(group, name: str, array: np.ndarray):
    # Contiguous and uncompressed: checkpoint speed matters more than size.
    dataset = group.create_dataset(name, data=array)
    dataset.attrs["hpcdl.crc32"] = np.uint32(_crc32(array))
    return dataset


def _put_text(group, name: str, text: str) -> None:
    raw = _encode_text(text)
    if len(raw) > _INLINE_TEXT_LIMIT:
        _create_checked_dataset(group, name, np.frombuffer(raw, dtype=np.uint8))
    elif raw and b"\0" not in raw:
        group.attrs[name] = np.bytes_(raw)
    else:
        # Fixed-length strings lose trailing NULs and cannot be empty.
        group.attrs[name] = np.frombuffer(raw, dtype=np.uint8)


class _Writer:
    """Walks a state dict into an open h5py file, calling the fault hook halfway."""

    def __init__(self, file, total_datasets: int, fault_hook: Callable | None, temp_path: Path):
        self.file = file
        self.written = 0
        self.hook_at = max(1, (total_datasets + 1) // 2) if fault_hook else None
        self.fault_hook = fault_hook
        self.temp_path = temp_path

    def write_group(self, group, state: dict, where: str) -> None:
        kinds, attributes = {}, {}
        for key, value in state.items():
            _check_key(key, where)
            path = f"{where}/{key}"
            if isinstance(value, dict):
                kinds[key] = "dict"
                self.write_group(group.create_group(key, track_order=True), value, path)
            elif _is_array(value):
                kinds[key] = "array"
                self._write_array(group, key, _to_numpy(value), path)
            elif isinstance(value, bytes):
                kinds[key] = "bytes"
                self._write_array(group, key, np.frombuffer(value, dtype=np.uint8), path)
            else:
                kinds[key] = self._write_attribute(group, key, value, path)
                attributes[key] = value
        table = json.dumps(kinds)
        _put_text(group, "hpcdl.kinds", table)
        group.attrs["hpcdl.crc32"] = np.uint32(_group_crc32(table, kinds, attributes))

    def _write_array(self, group, key: str, array: np.ndarray, path: str) -> None:
        if array.dtype.hasobject or array.dtype.kind == "U":
            raise TypeError(f"checkpoint state {path}: dtype {array.dtype} cannot be stored; use numbers or bytes")
        # (np.ascontiguousarray would turn a 0-d array into shape (1,).)
        array = array if array.flags.c_contiguous else array.copy(order="C")
        _create_checked_dataset(group, key, array)
        self.written += 1
        if self.written == self.hook_at:
            self.file.flush()
            self.fault_hook(self.temp_path)

    @staticmethod
    def _write_attribute(group, key: str, value, path: str) -> str:
        attrs = group.attrs
        if value is None:
            attrs[key] = np.uint8(0)  # a placeholder: the kind says None
            return "none"
        if isinstance(value, np.generic):
            if value.dtype.hasobject or value.dtype.kind in "SUV":
                raise TypeError(f"checkpoint state {path}: NumPy scalar of dtype {value.dtype} cannot be stored; use str or bytes")
            attrs[key] = value
            return f"numpy:{value.dtype.str}"
        if isinstance(value, bool):
            attrs[key] = np.bool_(value)
            return "bool"
        if isinstance(value, int):
            if -(2**63) <= value < 2**63:
                attrs[key] = np.int64(value)
            else:
                # Wider than int64 (e.g. a PCG64 state): keep every digit as text.
                _put_text(group, key, str(value))
            return "int"
        if isinstance(value, float):
            attrs[key] = np.float64(value)
            return "float"
        if isinstance(value, str):
            _put_text(group, key, value)
            return "str"
        if isinstance(value, (list, tuple)):
            if not all(_plain_scalar(v) for v in value):
                raise TypeError(
                    f"checkpoint state {path}: lists may hold only str, int, float, bool or None; use a dict for arrays"
                )
            _put_text(group, key, json.dumps(list(value)))
            return "list" if isinstance(value, list) else "tuple"
        raise TypeError(f"checkpoint state {path}: cannot store {type(value).__name__}")


# -- save ------------------------------------------------------------------------


def _fault_hook_from_env() -> Callable | None:
    """The SIGKILL hook when HPCDL_FAULT_INJECT asks for it on this save."""
    if any(_saves_in_this_process == (n or 1) for n in faults.requested("checkpoint-write")):
        return _kill_self
    return None


def _kill_self(temp_path: Path) -> None:
    os.write(2, f"hpcdl: {faults.FAULT_ENV}: killing pid {os.getpid()} while writing {temp_path}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save(path, state: dict, *, fault_hook: Callable[[Path], None] | None = None) -> Path:
    """Write `state` to `path` atomically; see the module docstring for the format.

    `fault_hook(temp_path)` runs once, halfway through the datasets, with the
    partial temp file flushed: tests use it to interrupt a save. Without one,
    HPCDL_FAULT_INJECT may install the SIGKILL hook.
    """
    import h5py

    global _saves_in_this_process
    _saves_in_this_process += 1
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    hook = fault_hook or _fault_hook_from_env()
    try:
        with atomic_output(path, temp=temp_path_for(path)) as temp:
            with h5py.File(temp, "w", libver=_LIBVER, track_order=True, locking=False) as file:
                file.attrs["hpcdl.format"] = FORMAT_VERSION
                writer = _Writer(file, _count_datasets(state), hook, temp)
                writer.write_group(file, state, "")
                if hook is not None and writer.written == 0:
                    file.flush()
                    hook(temp)
                file.attrs["hpcdl.complete"] = True
            # HDF5 writes its superblock and free-space info on close: atomic_output fsyncs after that.
    except OSError as exc:
        raise UserError(f"cannot write checkpoint {path}: {_first_line(exc)}") from exc
    return path


# -- load --------------------------------------------------------------------------


def _open_for_reading(path: Path):
    import h5py

    if not path.is_file():
        raise DataError(f"checkpoint {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"checkpoint {path}: empty file")
    with open(path, "rb") as raw:
        if raw.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
            raise DataError(f"checkpoint {path}: not an HDF5 file")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "unreadable"
        raise DataError(f"checkpoint {path}: {reason} HDF5 file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_dataset(path: Path, dataset, name: str) -> np.ndarray:
    out = np.empty(dataset.shape, dtype=dataset.dtype)
    try:
        if out.size:
            dataset.read_direct(out)
        stored = int(dataset.attrs["hpcdl.crc32"])
    except (OSError, KeyError) as exc:
        raise DataError(f"checkpoint {path}: cannot read dataset {name} ({_first_line(exc)})") from None
    computed = _crc32(out)
    if computed != stored:
        raise DataError(
            f"checkpoint {path}: checksum mismatch on dataset {name} "
            f"(stored crc32 {stored:08x}, computed {computed:08x}); the file is corrupt"
        )
    return out


def _get_text(path: Path, group, name: str, where: str) -> str:
    if name in group:
        raw = _read_dataset(path, group[name], where).tobytes()
    else:
        value = group.attrs[name]
        raw = value.tobytes() if isinstance(value, np.ndarray) else bytes(value)
    return raw.decode("utf-8", "surrogatepass")


def _read_attribute(path: Path, group, key: str, kind: str, where: str):
    if kind == "none":
        return None
    if kind == "str":
        return _get_text(path, group, key, where)
    if kind in ("list", "tuple"):
        items = json.loads(_get_text(path, group, key, where))
        return items if kind == "list" else tuple(items)
    if kind == "int":
        value = None if key in group else group.attrs[key]
        return int(value) if isinstance(value, np.integer) else int(_get_text(path, group, key, where))
    value = group.attrs[key]
    if kind == "bool":
        return bool(value)
    if kind == "float":
        return float(value)
    if kind.startswith("numpy:"):
        return np.dtype(kind[len("numpy:"):]).type(value)
    raise ValueError(f"unknown kind {kind!r}")


def _read_group(path: Path, group, where: str) -> dict:
    try:
        table = _get_text(path, group, "hpcdl.kinds", f"{where}/hpcdl.kinds")
        stored_crc = int(group.attrs["hpcdl.crc32"])
        kinds = json.loads(table)
    except (KeyError, OSError, ValueError) as exc:
        raise DataError(f"checkpoint {path}: group {where or '/'} has no readable key table ({_first_line(exc)})") from None
    state, attributes = {}, {}
    for key, kind in kinds.items():
        name = f"{where}/{key}"
        try:
            if kind == "dict":
                state[key] = _read_group(path, group[key], name)
            elif kind in ("array", "bytes"):
                array = _read_dataset(path, group[key], name)
                state[key] = array.tobytes() if kind == "bytes" else array
            else:
                state[key] = attributes[key] = _read_attribute(path, group, key, kind, name)
        except DataError:
            raise
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise DataError(f"checkpoint {path}: cannot read {name} ({_first_line(exc)})") from None
    if _group_crc32(table, kinds, attributes) != stored_crc:
        raise DataError(f"checkpoint {path}: checksum mismatch on the attributes of group {where or '/'}; the file is corrupt")
    return state


# What h5py raises when the bytes under a valid superblock are damaged.
_DAMAGE = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError)


def load(path) -> dict:
    """The state dict saved at `path`, arrays as NumPy; DataError says what is wrong."""
    path = Path(path)
    file = _open_for_reading(path)
    try:
        return _read_checkpoint(path, file)
    except DataError:
        raise
    except _DAMAGE as exc:
        raise DataError(f"checkpoint {path}: damaged HDF5 structure ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        try:
            file.close()
        except _DAMAGE:
            pass


def _read_checkpoint(path: Path, file) -> dict:
    version = file.attrs.get("hpcdl.format")
    if version is None:
        raise DataError(f"checkpoint {path}: not an hpcdl checkpoint (no hpcdl.format attribute)")
    if int(version) > FORMAT_VERSION:
        raise DataError(f"checkpoint {path}: format {int(version)} is newer than this hpcdl reads ({FORMAT_VERSION})")
    if not bool(file.attrs.get("hpcdl.complete", False)):
        raise DataError(f"checkpoint {path}: incomplete (no completion marker; its writer was interrupted)")
    return _read_group(path, file, "")


def verify(path) -> None:
    """Raise DataError unless `path` is a complete checkpoint whose checksums all match."""
    load(path)


# -- a run directory of checkpoints ------------------------------------------------


class CheckpointManager:
    """`directory/ckpt-{step:08d}.h5`, newest `keep` valid ones kept.

    Only rank 0 writes (the trainer saves after the allreduce, when every
    rank holds the same state); every rank may call `latest` / `resolve`.
    Invalid files are skipped with a `CheckpointWarning` naming them, never
    deleted unless older than the newest `keep` valid ones.
    """

    def __init__(self, directory, keep: int | None = 3, rank: int = 0):
        if keep is not None and keep < 1:
            raise ConfigError(f"checkpoint keep = {keep}: must be at least 1 (or None to keep all)")
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        # Full verification reads every byte; do it once per file version.
        self._valid: dict[Path, tuple[int, int]] = {}

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{int(step):08d}.h5"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every file named like a checkpoint, oldest first, unverified."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def save(self, step: int, state: dict) -> Path | None:
        """Write the checkpoint of `step` on rank 0 and prune; other ranks return None."""
        if self.rank != 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stray_temp_files()
        path = save(self.path_for(step), state)
        self._remember_valid(path)
        self._prune()
        return path

    def latest(self, *, quiet: bool = False) -> Path | None:
        """The newest checkpoint that verifies, or None; invalid ones are skipped with a warning unless `quiet`."""
        for _, path in reversed(self.checkpoints()):
            if self.is_valid(path, warn=not quiet):
                return path
        return None

    def resolve(self, spec) -> Path | None:
        """`--resume` semantics: None/"" -> None, "auto" -> `latest()`, a directory -> its latest, a file -> itself.

        An explicit file must exist and verify; otherwise DataError names it.
        """
        if spec is None or str(spec) == "":
            return None
        if str(spec) == "auto":
            return self.latest()
        path = Path(spec)
        if path.is_dir():
            found = CheckpointManager(path, keep=None, rank=self.rank).latest()
            if found is None:
                raise DataError(f"resume directory {path}: no valid checkpoint (ckpt-*.h5) in it")
            return found
        if not path.exists():
            raise DataError(f"resume checkpoint {path}: no such file")
        verify(path)
        return path

    def is_valid(self, path: Path, *, warn: bool = False) -> bool:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if self._valid.get(path) == (stat.st_size, stat.st_mtime_ns):
            return True
        try:
            verify(path)
        except DataError as exc:
            if warn:
                warnings.warn(f"skipping {exc}", CheckpointWarning, stacklevel=3)
            return False
        self._valid[path] = (stat.st_size, stat.st_mtime_ns)
        return True

    def _remember_valid(self, path: Path) -> None:
        stat = path.stat()
        self._valid[path] = (stat.st_size, stat.st_mtime_ns)

    def _prune(self) -> None:
        if self.keep is None:
            return
        kept = 0
        for _, path in reversed(self.checkpoints()):
            if kept >= self.keep:
                path.unlink(missing_ok=True)
                self._valid.pop(path, None)
            elif self.is_valid(path):
                kept += 1

    def _remove_stray_temp_files(self) -> None:
        """Temp files of saves that died mid-write (they never became checkpoints)."""
        for entry in self.directory.iterdir():
            match = _TEMP_NAME.match(entry.name)
            if match and int(match.group(1)) != os.getpid():
                entry.unlink(missing_ok=True)
                warnings.warn(f"removed {entry}: temp file of an interrupted checkpoint save", CheckpointWarning, stacklevel=3)


# -- when to save ----------------------------------------------------------------------


class CheckpointPolicy:
    """Checkpoint every `every_steps` steps and/or every `every_minutes` minutes (0 = off).

    Under MPI every rank must take the same decision, or rank 0 would enter a
    save (and the collectives around it) that the others skip. The step
    trigger is deterministic, but wall clocks and step times differ across
    ranks, so only rank 0 votes on time. Use it like this:

        vote = policy.local_vote(step)                 # on every rank
        stats[k] = float(vote)                          # a slot in the per-step stats allreduce
        ...allreduce(stats, MAX)...
        if stats[k] > 0: manager.save(step, state); policy.record_save()

    The vote rides on an allreduce the step already does, so deciding costs
    no extra collective. With one process, `due(step)` is the same as
    `local_vote(step)`.
    """

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0, *, rank: int = 0, clock=time.monotonic):
        if every_steps < 0:
            raise ConfigError(f"checkpoint every_steps = {every_steps}: must be >= 0 (0 turns it off)")
        if every_minutes < 0:
            raise ConfigError(f"checkpoint every_minutes = {every_minutes}: must be >= 0 (0 turns it off)")
        self.every_steps = int(every_steps)
        self.every_seconds = float(every_minutes) * 60.0
        self.rank = rank
        self.clock = clock
        self.last_save = clock()

    def local_vote(self, step: int, now: float | None = None) -> bool:
        """This rank's vote for saving after `step`; combine votes with a max across ranks."""
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return True
        if self.every_seconds and self.rank == 0:
            now = self.clock() if now is None else now
            return now - self.last_save >= self.every_seconds
        return False

    def due(self, step: int, now: float | None = None) -> bool:
        """Single-process decision; under MPI use the max of `local_vote` over ranks."""
        return self.local_vote(step, now)

    def record_save(self, now: float | None = None) -> None:
        """Restart the time trigger; call after every save, on every rank."""
        self.last_save = self.clock() if now is None else now


class StopSignals:
    """Turn SIGTERM/SIGUSR1 into a request to checkpoint and stop at the next step boundary.

    For Slurm's `--signal=USR1@120` (or `B:USR1@120` forwarded by
    jobs/restart_srun.sh), `scancel --signal=USR1`, and MPICH's mpiexec, which
    forwards SIGTERM and SIGUSR1 to every rank. Ranks may receive a signal at
    different steps, so the trainer ORs `requested` across ranks on its
    per-step stats allreduce before acting on it. SIGKILL still stops the
    process at once; saves are atomic, so that is safe too.

    Constructing it installs the handlers (pass `install=False` to defer);
    `restore()` or leaving the `with` block puts the previous ones back.
    Handlers can only be installed from the main thread.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), *, install: bool = True):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._signal: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict = {}
        if install:
            self.install()

    @property
    def requested(self) -> bool:
        return self._signal is not None

    @property
    def signal_name(self) -> str | None:
        return self._signal.name if self._signal is not None else None

    def _handle(self, signum, frame) -> None:
        if self._signal is None:
            self._signal = signal.Signals(signum)
            self.received_at = time.time()

    def install(self) -> "StopSignals":
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
