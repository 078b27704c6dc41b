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

Stopping drains the entry model first: Triton's own SIGTERM handling stops *every* model from
accepting requests at once, including the BLS requests an in-flight embedder request still has to
send to the towers (they fail with "Server not ready").  So ``drain`` unloads ``step37_embedder``
through the model-repository API (models load in explicit mode; that API, shared memory, logging
and trace are restricted by a key generated per run, which only this process sends and which is
redacted from the command line it logs): new requests to it are refused,
the ones it is executing finish (their tower calls still work), and only then does Triton get
SIGTERM (``--exit-timeout-secs`` bounds what is left).  The server also gets SIGTERM if this
process dies (``PR_SET_PDEATHSIG``).

``serve`` puts the gateway (``gateway.py``: nginx, with the limits Triton lacks, an API allowlist,
the API key and TLS) on the user's address and ports and Triton on 127.0.0.1 behind it; it starts
the gateway once Triton is ready and stops it after the drain, before Triton.

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
import secrets
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
from .gateway import Gateway, GatewayOptions
from .net import free_port, host_port, probe_host
from .prepare import ServePlan, TritonInstall, bundled_tritonserver, plan_serve, private_work_folder
from .shm import launch as launch_with_shm
from .supervise import POLL_S, Supervisor, expected_stubs, shm_prefix
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


#: Triton's API categories no network client may use: only ``serve`` holds the key that opens
#: them (``drain`` unloads the embedder through the model-repository API).
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
#: The header of that key (gRPC: ``triton-grpc-protocol-`` + it).
ADMIN_HEADER = "step37-admin-key"

#: What "ready" means for ``serve``: every model of the served API is loaded.
SERVED_MODELS = (*C.TOWER_MODELS.values(), C.EMBEDDER_MODEL)


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
        exit_timeout_s: int = 30,
        log_verbose: int = 0,
        models: tuple[str, ...] = SERVED_MODELS,
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
        self.models = models
        self.probe_host = probe
        self.allow_shared_memory = allow_shared_memory
        self.grpc_tls = grpc_tls
        # The key of Triton's restricted APIs (model repository, shared memory, logging, trace):
        # new every run, known to this process only, sent by drain() alone, never logged.
        self.admin_key = secrets.token_urlsafe(32)
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
        """Triton's API categories only the admin key opens (``--http-restricted-api`` and
        ``--grpc-restricted-protocol``)."""
        if self.allow_shared_memory:
            return tuple(a for a in RESTRICTED_APIS if a != "shared-memory")
        return RESTRICTED_APIS

    def command(self) -> list[str]:
        restricted = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
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
            "--model-control-mode=explicit",  # so that drain() can unload the entry model first
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            *(f"--load-model={m}" for m in self.models),
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

    def redacted(self, cmd: list[str]) -> str:
        """The command line for the log, with the admin key replaced."""
        return " ".join(cmd).replace(self.admin_key, "<redacted>")

    def launch(self) -> subprocess.Popen:
        """Start tritonserver (its own process group, umask 077, SIGTERM when this process dies, and
        a private /dev/shm unless ``allow_shared_memory`` or the platform forbids it: ``shm.py``)."""
        cmd = self.command()
        log.info("starting %s", self.redacted(cmd))
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

    def _post(self, path: str, timeout_s: float) -> bytes:
        req = urllib.request.Request(
            f"http://{self.http_url}{path}", data=b"{}", method="POST", headers={ADMIN_HEADER: self.admin_key}
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.read()

    def drain(self, timeout_s: float, entry: tuple[str, ...] = (C.EMBEDDER_MODEL,)) -> bool:
        """Unload the entry models and wait until their in-flight requests are done (the towers
        stay up for them).  True when drained within ``timeout_s``."""
        import json

        deadline = time.monotonic() + timeout_s
        entry = tuple(m for m in entry if m in self.models)
        try:
            for m in entry:
                self._post(f"/v2/repository/models/{m}/unload", timeout_s)
            while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
                index = json.loads(self._post("/v2/repository/index", 5))
                busy = [e["name"] for e in index if e["name"] in entry and e.get("state") in ("READY", "UNLOADING")]
                if not busy:
                    return True
                time.sleep(0.1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("could not drain %s before stopping: %s", ", ".join(entry), exc)
        return False

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
        """Drain the embedder, SIGTERM (Triton finishes the rest, unloads, exits), SIGKILL after the
        grace period."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.drain(self.exit_timeout_s)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace_s if grace_s is not None else self.exit_timeout_s + 15)
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
        self.server = TritonServer(
            repo, workdir, p.install, host, ports["http"], ports["grpc"], ports["metrics"], p.exit_timeout_s,
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
        """Drain the embedder through Triton (the gateway still up, so new requests get Triton's
        refusal), stop the gateway gracefully, then Triton.  0, or :class:`BackendUnavailable` when
        Triton fails to stop with requests still in flight."""
        server, exit_timeout_s = self.server, self.plan.exit_timeout_s
        drained = False
        if server.proc.poll() is None:
            drained = server.drain(exit_timeout_s)
            log.info("%s; stopping tritonserver", "in-flight requests done" if drained else "drain timed out")
        if self.front is not None:
            self.front.stop()  # graceful: it closes idle client connections and its keep-alive ones to Triton
        if self.stopping:
            server.signal(signal.SIGTERM)
        rc = server.wait(exit_timeout_s + 15)
        if rc != 0 and drained:
            # Every embedder request was answered before SIGTERM; what Triton still waited for is
            # almost always clients' idle keep-alive HTTP connections (it waits for those first).
            log.warning(
                "tritonserver exited with status %d after --exit-timeout %ds (open client connections?); "
                "every embedder request had been answered",
                rc,
                exit_timeout_s,
            )
        elif rc != 0:
            raise BackendUnavailable(
                f"tritonserver exited with status {rc} while stopping (requests still in flight "
                f"after --exit-timeout {exit_timeout_s}s?)"
            )
        log.info("stopped cleanly" if rc == 0 else "stopped")
        return 0

    def take_down(self) -> None:
        """Nothing outlives ``serve``: every watched process and its tree (stubs that ignore SIGTERM,
        a gateway) is killed; a server started but not yet watched is stopped."""
        if self.supervisor is not None:
            self.supervisor.kill_all()
        elif self.server is not None and self.server.proc is not None and self.server.proc.poll() is None:
            self.server.stop()


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
    exit_timeout_s: int = 30,
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
    127.0.0.1 only), in the foreground until SIGINT/SIGTERM; then drain the embedder (through
    Triton, the gateway still up so that new requests get Triton's refusal), stop the gateway
    (graceful: what it still forwards is answered), stop Triton and remove the folder.  Returns 0
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
            options, threads = thread_options(options)  # issue 21: the stubs share the cores
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
