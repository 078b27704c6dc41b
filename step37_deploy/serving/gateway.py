"""The gateway in front of Triton: an nginx that ``serve`` configures, starts and stops.

Triton's own HTTP front has no body-size limit, no limit on what a compressed body inflates to, no
connection limit and no idle timeout, and its gRPC front accepts gzip messages up to 2 GB.  So by
default ``serve`` puts nginx (the distribution's package, ``apt-get install -y nginx``) on the
user's host and ports and lets Triton listen on 127.0.0.1 only, on free ports.  The nginx config is
generated here from ``serve``'s options into ``serve``'s private work folder (mode 0600: it holds
the API key when one is given) and enforces:

* an allowlist, everything else refused (HTTP 403, gRPC ``PERMISSION_DENIED``): health, server and
  model metadata, model readiness, model config (read), statistics and inference; ``/metrics``
  only on the metrics port.  The model repository (load, unload, index), system and CUDA shared
  memory, trace and log settings are never reachable through it (``--allow-shared-memory`` opens
  the shared-memory APIs);
* request bodies up to ``max_body_mb`` (refused from ``Content-Length`` before any byte of the
  body is read; a chunked or HTTP/2 body as soon as it passes the limit): HTTP 413, gRPC
  ``RESOURCE_EXHAUSTED``;
* no compressed request bodies (``Content-Encoding`` / ``grpc-encoding`` other than identity):
  HTTP 415, gRPC ``INVALID_ARGUMENT``; nginx itself never inflates a request body;
* at most ``max_connections`` requests in flight per port (more: HTTP 503, gRPC ``UNAVAILABLE``,
  at once; health and readiness are not counted, so probes answer under overload) and at most
  ``2 * max_connections + 64`` open connections: when they run out, nginx closes idle ones first
  (its connection reuse, logged at most once a second);
* ``idle_timeout_s`` for a request's header and body, between keep-alive requests and on idle
  HTTP/2 connections;
* with an API key (read by ``auth.py``): inference, metadata, config and statistics require
  ``x-api-key`` (HTTP 401, gRPC ``UNAUTHENTICATED``); health and readiness stay open for probes.
  The key is removed from the request before it reaches Triton, and is never on any command line;
* TLS (HTTPS and gRPC over TLS) when given a certificate and key.

nginx runs in the foreground (``daemon off``) as a child of ``serve`` with its pid file, temporary
folders and config in the work folder, and logs to ``serve``'s stderr (errors and warnings; no
access log).  :attr:`Gateway.proc` is its master process, for a supervisor to watch.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
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
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError
from ..process import die_with_parent
from .auth import API_KEY_HEADER
from .contract import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_BODY_MB, DEFAULT_MAX_CONNECTIONS
from .net import host_port, probe_host

log = logging.getLogger(__name__)

#: The one documented install line (Debian/Ubuntu); ``serve`` names it when nginx is missing.
NGINX_INSTALL = "apt-get install -y nginx"
#: How long nginx waits for Triton's answer to one request (Triton's queue policy answers sooner).
UPSTREAM_TIMEOUT_S = 300
#: gRPC methods of Triton's ``inference.GRPCInferenceService`` the gateway passes on.
GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_OPEN = ("ServerLive", "ServerReady", "ModelReady")  # probes: no key
GRPC_KEYED = ("ServerMetadata", "ModelMetadata", "ModelConfig", "ModelStatistics", "ModelInfer")
GRPC_SHARED_MEMORY = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
)
#: HTTP status nginx refuses with -> the gRPC status a gRPC client gets instead, and the message
#: both get (HTTP: as Triton's own ``{"error": ...}`` body, which tritonclient reads).
GRPC_STATUS = {
    400: (3, "bad request"),  # INVALID_ARGUMENT
    401: (16, "missing or wrong x-api-key"),  # UNAUTHENTICATED
    403: (7, "this API is not served"),  # PERMISSION_DENIED
    405: (12, "method not allowed"),  # UNIMPLEMENTED
    413: (8, "request larger than the gateway's --max-body-mb"),  # RESOURCE_EXHAUSTED
    415: (3, "compressed requests are not accepted"),  # INVALID_ARGUMENT
    500: (13, "gateway error"),  # INTERNAL
    502: (14, "the server is not reachable"),  # UNAVAILABLE
    503: (14, "too many requests in flight"),  # UNAVAILABLE
    504: (4, "the server did not answer in time"),  # DEADLINE_EXCEEDED
}
# A model name in a URL: Triton's names, never '..' (the raw URI is checked for it separately).
_MODEL = r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/versions/[0-9]+)?"


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


@dataclass(frozen=True)
class GatewayOptions:
    """The limits and the access rules; ``serve``'s options of the same names."""

    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    api_key: str | None = field(default=None, repr=False)  # never in a repr, hence never in a log
    tls: tuple[Path, Path] | None = None  # (certificate, private key), PEM
    allow_shared_memory: bool = False
    shutdown_timeout_s: int = 30  # nginx's worker_shutdown_timeout: in-flight requests at stop

    @property
    def worker_connections(self) -> int:
        """nginx's connection budget: every request in flight may hold a client and an upstream
        connection, plus listening sockets and upstream keep-alive."""
        return 2 * self.max_connections + 64

    @property
    def open_files(self) -> int:
        return 2 * self.worker_connections + 64


