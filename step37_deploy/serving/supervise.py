"""Watching what ``serve`` started, and making a failure loud instead of silent.

Triton 2.51 never replaces a dead Python-backend stub: once the process behind a model instance
is gone (OOM killer, a crash in a native library, ``kill -9``) every request routed to that
instance fails, while ``/v2/health/ready`` and the model's ready endpoint keep answering 200.  A
stub that stops running for two seconds or more (``SIGSTOP``, a debugger, a frozen cgroup) makes
tritonserver abort or segfault a moment later.  Neither can be healed from outside without
reloading models through the API that must stay closed to clients, so ``serve`` does what a
supervisor (Kubernetes, systemd) can act on:

* :class:`Supervisor` watches every process (tritonserver and every instance stub it spawned, each
  named by its model and instance, read from the stub's command line, the gateway's nginx master
  and its workers, plus whatever else :meth:`Supervisor.watch` is given): :meth:`Supervisor.wait`
  sleeps on their exit events (Linux pidfds: a death wakes it at once) and
  :meth:`Supervisor.check` reads their states.  Each is known by its PID *and* start time
  (:class:`~step37_deploy.process.ProcessId`): a PID the kernel gave to another process reads as
  dead, never as alive.  Stubs are looked for from tritonserver's launch on (the child lists of
  its threads: 4.1 ms of CPU for 170 threads, every 0.25 s while loading, then every
  :data:`DISCOVER_S`), and each model's stub count is compared with its ``config.pbtxt``, so a stub
  that died before it was seen is a crash too.  A poll costs 0.35 ms of CPU (a few
  ``/proc/PID/stat`` reads; 4 stubs, 2 workers), so watching takes no measurable share of the cores;
* a process that exits, or stays stopped (state ``T``) longer than :data:`STALL_S`, is a crash, and
  so is a model with fewer stubs than its config asks, an nginx worker stopped that long, or a
  gateway short of workers for :data:`WORKER_RESPAWN_S` (nginx replaces a worker that dies: that is
  fine once the new one runs): :meth:`Supervisor.check` returns one line naming it;
* :meth:`Supervisor.kill_all` then takes the listening front down first (SIGKILL, so readiness stops
  answering at once), SIGTERMs the rest, and SIGKILLs what is left after a short grace, including
  stubs that ignore SIGTERM or are frozen; ``serve`` exits with the crash code.  It runs once (every
  exit path calls it; the second call does nothing) and signals only what is provably this
  server's, through pidfds checked against the start time: never a process group whose leader is
  gone (its number may be another group's by then).

Shared memory (``shm.py``): tritonserver gets a private ``/dev/shm`` where the platform allows;
elsewhere :meth:`Supervisor.protect_shm` sets every region of this server to 0600 as soon as it
sees it (the regions only carry request data after the models are loaded, and ``serve`` checks
them before it reports ready).

:func:`sweep_dead_runs` is the other half of "a killed run's leftovers are cleaned by the next
run": orphaned stubs and shared-memory regions of a ``serve`` that is provably gone
(:class:`~.shm.RunMark`: same boot, same PID namespace, its PID and start time no longer run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..process import ProcessId, children, pids, proc_stat
from .shm import SHM_DIR, RunMark, remove_shm, shm_regions, sweep_regions  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: How long a watched process may stay stopped (``SIGSTOP``, state T) before it counts as a crash:
#: tritonserver aborts on a stub frozen for about 2 s, so waiting any longer only loses time.
STALL_S = 1.0
#: How often the watched processes' states are read (a death is seen at once through its pidfd).
POLL_S = 0.2
#: How often :meth:`Supervisor.check` looks for stubs spawned since (a read of tritonserver's
#: threads' child lists): stubs are spawned while the models load, which ``serve`` covers with
#: :meth:`~Supervisor.discover` on every poll until ready.
DISCOVER_S = 10.0
#: Between SIGTERM and SIGKILL when the process tree is taken down.
KILL_GRACE_S = 3.0
#: How long a gateway may run fewer workers than it was started with: nginx replaces a worker that
#: dies within milliseconds, so a longer shortfall means it cannot.
WORKER_RESPAWN_S = 2.0
#: The Python backend's stub executable.
STUB_NAME = "triton_python_backend_stub"
_STOPPED = ("T", "t")
_EXITED = ("Z", "X", "x")


def shm_prefix() -> str:
    """A new run's Python-backend shared-memory prefix (``--backend-config=python,
    shm-region-prefix-name=...``): boot, PID namespace, this ``serve``'s PID and start time, and
    random bits (:class:`~.shm.RunMark`), so servers side by side never share regions and a sweep can
    prove a run dead."""
    return RunMark.new().prefix


def stub_identity(cmdline: list[str]) -> tuple[str, str] | None:
    """(model, instance) of a Python-backend stub from its command line, or None for another
    process.  The stub is started as ``triton_python_backend_stub MODEL_DIR/VERSION/model.py
    SHM_REGION SHM_SIZE SHM_GROWTH PARENT_PID LIB_DIR IPC_HANDLE INSTANCE_NAME RUNTIME``."""
    if not cmdline or not cmdline[0].endswith(STUB_NAME):
        return None
    model = Path(cmdline[1]).parent.parent.name if len(cmdline) > 1 else "?"
    instance = cmdline[8] if len(cmdline) > 8 else "?"
    return model, instance


def instance_stub(cmdline: list[str]) -> tuple[str, str] | None:
    """(model, instance) of a stub that serves a model instance; None for any other process,
    including the two the backend starts and ends itself while a model loads: the stub run with no
    argument (a permission check) and the auto-complete stub (named by the model, not an instance)."""
    ident = stub_identity(cmdline)
    if ident is None or len(cmdline) < 9 or ident[1] == ident[0]:
        return None
    return ident


def expected_stubs(repository: str | Path) -> dict[str, int]:
    """How many stubs each Python-backend model of ``repository`` runs once loaded: the counts of
    its CPU instance groups (``config.pbtxt``).  A model with another kind of group (GPU: its count
    depends on the devices) is left out."""
    from .configs import parse_config

    out = {}
    for path in sorted(Path(repository).glob("*/config.pbtxt")):
        cfg = parse_config(path)
        groups = list(cfg.instance_group)
        if cfg.backend != "python" or not groups or any(type(g).Kind.Name(g.kind) != "KIND_CPU" for g in groups):
            continue
        out[cfg.name or path.parent.name] = sum(max(g.count, 1) for g in groups)
    return out


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0")[:-1]]
    except OSError:
        return []


@dataclass
class _Watched:
    name: str  # "tritonserver", "model step37_vision_728 (stub step37_vision_728_0_0, pid 7)", "gateway"...
    ident: ProcessId | None  # None: it was gone before it could be watched
    popen: subprocess.Popen | None = None  # the exit status, when this process is our child
    front: bool = False  # listens for clients: killed first, so readiness stops answering
    kind: str = "process"  # "process"; "stub" (its death is a crash); "worker" (nginx replaces it)
    model: str | None = None  # a stub's model
    parent: int | None = None  # a worker's master
    stopped_since: float | None = None
    pidfd: int | None = None  # readable once the process has exited (Linux >= 5.3)

    @property
    def pid(self) -> int:
        return self.ident.pid if self.ident is not None else -1


@dataclass
class Supervisor:
    """The processes of one ``serve``; see the module docstring.  Not thread-safe: ``serve``'s main
    loop calls :meth:`check` every :data:`POLL_S`.  Every process is known by its
    :class:`~step37_deploy.process.ProcessId` (PID and start time), so a PID the kernel gave to
    another process is never judged nor signalled as ours."""

    shm_prefix: str | None = None
    stall_s: float = STALL_S
    private_shm: bool = False  # tritonserver has its own /dev/shm: nothing to protect or remove
    watched: dict[int, _Watched] = field(default_factory=dict)
    groups: dict[int, ProcessId] = field(default_factory=dict)  # process groups to sweep, by leader
    stub_parents: list[ProcessId] = field(default_factory=list)
    workers: dict[int, int] = field(default_factory=dict)  # nginx master PID -> the workers it runs
    short_since: dict[int, float] = field(default_factory=dict)  # master PID -> fewer workers since
    expected: dict[str, int] = field(default_factory=dict)  # model -> its stubs (expected_stubs)
    discovered_at: float = float("-inf")
    down: bool = False  # kill_all has run

    def watch(
        self, name: str, process: subprocess.Popen | int, front: bool = False, stubs: bool = False, workers: int = 0
    ) -> None:
        """Watch ``process`` (a ``Popen`` or a PID) under ``name``: its exit or a stall is a crash.
        ``front``: it listens for clients (tritonserver, a gateway) and is killed first on a crash.
        ``stubs``: its Python-backend stub children are found and watched too (tritonserver).
        ``workers``: it is an nginx master running that many workers, watched too (a stall is a
        crash; a dead one is fine once nginx has replaced it).  Its process group is swept at
        :meth:`kill_all` while it leads one (``start_new_session``) and still runs."""
        pid = process if isinstance(process, int) else process.pid
        popen = None if isinstance(process, int) else process
        st = proc_stat(pid)
        ident = ProcessId(pid, st.start) if st is not None else None
        if ident is not None and st.pgid == pid:
            self.groups[pid] = ident
        if ident is not None and stubs:
            self.stub_parents.append(ident)
        if workers:
            self.workers[pid] = workers
        self.watched[pid] = _Watched(name, ident, popen, front, pidfd=_pidfd(pid))

    def expect_stubs(self, counts: dict[str, int]) -> None:
        """Each model's stub count once loaded (:func:`expected_stubs`): fewer running is a crash,
        which also catches a stub that died before :meth:`discover` could see it."""
        self.expected = dict(counts)

    def discover(self) -> None:
        """Start watching the instance stubs the ``stubs=True`` processes have spawned since the
        last call (cheap enough to run on every poll while the models load)."""
        self.discovered_at = time.monotonic()
        for parent in self.stub_parents:
            for st in children(parent):
                known = self.watched.get(st.pid)
                if known is not None and known.ident == ProcessId(st.pid, st.start):
                    continue
                ident = instance_stub(_cmdline(st.pid))
                if ident is None or ProcessId.of(st.pid) != ProcessId(st.pid, st.start):
                    continue
                model, instance = ident
                self.watched[st.pid] = _Watched(
                    f"model {model} (stub {instance}, pid {st.pid})", ProcessId(st.pid, st.start), kind="stub",
                    model=model, pidfd=_pidfd(st.pid),
                )  # fmt: skip

    def stubs(self) -> list[str]:
        """Names of the stubs watched so far."""
        return [w.name for w in self.watched.values() if w.kind == "stub"]

    def check(self, now: float | None = None) -> str | None:
        """One poll: the first watched process that died or stalls too long, a model with fewer
        stubs than its config asks, or a gateway short of workers, as one line; None when all run."""
        now = time.monotonic() if now is None else now
        if time.monotonic() - self.discovered_at >= DISCOVER_S:
            self.discover()
        live: Counter[str] = Counter()
        for w in list(self.watched.values()):
            if w.kind == "worker":
                continue
            problem = self._judge(w, now)
            if problem is not None:
                return problem
            if w.kind == "stub":
                live[w.model] += 1
        for model, want in self.expected.items():
            if live[model] < want:
                return f"model {model} runs {live[model]} of its {want} stubs (one exited before serve found it)"
        for master, want in self.workers.items():
            problem = self._check_workers(master, want, now)
            if problem is not None:
                return problem
        if self.shm_prefix and not self.private_shm:
            self.protect_shm()
        return None

    def _judge(self, w: _Watched, now: float) -> str | None:
        """``w``'s exit or stall as one line, or None."""
        if w.popen is not None and w.popen.poll() is not None:
            return f"{w.name} {_describe_exit(w.popen.returncode)}"
        st = w.ident.stat() if w.ident is not None else None
        if st is None or st.state in _EXITED:
            return f"{w.name} died"
        return self._stall(w, st.state, now)

    def _stall(self, w: _Watched, state: str, now: float) -> str | None:
        if state not in _STOPPED:
            w.stopped_since = None
            return None
        w.stopped_since = now if w.stopped_since is None else w.stopped_since
        if now - w.stopped_since >= self.stall_s:
            return f"{w.name} stalled (stopped for more than {self.stall_s:g}s)"
        return None

    def _check_workers(self, master_pid: int, want: int, now: float) -> str | None:
        """The workers of one nginx master: a stall is a crash, a death is not once nginx has
        replaced the worker (within :data:`WORKER_RESPAWN_S`)."""
        master = self.watched.get(master_pid)
        if master is None or master.ident is None:
            return None
        seen = set()
        for st in children(master.ident):  # nginx's master has one thread: one small read
            if st.state in _EXITED:  # not reaped yet: gone all the same
                continue
            seen.add(st.pid)
            w = self.watched.get(st.pid)
            if w is None or w.ident != ProcessId(st.pid, st.start):
                w = self.watched[st.pid] = _Watched(
                    f"gateway worker (pid {st.pid})", ProcessId(st.pid, st.start), kind="worker", parent=master_pid
                )
            problem = self._stall(w, st.state, now)
            if problem is not None:
                return problem
        for pid in [p for p, w in self.watched.items() if w.parent == master_pid and p not in seen]:
            del self.watched[pid]  # gone: nginx has reaped it
        running = sum(1 for w in self.watched.values() if w.parent == master_pid)
        if running >= want or not master.ident.running():
            self.short_since.pop(master_pid, None)
            return None
        since = self.short_since.setdefault(master_pid, now)
        if now - since >= WORKER_RESPAWN_S:
            return f"{master.name} runs {running} of its {want} workers (for more than {WORKER_RESPAWN_S:g}s)"
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
        """Set this server's shared-memory regions in the host's ``/dev/shm`` readable and writable
        by its user only; returns the regions changed."""
        changed = []
        for path in shm_regions(self.shm_prefix or ""):
            with contextlib.suppress(OSError):
                if path.stat().st_mode & 0o077:
                    os.chmod(path, 0o600)
                    changed.append(path)
        return changed

    def _tree(self) -> dict[int, ProcessId]:
        """Every live process that is provably this server's: the watched ones that still run, their
        descendants, the members of a process group whose leader still runs (its PID cannot be
        another group's then), and any process of this user whose command line carries this run's
        unguessable shared-memory prefix (stubs orphaned by a dead tritonserver)."""
        found: dict[int, ProcessId] = {}
        todo = [w.ident for w in self.watched.values() if w.ident is not None and w.ident.running()]
        while todo:
            p = todo.pop()
            if p.pid in found:
                continue
            found[p.pid] = p
            todo += [ProcessId(st.pid, st.start) for st in children(p) if st.state not in _EXITED]
        leaders = {pid for pid, leader in self.groups.items() if leader.running()}
        for pid in pids() if leaders or self.shm_prefix else []:
            st = proc_stat(pid)
            if st is None or pid in found or st.state in _EXITED:
                continue
            if st.pgid in leaders or (self.shm_prefix and self._carries_prefix(pid)):
                found[pid] = ProcessId(pid, st.start)
        found.pop(os.getpid(), None)
        return found

    def _carries_prefix(self, pid: int) -> bool:
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
                return False
        except OSError:
            return False
        return any(self.shm_prefix in arg for arg in _cmdline(pid))

    def kill_all(self, grace_s: float = KILL_GRACE_S) -> list[int]:
        """Take the server down, once (a second call does nothing): SIGKILL the front processes (their
        ports close at once), SIGTERM the rest, SIGKILL whatever still runs after ``grace_s``
        (stopped processes at once).  Only processes that are provably this server's are signalled
        (:meth:`_tree`), each through a pidfd checked against its start time.  Returns the PIDs that
        had to be SIGKILLed after the grace."""
        if self.down:
            return []
        self.down = True
        tree = self._tree()  # before anything dies: a dead parent no longer lists its children
        fronts = [w.ident for w in self.watched.values() if w.front and w.ident is not None]
        for p in fronts:
            p.send(signal.SIGKILL)
        rest = [p for p in tree.values() if p not in fronts]
        for p in rest:
            st = p.stat()
            # A stopped process would only act on SIGTERM once continued: SIGKILL it now.
            if st is not None:
                p.send(signal.SIGKILL if st.state in _STOPPED else signal.SIGTERM)
        _wait_gone(rest, grace_s)
        alive = [p for p in rest if p.running()]
        alive += [p for p in self._tree().values() if p not in alive and p not in fronts]  # spawned meanwhile
        for p in alive:
            p.send(signal.SIGKILL)
        _wait_gone(alive, grace_s)
        for w in self.watched.values():
            if w.popen is not None:
                with contextlib.suppress(Exception):
                    w.popen.wait(grace_s)
        if self.shm_prefix and not self.private_shm:
            remove_shm(self.shm_prefix, "at exit")
        self.close()
        return [p.pid for p in alive]


