"""Fail fast instead of hanging: the #1 complaint about MPI training jobs.

* `install_abort_on_exception`: an uncaught exception on one rank aborts the
  whole job with one header line naming the rank, instead of leaving the
  other ranks blocked in their next collective forever. (Measured with the
  MPICH 5.0 wheel: a plain `raise` on rank 1 of 3 hangs the job; the dying
  rank itself blocks in MPI_Finalize. `sys.exit(2)` on one rank hangs too.)
* `abort`: the same for a user error only one rank can see.
* `check_consistency`: one allgather at start-up that fails on every rank,
  with the same message, when ranks built different models or configs.
* `StallWatchdog`: when a rank has waited in a collective for too long, ask
  every other rank where it is (on a side communicator, from a helper
  thread) and print one report naming the straggler.

A dead rank is the launcher's business: MPICH's hydra `mpiexec` kills every
other rank within ~0.1 s of one being SIGKILLed and exits with 9 (measured
here). Under Slurm use `srun --kill-on-bad-exit=1` for the same. A rank that
hangs without dying is what the watchdog reports, and with `abort_after_s`
it turns that hang into an abort the restart wrappers in jobs/ recover from.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import socket
import sys
import threading
import time
import traceback
import warnings

from hpcdl.errors import UserError


class ConsistencyError(UserError):
    """Ranks disagree on something they must share. Raised on every rank with the same message."""

    # Every rank raises it at the same time, so the CLI may print it once on
    # rank 0 and exit 2 everywhere, without an MPI abort.
    collective = True

    def __init__(self, message: str, mismatches: dict[str, dict[str, list[int]]]):
        super().__init__(message)
        self.mismatches = mismatches


# -- where am I ------------------------------------------------------------------------

_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
_ABORT_GRACE_S = 0.2  # see _abort_world


def _live_mpi():
    """The mpi4py.MPI module if MPI is initialised and not finalised, else None.

    Never imports mpi4py: a process that did not import it has no MPI to abort.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return None
    try:
        return mpi if mpi.Is_initialized() and not mpi.Is_finalized() else None
    except Exception:
        return None


def world_position() -> tuple[int, int]:
    """(rank, size) in COMM_WORLD, or as the launcher announced them before MPI starts."""
    mpi = _live_mpi()
    if mpi is not None:
        return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
    from hpcdl.threads import launcher_world_size

    for var in _LAUNCHER_RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value), launcher_world_size()
    return 0, 1


