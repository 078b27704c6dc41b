"""``serve`` under faults and overload (issue 16): a dead or frozen process makes it exit with the
crash code and leave nothing behind, the next run sweeps what a killed run left, bounded queues
refuse work fast instead of computing answers nobody waits for, and what the server writes is its
user's alone (issue 15 item 4).

The supervision, queue-policy and client-retry logic is checked without a server first; then real
``step37-deploy serve`` subprocesses (ONNX FP32 towers of the tiny checkpoint, loopback, free ports):
one per crash (a crash ends it), and one shared by the overload and permission checks, which is
started right after a run killed with SIGKILL so that it shows the sweep.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from step37_deploy.errors import ServerError
from step37_deploy.serving import shm, supervise
from step37_deploy.serving.client import EmbedClient
from step37_deploy.serving.threads import usable_cores
from tests.conftest import private_shm_allowed, rel_l2, start_serve, stop_serve

# -- without a server ---------------------------------------------------------------------------------


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_stub_identity_from_the_command_line():
    cmd = [
        "/x/backends/python/triton_python_backend_stub", "/tmp/r/step37_vision_728/1/model.py",
        "step37_1_2_uuid", "1048576", "1048576", "77", "/x/backends/python", "336", "step37_vision_728_0_0", "DEFAULT",
    ]  # fmt: skip
    assert supervise.stub_identity(cmd) == ("step37_vision_728", "step37_vision_728_0_0")
    assert supervise.stub_identity(["/usr/bin/python3", "-c", "pass"]) is None
    assert supervise.stub_identity([]) is None


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until ``pid`` is in the stopped state (SIGSTOP is delivered when it next runs)."""
    deadline = time.monotonic() + timeout_s
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, f"process {pid} did not stop within {timeout_s} s"
        time.sleep(0.01)


def test_supervisor_sees_a_death_and_a_stall_and_kills_what_ignores_sigterm():
    stubborn = _child("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)")
    other = _child("import time; time.sleep(120)")
    try:
        sup = supervise.Supervisor(stall_s=0.5)
        sup.watch("gateway", stubborn, front=False)
        sup.watch("tritonserver", other, front=True)
        time.sleep(0.5)  # the interpreters are up
        assert sup.check() is None
        os.kill(other.pid, signal.SIGKILL)
        other.wait(10)
        assert sup.check() == "tritonserver was killed by SIGKILL"
        # A stall: stopped for longer than stall_s, not before.
        sup = supervise.Supervisor(stall_s=0.5)
        sup.watch("gateway", stubborn)
        os.kill(stubborn.pid, signal.SIGSTOP)
        _wait_stopped(stubborn.pid)
        t0 = time.monotonic()
        assert sup.check(t0) is None
        assert sup.check(t0 + 0.3) is None
        assert sup.check(t0 + 0.6) == "gateway stalled (stopped for more than 0.5s)"
        # kill_all: a running process that ignores SIGTERM gets SIGKILL after the grace.
        os.kill(stubborn.pid, signal.SIGCONT)
        t0 = time.monotonic()
        killed = sup.kill_all(grace_s=1.0)
        stubborn.wait(5)  # (psutil reaped it: Popen cannot see the signal any more)
        assert killed == [stubborn.pid] and not psutil.pid_exists(stubborn.pid)
        assert time.monotonic() - t0 < 5
        # A stopped one is SIGKILLed at once (it would act on SIGTERM only once continued).
        frozen = _child("import time; time.sleep(120)")
        time.sleep(0.3)
        os.kill(frozen.pid, signal.SIGSTOP)
        _wait_stopped(frozen.pid)  # a signal takes effect once the process is scheduled: a loaded machine
        sup = supervise.Supervisor()
        sup.watch("stub", frozen)
        t0 = time.monotonic()
        assert sup.kill_all(grace_s=5.0) == [] and time.monotonic() - t0 < 2
        frozen.wait(5)
    finally:
        for p in (stubborn, other):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_queue_policy_in_every_config():
    """Every served model has a bounded queue with a timeout that a request may shorten; a tower's
    bound never refuses what the embedder instances can send it."""
    from step37_deploy.serving.repository import (
        RepositoryOptions,
        TowerArtifact,
        config_text,
        embedder_config,
        tower_config,
    )

    tower = TowerArtifact(728, "onnx", Path("t.onnx"), "float32", "fp32", 169, 64, None)
    opts = RepositoryOptions(max_queue_size=5, queue_timeout_ms=1500, preprocess_instances=3, max_batch=8)
    emb, tow = embedder_config(opts), tower_config(tower, opts)
    assert emb.max_batch_size == 0  # the wire contract: one image per request, unchanged
    p = emb.dynamic_batching.default_queue_policy
    assert (p.max_queue_size, p.default_timeout_microseconds, p.allow_timeout_override) == (5, 1_500_000, True)
    from tritonclient.grpc import model_config_pb2 as pb

    assert p.timeout_action == pb.ModelQueuePolicy.REJECT and "max_queue_size: 5" in config_text(emb)
    t = tow.dynamic_batching.default_queue_policy
    # 3 instances x (a global view + 36 crops of a 3024 px image in chunks of 8) = 3 x 6 = 18 > 5
    assert (t.max_queue_size, t.default_timeout_microseconds, t.allow_timeout_override) == (18, 1_500_000, True)
    assert (
        tower_config(
            tower, RepositoryOptions(max_queue_size=100, preprocess_instances=1)
        ).dynamic_batching.default_queue_policy.max_queue_size
        == 100
    )


