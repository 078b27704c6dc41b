"""Issue 22 items 5, 6 and 18 without a server: what ``serve`` watches and signals is known by PID
*and* start time, stubs are counted against the configs, nginx workers are watched, the shared
memory is private where the platform allows, and the sweep of a killed run's leftovers touches
only what is provably a dead run of ours.  Fake processes stand in for tritonserver, its stubs and
nginx (a Python interpreter started under the stub's name runs a ``model.py`` that sleeps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from step37_deploy import process
from step37_deploy.process import ProcessId, boot_id, pid_namespace, proc_stat
from step37_deploy.serving import shm, supervise
from step37_deploy.serving.shm import RunMark
from tests.conftest import private_shm_allowed

PY = os.path.realpath(sys.executable)


def _sleeper(**popen) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", "import time; time.sleep(120)"], **popen)


def _wait(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def procs():
    """Processes a test started: killed and reaped at the end, by their own Popen."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


# -- identity: PID and start time ---------------------------------------------------------------------


def test_a_process_id_is_its_pid_and_start_time(procs):
    child = _sleeper()
    procs.append(child)
    me = ProcessId.of(child.pid)
    assert me is not None and me.running() and me.stat().ppid == os.getpid()
    reused = ProcessId(child.pid, me.start + 1)  # the same PID, another process
    assert not reused.running() and reused.stat() is None
    assert not reused.send(signal.SIGKILL)  # never signalled as someone else
    time.sleep(0.2)
    assert child.poll() is None
    assert me.send(signal.SIGKILL)
    child.wait(10)
    assert not me.running() and not me.send(signal.SIGTERM)


def test_a_reused_pid_reads_as_dead_not_alive(procs):
    """``check`` judges a watched process by its identity: the PID now runs another process (here a
    live sleeper whose start time differs from the one recorded), so the watched one died."""
    child = _sleeper()
    procs.append(child)
    sup = supervise.Supervisor()
    sup.watch("model m (stub m_0_0, pid 1)", child.pid)
    assert sup.check() is None
    w = sup.watched[child.pid]
    w.ident = ProcessId(child.pid, w.ident.start - 1)  # as if the stub died and its PID went to another
    assert sup.check() == "model m (stub m_0_0, pid 1) died"


def test_kill_all_runs_once_and_never_signals_a_group_whose_leader_is_not_ours(procs):
    # A group leader with a member: the leader as recorded is gone (its PID, and so the group's
    # number, now belong to other processes), so neither may be signalled.
    leader = subprocess.Popen(
        [PY, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
         "'import time; time.sleep(120)']); time.sleep(120)"], start_new_session=True,
    )  # fmt: skip
    procs.append(leader)
    _wait(lambda: len(process.children(ProcessId.of(leader.pid))) == 1)
    (member,) = process.children(ProcessId.of(leader.pid))
    sup = supervise.Supervisor()
    sup.watch("gateway", leader.pid)
    assert leader.pid in sup.groups
    forged = ProcessId(leader.pid, sup.groups[leader.pid].start + 1)
    sup.groups[leader.pid] = sup.watched[leader.pid].ident = forged
    assert sup.kill_all(grace_s=0.5) == []
    time.sleep(0.3)
    assert leader.poll() is None and ProcessId(member.pid, member.start).running()
    # A second call (every exit path of serve calls it) does nothing at all.
    sup.watched[leader.pid].ident = ProcessId.of(leader.pid)
    assert sup.kill_all(grace_s=0.5) == [] and leader.poll() is None
    os.killpg(leader.pid, signal.SIGKILL)  # the test's own cleanup: the group is this test's


# -- stubs: found from the launch, counted against the configs -------------------------------------------

_FAKE_TRITON = """
import subprocess, sys, threading, time
stub, model_py, n, die = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
def spawn(i):
    args = [stub, model_py, "step37_region", "1", "1", "0", "/lib", "0", f"m_0_{i}", "DEFAULT"]
    p = subprocess.Popen(args)
    if die and i == 0:
        p.kill()  # this instance's stub dies at once: before anyone looks
        p.wait()
subprocess.Popen([stub, "-c", "pass"]).wait()  # like the backend's argument-less check: exits
threads = [threading.Thread(target=spawn, args=(i,)) for i in range(n)]  # forked from other threads
for t in threads: t.start()
for t in threads: t.join()
print("ready", flush=True)
time.sleep(120)
"""


