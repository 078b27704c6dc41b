"""The gateway in front of Triton: an nginx that ``serve`` configures, starts and stops.

Triton's own HTTP front has no body-size limit, no limit on what a compressed body inflates to, no
connection limit and no idle timeout, and its gRPC front accepts gzip messages up to 2 GB.  So by
default ``serve`` puts nginx (the distribution's package, ``apt-get install -y nginx``) on the
user's host and ports and lets Triton listen on 127.0.0.1 only, on free ports.  The config
(``nginxconf.py``, from ``serve``'s options) is written into ``serve``'s private work folder (mode
0600: it holds the API key when one is given) and enforces:

* an allowlist, everything else refused (HTTP 403, gRPC ``PERMISSION_DENIED``): health, server and
  model metadata, model readiness, model config (read), statistics and inference; ``/metrics``
  only on the metrics port.  The model repository (load, unload, index), system and CUDA shared
  memory, trace and log settings are never reachable through it (``--allow-shared-memory`` opens
  the shared-memory APIs); a raw URI that nginx would normalise (``%``, ``..``, ``//``, ``/./``)
  is refused, since Triton gets it raw;
* request bodies up to ``max_body_mb`` (refused from ``Content-Length`` before any byte of the
  body is read; a chunked or HTTP/2 body as soon as it passes the limit), streamed to Triton,
  never buffered to a file: HTTP 413, gRPC ``RESOURCE_EXHAUSTED``;
* no request with a ``Content-Encoding`` or ``grpc-encoding`` header (HTTP 415, gRPC
  ``INVALID_ARGUMENT``), and no such header passed on (nginx sees only the first of several);
* at most ``max_connections`` requests in flight per port and ``max_connections / 8`` per client
  address (more: HTTP 503, gRPC ``UNAVAILABLE``, at once; health and readiness are not counted, so
  probes answer under overload); one worker per CPU, each with room for max(2 x max_connections +
  64, 1024) connections, idle ones closed first when they run out;
* a whole-header deadline (10 s), a bound on pauses inside a body (10 s), ``idle_timeout_s``
  between keep-alive requests and on idle HTTP/2 connections, a gRPC deadline at Triton;
* with an API key: inference, metadata, config, statistics and metrics require it, compared
  exactly (HTTP 401, gRPC ``UNAUTHENTICATED``); health and readiness stay open for probes.  The key
  is removed from the request before it reaches Triton, and is never on any command line;
* TLS (Mozilla's intermediate profile) on all three ports when given a certificate and key.

nginx runs in the foreground (``daemon off``) as a child of ``serve`` with its pid file, temporary
folders and config in the work folder, its workers as an unprivileged user when ``serve`` is root;
its errors and warnings reach ``serve``'s log through :class:`~.gatewaylog.GatewayLog` (escaped,
cut, rate-limited), and one access-log line per answer reaches :class:`~.gatewaycount.GatewayCount`
through its stdout (every answer counted by outcome, served at ``/metrics/gateway``).
:attr:`Gateway.proc` is its master process, for a supervisor to watch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError
from ..process import ProcessId, children, die_with_parent
from .auth import check_tls_files, read_api_key  # noqa: F401  (importable from here as before)
from .gatewaycount import COUNTS_FILE, GatewayCount
from .gatewaylog import GatewayLog
from .net import host_port, probe_host
from .nginxconf import (  # noqa: F401  (re-exported: serve's options and the served API live there)
    API_KEY_HEADER,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_CONNECTIONS,
    GRPC_STATUS,
    MIN_WORKER_CONNECTIONS,
    TEMP_FOLDERS,
    TLS_LINKS,
    GatewayOptions,
    NginxConfig,
    worker_account,
)

log = logging.getLogger(__name__)

#: After the shutdown timeout (nginx's ``worker_shutdown_timeout``, which then closes what is
#: left), how long the old workers of a drain get to exit.
DRAIN_MARGIN_S = 1.0
#: How long a reload (SIGHUP) may take to start its new workers before the drain falls back to a
#: graceful quit.
RELOAD_S = 2.0
#: The gateway's last stop, after a drain (SIGQUIT, then SIGKILL).
STOP_S = 1.0
#: How long the stop waits for the log relay to pass on nginx's last lines.
RELAY_JOIN_S = 1.0
#: The one documented install line (Debian/Ubuntu); ``serve`` names it when nginx is missing.
NGINX_INSTALL = "apt-get install -y nginx"


def _traversable(folder: Path, group: int) -> bool:
    """Whether a user of ``group`` (not the folder's owner) may pass through ``folder``."""
    st = folder.stat()
    return bool(st.st_mode & 0o001 or (st.st_gid == group and st.st_mode & 0o010))


def find_nginx() -> Path | None:
    """The ``nginx`` binary on ``PATH`` (or Debian's ``/usr/sbin``), or None."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


#: ``-e stderr`` needs 1.19.5, ``keepalive_timeout`` on idle HTTP/2 connections 1.19.7.
NGINX_MIN_VERSION = (1, 19, 7)


def nginx_version(nginx: Path) -> tuple[int, ...] | None:
    """``nginx -v``'s version, or None when it cannot be read."""
    try:
        out = subprocess.run([str(nginx), "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(x) for x in m.groups()) if m else None


def require_nginx() -> Path:
    """The nginx binary, or one line naming the install command and the way around it."""
    nginx = find_nginx()
    if nginx is None:
        raise BackendUnavailable(
            f"nginx is not installed: install it ({NGINX_INSTALL}) or pass --no-gateway "
            "(exposes Triton's raw ports: no body, gzip, connection or idle limits)"
        )
    version = nginx_version(nginx)
    if version is None or version < NGINX_MIN_VERSION:
        have = ".".join(map(str, version)) if version else "of unknown version"
        raise BackendUnavailable(
            f"{nginx} is nginx {have}; the gateway needs {'.'.join(map(str, NGINX_MIN_VERSION))} or later "
            f"({NGINX_INSTALL} on Debian 12 / Ubuntu 24.04 or later, or nginx.org packages)"
        )
    return nginx


class Gateway:
    """One nginx master process in front of one Triton.

    ``listen`` is where clients connect (the user's host and ports: ``{"http": .., "grpc": ..,
    "metrics": ..}``), ``upstream`` where Triton listens on 127.0.0.1 (same keys).
    """

    def __init__(
        self,
        workdir: str | Path,
        host: str,
        listen: dict[str, int],
        upstream: dict[str, int],
        options: GatewayOptions | None = None,
        nginx: str | Path | None = None,
    ) -> None:
        self.folder = Path(workdir) / "gateway"
        self.host = host
        self.listen = dict(listen)
        self.upstream = dict(upstream)
        self.options = options if options is not None else GatewayOptions()
        self.nginx = Path(nginx) if nginx is not None else require_nginx()
        self.probe_host = probe_host(host)
        self.proc: subprocess.Popen | None = None
        self.log_relay: GatewayLog | None = None
        self.counts: GatewayCount | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / "nginx.conf"

    def config_text(self, draining: bool = False) -> str:
        """The whole nginx.conf (holds the API key when there is one: write it 0600); ``draining``:
        the variant :meth:`drain` reloads (readiness and inference refused)."""
        return NginxConfig(self.options, self.host, self.listen, self.upstream, draining).text()

    def write_config(self, draining: bool = False) -> Path:
        for sub in ("", *TEMP_FOLDERS, Path(COUNTS_FILE).parent):
            (self.folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.options.tls:  # links, so that the config never holds the user's paths
            for link, target in zip(TLS_LINKS, self.options.tls, strict=True):
                path = self.folder / link
                path.parent.mkdir(mode=0o700, exist_ok=True)
                path.unlink(missing_ok=True)
                path.symlink_to(Path(target).resolve())
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.config_text(draining))
        os.chmod(self.config_path, 0o600)
        self._share_counts()
        return self.config_path

    def worker_group(self) -> int | None:
        """The workers' group when they run as another user (``serve`` is root), else None."""
        pw = worker_account(self.options.worker_user)
        return None if pw is None else pw.pw_gid

    def _share_counts(self) -> None:
        """Workers running as another user read the counts file: its folder and the two above it
        (the work folder, this gateway folder) become traversable by their group, not listable
        (0710), and nothing in them but the counts is readable by that group (every other file
        is 0600, every other folder 0700)."""
        group = self.worker_group()
        if group is None:
            return
        counts = self.folder / COUNTS_FILE
        for folder in (self.folder.parent, self.folder, counts.parent):
            os.chown(folder, -1, group)
            os.chmod(folder, 0o710)
        blocked = [p for p in self.folder.parent.parents if not _traversable(p, group)]
        if blocked:
            log.warning(
                "the gateway's workers (user %s) cannot reach %s (%s is closed to them): %s will answer 403; "
                "set TMPDIR to a folder they may traverse, such as /tmp",
                self.options.worker_user, counts, blocked[0], "/metrics/gateway",
            )  # fmt: skip

    def command(self) -> list[str]:
        return [str(self.nginx), "-p", str(self.folder), "-c", str(self.config_path), "-e", "stderr"]

    # -- the process -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> Gateway:
        """Write the config, start nginx in the foreground, return once every port answers."""
        self._check_open_files()
        self.write_config()
        log.info(
            "starting the gateway: nginx on %s ports %s -> Triton on 127.0.0.1 ports %s",
            self.host,
            ", ".join(f"{k} {v}" for k, v in self.listen.items()),
            ", ".join(f"{k} {v}" for k, v in self.upstream.items()),
        )
        relay = self.log_relay = GatewayLog()  # nginx's stderr: escaped, cut, rate-limited into serve's log
        counts = self.counts = GatewayCount(self.folder / COUNTS_FILE, self.listen, self.worker_group())
        counts.write()  # zeros until the first answer: the file is there before nginx serves it
        try:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.folder, stdout=counts.write_fd, stderr=relay.write_fd,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        except OSError:
            relay.close()
            counts.close()
            raise
        relay.start()
        counts.start()
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                relay.join()
                counts.join()
                raise BackendUnavailable(
                    f"the gateway (nginx) exited with status {self.proc.returncode} at start "
                    "(its message above says why)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise BackendUnavailable(f"the gateway (nginx) did not listen within {timeout_s:.0f}s")
            time.sleep(0.1)
        return self

    def _check_open_files(self) -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = self.options.open_files
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and need > hard:
            raise ConfigError(
                f"the gateway needs {need} open files per nginx worker (its connection budget, at least "
                f"{MIN_WORKER_CONNECTIONS} connections, more with --max-connections {self.options.max_connections}), "
                f"and the hard limit here is {hard} (ulimit -Hn): raise the limit, or lower --max-connections"
            )

    def ready(self) -> bool:
        """Every port accepts connections and health answers through the HTTP port."""
        for port in self.listen.values():
            try:
                with socket.create_connection((self.probe_host, port), timeout=1):
                    pass
            except OSError:
                return False
        ctx = None
        scheme = "http"
        if self.options.tls:
            scheme, ctx = "https", ssl._create_unverified_context()  # only asks whether it answers
        try:
            url = f"{scheme}://{host_port(self.probe_host, self.listen['http'])}/v2/health/live"
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def workers(self) -> set[int]:
        """The PIDs of the master's children (its workers), read from /proc; empty once it is gone."""
        master = ProcessId.of(self.proc.pid) if self.alive() else None
        return set() if master is None else {st.pid for st in children(master)}

    def drain(self, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Stop taking work, finish what is in flight, keep answering probes: reload nginx (SIGHUP)
        with the draining config.  Its new workers refuse readiness and inference at once (503 /
        ``UNAVAILABLE``) and still answer liveness; the old workers stop accepting, finish the
        requests they are forwarding and exit (nginx's ``worker_shutdown_timeout``, the shutdown
        timeout, cuts what is left).  True once every old worker is gone, within ``timeout_s`` +
        :data:`DRAIN_MARGIN_S`; False on time out or when ``should_stop()`` says to stop now.
        Should the reload fail (the master then keeps its old workers), nginx is asked to quit
        gracefully instead (SIGQUIT: the ports close, what is in flight is finished)."""
        if not self.alive():
            return False
        start = time.monotonic()
        deadline = start + timeout_s + DRAIN_MARGIN_S
        old = self.workers()
        self.write_config(draining=True)
        self.proc.send_signal(signal.SIGHUP)
        log.info("gateway draining: readiness and new requests refused, %d old workers finishing", len(old))
        reloaded = False
        while time.monotonic() < deadline and not should_stop():
            now = self.workers()
            if not self.alive() or not (now & old):
                return True
            if not reloaded and now - old:
                reloaded = True  # the new workers run the draining config
            elif not reloaded and time.monotonic() > start + RELOAD_S:
                log.warning("the gateway (nginx) did not reload its draining config; stopping it gracefully")
                self.proc.send_signal(signal.SIGQUIT)
                reloaded = True
            time.sleep(0.05)
        return False

    def stop(self, grace_s: float = STOP_S) -> int | None:
        """Graceful quit (SIGQUIT: nginx finishes requests in flight, closes idle connections),
        SIGKILL when it has not exited after ``grace_s`` (after :meth:`drain`, nothing but refusals
        and probes is left to finish)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the gateway (nginx) did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        end = time.monotonic() + RELAY_JOIN_S  # both relays see nginx's exit at once: one wait
        for relay in (self.log_relay, self.counts):
            if relay is not None:
                relay.join(max(0.0, end - time.monotonic()))
        return self.proc.returncode