def test_client_retries_unavailable_with_backoff_within_its_deadline_never_invalid_arg(monkeypatch):
    monkeypatch.setattr("step37_deploy.serving.client.RETRY_AFTER_S", 0)  # plain backoff here (the hint: below)
    client = EmbedClient("127.0.0.1:1", "grpc", timeout=2.0)
    calls: list[float] = []

    def flaky(data, left_s, **_request):
        calls.append(left_s)
        if len(calls) < 3:
            raise ServerError("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", retryable=True)
        return "answer"

    monkeypatch.setattr(client, "_embed_once", flaky)
    assert client.embed(b"x") == "answer" and len(calls) == 3 and client.retries == 2
    assert calls[0] <= 2.0 and calls[2] < calls[0]  # each try gets what is left of one deadline

    calls.clear()

    def bad(data, left_s, **_request):
        calls.append(left_s)
        raise ServerError("cannot read image", "StatusCode.INVALID_ARGUMENT", retryable=False)

    monkeypatch.setattr(client, "_embed_once", bad)
    with pytest.raises(ServerError, match="cannot read image"):
        client.embed(b"x")
    assert len(calls) == 1  # never retried

    def busy(data, left_s, **_request):
        calls.append(left_s)
        raise ServerError("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", retryable=True)

    calls.clear()
    monkeypatch.setattr(client, "_embed_once", busy)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="maximum queue size"):
        client.embed(b"x", deadline=0.8)
    assert time.monotonic() - t0 < 1.0 and len(calls) > 2  # backed off, gave up inside the deadline
    with pytest.raises(ServerError):
        EmbedClient("127.0.0.1:1", "grpc", retry=False).embed(b"x")  # a refused connection, final at once