def _fake_triton(tmp_path: Path, n: int, die: bool, procs: list) -> subprocess.Popen:
    model_py = tmp_path / "m" / "1" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("import time\ntime.sleep(120)\n")
    stub = tmp_path / supervise.STUB_NAME
    stub.symlink_to(PY)
    script = tmp_path / "triton.py"
    script.write_text(_FAKE_TRITON)
    p = subprocess.Popen([PY, str(script), str(stub), str(model_py), str(n), "1" if die else "0"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_stub_that_died_before_it_was_seen_is_a_crash(tmp_path, procs):
    triton = _fake_triton(tmp_path, 2, die=True, procs=procs)
    sup = supervise.Supervisor()
    sup.expect_stubs({"m": 2})
    sup.watch("tritonserver", triton, front=True, stubs=True)
    sup.discover()
    assert len(sup.stubs()) == 1 and "(stub m_0_1, pid" in sup.stubs()[0]
    assert sup.check() == "model m runs 1 of its 2 stubs (one exited before serve found it)"
    stub = next(w.ident for w in sup.watched.values() if w.kind == "stub")
    assert sup.kill_all(grace_s=2.0) == []
    assert triton.wait(5) == -signal.SIGKILL
    _wait(lambda: not stub.running(), 5.0)  # the stub went down with it


def test_stubs_of_every_thread_are_found_and_their_death_is_a_crash(tmp_path, procs):
    triton = _fake_triton(tmp_path, 2, die=False, procs=procs)
    sup = supervise.Supervisor()
    sup.expect_stubs({"m": 2})
    sup.watch("tritonserver", triton, front=True, stubs=True)
    sup.discover()
    assert sorted(n.split(",")[0] for n in sup.stubs()) == ["model m (stub m_0_0", "model m (stub m_0_1"]
    assert sup.check() is None
    pid = next(w.pid for w in sup.watched.values() if w.kind == "stub")
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: sup.check() is not None)
    assert sup.check() == f"{sup.watched[pid].name} died"
    sup.kill_all(grace_s=2.0)


def test_expected_stubs_are_the_cpu_instance_counts_of_python_models(tmp_path):
    for name, text in {
        "emb": 'name: "emb"\nbackend: "python"\ninstance_group [{count: 3, kind: KIND_CPU}]\n',
        "tower": 'name: "tower"\nbackend: "python"\ninstance_group [{kind: KIND_CPU}, {count: 2, kind: KIND_CPU}]\n',
        "plan": 'name: "plan"\nplatform: "tensorrt_plan"\ninstance_group [{count: 1, kind: KIND_GPU}]\n',
        "gpu": 'name: "gpu"\nbackend: "python"\ninstance_group [{count: 1, kind: KIND_GPU}]\n',
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(text)
    assert supervise.expected_stubs(tmp_path) == {"emb": 3, "tower": 3}


# -- nginx workers -------------------------------------------------------------------------------------

_FAKE_NGINX = """
import os, signal, subprocess, sys, time
respawn = sys.argv[1] == "1"
workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
print("ready", flush=True)
while True:
    for i, w in enumerate(workers):
        if w.poll() is not None and respawn:
            workers[i] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.05)
"""


def _fake_nginx(respawn: bool, procs: list) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", _FAKE_NGINX, "1" if respawn else "0"], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    return p


def _workers(sup: supervise.Supervisor) -> list[int]:
    return sorted(w.pid for w in sup.watched.values() if w.kind == "worker")


def test_a_replaced_worker_is_fine_a_stopped_one_is_a_crash(procs):
    master = _fake_nginx(True, procs)
    sup = supervise.Supervisor(stall_s=0.5)
    sup.watch("gateway", master, front=True, workers=2)
    assert sup.check() is None and len(_workers(sup)) == 2
    first = _workers(sup)
    os.kill(first[0], signal.SIGKILL)  # nginx replaces a worker that crashed
    _wait(lambda: sup.check() is None and len(_workers(sup)) == 2 and _workers(sup) != first)
    t0 = time.monotonic()
    victim = _workers(sup)[1]
    os.kill(victim, signal.SIGSTOP)
    _wait(lambda: proc_stat(victim).state == "T")
    assert sup.check(t0) is None and sup.check(t0 + 0.3) is None
    assert sup.check(t0 + 0.6) == f"gateway worker (pid {victim}) stalled (stopped for more than 0.5s)"
    t0 = time.monotonic()
    sup.kill_all(grace_s=2.0)  # the stopped worker is SIGKILLed with the rest
    assert time.monotonic() - t0 < 5
    _wait(lambda: proc_stat(victim) is None or proc_stat(victim).state == "Z")


def test_a_worker_that_is_not_replaced_is_a_crash(procs):
    master = _fake_nginx(False, procs)
    sup = supervise.Supervisor()
    sup.watch("gateway", master, front=True, workers=2)
    assert sup.check() is None
    os.kill(_workers(sup)[0], signal.SIGKILL)
    _wait(lambda: len(process.children(sup.watched[master.pid].ident)) == 1)
    t0 = time.monotonic()
    assert sup.check(t0) is None  # nginx may still replace it
    assert sup.check(t0 + supervise.WORKER_RESPAWN_S) == (
        f"gateway runs 1 of its 2 workers (for more than {supervise.WORKER_RESPAWN_S:g}s)"
    )
    sup.kill_all(grace_s=2.0)


# -- shared memory -------------------------------------------------------------------------------------


def test_the_sweep_removes_only_a_provably_dead_run_of_ours(tmp_path, monkeypatch, procs):
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    gone = _sleeper()
    dead = ProcessId.of(gone.pid)
    gone.kill()
    gone.wait()
    live = _sleeper()
    procs.append(live)
    boot, ns = boot_id(), pid_namespace()
    assert boot and ns

    def region(mark: RunMark) -> Path:
        path = tmp_path / f"{mark.prefix}0f1e2d3c-uuid"
        path.write_bytes(b"request bytes")
        return path

    killed = region(RunMark(boot, ns, dead, "a" * 16))  # a killed run of ours
    reused = region(RunMark(boot, ns, ProcessId(live.pid, ProcessId.of(live.pid).start - 5), "b" * 16))
    keep = {
        "other PID namespace": region(RunMark(boot, ns + 1, dead, "c" * 16)),  # --ipc=host, a pod
        "other boot": region(RunMark("0" * 32, ns, dead, "d" * 16)),
        "live run": region(RunMark(boot, ns, ProcessId.of(live.pid), "e" * 16)),
        "this run": region(RunMark.new()),
    }
    legacy = tmp_path / f"step37_{dead.pid}_8000_0f1e2d3c"  # a PID alone proves nothing
    legacy.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    lines = supervise.sweep_dead_runs()
    assert not killed.exists() and not reused.exists()
    assert all(p.exists() for p in keep.values()), {k: p.exists() for k, p in keep.items()}
    assert legacy.exists()
    assert len(lines) == 2 and all("shared memory left by a killed serve" in line for line in lines)


def test_a_run_mark_round_trips_and_names_this_process():
    mark = RunMark.new()
    assert RunMark.parse(mark.prefix + "uuid") == mark and mark.here() and not mark.dead()
    assert mark.owner == ProcessId.of(os.getpid()) and len(mark.prefix) < 120
    assert RunMark.parse("step37_123_8000_x") is None and RunMark.parse("other") is None
    assert RunMark.new().token != mark.token  # unguessable: nobody can create our regions beforehand


_MAKE_REGION = "import os, time; open('/dev/shm/step37_probe_' + str(os.getpid()), 'w').write('x'); " \
    "print(oct(os.stat('/dev/shm').st_mode & 0o777), flush=True); time.sleep(120)"  # fmt: skip


def test_tritonserver_gets_a_private_dev_shm_where_the_platform_allows(procs, caplog):
    allowed = private_shm_allowed()
    proc, private = shm.launch([PY, "-c", _MAKE_REGION], True, 0o077, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    mode = proc.stdout.readline().strip()
    host = shm.SHM_DIR / f"step37_probe_{proc.pid}"
    try:
        if not allowed:
            assert not private and "a private one cannot be made here" in caplog.text
            pytest.skip(f"no private /dev/shm on this machine: {caplog.text.strip()}")
        deadline = time.monotonic() + 5  # (once seen False under a loaded full suite: look again a moment)
        while not shm.private_shm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert private and shm.private_shm(proc.pid) and mode == "0o700", (mode, proc.poll())
        assert not host.exists()  # never in the host's /dev/shm, not even for a moment
        assert (Path(f"/proc/{proc.pid}/root/dev/shm") / host.name).exists()
    finally:
        host.unlink(missing_ok=True)


def test_the_fallback_is_one_logged_line_and_the_host_dev_shm(procs, caplog, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", Path("/nonexistent-shm-dir"))  # the tmpfs mount fails
    proc, private = shm.launch([PY, "-c", "import time; time.sleep(120)"], True, 0o077)
    procs.append(proc)
    assert not private and not shm.private_shm(proc.pid)
    lines = [r.getMessage() for r in caplog.records if "private one cannot be made" in r.getMessage()]
    assert len(lines) == 1 and ("/nonexistent-shm-dir" in lines[0] or "unshare" in lines[0]), caplog.text


def test_a_private_dev_shm_child_still_dies_with_serve(tmp_path):
    """The parent-death signal survives the namespaces (it is set last): kill the parent with
    SIGKILL and its tritonserver stand-in gets SIGTERM."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from step37_deploy.serving import shm
        proc, private = shm.launch([{PY!r}, "-c", "import time; time.sleep(120)"], True, 0o077)
        print(proc.pid, private, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child_pid, private = parent.stdout.readline().split()
        child = ProcessId.of(int(child_pid))
        assert child is not None and child.running() and private == str(private_shm_allowed())
        parent.kill()
        parent.wait(10)
        _wait(lambda: not child.running(), 5.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None:
            child.send(signal.SIGKILL)
