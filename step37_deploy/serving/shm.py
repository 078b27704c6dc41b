"""The Python backend's shared memory: private to one ``serve`` where the platform allows, named so
that only a provably dead run of ours is ever swept.

The Python backend (boost.interprocess) creates its regions in ``/dev/shm`` with mode 0644 whatever
the umask, and they carry every request's image bytes.  A ``chmod`` afterwards leaves a window, and
a process that opens a region in it keeps its mapping (a chmod does not revoke it).  So
tritonserver gets a ``/dev/shm`` of its own: :func:`launch` starts it in a new mount namespace
(plus a user namespace when ``serve`` lacks ``CAP_SYS_ADMIN``: an unprivileged user may make both)
with a fresh tmpfs, mode 0700, on ``/dev/shm``, as large as the host's.  Its regions never appear
in the host's ``/dev/shm``, no other user's process can open them, and the kernel frees them with the last
process of the run (a killed run leaves none).  Triton's client shared-memory API is closed unless
``--allow-shared-memory`` (the regions clients register must be in the host's ``/dev/shm``), so
the private one is used whenever that flag is off.  Where the namespaces cannot be made (a
container without ``CAP_SYS_ADMIN`` whose seccomp profile refuses user namespaces, user namespaces
turned off), or under ``--allow-shared-memory``, tritonserver shares the host's ``/dev/shm``: one
line is logged, and the supervisor makes the regions 0600 as they appear (the window stays).

Region names carry a :class:`RunMark` (``--backend-config=python,shm-region-prefix-name=``): the
boot id, the PID namespace, the ``serve`` PID and its start time (clock ticks after boot), and 64
random bits.  :func:`sweep_regions` unlinks a region only when that mark is of this boot and this
PID namespace, its file is this user's, and that (PID, start time) no longer runs: a live run, one
in another container sharing ``/dev/shm`` (``--ipc=host``, a pod) or one of an earlier boot is never
touched.  The random part makes the names unguessable, so nobody can create a region under our
name beforehand and have the backend open it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..process import ProcessId, boot_id, child_setup, pid_namespace

log = logging.getLogger(__name__)

#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")
_MARK_RE = re.compile(r"^step37_([0-9a-f]{32})_(\d+)_(\d+)_(\d+)_([0-9a-f]{16})_")
# <sched.h> and <sys/mount.h>
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>: SIGTERM when serve dies, as process.die_with_parent


@dataclass(frozen=True)
class RunMark:
    """What names one ``serve`` run beyond a PID: see the module docstring."""

    boot: str
    pidns: int
    owner: ProcessId
    token: str

    @classmethod
    def new(cls) -> RunMark:
        """The mark of a run of this process."""
        me = ProcessId.of(os.getpid())
        return cls(boot_id(), pid_namespace(), me or ProcessId(os.getpid(), 0), secrets.token_hex(8))

    @property
    def prefix(self) -> str:
        return f"step37_{self.boot}_{self.pidns}_{self.owner.pid}_{self.owner.start}_{self.token}_"

    @classmethod
    def parse(cls, name: str) -> RunMark | None:
        """The mark at the start of a region's name, or None (not a region of this format)."""
        m = _MARK_RE.match(name)
        if not m:
            return None
        return cls(m.group(1), int(m.group(2)), ProcessId(int(m.group(3)), int(m.group(4))), m.group(5))

    def here(self) -> bool:
        """Of this boot and this PID namespace: only then do its PID and start time mean anything."""
        return bool(self.boot) and self.boot == boot_id() and self.pidns == pid_namespace() != 0

    def dead(self) -> bool:
        """Provably gone: a run of this boot and PID namespace whose ``serve`` no longer runs."""
        return self.here() and not self.owner.running()


