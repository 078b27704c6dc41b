"""Watching what ``serve`` started, and making a failure loud instead of silent.

Triton 2.51 never replaces a dead Python-backend stub: once the process behind a model instance
is gone (OOM killer, a crash in a native library, ``kill -9``) every request routed to that
instance fails, while ``/v2/health/ready`` and the model's ready endpoint keep answering 200.  A
stub that stops running for two seconds or more (``SIGSTOP``, a debugger, a frozen cgroup) makes
tritonserver abort or segfault a moment later.  Neither can be healed from outside without
reloading models through the API that must stay closed to clients, so ``serve`` does what a
supervisor (Kubernetes, systemd) can act on:

* :class:`Supervisor` watches every process (tritonserver and every stub it spawned, each named by
  its model and instance, read from the stub's command line, plus whatever else
  :meth:`Supervisor.watch` is given, such as a gateway): :meth:`Supervisor.wait` sleeps on their
  exit events (Linux pidfds: a death wakes it at once) and :meth:`Supervisor.check` reads their
  states.  A poll costs well under a millisecond of CPU (it reads a few ``/proc/PID/stat`` files;
  the scan of every process for new stubs, 2.9 ms of CPU each time on a quiet machine, runs only
  every :data:`DISCOVER_S`), so watching takes no measurable share of the cores the service runs on;
* a process that exits, or stays stopped (state ``T``) longer than :data:`STALL_S`, is a crash:
  :meth:`Supervisor.check` returns one line naming it;
* :meth:`Supervisor.kill_all` then takes the listening front down first (SIGKILL, so readiness stops
  answering at once), SIGTERMs the rest, and SIGKILLs what is left after a short grace, including
  stubs that ignore SIGTERM or are frozen; ``serve`` exits with the crash code.

It also keeps request data private: the Python backend (boost.interprocess) creates its shared
memory regions with mode 0644 whatever the umask, so :meth:`Supervisor.protect_shm` sets every
region of this server to 0600 as soon as it sees it (the regions only carry request data after the
models are loaded, and ``serve`` checks them before it reports ready).

:func:`sweep_dead_runs` is the other half of "a killed run's leftovers are cleaned by the next
run": shared-memory regions (``step37_{serve pid}_{port}_...``) and orphaned stubs of a ``serve``
that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..process import PROCESS_START, alive

log = logging.getLogger(__name__)

#: How long a watched process may stay stopped (``SIGSTOP``, state T) before it counts as a crash:
#: tritonserver aborts on a stub frozen for about 2 s, so waiting any longer only loses time.
STALL_S = 1.0
#: How often the watched processes' states are read (a death is seen at once through its pidfd).
POLL_S = 0.2
#: How often :meth:`Supervisor.check` looks for stubs spawned since (a scan of every process): stubs
#: are spawned while the models load, which ``serve`` covers with an explicit :meth:`~Supervisor.discover`.
DISCOVER_S = 10.0
#: Between SIGTERM and SIGKILL when the process tree is taken down.
KILL_GRACE_S = 3.0
#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")
#: The Python backend's stub executable.
STUB_NAME = "triton_python_backend_stub"
_SHM_RE = re.compile(r"^step37_(\d+)_(\d+)_")


def shm_prefix(serve_pid: int, port: int) -> str:
    """The Python-backend shared-memory prefix of one server (``--backend-config=python,
    shm-region-prefix-name=...``): servers side by side never share regions, and the next run can
    tell a dead run's regions by its PID."""
    return f"step37_{serve_pid}_{port}_"


def stub_identity(cmdline: list[str]) -> tuple[str, str] | None:
    """(model, instance) of a Python-backend stub from its command line, or None for another
    process.  The stub is started as ``triton_python_backend_stub MODEL_DIR/VERSION/model.py
    SHM_REGION SHM_SIZE SHM_GROWTH PARENT_PID LIB_DIR IPC_HANDLE INSTANCE_NAME RUNTIME``."""
    if not cmdline or not cmdline[0].endswith(STUB_NAME):
        return None
    model = Path(cmdline[1]).parent.parent.name if len(cmdline) > 1 else "?"
    instance = cmdline[8] if len(cmdline) > 8 else "?"
    return model, instance


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class _Watched:
    name: str  # "tritonserver", "model step37_vision_728 (stub step37_vision_728_0_0)", "gateway"...
    pid: int
    popen: subprocess.Popen | None  # the exit status, when this process is our child
    proc: object  # psutil.Process
    front: bool  # listens for clients: killed first, so readiness stops answering
    stubs: bool  # its children that are Python-backend stubs are watched too
    stopped_since: float | None = None
    pidfd: int | None = None  # readable once the process has exited (Linux >= 5.3)


