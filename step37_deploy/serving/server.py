"""Launch a real ``tritonserver`` on a model repository: start it, wait until every model is loaded,
stop it gracefully; and ``serve``, the whole service from start to stop.

The binary is found by ``prepare.py`` (the one ``nvidia-pytriton`` ships unless the user names
their own).  Two things make the bundled Python backend work from any environment, both handled
here rather than in the user's shell:

* the stub must load the running interpreter's own ``libpython``: ``sysconfig``'s ``LIBDIR`` goes
  first on the server's ``LD_LIBRARY_PATH`` (otherwise a system ``libpython`` of another patch
  release is picked and every Python model fails with ``'_thread.RLock' object has no attribute
  '_recursion_count'``);
* the stub's embedded interpreter must be this environment's and import this ``step37_deploy``:
  it finds its prefix by looking up ``python3`` on ``PATH`` (so this interpreter's folder goes
  first: a venv's ``site-packages`` then come with it) and it ignores ``PYTHONPATH``, which the
  repository's ``model.py`` files honour themselves (the package's parent folder goes there).

PyTriton keeps the stubs outside the backend folder, so the Python backend folder is assembled in
a temporary directory (links to the library and the stub for this Python).

No secret is on tritonserver's command line (any local user reads it in ``/proc/PID/cmdline``):
models load once at start (``--model-control-mode=none``: the model-repository API can then load
and unload nothing, even from loopback), and the restricted categories (model repository, shared
memory, logging, trace) are locked with a header value no client can send (:data:`LOCK_VALUE`
holds a newline), so there is no key to open them at all.

Stopping drains through the gateway, not through Triton: Triton's own SIGTERM handling stops
*every* model from accepting requests at once, including the BLS requests an in-flight embedder
request still has to send to the towers (they fail with "Server not ready").  So ``serve`` first
reloads the gateway with its draining config (``Gateway.drain``: readiness and new requests
refused at once, what is in flight finished), and only once the gateway's old workers are gone
does Triton get SIGTERM (``--exit-timeout-secs`` bounds what is left), then the gateway stops.
:func:`stop_bound_s` is the sum of those bounded waits.  Under ``--no-gateway`` Triton gets SIGTERM
directly.  The server also gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``).

``serve`` puts the gateway (``gateway.py``: nginx, with the limits Triton lacks, an API allowlist,
the API key and TLS) on the user's address and ports and Triton on 127.0.0.1 behind it; it starts
the gateway once Triton is ready, drains through it, and stops it after Triton.

``serve`` is a sequence of named steps: resolve and check its arguments (``prepare.plan_serve``),
prepare the private work folder (``prepare.private_work_folder``), write the repository, then
:class:`ServeRun`'s ``start_triton``, ``start_gateway``, ``report_ready``, ``supervise``,
``drain_and_stop``, and ``take_down`` whatever happens.

While it serves, ``serve`` supervises tritonserver and every backend stub (``supervise.py``): a
process that dies or stays stopped is a crash, logged in one line; the whole process tree is taken
down and ``serve`` raises :class:`ServerCrashed` (exit 4).  tritonserver runs with umask 077, the
work folder is 0700 and named with this host and PID (``files.temp_sibling``), so the next run
removes a killed run's folder, shared memory and stubs (``supervise.sweep_dead_runs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..errors import BackendUnavailable, ServerCrashed
from . import contract as C
from .gateway import DRAIN_MARGIN_S, RELAY_JOIN_S, Gateway, GatewayOptions
from .gateway import STOP_S as GATEWAY_STOP_S
from .net import free_port, host_port, probe_host
from .prepare import ServePlan, TritonInstall, bundled_tritonserver, plan_serve, private_work_folder
from .shm import launch as launch_with_shm
from .supervise import KILL_GRACE_S, POLL_S, Supervisor, expected_stubs, shm_prefix
from .threads import ThreadPlan, thread_options

log = logging.getLogger(__name__)


def package_parent() -> str:
    """The folder holding the ``step37_deploy`` this process imported (a checkout, or site-packages)."""
    import step37_deploy

    return str(Path(step37_deploy.__file__).resolve().parent.parent)


def server_env(
    install: TritonInstall, base: dict[str, str] | None = None, threads: ThreadPlan | None = None
) -> dict[str, str]:
    """tritonserver's environment: the stub fixes above, and ``threads``' pool sizes for the stubs."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        env = threads.env(env)
    libdirs = [sysconfig.get_config_var("LIBDIR")]
    if install.libs is not None:
        libdirs.append(str(install.libs))
    rest = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = ":".join([d for d in libdirs if d] + ([rest] if rest else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([package_parent(), *([old] if old else [])])
    env.pop("PYTHONHOME", None)
    return env


def assemble_backends(install: TritonInstall, folder: Path) -> Path | None:
    """A backend folder whose ``python/`` holds the library, its utils and this Python's stub."""
    if install.python_backend is None:
        return None
    py = folder / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in install.python_backend.iterdir():
        if src.is_file():
            (py / src.name).symlink_to(src)
    if install.stub is not None:
        (py / "triton_python_backend_stub").symlink_to(install.stub)
    return folder


#: Triton's API categories no client may use, not even on Triton's loopback ports: locked by
#: :data:`LOCK_HEADER` = :data:`LOCK_VALUE`, which no client can send.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
#: The lock's header (gRPC: ``triton-grpc-protocol-`` + it) and value.  The value holds a newline:
#: an HTTP header value cannot (a raw newline ends the header line) and gRPC clients refuse to
#: send one ("Illegal header value"), so nothing opens these categories and the value is no
#: secret: it may be read in ``ps``.  (Checked with Triton 2.51: 403 / ``UNAVAILABLE`` "This API
#: is restricted" with or without ``step37-lock: no``.)
LOCK_HEADER = "step37-lock"
LOCK_VALUE = "no\nbody"
#: Triton's ``--exit-timeout-secs`` behind the gateway: the gateway has drained every request
#: before Triton gets SIGTERM, so this bounds only Triton's own unloading (Python-backend models
#: took about 4 s to unload on a loaded 2-core machine; past it Triton exits with status 1 and
#: the stubs are ended without their ``finalize``).
TRITON_EXIT_AFTER_DRAIN_S = 6
#: After Triton's exit timeout, how long before SIGKILL.
STOP_GRACE_S = 1.0
#: After a clean stop, what still runs (a stub of a SIGKILLed tritonserver) gets this long after
#: SIGTERM, and again after SIGKILL (``Supervisor.kill_all``'s grace).
CLEAN_KILL_GRACE_S = 1.0

#: What "ready" means to a client: the served API's model is loaded (Triton runs with
#: ``--strict-readiness``, so the server is ready only once every model of its repository is; the
#: towers are models of their own only under ``--tower-calls bls``).
SERVED_MODELS = (C.EMBEDDER_MODEL,)


def repository_models(repository: str | Path) -> tuple[str, ...]:
    """The models of a repository: its folders with a ``config.pbtxt``."""
    return tuple(sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt")))


def models_ready(http_url: str, models: tuple[str, ...] = SERVED_MODELS) -> bool:
    """The server at ``http_url`` (HOST:PORT) is ready and so is every one of ``models``."""

    def ok(path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{http_url}{path}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return ok("/v2/health/ready") and all(ok(f"/v2/models/{m}/ready") for m in models)


class TritonServer:
    """One ``tritonserver`` process on a repository; ``start`` returns once every model is ready."""

    def __init__(
        self,
        repository: str | Path,
        workdir: str | Path,
        install: TritonInstall | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        exit_timeout_s: int = C.DEFAULT_EXIT_TIMEOUT_S,
        log_verbose: int = 0,
        models: tuple[str, ...] | None = None,  # default: every model of the repository
        allow_shared_memory: bool = False,
        grpc_tls: tuple[Path, Path] | None = None,
        threads: ThreadPlan | None = None,
    ) -> None:
        self.threads = threads  # the stubs' thread pools (serving/threads.py), set in their environment
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.install = install or bundled_tritonserver()
        self.host = host
        probe = probe_host(host)
        self.http_port = http_port or free_port(probe)
        self.grpc_port = grpc_port or free_port(probe)
        self.metrics_port = metrics_port or free_port(probe)
        self.exit_timeout_s = exit_timeout_s
        self.log_verbose = log_verbose
        self.models = models or repository_models(repository)
        self.probe_host = probe
        self.allow_shared_memory = allow_shared_memory
        self.grpc_tls = grpc_tls
        self.proc: subprocess.Popen | None = None
        self.shm_prefix = shm_prefix()
        self.private_shm = False  # set by launch(): tritonserver has a /dev/shm of its own (shm.py)

    @property
    def http_url(self) -> str:
        return host_port(self.probe_host, self.http_port)

    @property
    def grpc_url(self) -> str:
        return host_port(self.probe_host, self.grpc_port)

    @property
    def restricted_apis(self) -> tuple[str, ...]:
        """Triton's API categories locked for every client (``--http-restricted-api`` and
        ``--grpc-restricted-protocol``)."""
        if self.allow_shared_memory:
            return tuple(a for a in RESTRICTED_APIS if a != "shared-memory")
        return RESTRICTED_APIS

    def command(self) -> list[str]:
        restricted = f"{','.join(self.restricted_apis)}:{LOCK_HEADER}={LOCK_VALUE}"
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            "--model-control-mode=none",  # every model loads at start; nothing loads or unloads after
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            # A prefix of our own: servers started side by side never share Python-backend memory.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.grpc_tls is not None:
            cert, key = self.grpc_tls
            cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
        backends = assemble_backends(self.install, self.workdir / "backends")
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        return cmd

    @staticmethod
    def loggable(cmd: list[str]) -> str:
        """The command line as one log line (the lock's newline written ``\\n``)."""
        return " ".join(cmd).replace("\n", "\\n")

    def launch(self) -> subprocess.Popen:
        """Start tritonserver (its own process group, umask 077, SIGTERM when this process dies, and
        a private /dev/shm unless ``allow_shared_memory`` or the platform forbids it: ``shm.py``)."""
        cmd = self.command()
        log.info("starting %s", self.loggable(cmd))
        # umask 077: what tritonserver and its stubs create is the server user's alone
        self.proc, self.private_shm = launch_with_shm(
            cmd, not self.allow_shared_memory, 0o077,
            env=server_env(self.install, threads=self.threads), cwd=self.workdir, start_new_session=True,
        )  # fmt: skip
        return self.proc

    def start(self, timeout_s: float = 300.0, should_stop=lambda: False) -> TritonServer:
        self.launch()
        self.wait_ready(timeout_s, should_stop)
        return self

    def ready(self) -> bool:
        """Server ready and every served model loaded."""
        return models_ready(self.http_url, self.models)

    def wait_ready(self, timeout_s: float, should_stop=lambda: False, supervisor: Supervisor | None = None) -> None:
        """Until every model is ready.  ``supervisor``: the shared-memory regions are made private as
        they appear; its processes are not judged yet (a model that fails to load ends its stub, and
        tritonserver then exits on its own: a repository problem, exit 2, not a crash)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise BackendUnavailable(
                    f"tritonserver exited with status {self.proc.returncode} before every model was ready "
                    "(its log above names the model and the reason)"
                )
            if should_stop():
                return
            if supervisor is not None:  # stubs are watched from their start (a later death is then seen)
                supervisor.protect_shm()
                supervisor.discover()
            if time.monotonic() > deadline:
                self.stop()
                raise BackendUnavailable(f"tritonserver was not ready within {timeout_s:.0f}s (its log above says why)")
            time.sleep(0.25)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float | None = None) -> int:
        """tritonserver's exit status; SIGKILL after ``timeout_s`` (None: wait as long as it takes)."""
        assert self.proc is not None
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                return self.proc.wait(None if end is None else max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0fs; killing it", timeout_s)
                self.proc.kill()
                end = None
            except KeyboardInterrupt:  # pragma: no cover - the handler forwards signals
                continue

    def stop(self, grace_s: float | None = None) -> int:
        """SIGTERM (Triton finishes what it runs within its exit timeout, unloads, exits), SIGKILL
        after ``grace_s`` (default: the exit timeout + :data:`STOP_GRACE_S`).  Nothing drains the
        embedder first: behind ``serve``'s gateway that is the gateway's job."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace_s if grace_s is not None else self.exit_timeout_s + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in time; killing it")
            self.proc.kill()
            return self.proc.wait()


class ServeRun:
    """One ``serve`` from start to stop: its processes, their supervisor, and the stop request
    (SIGINT/SIGTERM) that ends it.  Each step is a method; :func:`serve` calls them in order."""

    def __init__(self, plan: ServePlan) -> None:
        self.plan = plan
        self.stop_signals: list[int] = []
        self.server: TritonServer | None = None
        self.front: Gateway | None = None
        self.supervisor: Supervisor | None = None
        self.stopped = False  # drain_and_stop completed

    @property
    def stopping(self) -> bool:
        return bool(self.stop_signals)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask for a graceful stop (drain first); a second one stops Triton at once."""

        def on_signal(signum: int, _frame) -> None:
            if not self.stop_signals:
                log.info("received %s: stopping (in-flight requests are drained first)", signal.Signals(signum).name)
            elif self.server is not None:  # a second signal: stop now
                self.server.signal(signal.SIGTERM)
            self.stop_signals.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def start_triton(
        self, repo: Path, workdir: Path, ready_timeout_s: float, threads: ThreadPlan | None = None
    ) -> None:
        """tritonserver on the repository, watched from its launch, until every model is ready (or a
        stop is asked).  Behind the gateway it listens on 127.0.0.1 only, on free ports."""
        p = self.plan
        if p.gateway is not None:
            host, ports, tls = "127.0.0.1", {"http": None, "grpc": None, "metrics": None}, None
        else:
            log.warning(
                "--no-gateway: tritonserver listens on %s itself, with no body-size, compressed-body, connection "
                "or idle limits%s",
                p.host,
                "; TLS covers gRPC only (HTTP stays plain)" if p.tls else "",
            )
            host, ports, tls = p.host, p.ports, p.tls
        # Behind the gateway, Triton gets SIGTERM once the gateway has drained: its own exit timeout
        # bounds only its unloading.  Without it, Triton's exit timeout is the drain.
        exit_timeout_s = p.exit_timeout_s if p.gateway is None else TRITON_EXIT_AFTER_DRAIN_S
        self.server = TritonServer(
            repo, workdir, p.install, host, ports["http"], ports["grpc"], ports["metrics"], exit_timeout_s,
            p.log_verbose, allow_shared_memory=p.allow_shared_memory, grpc_tls=tls, threads=threads,
        )  # fmt: skip
        self.supervisor = Supervisor(self.server.shm_prefix)
        self.supervisor.expect_stubs(expected_stubs(repo))
        self.server.launch()
        self.supervisor.private_shm = self.server.private_shm
        self.supervisor.watch("tritonserver", self.server.proc, front=True, stubs=True)
        self.server.wait_ready(ready_timeout_s, should_stop=lambda: self.stopping, supervisor=self.supervisor)

    def start_gateway(self, workdir: Path) -> None:
        """nginx on the user's host and ports (free ones where none was given), in front of Triton;
        watched: its death is a crash, and it is killed first."""
        p, server = self.plan, self.server
        if p.gateway is None or server is None:
            return
        probe = probe_host(p.host)
        listen = {name: port or free_port(probe) for name, port in p.ports.items()}
        upstream = {"http": server.http_port, "grpc": server.grpc_port, "metrics": server.metrics_port}
        self.front = Gateway(workdir, p.host, listen, upstream, p.gateway, p.nginx).start()
        self.supervisor.watch("gateway", self.front.proc, front=True, workers=self.front.options.worker_processes)

    def report_ready(self, repo: Path) -> None:
        """Shared memory made private and the stubs watched, then one line: where to connect."""
        server, supervisor, host = self.server, self.supervisor, self.plan.host
        supervisor.protect_shm()
        supervisor.discover()
        if self.front is not None:
            ports = self.front.listen
        else:
            ports = {"http": server.http_port, "grpc": server.grpc_port, "metrics": server.metrics_port}
        log.info(
            "ready: HTTP %s:%d, gRPC %s:%d, metrics %s:%d (%s); models %s (repository %s); watching %d stubs",
            host, ports["http"], host, ports["grpc"], host, ports["metrics"],
            "through the nginx gateway" if self.front is not None else "tritonserver itself, no gateway",
            ", ".join(server.models), repo, len(supervisor.stubs()),
        )  # fmt: skip

    def supervise(self) -> None:
        """Until a stop is asked; a watched process that dies or stalls takes the server down
        (:class:`ServerCrashed`, exit 4)."""
        while not self.stopping:
            problem = self.supervisor.check()
            if problem is not None:
                log.error("crash: %s; taking the server down", problem)
                self.supervisor.kill_all()
                raise ServerCrashed(f"{problem}: the server was taken down (restart serve)")
            self.supervisor.wait(POLL_S)  # woken at once by a watched process's exit

    def drain_and_stop(self) -> int:
        """Drain through the gateway (:meth:`Gateway.drain`: readiness and new requests refused at
        once, the ones in flight finished within ``--exit-timeout``), then SIGTERM Triton (nothing
        is left in flight, so its exit timeout bounds only its unloading), then stop the gateway.
        Under ``--no-gateway`` Triton gets SIGTERM directly and its ``--exit-timeout-secs`` is the
        drain.  0, or :class:`BackendUnavailable` when Triton fails to stop with requests still in
        flight.  :func:`stop_bound_s` sums the waits."""
        server, front, exit_timeout_s = self.server, self.front, self.plan.exit_timeout_s
        drained, started = False, time.monotonic()
        if front is not None and server.proc.poll() is None:
            drained = front.drain(exit_timeout_s, should_stop=lambda: len(self.stop_signals) > 1)
            what = "in-flight requests done" if drained else "drain cut short"
            log.info("%s after %.1fs; stopping tritonserver", what, time.monotonic() - started)
        server.signal(signal.SIGTERM)
        rc = server.wait(server.exit_timeout_s + STOP_GRACE_S)
        if front is not None:
            front.stop()  # only refusals and probes are left: it quits at once
        if rc != 0 and drained:
            log.warning(
                "tritonserver exited with status %d (its models did not finish unloading within %ds?); every "
                "request had been answered",
                rc,
                server.exit_timeout_s,
            )
        elif rc != 0:
            raise BackendUnavailable(
                f"tritonserver exited with status {rc} while stopping (requests still in flight "
                f"after --exit-timeout {exit_timeout_s}s?)"
            )
        self.stopped = True
        log.info("stopped cleanly" if rc == 0 else "stopped")
        return 0

    def take_down(self) -> None:
        """Nothing outlives ``serve``: every watched process and its tree (stubs that ignore SIGTERM,
        a gateway) is killed; a server started but not yet watched is stopped.  After a clean stop
        nothing should be left, so what is gets :data:`CLEAN_KILL_GRACE_S`."""
        if self.supervisor is not None:
            self.supervisor.kill_all(CLEAN_KILL_GRACE_S if self.stopped else KILL_GRACE_S)
        elif self.server is not None and self.server.proc is not None and self.server.proc.poll() is None:
            self.server.stop()


def stop_bound_s(exit_timeout_s: float = C.DEFAULT_EXIT_TIMEOUT_S, gateway: bool = True) -> float:
    """The longest a stop (SIGINT/SIGTERM to ``serve``'s exit) can take: every bounded wait on its
    path, each at its bound.  The supervisor's poll; then behind the gateway its drain (requests
    in flight up to ``exit_timeout_s``, then its old workers' exit), Triton's exit timeout and the
    grace before SIGKILL, the gateway's stop and its log relay; under ``--no-gateway`` Triton's
    exit timeout (``exit_timeout_s``) and that grace; and the take-down of whatever survived (two
    waits).  With the defaults, 22.2 s: under Kubernetes' default grace period (30 s)."""
    if gateway:
        stop = exit_timeout_s + DRAIN_MARGIN_S + TRITON_EXIT_AFTER_DRAIN_S + STOP_GRACE_S + GATEWAY_STOP_S
        stop += RELAY_JOIN_S
    else:
        stop = exit_timeout_s + STOP_GRACE_S
    return POLL_S + stop + 2 * CLEAN_KILL_GRACE_S


def serve(
    checkpoint: str | Path,
    backend: str,
    artifacts: list[str | Path] | tuple = (),
    options=None,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    tritonserver: str | Path | None = None,
    exit_timeout_s: int = C.DEFAULT_EXIT_TIMEOUT_S,
    ready_timeout_s: float = 600.0,
    log_verbose: int = 0,
    gateway: bool = True,
    limits: GatewayOptions | None = None,
    api_key_file: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    allow_shared_memory: bool = False,
) -> int:
    """``step37-deploy serve``: a repository in a temporary folder, ``tritonserver`` on it, and in
    front of it the gateway (nginx, on ``host`` and the given ports; Triton then listens on
    127.0.0.1 only), in the foreground until SIGINT/SIGTERM; then drain through the gateway
    (readiness and new requests refused, what is in flight answered), stop Triton, then the
    gateway, and remove the folder (within :func:`stop_bound_s`).  Returns 0
    on a clean stop (also when the signal came during start-up).  ``limits`` carries the gateway's
    limits; its key, TLS, shared-memory rule and shutdown timeout come from the other arguments
    (:func:`gateway_options`; ``limits`` itself is never changed).

    Raises :class:`ServerCrashed` (exit 4) when a watched process (tritonserver, a stub, the
    gateway) dies or stalls (``supervise.py``)."""
    from .repository import write_repository

    plan = plan_serve(
        backend=backend, tritonserver=tritonserver, host=host,
        ports={"http": http_port, "grpc": grpc_port, "metrics": metrics_port}, gateway=gateway, limits=limits,
        api_key_file=api_key_file, tls_cert=tls_cert, tls_key=tls_key, allow_shared_memory=allow_shared_memory,
        exit_timeout_s=exit_timeout_s, log_verbose=log_verbose,
    )  # fmt: skip
    run = ServeRun(plan)
    with run.handling_signals(), private_work_folder() as workdir:
        try:
            options, threads = thread_options(options, backend)  # issue 21: the stubs share the cores
            log.info("threads: %s", threads.describe())
            repo = write_repository(checkpoint, backend, artifacts, workdir / "model_repository", options)
            if not run.stopping:
                run.start_triton(repo, workdir, ready_timeout_s, threads)
            if not run.stopping:
                run.start_gateway(workdir)
            if run.stopping:  # SIGTERM/SIGINT before every model was ready: nothing was served, nothing to drain
                log.info("stopped during start-up")
                return 0
            run.report_ready(repo)
            run.supervise()
            return run.drain_and_stop()
        finally:
            run.take_down()
