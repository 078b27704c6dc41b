"""Processes: is the writer of a leftover still running, and what a child process starts with.

Two things a run leaves behind must be told apart from a live run's: temporaries named with the
writer's PID (``files.py``) and the work folder, shared memory and stubs of a killed ``serve``
(``serving/supervise.py``).  A PID alone is not enough, since the kernel reuses them: after a
reboot or a busy day the PID in a leftover's name may belong to an unrelated process.  So
:func:`alive` also compares the process's start time with the time the leftover was last written
(its ``mtime``): a process that started after that cannot be its writer.

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