def _quote(text: str) -> str:
    """An nginx string literal (paths, header values)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _user_line() -> str:
    """As root, nginx's workers would run as ``nobody`` and could not use the work folder: run
    them as the current user instead.  Otherwise nginx cannot switch users anyway."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"


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
        options: GatewayOptions = GatewayOptions(),
        nginx: str | Path | None = None,
    ) -> None:
        self.folder = Path(workdir) / "gateway"
        self.host = host
        self.listen = dict(listen)
        self.upstream = dict(upstream)
        self.options = options
        self.nginx = Path(nginx) if nginx is not None else require_nginx()
        self.probe_host = probe_host(host)
        self.proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / "nginx.conf"

    # -- the config ---------------------------------------------------------------------------------
    def _grpc_errors(self) -> list[str]:
        lines = [f"error_page {code} = @grpc_{code};" for code in GRPC_STATUS]
        for code, (status, message) in GRPC_STATUS.items():
            lines += [
                f"location @grpc_{code} {{",
                "    default_type application/grpc;",
                f"    add_header grpc-status {status} always;",
                f'    add_header grpc-message "{message}" always;',
                "    return 204;",
                "}",
            ]
        return lines

    def _http_errors(self) -> list[str]:
        lines = [f"error_page {code} = @http_{code};" for code in GRPC_STATUS]
        for code, (_, message) in GRPC_STATUS.items():
            body = json.dumps({"error": message}).replace("'", "")
            lines.append(f"location @http_{code} {{ default_type application/json; return {code} '{body}'; }}")
        return lines

    def _keyed(self) -> list[str]:
        return ["if ($step37_key_ok = 0) { return 401; }"] if self.options.api_key is not None else []

    def _http_server(self) -> list[str]:
        o = self.options
        get_only = 'if ($request_method !~ "^(GET|HEAD)$") { return 405; }'
        proxy = "proxy_pass http://step37_triton_http;"
        out = [
            "server {",
            f"    listen {host_port(self.host, self.listen['http'])}{' ssl' if o.tls else ''};",
            *self._tls_lines(),
            # The raw URI goes to Triton unchanged: refuse what nginx would normalise differently.
            '    if ($request_uri ~ "(%|\\.\\.|//|/\\./)") { return 400; }',
            '    if ($http_content_encoding !~* "^(identity)?$") { return 415; }',
            '    proxy_set_header Connection "";',
            f'    proxy_set_header {API_KEY_HEADER} "";',
            *("    " + line for line in self._http_errors()),
            "    location = /v2/health/live { " + get_only + " " + proxy + " }",
            "    location = /v2/health/ready { " + get_only + " " + proxy + " }",
            f'    location ~ "^/v2/models/{_MODEL}/ready$" {{ {get_only} {proxy} }}',
        ]
        # Health and readiness stay outside the in-flight bound: probes answer under overload.
        keyed = " ".join([f"limit_conn step37_inflight {o.max_connections};", *self._keyed()])
        out += [
            f"    location = /v2 {{ {get_only} {keyed} {proxy} }}",
            f"    location = /v2/models/stats {{ {get_only} {keyed} {proxy} }}",
            f'    location ~ "^/v2/models/{_MODEL}(/config|/stats)?$" {{ {get_only} {keyed} {proxy} }}',
            f'    location ~ "^/v2/models/{_MODEL}/infer$" {{',
            f'        if ($request_method != "POST") {{ return 405; }} {keyed} {proxy}',
            "    }",
        ]
        if o.allow_shared_memory:
            out.append(f'    location ~ "^/v2/(system|cuda)sharedmemory(/|$)" {{ {keyed} {proxy} }}')
        out += ["    location / { return 403; }", "}"]
        return out

    def _grpc_server(self) -> list[str]:
        o = self.options
        grpc_pass = "grpc_pass grpc://step37_triton_grpc;"
        out = [
            "server {",
            f"    listen {host_port(self.host, self.listen['grpc'])}{' ssl' if o.tls else ''} http2;",
            *self._tls_lines(),
            '    if ($http_grpc_encoding !~* "^(identity)?$") { return 415; }',
            '    if ($http_content_encoding !~* "^(identity)?$") { return 415; }',
            f'    grpc_set_header {API_KEY_HEADER} "";',
            *("    " + line for line in self._grpc_errors()),
        ]
        keyed = " ".join([f"limit_conn step37_inflight {o.max_connections};", *self._keyed()])
        methods = [(m, "") for m in GRPC_OPEN] + [(m, keyed) for m in GRPC_KEYED]
        if o.allow_shared_memory:
            methods += [(m, keyed) for m in GRPC_SHARED_MEMORY]
        for method, check in methods:
            out.append(f"    location = /{GRPC_SERVICE}/{method} {{ {check} {grpc_pass} }}")
        out += ["    location / { return 403; }", "}"]
        return out

    def _metrics_server(self) -> list[str]:
        return [
            "server {",
            f"    listen {host_port(self.host, self.listen['metrics'])};",
            f"    limit_conn step37_inflight {self.options.max_connections};",
            '    location = /metrics { if ($request_method !~ "^(GET|HEAD)$") { return 405; } '
            "proxy_pass http://step37_triton_metrics; }",
            "    location / { return 403; }",
            "}",
        ]

    def _tls_lines(self) -> list[str]:
        if not self.options.tls:
            return []
        cert, key = self.options.tls
        return [
            f"    ssl_certificate {_quote(str(cert))};",
            f"    ssl_certificate_key {_quote(str(key))};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
        ]

    def config_text(self) -> str:
        """The whole nginx.conf (holds the API key when there is one: write it 0600)."""
        o, d = self.options, self.folder
        idle = max(1, round(o.idle_timeout_s))
        lines = [
            "# Written by step37-deploy serve for this run only; regenerated at every start.",
            "daemon off;",
            "master_process on;",
            "worker_processes 1;",  # one worker: the connection and in-flight bounds are exact
            f"worker_rlimit_nofile {o.open_files};",
            f"worker_shutdown_timeout {o.shutdown_timeout_s}s;",
            f"pid {_quote(str(d / 'nginx.pid'))};",
            "error_log stderr warn;",
            _user_line(),
            f"events {{ worker_connections {o.worker_connections}; }}",
            "http {",
            "    access_log off;",
            "    server_tokens off;",
            "    default_type application/octet-stream;",
            *(f"    {what}_temp_path {_quote(str(d / what))};" for what in ("client_body", "proxy", "fastcgi")),
            *(f"    {what}_temp_path {_quote(str(d / what))};" for what in ("uwsgi", "scgi")),
            f"    client_max_body_size {max(1, round(o.max_body_mb * 2**20))};",
            "    client_body_buffer_size 1m;",
            f"    client_header_timeout {idle}s;",
            f"    client_body_timeout {idle}s;",
            f"    send_timeout {idle}s;",
            f"    keepalive_timeout {idle}s;",
            "    limit_conn_zone $server_port zone=step37_inflight:1m;",
            "    limit_conn_status 503;",
            "    limit_conn_log_level warn;",
            "    proxy_http_version 1.1;",
            "    proxy_connect_timeout 5s;",
            f"    proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;",
            f"    proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;",
            "    grpc_connect_timeout 5s;",
            f"    grpc_read_timeout {UPSTREAM_TIMEOUT_S}s;",
            f"    grpc_send_timeout {UPSTREAM_TIMEOUT_S}s;",
        ]
        if o.api_key is not None:
            header = API_KEY_HEADER.replace("-", "_")
            bucket = 1 << (len(o.api_key) + 32).bit_length()  # a map's key must fit one hash bucket
            lines.append(f"    map_hash_bucket_size {max(64, bucket)};")
            lines.append(f"    map $http_{header} $step37_key_ok {{ default 0; {_quote(o.api_key)} 1; }}")
        for name in ("http", "grpc", "metrics"):
            keep = "" if name == "metrics" else " keepalive 32;"
            lines.append(f"    upstream step37_triton_{name} {{ server 127.0.0.1:{self.upstream[name]};{keep} }}")
        for server in (self._http_server(), self._grpc_server(), self._metrics_server()):
            lines += ["    " + line for line in server]
        lines.append("}")
        return "\n".join(line for line in lines if line.strip()) + "\n"

    def write_config(self) -> Path:
        for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.config_text())
        os.chmod(self.config_path, 0o600)
        return self.config_path

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
        self.proc = subprocess.Popen(
            self.command(), cwd=self.folder, start_new_session=True, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
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
                f"--max-connections {self.options.max_connections} needs {need} open files, and the hard limit here "
                f"is {hard} (ulimit -Hn): lower --max-connections or raise the limit"
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

    def stop(self, grace_s: float | None = None) -> int | None:
        """Graceful quit (SIGQUIT: nginx finishes requests in flight, closes idle connections),
        SIGKILL when it has not exited after ``grace_s`` (default: the shutdown timeout + 5 s)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(grace_s if grace_s is not None else self.options.shutdown_timeout_s + 5)
            except subprocess.TimeoutExpired:
                log.warning("the gateway (nginx) did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