def _wait_gone(procs: list[ProcessId], timeout_s: float) -> None:
    """Until none of ``procs`` runs (a zombie has exited), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(p.running() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits), or None (not Linux >= 5.3, or already gone)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def sweep_dead_runs() -> list[str]:
    """Remove what ``serve`` runs that are gone (SIGKILL, OOM killer, power cut of a container) left
    on this machine: their orphaned stubs (killed) and shared-memory regions in the host's
    ``/dev/shm`` (unlinked).  Only what is provably a dead run's is touched (:class:`~.shm.RunMark`:
    this boot, this PID namespace, this user, and its ``serve``'s PID and start time no longer run);
    a stub whose tritonserver still runs, and its regions, are left alone.  Returns one line per
    thing removed (also logged)."""
    done: list[str] = []
    in_use: set[str] = set()
    for pid in pids():
        cmd = _cmdline(pid)
        if stub_identity(cmd) is None or len(cmd) < 6:
            continue
        mark, st = RunMark.parse(Path(cmd[2]).name), proc_stat(pid)
        if mark is None or st is None:
            continue
        parent_runs = cmd[5].isdigit() and st.ppid == int(cmd[5])  # not reparented: its tritonserver lives
        try:
            mine = os.stat(f"/proc/{pid}").st_uid == os.geteuid()
        except OSError:
            continue
        if parent_runs or not mine or not mark.dead():
            in_use.add(mark.prefix)
            continue
        if ProcessId(pid, st.start).send(signal.SIGKILL):
            model, instance = stub_identity(cmd)
            line = (
                f"killed stub {instance} (pid {pid}) of model {model}, "
                f"left running by a killed serve (pid {mark.owner.pid})"
            )
            log.warning("%s", line)
            done.append(line)
    return done + sweep_regions(in_use)