def test_client_waits_what_a_refusal_asks_before_the_retry_and_the_next_request(monkeypatch):
    """Issue 22 item 20: a refusal that says "retry after N s" (the gateway's 503, the embedder's
    busy tower) is retried no sooner than N s later; Triton's own queue refusal, which cannot say
    it, gets the contract's RETRY_AFTER_S; a lost connection only the jittered backoff.  When the
    retry budget is spent the refusal is final, and the same thread's next request waits the rest
    of N s before it is sent (a closed loop does not answer a refusal with a new request at once);
    ``retry=False`` callers pace themselves and never wait."""
    from step37_deploy.serving import client as cl
    from step37_deploy.serving.contract import RETRY_AFTER_S

    gateway = ServerError("too many requests in flight; retry after 0.4 s", "StatusCode.UNAVAILABLE", retryable=True)
    triton = ServerError("Exceeds maximum queue size", "503", retryable=True)
    lost = ServerError("connection failure: reset", "connection", retryable=True)
    assert cl.retry_after_s(gateway) == 0.4 and cl.retry_after_s(triton) == RETRY_AFTER_S
    assert cl.retry_after_s(lost) == 0.0
    assert cl.retry_after_s(ServerError("retry after 9999 s", "503", retryable=True)) == cl.MAX_RETRY_AFTER_S
    monkeypatch.setattr(cl, "backoff_s", lambda attempt: 0.0)  # only the hint is waited for here
    sent: list[float] = []

    def refused_once(data, left_s, **_request):
        sent.append(time.monotonic())
        if len(sent) == 1:
            raise gateway
        return "answer"

    client = EmbedClient("127.0.0.1:1", "grpc", timeout=5.0)
    monkeypatch.setattr(client, "_embed_once", refused_once)
    assert client.embed(b"x") == "answer" and sent[1] - sent[0] >= 0.4  # the retry waited the hint
    sent.clear()

    def always_refused(data, left_s, **_request):
        sent.append(time.monotonic())
        raise gateway

    spent = EmbedClient("127.0.0.1:1", "grpc", timeout=5.0, retry_budget=cl.RetryBudget(0.0, 0.0, 0.0))
    monkeypatch.setattr(spent, "_embed_once", always_refused)
    for _ in range(2):
        with pytest.raises(ServerError, match="retry budget is spent"):
            spent.embed(b"x")
    assert len(sent) == 2 and sent[1] - sent[0] >= 0.4  # the next request waited the hint too
    sent.clear()
    paced = EmbedClient("127.0.0.1:1", "grpc", timeout=5.0, retry=False)
    monkeypatch.setattr(paced, "_embed_once", always_refused)
    for _ in range(2):
        with pytest.raises(ServerError, match="retry after"):
            paced.embed(b"x")
    assert sent[1] - sent[0] < 0.3  # retry=False: sent when the caller sends


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_retry_false_sends_one_try_where_retry_true_sends_more(protocol):
    """Issue 22 item 11: a refused connection (a real loopback port nobody listens on) is retried
    with ``retry=True`` within the deadline, tried exactly once with ``retry=False``: tries counted."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"
    tries = {}
    for retry in (False, True):
        client = EmbedClient(url, protocol, timeout=1.5, retry=retry)
        once, count = client._embed_once, []

        def counted(*args, _once=once, _count=count, **kwargs):
            _count.append(1)
            return _once(*args, **kwargs)

        client._embed_once = counted
        with client, pytest.raises(ServerError, match="connection failure") as err:
            client.embed(b"x")
        assert err.value.retryable  # worth retrying: only retry=False made it final
        tries[retry] = (len(count), client.retries)
    assert tries[False] == (1, 0) and tries[True][0] > 1 and tries[True][1] == tries[True][0] - 1, tries


class _FakeTritonError(Exception):
    INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = range(4)

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


@pytest.fixture
def embedder_module(monkeypatch):
    """The embedder model's module with a stand-in for the Python backend's ``pb_utils`` (its
    ``TritonError`` has codes and ``code()``, as Triton 2.51's does)."""
    import importlib
    import types

    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonError = _FakeTritonError
    fake.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(error=error)
    fake.Logger = types.SimpleNamespace(log_error=lambda m: None, log_info=lambda m: None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    name = "step37_deploy.serving.triton_models.embedder"
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module(name)
    sys.modules.pop(name, None)  # no module bound to the stand-in outlives the test


def test_embedder_sends_no_tower_call_for_a_cancelled_request_and_bounds_each_call(embedder_module):
    """Issue 22 item 19: a request cancelled while its views were prepared gets no tower call at
    all; a live one's tower calls carry what its client's ``timeout`` leaves (so a tower's queue
    drops views whose client stopped waiting)."""
    import asyncio
    import types

    fake = sys.modules["triton_python_backend_utils"]
    sent: list[dict] = []

    class Call:
        def __init__(self, **kwargs) -> None:
            sent.append(kwargs)

        async def async_exec(self):
            return types.SimpleNamespace(has_error=lambda: False)

    fake.InferenceRequest, fake.Tensor = Call, lambda name, array: array
    rows = types.SimpleNamespace(as_numpy=lambda: np.zeros((1, 4, 8), np.float32))
    fake.get_output_tensor_by_name = lambda response, name: rows
    model = object.__new__(embedder_module.TritonPythonModel)
    model.towers = {728: ("step37_vision_728", np.dtype(np.float32), 8)}
    model.local = {}  # the towers are Triton models (--tower-calls bls)
    views = np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(embedder_module._Cancelled):
        asyncio.run(model._tower(728, views, None, types.SimpleNamespace(is_cancelled=lambda: True), 0))
    assert sent == []  # cancelled: the tower never sees it
    asyncio.run(model._tower(728, views, None, types.SimpleNamespace(is_cancelled=lambda: False), 1234))
    assert len(sent) == 1 and sent[0]["timeout"] == 1234
    left = embedder_module._time_left_us(types.SimpleNamespace(timeout=lambda: 2_000_000), time.monotonic_ns())
    assert 1_000_000 < left <= 2_000_000
    assert embedder_module._time_left_us(types.SimpleNamespace(timeout=lambda: 0), 0) == 0  # none: the default


def test_embedder_runs_no_local_tower_chunk_for_a_cancelled_request(embedder_module):
    """``--tower-calls local``: the towers run in the embedder's own process, in chunks of at most
    ``max_batch_size`` views; a request cancelled before a chunk starts runs no more of them, and
    nothing crosses BLS."""
    import asyncio
    import types

    fake = sys.modules["triton_python_backend_utils"]
    fake.InferenceRequest = lambda **kwargs: pytest.fail(f"a BLS call for a local tower: {kwargs}")
    ran: list[int] = []

    class Runner:
        def infer(self, x):
            ran.append(len(x))
            return np.ones((len(x), 4, 8), np.float64)

    model = object.__new__(embedder_module.TritonPythonModel)
    model.towers = {504: ("step37_vision_504", np.dtype(np.float32), 3)}
    model.local = {504: Runner()}
    views = np.zeros((7, 3, 4, 4), np.float32)
    rows = asyncio.run(model._tower(504, views, None, types.SimpleNamespace(is_cancelled=lambda: False)))
    assert ran == [3, 3, 1] and rows.shape == (7, 4, 8) and rows.dtype == np.float32
    checks = iter([False, True])  # cancelled while the first chunk ran
    ran.clear()
    with pytest.raises(embedder_module._Cancelled):
        asyncio.run(model._tower(504, views, None, types.SimpleNamespace(is_cancelled=lambda: next(checks))))
    assert ran == [3]


def test_embedder_answers_user_errors_invalid_arg_and_its_own_faults_internal(embedder_module):
    """Issue 22 item 9: only an InputError is the client's mistake; an EngineError (a server fault,
    also a Step37Error) is INTERNAL, and a tower's busy answer is told by its UNAVAILABLE code."""
    import asyncio

    from step37_deploy.errors import EngineError, InputError

    E = _FakeTritonError
    model = object.__new__(embedder_module.TritonPythonModel)
    model.logger = sys.modules["triton_python_backend_utils"].Logger
    raised = iter([InputError("image x.png is 1x20000"), EngineError("engine x.plan: device lost")])

    async def embed(request, marks=None):
        raise next(raised)

    model._embed, model.stages = embed, None  # no stage log (issue 21's timers off)
    answers = asyncio.run(model.execute([object(), object()]))
    assert [a.error.code() for a in answers] == [E.INVALID_ARG, E.INTERNAL]
    assert "1x20000" in answers[0].error.message() and "device lost" in answers[1].error.message()
    busy = embedder_module._tower_busy
    assert busy(E("Exceeds maximum queue size", E.UNAVAILABLE)) and busy(E("any words", E.UNAVAILABLE))
    assert not busy(E("model said: Exceeds maximum queue size", E.INTERNAL))  # the code decides, not the text


def test_backoff_is_exponential_with_full_jitter():
    from step37_deploy.serving.client import backoff_s

    draws = [[backoff_s(a, 0.1, 1.0) for _ in range(200)] for a in range(6)]
    for a, d in enumerate(draws):
        cap = min(1.0, 0.1 * 2**a)
        assert all(0 <= x <= cap for x in d) and max(d) > 0.5 * cap and len(set(d)) > 150


def test_loadtest_without_the_serve_extra_is_one_line_exit_2(monkeypatch, capsys):
    from step37_deploy.cli import main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    rc = main(["loadtest", "--server", "127.0.0.1:1", "--images", "x.png", "--checkpoint", "ckpt", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'step37-deploy[serve]'" in err and len(err.strip().splitlines()) == 1


# -- against real `serve` processes ----------------------------------------------------------------------

pytest.importorskip("tritonclient.grpc", reason="the [serve] extra (tritonclient) is not installed")
pytest.importorskip("pytriton", reason="the [serve] extra (nvidia-pytriton) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXIT_CRASH = 4


def _args(checkpoint: Path, artifacts: tuple[Path, Path], *extra: str) -> list[str]:
    """The towers as models of their own (``--tower-calls bls``, the layout of TensorRT towers):
    these tests kill and freeze tower stubs and count the views each tower computed."""
    return [
        "--checkpoint", str(checkpoint), "--backend", "onnx", "--artifacts", *map(str, artifacts),
        "--preprocess-instances", "2", "--cache-mb", "0", "--exit-timeout", "10", "--tower-calls", "bls", *extra,
    ]  # fmt: skip


def _run_facts(log: Path) -> tuple[Path, str]:
    """The work folder and the shared-memory prefix of a running serve, from its log (once serve
    has logged ``ready``: its models can be ready a moment before)."""
    deadline = time.monotonic() + 30
    while "ready: HTTP" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text(errors="replace")
    workdir = Path(re.search(r"repository (\S+)/model_repository", text).group(1))
    prefix = re.search(r"shm-region-prefix-name=(\S+)", text).group(1)
    return workdir, prefix


def _leftover_processes(prefix: str) -> list[psutil.Process]:
    """tritonserver and stubs of the run with this shared-memory prefix that still exist."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if prefix in cmd and p.info.get("status") != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def _stub_pid(prefix: str, instance: str) -> int:
    for p in _leftover_processes(prefix):
        cmd = p.cmdline()
        if supervise.stub_identity(cmd) and cmd[8] == instance:
            return p.pid
    raise AssertionError(f"no stub {instance} for {prefix}")


def _triton_pid(prefix: str) -> int:
    (p,) = [p for p in _leftover_processes(prefix) if p.cmdline()[0].endswith("tritonserver")]
    return p.pid


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _assert_gone(proc: subprocess.Popen, log: Path, workdir: Path, prefix: str) -> None:
    deadline = time.monotonic() + 5
    while _leftover_processes(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _leftover_processes(prefix), [p.cmdline()[:2] for p in _leftover_processes(prefix)]
    assert not workdir.exists()
    assert not supervise.shm_regions(prefix)


@pytest.mark.parametrize(
    ("target", "names"),
    [
        ("step37_vision_728_0_0", "model step37_vision_728 (stub step37_vision_728_0_0"),
        ("step37_embedder_0_1", "model step37_embedder (stub step37_embedder_0_1"),
        ("tritonserver", "tritonserver was killed by SIGKILL"),
    ],
    ids=["tower-stub", "embedder-stub", "tritonserver"],
)
def test_sigkill_is_a_crash_that_takes_everything_down(tiny_fp32, exported, tmp_path, target, names):
    """Documented behaviour (option b): readiness stops answering within a moment, serve logs one
    line naming what died, kills the rest, removes its leftovers and exits 4."""
    log = tmp_path / "serve.log"
    proc, ports = start_serve(_args(tiny_fp32, (exported[("fp32", 728)], exported[("fp32", 504)])), log)
    try:
        workdir, prefix = _run_facts(log)
        cores = usable_cores()  # each tower min(2, cores) instances; one embedder instance a core
        assert f"watching {2 * min(2, cores) + cores} stubs" in log.read_text()
        pid = _triton_pid(prefix) if target == "tritonserver" else _stub_pid(prefix, target)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        last_ready = killed
        while proc.poll() is None and time.monotonic() - killed < 30:
            if _ready(ports["http"]):
                last_ready = time.monotonic()
            time.sleep(0.1)
        assert proc.wait(5) == EXIT_CRASH
        assert last_ready - killed < 3.0  # health never says ready for more than a moment
        text = log.read_text(errors="replace")
        crash = [line for line in text.splitlines() if line.startswith("step37-deploy: crash:")]
        assert len(crash) == 1 and names in crash[0], text[-2000:]
        _assert_gone(proc, log, workdir, prefix)
    finally:
        stop_serve(proc)


def _gateway_workers(serve: subprocess.Popen) -> list[int]:
    (master,) = [c for c in psutil.Process(serve.pid).children() if "nginx: master" in " ".join(c.cmdline())]
    return sorted(c.pid for c in master.children() if c.status() != psutil.STATUS_ZOMBIE)


def _worker_after_a_replaced_one(serve: subprocess.Popen, http_port: int) -> int:
    """Issue 22 item 18: a killed worker that nginx replaces is no crash; returns a live worker."""
    first = _gateway_workers(serve)
    os.kill(first[0], signal.SIGKILL)
    for _ in range(50):  # up to 5 s for nginx's replacement
        if (now := _gateway_workers(serve)) != first and len(now) == len(first):
            break
        time.sleep(0.1)
    time.sleep(2 * supervise.WORKER_RESPAWN_S)
    assert serve.poll() is None and _ready(http_port) and len(_gateway_workers(serve)) == len(first)
    return _gateway_workers(serve)[-1]


@pytest.mark.parametrize("target", ["stub", "gateway-worker"])
def test_a_process_frozen_for_3s_is_a_crash(tiny_fp32, exported, tmp_path, target):
    log = tmp_path / "serve.log"
    proc, ports = start_serve(_args(tiny_fp32, (exported[("fp32", 728)], exported[("fp32", 504)])), log)
    try:
        workdir, prefix = _run_facts(log)
        if target == "stub":
            pid = _stub_pid(prefix, "step37_vision_504_0_0")
        else:
            pid = _worker_after_a_replaced_one(proc, ports["http"])
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3)
        # Seen while still frozen: serve did not wait for the stub to run again.
        text = log.read_text(errors="replace")
        assert "stalled (stopped for more than 1s)" in text
        assert target == "stub" or f"crash: gateway worker (pid {pid}) stalled" in text, text[-2000:]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        assert proc.wait(15) == EXIT_CRASH
        _assert_gone(proc, log, workdir, prefix)
    finally:
        stop_serve(proc)


def test_sigterm_during_start_up_stops_cleanly(tiny_fp32, exported, tmp_path):
    from step37_deploy.serving.server import free_port

    log = tmp_path / "serve.log"
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "step37_deploy.cli", "serve", "--host", "127.0.0.1"]
    cmd += _args(tiny_fp32, (exported[("fp32", 728)], exported[("fp32", 504)]))
    cmd += [f"--{k}-port={free_port()}" for k in ("http", "grpc", "metrics")]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while "starting " not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # tritonserver is loading the models
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        text = log.read_text(errors="replace")
        assert "stopped during start-up" in text and "in flight" not in text and "step37-deploy: error" not in text
        _assert_gone(proc, log, *_run_facts_start(text))
    finally:
        stop_serve(proc)


def _run_facts_start(text: str) -> tuple[Path, str]:
    """Work folder and prefix from the ``starting`` line (the run never reached ``ready``)."""
    m = re.search(r"--model-repository=(\S+)/model_repository", text)
    return Path(m.group(1)), re.search(r"shm-region-prefix-name=(\S+)", text).group(1)


@pytest.fixture(scope="module")
def survivor(tiny_fp32, exported, tmp_path_factory):
    """A serve killed with SIGKILL together with its tritonserver and stubs (as the OOM killer of a
    container might), then the next serve: it sweeps the dead run's leftovers and then serves the
    overload and permission tests."""
    artifacts = (exported[("fp32", 728)], exported[("fp32", 504)])
    folder = tmp_path_factory.mktemp("survivor")
    dead_log = folder / "dead.log"
    dead, _ = start_serve(_args(tiny_fp32, artifacts), dead_log)
    workdir, prefix = _run_facts(dead_log)
    triton = _triton_pid(prefix)
    dead.kill()
    os.killpg(triton, signal.SIGKILL)  # tritonserver's group: it and every stub
    dead.wait()
    deadline = time.monotonic() + 10
    while _leftover_processes(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {"workdir": workdir, "prefix": prefix, "regions": supervise.shm_regions(prefix), "pid": dead.pid}
    # A private /dev/shm (issue 22 item 5) dies with the run: nothing of it is left on the host.
    private = "a private one cannot be made here" not in dead_log.read_text(errors="replace")
    assert workdir.is_dir() and bool(left["regions"]) != private, "the killed run left nothing to sweep"
    log = folder / "serve.log"
    proc, ports = start_serve(_args(tiny_fp32, artifacts), log)
    try:
        yield {"proc": proc, "ports": ports, "log": log, "left": left, "checkpoint": tiny_fp32, "artifacts": artifacts}
    finally:
        stop_serve(proc)


def test_the_next_serve_removes_a_killed_runs_leftovers(survivor):
    left, text = survivor["left"], survivor["log"].read_text(errors="replace")
    assert not left["workdir"].exists() and not any(r.exists() for r in left["regions"])
    assert f"removed {left['workdir']}, a temporary left by a killed run (pid {left['pid']})" in text
    for region in left["regions"]:
        assert f"removed {region} (" in text and f"shared memory left by a killed serve (pid {left['pid']})" in text


def test_shared_memory_and_repository_are_the_server_users_only(survivor):
    workdir, prefix = _run_facts(survivor["log"])
    triton = _triton_pid(prefix)
    # Issue 22 item 5: where the platform allows, tritonserver's regions live in a /dev/shm of its
    # own (0700): they never exist in the host's, not even for the moment before a chmod.
    assert shm.private_shm(triton) == private_shm_allowed()
    if shm.private_shm(triton):
        own = Path(f"/proc/{triton}/root/dev/shm")
        assert own.stat().st_mode & 0o777 == 0o700 and not supervise.shm_regions(prefix)
        regions = [r for r in own.iterdir() if r.name.startswith(prefix)]
    else:  # the fallback: made 0600 after the fact
        regions = supervise.shm_regions(prefix)
        assert all(r.stat().st_mode & 0o777 == 0o600 for r in regions), [oct(r.stat().st_mode) for r in regions]
    assert len(regions) >= 4  # one per stub: two towers, two embedder instances
    # As root the gateway's workers run as nobody: its group may pass through to the counts (0640).
    counts = workdir / "gateway" / "counts" / "gateway.prom"
    shared = os.geteuid() == 0
    assert workdir.stat().st_mode & 0o777 == (0o710 if shared else 0o700)
    assert counts.stat().st_mode & 0o777 == (0o640 if shared else 0o600)
    files = [p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink() and p != counts]
    assert files
    for f in files:
        st = f.stat()
        # What serve wrote is 0600 (umask 077); a hard link to an input artifact keeps the input's own
        # mode (changing it would modify the user's file) and is reachable only through the 0700 folder.
        assert st.st_mode & 0o077 == 0 or st.st_nlink > 1, (f, oct(st.st_mode))


def _png(seed: int, w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pending(metrics_port: int) -> float:
    from step37_deploy.serving.loadtest import parse_metrics

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        m = parse_metrics(r.read().decode())
    return sum(v for (name, _), v in m.items() if name == "nv_inference_pending_request_count")


def _gateway_refused(metrics_port: int) -> float:
    """Every refusal the gateway has answered (its own and Triton's), from ``/metrics/gateway``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics/gateway", timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
    samples = [s for f in families for s in f.samples if s.name == "step37_gateway_responses_total"]
    return sum(s.value for s in samples if s.labels["outcome"] == "refused")


def test_open_loop_overload_is_refused_fast_and_every_answer_is_right(survivor):
    """~4x capacity for 15 s, 5 s client deadline: requests are refused fast (bounded queue), each
    ends in exactly one answer or one error, every answer is correct, and the server's pending count
    is back to zero within 25 s of the load stopping."""
    from step37_deploy.runtime import ImageEmbedding, VisionEmbedder
    from step37_deploy.serving import loadtest as lt

    ports = survivor["ports"]
    payloads = [_png(200 + i, w, h) for i, (w, h) in enumerate([(610, 470), (530, 530), (980, 760), (450, 640)])]
    twin = VisionEmbedder.from_artifacts(survivor["checkpoint"], "onnx", list(survivor["artifacts"]), cache_mb=0)
    refs = []
    for p in payloads:
        (r,) = twin.embed_images([p])
        refs.append(ImageEmbedding(lt._numpy(r.features), r.token_ids, r.text, r.num_crops, r.newline_mask))
    client = EmbedClient(f"127.0.0.1:{ports['grpc']}", "grpc", timeout=5.0, retry=False)
    refused_before = _gateway_refused(ports["metrics"])
    try:
        out, sent, wall = lt.drive(client.embed, payloads, refs, 8, 4, 120, 60, 1e-4, "", False)
        assert sent == 8 and all(o.error is None and not o.wrong for o in out), [o.error or o.wrong for o in out]
        capacity = 8 / wall
        rate = 4 * capacity
        t0 = time.monotonic()
        out, sent, wall, late = lt.drive_open_loop(
            client.embed, payloads, refs, rate, 15.0, 5.0, 1e-4, "", False, on_exit=client.close_thread
        )
        load_stopped = t0 + 15.0
    finally:
        client.close()
    m = lt.measure_open_loop(out, sent, wall, late, rate, 5.0, 15.0)
    assert sent == len(out) and m.lost == 0  # each request: exactly one answer or one error
    assert m.mismatches == 0, m.error_messages
    answered = sent - m.errors
    assert answered > 0 and m.goodput_ips > 0, sorted({str(o.error)[:120] for o in out if o.error})[:5]
    others = [o.error for o in out if o.error and o.kind is None]
    assert not others, others[:3]  # only refusals and deadline misses
    full = [o.latency_s for o in out if o.error and "Exceeds maximum queue size" in o.error]
    assert full, "nothing was refused at 4x capacity"
    assert np.percentile(full, 90) < 1.0, np.percentile(full, 90)  # refused fast, not after a wait
    # Issue 22 item 20: every refusal the client saw is in the gateway's series, none more (the
    # counts are written at most a second after the answers).
    counted, end = _gateway_refused(ports["metrics"]) - refused_before, time.monotonic() + 5
    while counted < m.refused and time.monotonic() < end:
        time.sleep(0.2)
        counted = _gateway_refused(ports["metrics"]) - refused_before
    assert counted == m.refused, (counted, m.refused)
    while _pending(ports["metrics"]) > 0:
        assert time.monotonic() - load_stopped < 25, "requests still pending 25 s after the load stopped"
        time.sleep(0.5)


def _views(url: str, model: str) -> int:
    """A tower's ``inference_count``: the views it computed since it loaded."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


def _jpeg(seed: int, side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class _AsyncCalls:
    """Raw gRPC ``async_infer`` calls to the embedder, each with its own gRPC deadline; the status
    each ended with ("ok" or the gRPC code), in the order they ended."""

    def __init__(self, url: str) -> None:
        import threading

        import tritonclient.grpc as grpcclient

        self.grpc, self.client = grpcclient, grpcclient.InferenceServerClient(url)
        self.statuses: list[str] = []
        self.done = threading.Semaphore(0)

    def _ended(self, result, error) -> None:
        self.statuses.append("ok" if error is None else str(error.status()))
        self.done.release()

    def send(self, raw: bytes, deadline_s: float) -> None:
        inp = self.grpc.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([raw], dtype=np.object_))
        self.client.async_infer("step37_embedder", [inp], self._ended, client_timeout=deadline_s)

    def wait(self, n: int) -> None:
        """Until ``n`` more calls ended (60 s each at most)."""
        for _ in range(n):
            assert self.done.acquire(timeout=60), "a call never ended"

    def close(self) -> None:
        self.client.close()


def _hasty_waves(url: str, payloads: list[bytes], wave: int, deadline_s: float, queued: int) -> list[str]:
    """Send ``payloads`` (cycling) through raw gRPC in waves of ``wave``, each call with a
    ``deadline_s`` gRPC deadline and no ``timeout`` parameter (only the cancellation can spare the
    server the work), until ``queued`` calls ended past their deadline (those waited in a queue: a
    full queue refuses at once) or 40 waves went out; the status of every call."""
    calls = _AsyncCalls(url)
    try:
        for k in range(40):
            for raw in payloads[(k * wave) % len(payloads) :][:wave]:
                calls.send(raw, deadline_s)
            calls.wait(wave)
            if calls.statuses.count("StatusCode.DEADLINE_EXCEEDED") >= queued:
                break
            time.sleep(0.3)  # an instance frees now and then: the queue's cancelled requests go
    finally:
        calls.close()
    return calls.statuses


def test_a_request_whose_grpc_deadline_passed_is_never_computed(survivor):
    """Issue 22 item 19, at its scale: both embedder instances busy with large images (sent again
    and again, so they stay busy), 100 small requests with a 50 ms gRPC deadline queue behind them
    through the gateway, in waves of 10, and time out (those a full queue refuses at once are not
    among the 100).  At most 5 of them reach a tower (the 728
    tower sees one view per answered large image, one per computed small one), and the server
    answers correctly after."""
    import threading

    from step37_deploy.runtime import VisionEmbedder

    url = f"127.0.0.1:{survivor['ports']['grpc']}"
    small = [_png(400 + i, 300, 300) for i in range(100)]
    before = _views(url, "step37_vision_728")
    answered: list = []
    stop = threading.Event()

    failed: list[str] = []

    def keep_busy(seed: int) -> None:  # 2000x2000: 16 crops, a second or more of work each on a CPU
        with EmbedClient(url, "grpc", timeout=300) as slow:
            while not stop.is_set():
                try:
                    answered.append(slow.embed(_jpeg(seed, 2000)))
                except ServerError as exc:  # a loaded machine's tower timeout: reported below
                    failed.append(str(exc)[-120:])

    threads = [threading.Thread(target=keep_busy, args=(300 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # both instances are decoding / preprocessing / in the towers
        statuses = _hasty_waves(url, small, 10, 0.05, 100)
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    queued = statuses.count("StatusCode.DEADLINE_EXCEEDED")
    refused = statuses.count("StatusCode.UNAVAILABLE")  # a full queue (cancelled requests still hold slots)
    assert queued >= 100 and queued + refused == len(statuses), (queued, refused, sorted(set(statuses)))
    time.sleep(2.0)
    computed = _views(url, "step37_vision_728") - before - len(answered)
    assert not failed and len(answered) >= 2 and computed <= 5, (computed, len(answered), failed)
    twin = VisionEmbedder.from_artifacts(survivor["checkpoint"], "onnx", list(survivor["artifacts"]), cache_mb=0)
    _assert_answers_right(url, twin, 999)


def _assert_answers_right(url: str, twin, seed: int) -> None:
    """After an attack: the server answers a normal request, and correctly."""
    raw = _png(seed, 610, 470)
    with EmbedClient(url, "grpc", timeout=60) as client:
        got = client.embed(raw)
    (want,) = twin.embed_images([raw])
    assert got.token_ids == want.token_ids and rel_l2(got.features, np.asarray(want.features)) < 1e-4


def _infer_message(raw: bytes) -> bytes:
    """A ``ModelInfer`` call's body as on the wire: the embedder's ``ModelInferRequest`` (Triton's
    own protobuf classes) with ``raw`` as its one BYTES ``image``, behind gRPC's 5-byte prefix."""
    import struct

    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    from step37_deploy.serving import contract as C

    request = service_pb2.ModelInferRequest(model_name=C.EMBEDDER_MODEL)
    request.inputs.add(name=C.EMBEDDER_INPUT, datatype="BYTES", shape=[1])
    request.raw_input_contents.append(serialize_byte_tensor(np.array([raw], dtype=np.object_)).item())
    payload = request.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


class _RapidReset:
    """The rapid-reset attack (CVE-2023-44487) through real HTTP/2 connections (the ``h2``
    library) to the gateway's gRPC port, from ``source``: every stream is a whole ``ModelInfer``
    call, HEADERS and DATA, reset by the client (RST_STREAM CANCEL) in the same write (so it never
    counts against HTTP/2's concurrent-stream limit) or a moment later; the server is left to
    notice that nobody waits.  ``goaway``: connections the server closed."""

    def __init__(self, port: int, message: bytes, connections: int, source: str = "127.0.0.2") -> None:
        import h2.config
        import h2.connection

        self.message, self.sent, self.goaway = message, 0, 0
        self.headers = [
            (":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"), ("te", "trailers"),
        ]  # fmt: skip
        self.conns = []
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            self.conns.append((sock, conn))
        end = time.monotonic() + 10  # nginx opens its connection window at once: wait for it
        for sock, conn in self.conns:
            while conn.outbound_flow_control_window < 1 << 20 and time.monotonic() < end:
                self._pump(sock, conn, 0.2)

    def _pump(self, sock: socket.socket, conn, wait_s: float) -> bool:
        """Reads what the server sent within ``wait_s`` (settings, window updates, the answers of
        streams reset already, which h2 drops); False once the server closed the connection."""
        import h2.events

        end = time.monotonic() + wait_s
        while select.select([sock], [], [], max(0.0, end - time.monotonic()))[0]:
            try:
                data = sock.recv(1 << 20)
            except OSError:
                data = b""
            events = conn.receive_data(data) if data else []
            if not data or any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                return False
            if out := conn.data_to_send():
                sock.sendall(out)
        return True

    def burst(self, index: int, streams: int, reset_after_s: float = 0.0) -> None:
        """``streams`` calls in one write on connection ``index`` (a closed one is skipped), each
        reset in that same write, or ``reset_after_s`` later (once the server may be working on
        it; a stream the server ended meanwhile is left alone)."""
        import h2.errors
        import h2.exceptions

        sock, conn = self.conns[index]
        if conn is None:
            return
        sids = []
        for _ in range(streams):
            sid = conn.get_next_available_stream_id()
            sids.append(sid)
            conn.send_headers(sid, self.headers)
            step = conn.max_outbound_frame_size
            for i in range(0, len(self.message), step):
                conn.send_data(sid, self.message[i : i + step], end_stream=i + step >= len(self.message))
            if not reset_after_s:
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        try:
            sock.sendall(conn.data_to_send())
            self.sent += streams
            alive = self._pump(sock, conn, reset_after_s)
            if reset_after_s and alive:
                for sid in sids:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                sock.sendall(conn.data_to_send())
        except OSError:
            alive = False
        if not alive:
            self.goaway += 1
            sock.close()
            self.conns[index] = (sock, None)

    def close(self) -> None:
        for sock, conn in self.conns:
            if conn is not None:
                with contextlib.suppress(OSError):
                    self._pump(sock, conn, 0.5)
            sock.close()


def _settled_views(url: str, metrics_port: int, models: tuple[str, ...], within_s: float = 60.0) -> dict[str, int]:
    """Each tower's ``inference_count`` once nothing is pending and none changed for 2 s (what
    the gateway passed on before a reset may still be on its way through the queues)."""
    end = time.monotonic() + within_s
    last, since = {m: _views(url, m) for m in models}, time.monotonic()
    while time.monotonic() - since < 2.0 or _pending(metrics_port) > 0:
        assert time.monotonic() < end, f"{models} still busy {within_s} s after the attack"
        time.sleep(0.25)
        now = {m: _views(url, m) for m in models}
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_rapid_reset_streams_are_not_computed_and_others_are_served(survivor):
    """Issue 22 item 19, rapid reset (CVE-2023-44487): 300 ``ModelInfer`` streams, each reset by
    its client in the same write as its request, over 3 HTTP/2 connections from another address
    (bursts of 10, a few a second).  At most 5 % of them (15) are computed (one 728 view each, for
    a small image); while it runs, a second client's 20 requests (gRPC and HTTP, new connections)
    are at least 19 answered correctly; the serve tree grows by less than 1 GiB (RSS, /dev/shm,
    temporary files) and gives back what the attack held within 5 s; the server is ready and
    answers correctly after.  Measured: none is computed, with or without the embedder's
    cancellation checks (a stream reset in the same write never reaches Triton's model: nginx and
    Triton's gRPC front drop it); the next test covers a reset the embedder must catch itself."""
    from step37_deploy.runtime import VisionEmbedder
    from tests.conftest import ServedEmbedder
    from tests.test_gateway_attacks import check_goals, under_attack, warm_up

    ports = survivor["ports"]
    url = f"127.0.0.1:{ports['grpc']}"
    server = ServedEmbedder(
        survivor["proc"], ports["http"], ports["grpc"], ports["metrics"], survivor["checkpoint"],
        survivor["artifacts"], survivor["log"],
    )  # fmt: skip
    twin = VisionEmbedder.from_artifacts(survivor["checkpoint"], "onnx", list(survivor["artifacts"]), cache_mb=0)
    image = _png(31, 400, 300)  # one 728 view, no crops
    answer = (image, twin.embed_images([image])[0])
    warm_up(server, *answer)  # what the first calls allocate is not the attack's (any test may run first)
    streams, burst = 300, 10

    def reset_streams(stop) -> None:  # all 300, whenever the second client is done
        for k in range(streams // burst):
            attack.burst(k % len(attack.conns), burst)
            time.sleep(0.2)

    tower = ("step37_vision_728",)
    before = _settled_views(url, ports["metrics"], tower)[tower[0]]
    # Connected right before it: nginx closes a connection that opened no stream within its header timeout.
    attack = _RapidReset(ports["grpc"], _infer_message(_png(32, 40, 30)), connections=3)
    try:
        result = under_attack(server, answer, reset_streams, warmup_s=0.5)
    finally:
        attack.close()
    computed = _settled_views(url, ports["metrics"], tower)[tower[0]] - before - result[0]
    assert attack.sent == streams, (attack.sent, attack.goaway)
    assert computed <= streams // 20, f"{computed} of {streams} reset streams were computed"
    check_goals(result)
    assert _ready(ports["http"])
    _assert_answers_right(url, twin, 998)


def _started(url: str) -> int:
    """The embedder's ``execution_count``: requests an instance began (one a call: no batching),
    cancelled or not; a request dropped from its queue never counts."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics("step37_embedder", as_json=True)
    return int(stats["model_stats"][0].get("execution_count", 0))


def _flat_png(side: int) -> bytes:
    """A ``side`` x ``side`` image of one colour: about 30 KB to send (one HTTP/2 window), as many
    pixels to decode, resize and tile as a photo of that size."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_a_request_cancelled_while_it_is_preprocessed_never_reaches_a_tower(survivor):
    """Issue 22 item 19, the embedder's own share: Triton drops a cancelled request that still
    waits in the embedder's queue, but one that an instance already runs is the model's to stop.
    A 3000x3000 image (36 crops) is sent two at a time (one per embedder instance), in waves that
    alternate a gRPC deadline of a fifth of its preprocessing time (tritonclient) and an HTTP/2
    stream reset by its client that long after it was sent (the rapid reset's slower cousin):
    every one is cancelled while an instance preprocesses it, and neither tower sees any view."""

    from step37_deploy.preprocess import preprocess

    ports = survivor["ports"]
    url = f"127.0.0.1:{ports['grpc']}"
    raw = _flat_png(3000)
    t0 = time.monotonic()
    preprocess(raw)
    cancel_s = (time.monotonic() - t0) / 5
    towers = ("step37_vision_728", "step37_vision_504")
    before = _settled_views(url, ports["metrics"], towers)
    calls = _AsyncCalls(url)
    message, sent = _infer_message(raw), 0
    started = {"deadline": 0, "reset": 0}
    try:
        for wave in range(4):
            kind, first = ("deadline", "reset")[wave % 2], _started(url)
            if kind == "deadline":
                for _ in range(2):
                    calls.send(raw, cancel_s)
                calls.wait(2)
            else:  # a new connection each time (nginx closes one that opened no stream for 10 s)
                resets = _RapidReset(ports["grpc"], message, connections=1)
                resets.burst(0, 2, reset_after_s=cancel_s)
                resets.close()
                sent += resets.sent
            end = time.monotonic() + 10  # both instances took theirs before the next wave
            while _started(url) - first < 2 and time.monotonic() < end:
                time.sleep(0.1)
            started[kind] += _started(url) - first
            time.sleep(20 * cancel_s)  # and are done with them (4x the preprocessing)
    finally:
        calls.close()
    assert calls.statuses == ["StatusCode.DEADLINE_EXCEEDED"] * 4 and sent == 4, (calls.statuses, sent)
    # A request cancelled before an instance took it checks nothing here: both kinds must have run.
    assert started["deadline"] >= 1 and started["reset"] >= 1, started
    after = _settled_views(url, ports["metrics"], towers)
    assert after == before, f"{started} cancelled while preprocessed; the towers computed views: {before} -> {after}"
