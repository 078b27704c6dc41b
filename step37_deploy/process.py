"""Processes: is the writer of a leftover still running, and what a child process starts with.

Two things a run leaves behind must be told apart from a live run's: temporaries named with the
writer's PID (``files.py``) and the work folder, shared memory and stubs of a killed ``serve``
(``serving/supervise.py``).  A PID alone is not enough, since the kernel reuses them: after a
reboot or a busy day the PID in a leftover's name may belong to an unrelated process.  So
:func:`alive` also compares the process's start time with the time the leftover was last written
(its ``mtime``): a process that started after that cannot be its writer.

A process that ``serve`` watches or signals is named by :class:`ProcessId`, its PID *and* its
start time in clock ticks since boot (``/proc/PID/stat``, field 22): exact, unlike a wall-clock
start time, and never the same for two processes of one boot, so a PID that the kernel has given
to another process is never mistaken for the one ``serve`` started, and a signal goes through a
pidfd opened and checked against that identity (:meth:`ProcessId.send`).

Children that ``serve`` starts (``tritonserver``, the gateway's nginx) get :func:`child_setup` as
``preexec_fn``: SIGTERM when ``serve`` dies, even by SIGKILL (``PR_SET_PDEATHSIG``), and, for
tritonserver, umask 077 so what it and its stubs create is the server user's alone.
:func:`umask` sets the umask of this process for a block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: When this process started (wall clock): a leftover written after it may belong to a run that
#: started before this one and is still going, so sweeps leave such files alone.
PROCESS_START = time.time()
#: Slack when comparing a process's start time with a file's mtime: psutil derives start times
#: from the boot time, which Linux gives in whole seconds.
START_TIME_SLACK_S = 2.0
#: ``prctl`` option and Linux's libc, for :func:`die_with_parent`.
_PR_SET_PDEATHSIG = 1


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when that cannot be read."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError, OverflowError):
        return None


def alive(pid: int, written_at: float | None = None) -> bool:
    """Process ``pid`` runs and, when ``written_at`` (a leftover's mtime) is given, started before
    that time, so it can be the leftover's writer.  A live process of another user counts as alive;
    when its start time cannot be read, so does the process (a sweep never removes a live run's
    files on a guess)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    except (OverflowError, ValueError):  # not a PID at all (a huge number in a file name)
        return False
    if written_at is None:
        return True
    start = started_at(pid)
    return start is None or start <= written_at + START_TIME_SLACK_S


@dataclass(frozen=True)
class ProcStat:
    """What ``/proc/PID/stat`` says of one process (one read: the fields belong together)."""

    pid: int
    state: str  # R, S, D, T (stopped), t (traced), Z (zombie), X, I...
    ppid: int
    pgid: int
    start: int  # clock ticks after boot


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/PID/stat`` of ``pid``, or None when it does not exist (or cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')': split after the last.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(pid, fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessId:
    """One process, for as long as it lives: its PID and its start time (clock ticks after boot).
    A PID reused by the kernel has another start time, so it is never this process."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The process that has ``pid`` now, or None."""
        st = proc_stat(pid)
        return None if st is None else cls(pid, st.start)

    def stat(self) -> ProcStat | None:
        """This process's ``/proc`` stat, or None once it is gone (its PID free or reused)."""
        st = proc_stat(self.pid)
        return st if st is not None and st.start == self.start else None

    def running(self) -> bool:
        """It exists and has not exited (a zombie has exited)."""
        st = self.stat()
        return st is not None and st.state not in ("Z", "X", "x")

    def send(self, sig: int) -> bool:
        """Send ``sig`` to this process and no other: through a pidfd opened first and checked
        against the start time (a pidfd names one process, even if its PID is reused after the
        check).  False when it is gone.  Where pidfds are missing (Linux < 5.3), ``kill`` after the
        same check."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        except (AttributeError, OSError):
            fd = None
        try:
            if not self.running():
                return False
            if fd is None:
                os.kill(self.pid, sig)
            else:
                signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            if fd is not None:
                os.close(fd)


def boot_id() -> str:
    """This boot's random id (32 hex digits): process start times count from this boot only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        return ""


def pid_namespace() -> int:
    """The inode of this process's PID namespace: PIDs mean something only inside one (0 if unknown)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM this (child) process when its parent dies (``PR_SET_PDEATHSIG``), even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_setup(umask: int | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: :func:`die_with_parent`, and ``umask`` when given."""

    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        if umask is not None:
            os.umask(umask)
        die_with_parent()

    return setup


def current_umask() -> int:
    """This process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def umask(mask: int) -> Iterator[int]:
    """Run the block under ``mask``; the previous umask is restored afterwards (and yielded)."""
    old = os.umask(mask)
    try:
        yield old
    finally:
        os.umask(old)


#: Linux lists each thread's children in ``/proc/PID/task/TID/children`` (3.5+, CONFIG_PROC_CHILDREN).
_HAVE_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def pids() -> list[int]:
    """Every PID this process can see."""
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def children(parent: ProcessId) -> list[ProcStat]:
    """The children of ``parent`` (provably: each one's parent is ``parent``, checked after it was
    read), from every thread's ``/proc/PID/task/TID/children`` (a child is listed under the thread
    that forked it); a scan of every process where that file is missing."""
    found: list[int] = []
    if _HAVE_CHILDREN:
        try:
            tids = os.listdir(f"/proc/{parent.pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{parent.pid}/task/{tid}/children") as fh:
                found += [int(x) for x in fh.read().split()]
    else:
        found = pids()
    out = [st for st in map(proc_stat, found) if st is not None and st.ppid == parent.pid]
    return out if parent.running() else []