@dataclass
class Supervisor:
    """The processes of one ``serve``; see the module docstring.  Not thread-safe: ``serve``'s main
    loop calls :meth:`check` every :data:`POLL_S`."""

    shm_prefix: str | None = None
    stall_s: float = STALL_S
    watched: dict[int, _Watched] = field(default_factory=dict)
    groups: set[int] = field(default_factory=set)  # process groups to sweep at the end
    discovered_at: float = float("-inf")

    def watch(self, name: str, process: subprocess.Popen | int, front: bool = False, stubs: bool = False) -> None:
        """Watch ``process`` (a ``Popen`` or a PID) under ``name``: its exit or a stall is a crash.
        ``front``: it listens for clients (tritonserver, a gateway) and is killed first on a crash.
        ``stubs``: its Python-backend stub children are found and watched too (tritonserver).
        Its process group is swept at :meth:`kill_all` when it leads one (``start_new_session``)."""
        import psutil

        pid = process if isinstance(process, int) else process.pid
        popen = None if isinstance(process, int) else process
        try:
            proc = psutil.Process(pid)
            if os.getpgid(pid) == pid:
                self.groups.add(pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            proc = None
        self.watched[pid] = _Watched(name, pid, popen, proc, front, stubs, pidfd=_pidfd(pid))

    def discover(self) -> None:
        """Start watching the stubs the ``stubs=True`` processes have spawned since the last call."""
        import psutil

        self.discovered_at = time.monotonic()
        for w in list(self.watched.values()):
            if not w.stubs or w.proc is None:
                continue
            try:
                children = w.proc.children(recursive=False)
            except psutil.Error:
                continue
            for child in children:
                if child.pid in self.watched:
                    continue
                try:
                    ident = stub_identity(child.cmdline())
                except psutil.Error:
                    continue
                if ident is not None:
                    model, instance = ident
                    self.watched[child.pid] = _Watched(
                        f"model {model} (stub {instance}, pid {child.pid})", child.pid, None, child, False, False,
                        pidfd=_pidfd(child.pid),
                    )  # fmt: skip

    def stubs(self) -> list[str]:
        """Names of the stubs watched so far."""
        return [w.name for w in self.watched.values() if w.name.startswith("model ")]

    def check(self, now: float | None = None) -> str | None:
        """One poll: the first watched process that died or stalls too long, as one line; None
        when all are running."""
        import psutil

        now = time.monotonic() if now is None else now
        if time.monotonic() - self.discovered_at >= DISCOVER_S:
            self.discover()
        for w in self.watched.values():
            if w.popen is not None and w.popen.poll() is not None:
                return f"{w.name} {_describe_exit(w.popen.returncode)}"
            try:
                status = w.proc.status() if w.proc is not None else psutil.STATUS_DEAD
            except psutil.NoSuchProcess:
                status = psutil.STATUS_DEAD
            except psutil.Error:
                continue
            if status in (psutil.STATUS_DEAD, psutil.STATUS_ZOMBIE):
                return f"{w.name} died"
            if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                w.stopped_since = w.stopped_since or now
                if now - w.stopped_since >= self.stall_s:
                    return f"{w.name} stalled (stopped for more than {self.stall_s:g}s)"
            else:
                w.stopped_since = None
        if self.shm_prefix:
            self.protect_shm()
        return None

    def wait(self, timeout_s: float = POLL_S) -> None:
        """Sleep up to ``timeout_s``, woken at once when a watched process exits (its pidfd becomes
        readable); a plain sleep where pidfds are not available."""
        fds = [w.pidfd for w in self.watched.values() if w.pidfd is not None]
        if not fds:
            time.sleep(timeout_s)
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        with contextlib.suppress(InterruptedError):
            poller.poll(timeout_s * 1000)

    def close(self) -> None:
        """Release the pidfds."""
        for w in self.watched.values():
            if w.pidfd is not None:
                with contextlib.suppress(OSError):
                    os.close(w.pidfd)
                w.pidfd = None

    def protect_shm(self) -> list[Path]:
        """Set this server's shared-memory regions readable and writable by its user only; returns
        the regions changed."""
        changed = []
        for path in shm_regions(self.shm_prefix or ""):
            with contextlib.suppress(OSError):
                if path.stat().st_mode & 0o077:
                    os.chmod(path, 0o600)
                    changed.append(path)
        return changed

    def _tree(self) -> list:
        """Every live process of this server: the watched ones, their descendants, and the members of
        their process groups (orphaned stubs keep the group of the tritonserver that started them)."""
        import psutil

        procs = {}
        for w in self.watched.values():
            if w.proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                if w.proc.is_running():
                    procs[w.pid] = w.proc
                for c in w.proc.children(recursive=True):
                    procs[c.pid] = c
        if self.groups:
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if p.pid != os.getpid() and os.getpgid(p.pid) in self.groups:
                        procs[p.pid] = p
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def kill_all(self, grace_s: float = KILL_GRACE_S) -> list[int]:
        """Take the server down: SIGKILL the front processes (their ports close at once), SIGTERM the
        rest, SIGKILL whatever still runs after ``grace_s`` (stopped processes included).  Returns
        the PIDs that had to be SIGKILLed after the grace."""
        import psutil

        rest = self._tree()  # before anything dies: a dead parent no longer lists its children
        fronts = [w.proc for w in self.watched.values() if w.front and w.proc is not None]
        for p in fronts:
            with contextlib.suppress(psutil.Error):
                p.kill()
        rest = [p for p in rest if p.pid not in {f.pid for f in fronts}]
        for p in rest:
            with contextlib.suppress(psutil.Error):
                # A stopped process would only act on SIGTERM once continued: SIGKILL it now.
                p.kill() if p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) else p.terminate()
        _, alive = psutil.wait_procs(rest, timeout=grace_s)
        alive += [p for p in self._tree() if p not in alive]  # anything spawned meanwhile
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        for w in self.watched.values():
            if w.popen is not None:
                with contextlib.suppress(Exception):
                    w.popen.wait(grace_s)
        if self.shm_prefix:
            remove_shm(self.shm_prefix, "at exit")
        self.close()
        return [p.pid for p in alive]


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits), or None (not Linux >= 5.3, or already gone)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def shm_regions(prefix: str) -> list[Path]:
    """This machine's shared-memory regions whose name starts with ``prefix``."""
    if not prefix:
        return []
    try:
        return [SHM_DIR / n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return []


def remove_shm(prefix: str, when: str) -> list[Path]:
    """Remove the regions of one server that its processes left behind (a killed stub never unlinks
    its region); logged."""
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


def sweep_dead_runs() -> list[str]:
    """Remove what ``serve`` runs that are gone (SIGKILL, OOM killer, power cut of a container) left
    on this machine: their orphaned stubs (killed) and shared-memory regions (unlinked).  A run is
    gone when the ``serve`` PID in its region prefix no longer runs the process that started it
    (``process.alive``: a reused PID is not that ``serve``); a live run's are never touched.
    Returns one line per thing removed (also logged)."""
    import psutil

    done: list[str] = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info.get("cmdline") or []
        if stub_identity(cmd) is None or len(cmd) < 6:
            continue
        m = _SHM_RE.match(Path(cmd[2]).name)
        born = p.info.get("create_time")  # its serve and its tritonserver started before it
        if not m or alive(int(m.group(1)), born) or (cmd[5].isdigit() and alive(int(cmd[5]), born)):
            continue
        with contextlib.suppress(psutil.Error):
            p.kill()
            model, instance = stub_identity(cmd)
            line = (
                f"killed stub {instance} (pid {p.pid}) of model {model}, "
                f"left running by a killed serve (pid {m.group(1)})"
            )
            log.warning("%s", line)
            done.append(line)
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        names = []
    for name in names:
        m = _SHM_RE.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        path = SHM_DIR / name
        try:
            st = path.stat()
            if st.st_mtime >= PROCESS_START or alive(int(m.group(1)), st.st_mtime):
                continue
            path.unlink()
        except FileNotFoundError:  # removed meanwhile (by the serve it belongs to)
            continue
        except OSError as exc:
            log.warning("could not remove %s, shared memory of a killed serve: %s", path, exc)
            continue
        line = f"removed {path} ({st.st_size / 2**20:.1f} MiB), shared memory left by a killed serve (pid {m.group(1)})"
        log.warning("%s", line)
        done.append(line)
    return done