def shm_regions(prefix: str) -> list[Path]:
    """This machine's (the host's) shared-memory regions whose name starts with ``prefix``."""
    if not prefix:
        return []
    try:
        return [SHM_DIR / n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return []


def remove_shm(prefix: str, when: str) -> list[Path]:
    """Remove the regions of one server that its processes left behind in the host's ``/dev/shm``
    (a killed stub never unlinks its region); logged."""
    removed = []
    for path in shm_regions(prefix):
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            removed.append(path)
            log.warning(
                "removed shared memory %s (%.1f MiB) left by this server's processes %s", path, size / 2**20, when
            )
    return removed


def sweep_regions(in_use: set[str] = frozenset()) -> list[str]:
    """Unlink the host's regions of runs that are provably dead (:meth:`RunMark.dead`), this user's,
    and whose prefix no live process still uses (``in_use``: prefixes of live stubs).  Returns one
    line per region removed (also logged)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    done = []
    for name in names:
        mark = RunMark.parse(name)
        if mark is None or mark.prefix in in_use or not mark.dead():
            continue
        path = SHM_DIR / name
        try:
            st = path.stat()
            if st.st_uid != os.geteuid():
                continue
            path.unlink()
        except FileNotFoundError:  # removed meanwhile (by the serve it belongs to)
            continue
        except OSError as exc:
            log.warning("could not remove %s, shared memory of a killed serve: %s", path, exc)
            continue
        line = (
            f"removed {path} ({st.st_size / 2**20:.1f} MiB), shared memory left by a killed serve "
            f"(pid {mark.owner.pid})"
        )
        log.warning("%s", line)
        done.append(line)
    return done


def _host_shm_bytes() -> int | None:
    """The size of the host's ``/dev/shm``: the private one gets the same bound."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize or None


def _private_setup(report_fd: int, umask: int) -> Callable[[], None]:
    """A ``preexec_fn``: a mount namespace (and a user namespace if need be) with a tmpfs on
    ``/dev/shm``, then umask and die-with-parent.  On failure it writes why to ``report_fd`` and
    raises, so ``Popen`` fails and :func:`launch` falls back.  Everything the child needs is made
    here, in the parent (no import or ``dlopen`` between fork and exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    uid, gid = os.geteuid(), os.getegid()
    size = _host_shm_bytes()
    options = f"mode=0700{f',size={size}' if size else ''}".encode()
    maps = ((b"/proc/self/setgroups", b"deny"), (b"/proc/self/uid_map", f"{uid} {uid} 1".encode()),
            (b"/proc/self/gid_map", f"{gid} {gid} 1".encode()))  # fmt: skip

    def fail(step: str) -> None:  # pragma: no cover - runs in the child
        os.write(report_fd, f"{step}: {os.strerror(ctypes.get_errno())}".encode())
        raise OSError(step)

    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        if libc.unshare(_CLONE_NEWNS) != 0:  # needs CAP_SYS_ADMIN; else a user namespace gives it
            if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
                fail("unshare(CLONE_NEWUSER|CLONE_NEWNS)")
            for path, text in maps:  # this user stays itself inside (no root, no capability after exec)
                try:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, text)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    os.write(report_fd, f"write {path.decode()}: {exc.strerror}".encode())
                    raise
        if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            fail("mount --make-rprivate /")
        if libc.mount(b"tmpfs", str(SHM_DIR).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options) != 0:
            fail(f"mount -t tmpfs {SHM_DIR}")
        os.umask(umask)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))  # last: a change of credentials would clear it

    return setup


def launch(cmd: list[str], private: bool, umask: int, **popen: object) -> tuple[subprocess.Popen, bool]:
    """Start ``cmd`` (tritonserver) with umask ``umask`` and SIGTERM on this process's death, in a
    private ``/dev/shm`` when ``private`` and the platform allows; returns the process and whether
    its ``/dev/shm`` is private.  A fallback to the host's is logged in one line."""
    if private:
        read_fd, write_fd = os.pipe()
        try:
            return subprocess.Popen(cmd, preexec_fn=_private_setup(write_fd, umask), **popen), True
        except subprocess.SubprocessError:
            os.set_blocking(read_fd, False)
            try:
                why = os.read(read_fd, 512).decode(errors="replace")
            except BlockingIOError:
                why = "no reason given"
        finally:
            os.close(read_fd)
            os.close(write_fd)
        log.warning(
            "tritonserver shares this host's /dev/shm: a private one cannot be made here (%s); its shared memory "
            "is made 0600 as it appears (any local process may open a region before that)",
            why,
        )
    else:
        log.info("--allow-shared-memory: tritonserver shares this host's /dev/shm (clients register regions there)")
    return subprocess.Popen(cmd, preexec_fn=child_setup(umask), **popen), False


def private_shm(pid: int) -> bool:
    """Process ``pid`` sees another ``/dev/shm`` than this process (a mount namespace of its own)."""
    try:
        return os.stat(f"/proc/{pid}/root{SHM_DIR}").st_dev != os.stat(SHM_DIR).st_dev
    except OSError:
        return False