def _who() -> str:
    rank, size = world_position()
    return f"rank {rank}/{size} on {socket.gethostname()}"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _abort_world(code: int) -> None:
    """MPI_Abort(code) when other ranks are running (never returns then); else return."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    mpi = _live_mpi()
    if mpi is not None and mpi.COMM_WORLD.Get_size() > 1:
        # The launcher kills every rank as soon as it hears of the abort, and a line still in the
        # pipe to its proxy is dropped with them: on a loaded node the reason then never reaches
        # the user. A moment's grace lets the proxy forward it.
        time.sleep(_ABORT_GRACE_S)
        # hydra's mpiexec exits with this code. A plain exit on one rank would
        # leave the others blocked, or race with their SIGKILL for the exit code.
        mpi.COMM_WORLD.Abort(code)


# -- uncaught exceptions -------------------------------------------------------------


def _exit_code_of(exc: BaseException | None) -> int:
    # A UserError must keep exit code 2 through the abort: the restart
    # wrappers stop retrying on 2.
    return int(getattr(exc, "exit_code", 1)) if isinstance(exc, UserError) else 1


def _report_and_abort(exc_type, exc, tb, thread_name: str | None) -> None:
    where = f" in thread {thread_name!r}" if thread_name else ""
    message = _one_line(exc) if exc is not None and str(exc) else ""
    header = f"hpcdl: {_who()}: uncaught {exc_type.__name__}{where}{': ' + message if message else ''} — aborting all ranks"
    try:
        sys.stderr.write(header + "\n")
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    except Exception:
        pass
    _abort_world(_exit_code_of(exc))


def _excepthook(exc_type, exc, tb) -> None:
    _report_and_abort(exc_type, exc, tb, None)
    # Alone: returning lets Python exit with status 1 as usual.


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    # A dead helper thread (prefetch, reducer) would leave the main thread
    # waiting on it forever, so it brings the job down too.
    _report_and_abort(args.exc_type, args.exc_value, args.exc_traceback, args.thread.name if args.thread else "?")
    os._exit(_exit_code_of(args.exc_value))


def install_abort_on_exception() -> None:
    """Make an uncaught exception on any rank or thread abort the whole job, loudly.

    Cheap and safe without MPI: the hook only looks for mpi4py in sys.modules
    when it fires. Also enables `faulthandler`, so a segfault prints the
    Python stack before the launcher reaps the job.
    """
    import faulthandler

    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    if not faulthandler.is_enabled():
        faulthandler.enable()


def abort(message: str, code: int = 2) -> None:
    """Print one line naming this rank and stop the whole job with `code` (2: user error).

    For an error only this rank can see (a file only it failed to read):
    raising would hang the others in their next collective.
    """
    sys.stderr.write(f"hpcdl: {_who()}: {_one_line(message, 1000)} — aborting all ranks\n")
    _abort_world(code)
    if threading.current_thread() is threading.main_thread():
        raise SystemExit(code)
    os._exit(code)


# -- start-up consistency --------------------------------------------------------------

_SHOW_RAW_UP_TO = 24


def _fingerprint(value) -> tuple[str, str]:
    """(digest to compare, text to show): short printable values show as themselves."""
    text = str(value)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    shown = repr(text) if len(text) <= _SHOW_RAW_UP_TO and text.isprintable() else digest[:12]
    return digest, shown


def format_ranks(ranks) -> str:
    """'rank 3' or 'ranks 0-2,5': runs of consecutive ranks collapse to ranges."""
    ranks = sorted(ranks)
    runs, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            runs.append(str(start) if start == r else f"{start}-{r}")
            start = None
    label = "rank" if len(ranks) == 1 else "ranks"
    return f"{label} {','.join(runs)}"


def check_consistency(comm, fields: dict[str, str]) -> None:
    """Raise ConsistencyError on every rank unless all ranks passed equal `fields`.

    One allgather of a digest per field (a few hundred bytes per rank), so it
    returns in well under a second. Fields are things like the arena
    signature, a config hash, the hpcdl version and the world batch size.
    """
    mine = {name: _fingerprint(value) for name, value in fields.items()}
    everyone = comm.allgather(mine)
    names = list(everyone[0]) + sorted({n for rank in everyone for n in rank} - set(everyone[0]))
    mismatches: dict[str, dict[str, list[int]]] = {}
    for name in names:
        groups: dict[str, tuple[str, list[int]]] = {}
        for rank, rank_fields in enumerate(everyone):
            digest, shown = rank_fields.get(name, ("", "<missing>"))
            groups.setdefault(digest, (shown, []))[1].append(rank)
        if len(groups) > 1:
            # The largest group first: usually the majority is right.
            ordered = sorted(groups.values(), key=lambda g: (-len(g[1]), g[1][0]))
            mismatches[name] = {shown: ranks for shown, ranks in ordered}
    if not mismatches:
        return
    parts = []
    for name, groups in mismatches.items():
        have = ", ".join(f"{format_ranks(r)} {'have' if len(r) > 1 else 'has'} {shown}" for shown, r in groups.items())
        parts.append(have if len(mismatches) == 1 else f"{name}: {have}")
    message = (
        f"ranks disagree on {', '.join(mismatches)}: {'; '.join(parts)}; "
        "check that every rank runs the same code and config"
    )
    raise ConsistencyError(message, mismatches)


# -- stall watchdog ------------------------------------------------------------------------

# Tags on the watchdog's private communicator; nothing else uses it.
_TAG_QUERY = 1
_TAG_ANSWER = 2
_thread_level_note_shown = False


class _Waiting:
    """Context manager marking the owning rank as blocked in a collective."""

    __slots__ = ("_watchdog", "_what")

    def __init__(self, watchdog: "StallWatchdog", what: str):
        self._watchdog, self._what = watchdog, what

    def __enter__(self):
        dog = self._watchdog
        dog._wait_serial += 1
        dog._wait = (dog._wait_serial, self._what, time.monotonic(), dog._position[0])
        return self

    def __exit__(self, *exc):
        self._watchdog._wait = None
        return False


class StallWatchdog:
    """Report which rank holds everybody up when a collective waits too long.

    The trainer calls `mark(step, phase)` at phase changes and wraps blocking
    communication in `with watchdog.waiting("allreduce"):`; both are a few
    attribute writes, no MPI. A daemon thread per rank wakes about once per
    `poll_s`, answers position queries from other ranks, and when its own
    rank has waited longer than `timeout_s`, asks every other rank where it
    is and prints one line to stderr, e.g.

        hpcdl: stall: rank 0 waiting 61 s in allreduce at step 120; rank 1 last
        at step 119 phase backward for 60 s (answered, not waiting); rank 2
        (node7) no answer (dead or hung); suspects: ranks 1-2

    Queries travel on a duplicate of `comm` with point-to-point messages, so
    they never mix with training traffic and no step gains a collective. A
    rank busy in computation still answers (its watchdog thread does); a rank
    that does not answer is dead, or hung in code that holds the GIL. When
    several ranks wait in the same collective at the same step, only the
    lowest of them prints. Each wait reports at most once. With
    `abort_after_s` (counted from the start of the wait, acted on after the
    report), a wait that long aborts the job with exit code 1, so a hang
    becomes a crash that jobs/restart_*.sh can resume from.

    Constructing it is collective over `comm` (it duplicates the
    communicator and learns host names). It needs MPI_THREAD_MULTIPLE
    (mpi4py's default; MPICH provides it); otherwise, or with one rank, it
    runs no thread and `mark`/`waiting` stay harmless no-ops. Call `close()`
    before MPI finalises; it is also registered with atexit.
    """

    def __init__(self, comm, timeout_s: float = 60.0, *, poll_s: float = 1.0,
                 abort_after_s: float | None = None, stream=None):
        if timeout_s <= 0 or poll_s <= 0:
            raise ValueError(f"StallWatchdog: timeout_s ({timeout_s}) and poll_s ({poll_s}) must be > 0")
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s)
        # Other ranks answer on their next wake-up, at most poll_s later.
        self.answer_wait_s = self.poll_s + 1.0
        self.abort_after_s = abort_after_s
        self.stream = stream
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.reports: list[str] = []
        self.hosts: list[str] = []

        self._position = (None, "start", time.monotonic())
        self._wait = None
        self._wait_serial = 0
        self._reported_wait = 0
        self._query_serial = 0
        self._sends: list = []
        self._stop = threading.Event()
        self._thread = None
        self._side = None
        self._closed = False
        self.enabled = self.size > 1 and _thread_multiple(comm)
        if not self.enabled:
            return
        self._side = comm.Dup()
        self.hosts = self._side.allgather(socket.gethostname())
        self._thread = threading.Thread(target=self._run, name="hpcdl-stall-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- called by the trainer: no MPI, a few attribute writes ------------------------
    def mark(self, step, phase: str) -> None:
        """Record where this rank is (one tuple store, atomic for the reader thread)."""
        self._position = (step, phase, time.monotonic())

    def waiting(self, what: str) -> _Waiting:
        """`with watchdog.waiting("allreduce"): ...` around a blocking call (not nested)."""
        return _Waiting(self, what)

    # -- the helper thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                self._pump()
                self._reap_sends()
                self._check_own_wait()
        except Exception as exc:
            # The watchdog must never take training down with it.
            self._emit(f"hpcdl: stall watchdog on rank {self.rank} stopped: {type(exc).__name__}: {_one_line(exc)}")

    def _snapshot(self) -> dict:
        step, phase, since = self._position
        wait = self._wait
        now = time.monotonic()
        answer = {"step": step, "phase": phase, "phase_s": now - since}
        if wait is not None:
            answer.update(waiting=wait[1], waiting_s=now - wait[2], wait_step=wait[3])
        return answer

    def _pump(self, query_id=None, answers: dict | None = None) -> None:
        """Answer every pending query; keep answers to `query_id`, drop late ones."""
        from mpi4py import MPI

        status = MPI.Status()
        empty_probes = 0
        # One probe does not always make enough progress to surface every
        # message that has arrived (seen with MPICH's shared-memory path:
        # a query sat unseen for a whole poll period), so stop only after a
        # few empty probes in a row.
        while empty_probes < 3:
            message = self._side.improbe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if message is None:
                empty_probes += 1
                continue
            empty_probes = 0
            payload = message.recv()
            source = status.Get_source()
            if status.Get_tag() == _TAG_QUERY:
                self._sends.append(self._side.isend((payload, self._snapshot()), dest=source, tag=_TAG_ANSWER))
            elif answers is not None and payload[0] == query_id:
                answers[source] = payload[1]

    def _reap_sends(self) -> None:
        self._sends = [request for request in self._sends if not request.Test()]

    def _ask_everyone(self) -> dict[int, dict]:
        self._query_serial += 1
        query_id = self._query_serial
        for other in range(self.size):
            if other != self.rank:
                self._sends.append(self._side.isend(query_id, dest=other, tag=_TAG_QUERY))
        answers: dict[int, dict] = {}
        deadline = time.monotonic() + self.answer_wait_s
        while len(answers) < self.size - 1 and time.monotonic() < deadline:
            # Keep answering others: two stalled ranks may query each other.
            self._pump(query_id, answers)
            if self._stop.wait(0.02):
                break
        return answers

    def _check_own_wait(self) -> None:
        wait = self._wait
        if wait is None:
            return
        serial, what, since, step = wait
        waited = time.monotonic() - since
        if serial == self._reported_wait:
            if self.abort_after_s is not None and waited >= self.abort_after_s:
                self._emit(f"hpcdl: stall: rank {self.rank} waited {waited:.0f} s in {what} at step {step}; "
                           f"aborting the job (abort_after_s={self.abort_after_s:g})")
                _abort_world(1)
                os._exit(1)
            return
        if waited < self.timeout_s:
            return
        self._reported_wait = serial
        answers = self._ask_everyone()
        if self._stop.is_set() or self._lower_rank_reports(answers, what, step):
            return  # closing mid-query: the answers are incomplete, not news
        self._emit(self._format_report(what, waited, step, answers))

    def _lower_rank_reports(self, answers: dict, what: str, step) -> bool:
        """Whether a lower rank is stuck in the same wait, and so will print the same report."""
        return any(
            other < self.rank and a.get("waiting") == what and a.get("wait_step") == step
            for other, a in answers.items()
        )

    def _format_report(self, what: str, waited: float, step, answers: dict) -> str:
        """One line: this rank, then the others grouped by what they answered."""
        groups: dict[str, list[tuple[int, float | None]]] = {}
        suspects = []
        for other in range(self.size):
            if other == self.rank:
                continue
            a = answers.get(other)
            if a is None:
                description, seconds = "no answer (dead or hung)", None
            elif "waiting" in a:
                description, seconds = f"waiting in {a['waiting']} at step {a['wait_step']}", a["waiting_s"]
            else:
                description, seconds = f"last at step {a['step']} phase {a['phase']}", a["phase_s"]
            if a is None or "waiting" not in a:
                suspects.append(other)
            groups.setdefault(description, []).append((other, seconds))

        parts = [f"rank {self.rank} waiting {waited:.0f} s in {what} at step {step}"]
        for description, members in sorted(groups.items(), key=lambda item: item[1][0][0]):
            ranks = [r for r, _ in members]
            if members[0][1] is None:
                hosts = sorted({self.hosts[r] for r in ranks})
                shown = ", ".join(hosts[:8]) + (", ..." if len(hosts) > 8 else "")
                parts.append(f"{format_ranks(ranks)} ({shown}) {description}")
                continue
            low, high = min(s for _, s in members), max(s for _, s in members)
            span = f"{low:.0f} s" if round(low) == round(high) else f"{low:.0f}-{high:.0f} s"
            answered = "" if description.startswith("waiting") else " (answered, not waiting)"
            parts.append(f"{format_ranks(ranks)} {description} for {span}{answered}")
        if suspects:
            parts.append(f"suspects: {format_ranks(suspects)}")
        else:
            parts.append("every rank is waiting: look for mismatched collectives")
        return "hpcdl: stall: " + "; ".join(parts)

    def _emit(self, line: str) -> None:
        self.reports.append(line)
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    # -- shutdown ---------------------------------------------------------------------------
    def close(self, abandon: bool = False) -> None:
        """Stop the thread, settle outstanding messages and free the side communicator.

        `abandon`: a peer died and the side communicator is revoked (ULFM):
        stop the thread and leave the communicator alone, since freeing it
        would need the dead peer.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.answer_wait_s + self.poll_s + 5.0)
        if abandon or self._thread.is_alive() or _live_mpi() is None:
            return  # never touch MPI under a thread that may still use it, or after finalise
        try:
            self._pump()  # answer late queries and drop late answers, so nothing stays queued
        except Exception:
            pass
        deadline = time.monotonic() + 1.0
        while self._sends and time.monotonic() < deadline:
            self._reap_sends()
            time.sleep(0.01)
        for request in self._sends:
            # Small sends complete eagerly; one still pending has a receiver
            # that is gone, so cancel it rather than wait forever.
            try:
                request.Cancel()
                request.Test()
            except Exception:
                pass
        self._sends = []
        self._side.Free()

    def __enter__(self) -> "StallWatchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _thread_multiple(comm) -> bool:
    from mpi4py import MPI

    if MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
        return True
    global _thread_level_note_shown
    if not _thread_level_note_shown:
        _thread_level_note_shown = True
        warnings.warn(
            f"hpcdl: stall watchdog off: MPI thread level is {MPI.Query_thread()}, it needs THREAD_MULTIPLE "
            f"({MPI.THREAD_MULTIPLE}); set mpi4py.rc.thread_level = 'multiple'",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
