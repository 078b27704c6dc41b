"""The nginx.conf of ``serve``'s gateway, generated from :class:`GatewayOptions` (``gateway.py``
starts and stops the nginx that runs it).

Everything a client reaches goes through what is written here, so each bound has its reason next
to it.  In short: an allowlist of Triton's API (everything else refused); request bodies up to
``max_body_mb``, streamed to Triton (never buffered to a file); no request with a compression
header, and none of those headers passed on; at most ``max_connections`` requests in flight per
port and ``client_requests`` per client address; one worker per CPU with a budget of connections
that trickling headers cannot exhaust cheaply, a whole-header deadline and a bound on pauses inside
a body; the API key compared exactly (case-sensitive, whole value) on the API and metrics ports;
Mozilla's intermediate TLS profile on all three ports; workers without root; one access-log line
per answer to ``serve``'s counter (``gatewaycount.py``), whose counts the metrics port serves.  Every file the config
names is relative to its own folder, so no ``$`` or quote of a path is ever parsed by nginx.
"""

from __future__ import annotations

import grp
import json
import math
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .auth import API_KEY_HEADER
from .contract import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_EXIT_TIMEOUT_S,
    DEFAULT_GATEWAY_USER,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_CONNECTIONS,
    MAX_AUTO_GATEWAY_WORKERS,
    MAX_GATEWAY_WORKERS,
    RETRY_AFTER_S,
)
from .gatewaycount import COUNTS_FILE, COUNTS_PATH, LOG_FORMAT
from .net import host_port

#: Open connections per nginx worker never below this, whatever --max-connections: connections that
#: trickle a header are not requests yet, so no in-flight bound counts them (only this budget and
#: the header deadline do).
MIN_WORKER_CONNECTIONS = 1024
#: How long nginx waits for Triton's answer to one request (Triton's queue policy answers sooner),
#: and the longest gRPC deadline Triton is given (a client's own deadline under 100 s is kept).
UPSTREAM_TIMEOUT_S = 300
#: Who nginx's workers run as when ``serve`` runs as root (they need no file: nothing is buffered
#: to disk, the certificate and key are read by the master at start); ``--gateway-user``.
DEFAULT_WORKER_USER = DEFAULT_GATEWAY_USER
#: Mozilla's "intermediate" TLS profile (ssl-config.mozilla.org, version 6): in TLS 1.2, only
#: ECDHE key exchange (forward secrecy) with AEAD ciphers; TLS 1.3 suites are OpenSSL's defaults.
TLS_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
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
    503: (14, f"too many requests in flight; retry after {RETRY_AFTER_S} s"),  # UNAVAILABLE (EmbedClient reads it)
    504: (4, "the server did not answer in time"),  # DEADLINE_EXCEEDED
}
#: What every 503 says in the draining config (``serve`` is stopping): readiness, inference.
DRAINING_MESSAGE = "the server is shutting down: send it elsewhere"
# A model name in a URL: Triton's names, never '..' (the raw URI is checked for it separately).
_MODEL = r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/versions/[0-9]+)?"


@dataclass(frozen=True)
class GatewayOptions:
    """The limits and the access rules; ``serve``'s options of the same names."""

    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    api_key: str | None = field(default=None, repr=False)  # never in a repr, hence never in a log
    tls: tuple[Path, Path] | None = None  # (certificate, private key), PEM
    allow_shared_memory: bool = False
    shutdown_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S  # nginx's worker_shutdown_timeout: in-flight requests at stop
    #: Requests in flight from one client address, both API ports together (None: an eighth of
    #: max_connections, at least 4): one client cannot take every slot.
    max_client_requests: int | None = None
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # whole header, from accept (at most idle_timeout_s)
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # longest pause inside a body (at most idle_timeout_s)
    workers: int = 0  # nginx worker processes (0: one per usable CPU, at most 8)
    worker_user: str = DEFAULT_WORKER_USER  # the workers' user when serve runs as root

    def __post_init__(self) -> None:
        """Refuse, in one line naming the option, a value the generated config could not honour:
        a bound above another bound, a worker count nginx would try to fork, a user name that is
        not one (it is written into the config)."""
        check_gateway_options(self)

    @property
    def client_requests(self) -> int:
        if self.max_client_requests is not None:
            return self.max_client_requests
        return min(self.max_connections, max(4, self.max_connections // 8))

    @property
    def worker_processes(self) -> int:
        return self.workers or max(1, min(MAX_AUTO_GATEWAY_WORKERS, len(os.sched_getaffinity(0))))

    @property
    def worker_connections(self) -> int:
        """nginx's connection budget per worker: every request in flight may hold a client and an
        upstream connection, plus listening sockets and upstream keep-alive; never below
        :data:`MIN_WORKER_CONNECTIONS`, for the connections still sending their header."""
        return max(2 * self.max_connections + 64, MIN_WORKER_CONNECTIONS)

    @property
    def open_files(self) -> int:
        return 2 * self.worker_connections + 64


#: A POSIX user name (``useradd``'s portable set): the name is written into nginx.conf as is.
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def check_gateway_options(o: GatewayOptions) -> None:
    """:class:`GatewayOptions`' checks (``ConfigError``, one line naming ``serve``'s option)."""
    for name, value in (
        ("--max-body-mb", o.max_body_mb),
        ("--idle-timeout-s", o.idle_timeout_s),
        ("--header-timeout-s", o.header_timeout_s),
        ("--body-timeout-s", o.body_timeout_s),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"gateway: {name} must be a finite number > 0, got {value!r}")
    if not (isinstance(o.max_connections, int) and o.max_connections >= 1):
        raise ConfigError(f"gateway: --max-connections must be an integer >= 1, got {o.max_connections!r}")
    n = o.max_client_requests
    if n is not None and not (isinstance(n, int) and 1 <= n <= o.max_connections):
        raise ConfigError(
            f"gateway: --max-client-requests must be an integer in 1..--max-connections ({o.max_connections}), "
            f"got {n!r}: one client can never hold more than a port's requests in flight"
        )
    if not (isinstance(o.workers, int) and 0 <= o.workers <= MAX_GATEWAY_WORKERS):
        raise ConfigError(
            f"gateway: --gateway-workers must be an integer in 0..{MAX_GATEWAY_WORKERS}, got {o.workers!r}"
        )
    if not (isinstance(o.worker_user, str) and _USER_NAME.fullmatch(o.worker_user)):
        raise ConfigError(
            f"gateway: --gateway-user must be a user name (letters, digits, _ . -), got {o.worker_user!r}"
        )


def _quote(text: str) -> str:
    """An nginx string literal (header values, regexes).  Paths never go through it: the config
    names files relative to its own folder, so no ``$`` of a path can expand as a variable."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exact(key: str) -> str:
    """A case-sensitive PCRE matching exactly ``key`` (``API_KEY_RE``'s characters; no backslash,
    which nginx's string quoting would alter)."""
    return "^" + re.sub(r"([.+])", r"[\1]", key) + "$"


def worker_account(user: str) -> pwd.struct_passwd | None:
    """As root, the account nginx's workers run as: ``user``, checked to exist and not to be root
    (``ConfigError`` otherwise); None when ``serve`` is not root (nginx cannot switch users)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"serve runs as root and its gateway's workers run as the unprivileged user {user!r}, which this host "
            "lacks: create it (useradd --system) or run serve as an unprivileged user"
        ) from None
    if pw.pw_uid == 0:
        raise ConfigError(f"the gateway's worker user {user!r} is root: name an unprivileged user")
    return pw


def user_line(user: str) -> str:
    """As root, nginx's workers run as ``user`` (they write no file: bodies stream to Triton,
    answers are never buffered to disk).  Otherwise nginx cannot switch users anyway."""
    pw = worker_account(user)
    return "" if pw is None else f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};"


#: The gRPC deadline Triton gets: the client's own when under 100 s, else UPSTREAM_TIMEOUT_S, so
#: that Triton ends a stalled upload or a forgotten call (grpc-timeout: up to 8 digits and a unit).
_GRPC_DEADLINE_MAP = (
    "map $http_grpc_timeout $step37_grpc_timeout { "
    '"~^[0-9]{1,8}[nu]$" $http_grpc_timeout; "~^[0-9]{1,5}m$" $http_grpc_timeout; '
    f'"~^[0-9]{{1,2}}S$" $http_grpc_timeout; default {UPSTREAM_TIMEOUT_S}S; }}'
)
#: GET/HEAD without a body: ``ok``; with one (Content-Length other than 0, or chunked): ``body``.
_GET_MAP = (
    'map "$request_method:$http_content_length:$http_transfer_encoding" $step37_get { '
    '"~^(GET|HEAD):0?:$" ok; "~^(GET|HEAD):" body; default method; }'
)
_GET_ONLY = "if ($step37_get = method) { return 405; } if ($step37_get = body) { return 400; }"


#: nginx's temporary folders, in the config's folder (nothing is written there: bodies and answers
#: stream), and the links to the TLS certificate and key.
TEMP_FOLDERS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
TLS_LINKS = ("tls/cert.pem", "tls/key.pem")


def _error_body(code: int, message: str | None = None) -> str:
    """The JSON body of an nginx-made refusal, as Triton's own errors are (tritonclient reads it)."""
    return json.dumps({"error": message or GRPC_STATUS[code][1]}).replace("'", "")


class NginxConfig:
    """The config of one gateway: ``listen`` is where clients connect (``{"http": .., "grpc": ..,
    "metrics": ..}`` on ``host``), ``upstream`` where Triton listens on 127.0.0.1 (same keys).

    ``draining``: the config ``serve`` reloads nginx with when it stops (same listeners and
    limits): readiness and inference answer 503 / gRPC ``UNAVAILABLE`` at once, liveness, metadata
    and metrics are still passed on, and no idle connection to Triton is kept open (Triton waits
    for open connections before it exits).  The workers of the previous config finish what they
    are forwarding meanwhile."""

    def __init__(
        self,
        options: GatewayOptions,
        host: str,
        listen: dict[str, int],
        upstream: dict[str, int],
        draining: bool = False,
    ) -> None:
        self.options, self.host, self.listen, self.upstream = options, host, dict(listen), dict(upstream)
        self.draining = draining

    def _message(self, code: int) -> str:
        return DRAINING_MESSAGE if self.draining and code == 503 else GRPC_STATUS[code][1]

    # -- the config ---------------------------------------------------------------------------------
    # nginx-made refusals reach clients as Triton's own would (JSON / a gRPC status).  They go to
    # named locations, which skip the server-level checks that sent them there; but a request line
    # nginx could not parse has no URI, and a named location needs one (nginx answered such a line
    # with 500 and logged it whole): 400 goes to an internal URI instead, and the checks that
    # answer 400 themselves send their body directly (an internal URI re-runs them).
    def _grpc_errors(self) -> list[str]:
        lines = [f"error_page {code} = @grpc_{code};" for code in GRPC_STATUS if code != 400]
        lines.append("error_page 400 = /.step37/400;")
        for code, (status, _) in GRPC_STATUS.items():
            where = "= /.step37/400 { internal; " if code == 400 else f"@grpc_{code} {{ "
            message = self._message(code)
            lines.append(
                f'location {where}add_header grpc-status {status} always; add_header grpc-message "{message}" always; '
                "return 204; }"
            )
        return lines

    def _http_errors(self) -> list[str]:
        lines = [f"error_page {code} = @http_{code};" for code in GRPC_STATUS if code != 400]
        lines.append("error_page 400 = /.step37/400;")
        for code in GRPC_STATUS:
            where = "= /.step37/400 { internal;" if code == 400 else f"@http_{code} {{"
            retry = f" add_header Retry-After {RETRY_AFTER_S} always;" if code == 503 and not self.draining else ""
            lines.append(f"location {where}{retry} return {code} '{_error_body(code, self._message(code))}'; }}")
        return lines

    def _listen_lines(self, name: str, http2: str = "") -> list[str]:
        """The server's listen line, and with TLS its certificate and key (by their links)."""
        tls = self.options.tls is not None
        out = [f"    listen {host_port(self.host, self.listen[name])}{' ssl' if tls else ''}{http2} reuseport;"]
        if tls:
            out += [f"    ssl_certificate {TLS_LINKS[0]};", f"    ssl_certificate_key {TLS_LINKS[1]};"]
        return out

    def _limits(self, key: str = "$step37_key_ok") -> str:
        """The in-flight bounds (per port, per client address) and, with an API key, the key."""
        o = self.options
        out = [f"limit_conn step37_inflight {o.max_connections};", f"limit_conn step37_client {o.client_requests};"]
        if o.api_key is not None:
            out.append(f"if ({key} = 0) {{ return 401; }}")
        return " ".join(out)

    def _http_server(self) -> list[str]:
        o = self.options
        get_only = _GET_ONLY
        proxy = "proxy_pass http://step37_triton_http;"
        keyed = self._limits()
        # Draining: readiness and inference refused at once (503), liveness still answers.
        ready = "return 503;" if self.draining else f"{get_only} {proxy}"
        infer = "return 503;" if self.draining else f"{keyed} {proxy}"
        out = [
            "server {",
            *self._listen_lines("http"),
            "    default_type application/json;",
            # The raw URI goes to Triton unchanged: refuse what nginx would normalise differently.
            f"""    if ($request_uri ~ "(%|\\.\\.|//|/\\./)") {{ return 400 '{_error_body(400)}'; }}""",
            # Any compression header at all (nginx sees the first of several): refused; and none
            # reaches Triton, which would inflate the body without a bound.
            "    if ($http_content_encoding) { return 415; }",
            '    proxy_set_header Connection "";',
            f'    proxy_set_header {API_KEY_HEADER} "";',
            '    proxy_set_header Content-Encoding "";',
            # Triton's own refusals (503: a full queue, a queue timeout) say when to come back too.
            "    add_header Retry-After $step37_retry_after always;",
            *("    " + line for line in self._http_errors()),
            # Health and readiness stay outside the in-flight bounds: probes answer under overload.
            "    location = /v2/health/live { " + get_only + " " + proxy + " }",
            "    location = /v2/health/ready { " + ready + " }",
            f'    location ~ "^/v2/models/{_MODEL}/ready$" {{ {ready} }}',
            f"    location = /v2 {{ {get_only} {keyed} {proxy} }}",
            f"    location = /v2/models/stats {{ {get_only} {keyed} {proxy} }}",
            f'    location ~ "^/v2/models/{_MODEL}(/config|/stats)?$" {{ {get_only} {keyed} {proxy} }}',
            f'    location ~ "^/v2/models/{_MODEL}/infer$" {{',
            f'        if ($request_method != "POST") {{ return 405; }} {infer}',
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
            *self._listen_lines("grpc", " http2"),
            "    default_type application/grpc;",
            # Any compression header at all is refused, and none reaches Triton (which inflates
            # gzip without a bound): a second grpc-encoding after an empty first one is dropped.
            "    if ($http_grpc_encoding) { return 415; }",
            "    if ($http_content_encoding) { return 415; }",
            *(f'    grpc_set_header {h} "";' for h in (API_KEY_HEADER, "grpc-encoding", "content-encoding")),
            '    grpc_set_header grpc-internal-encoding-request "";',
            "    grpc_set_header grpc-timeout $step37_grpc_timeout;",
            *("    " + line for line in self._grpc_errors()),
        ]
        keyed = self._limits()
        methods = [(m, "") for m in GRPC_OPEN] + [(m, keyed) for m in GRPC_KEYED]
        if o.allow_shared_memory:
            methods += [(m, keyed) for m in GRPC_SHARED_MEMORY]
        refused = ("ServerReady", "ModelReady", "ModelInfer") if self.draining else ()
        for method, check in methods:
            action = "return 503;" if method in refused else f"{check} {grpc_pass}"
            out.append(f"    location = /{GRPC_SERVICE}/{method} {{ {action} }}")
        out += ["    location / { return 403; }", "}"]
        return out

    def _metrics_server(self) -> list[str]:
        """``/metrics`` (Triton's) and ``/metrics/gateway`` (the gateway's answers, counted) only,
        with the same TLS, and with an API key the same key (as ``x-api-key`` or ``Authorization:
        Bearer``, which Prometheus sends from ``credentials_file``)."""
        get_only = _GET_ONLY
        return [
            "server {",
            *self._listen_lines("metrics"),
            "    default_type application/json;",
            '    proxy_set_header Connection "";',
            *(f'    proxy_set_header {h} "";' for h in (API_KEY_HEADER, "Authorization")),
            *("    " + line for line in self._http_errors()),
            f"    location = /metrics {{ {get_only} {self._limits('$step37_metrics_ok')} "
            "proxy_pass http://step37_triton_metrics; }",
            # Every answer of the gateway, by outcome (gatewaycount.py writes the file; the workers
            # read it: as another user, through folders only their group may traverse).
            f"    location = {COUNTS_PATH} {{ {get_only} {self._limits('$step37_metrics_ok')} "
            f'alias {COUNTS_FILE}; default_type "text/plain; version=0.0.4; charset=utf-8"; }}',
            "    location / { return 403; }",
            "}",
        ]

    def _tls_lines(self) -> list[str]:
        """Mozilla's intermediate profile (the files are named in each server: nginx turns an
        inherited relative name into a full one in place, which the next server then parses)."""
        if not self.options.tls:
            return []
        return [
            "ssl_protocols TLSv1.2 TLSv1.3;",
            f"ssl_ciphers {TLS_CIPHERS};",
            "ssl_prefer_server_ciphers off;",
            "ssl_ecdh_curve X25519:prime256v1:secp384r1;",
            "ssl_session_cache shared:step37_tls:10m;",
            "ssl_session_timeout 1d;",
            "ssl_session_tickets off;",
        ]

    def _key_maps(self) -> list[str]:
        """Exact, case-sensitive matches of the key (a string map key would be case-insensitive)."""
        key = self.options.api_key
        if key is None:
            return []
        header = API_KEY_HEADER.replace("-", "_")
        return [
            f"map $http_{header} $step37_key_ok {{ default 0; {_quote('~' + _exact(key))} 1; }}",
            "map $http_authorization $step37_bearer_ok { default 0; "
            f"{_quote('~^[Bb][Ee][Aa][Rr][Ee][Rr] +' + _exact(key)[1:])} 1; }}",
            'map "$step37_key_ok$step37_bearer_ok" $step37_metrics_ok { default 1; "00" 0; }',
        ]

    def _limit_lines(self) -> list[str]:
        o = self.options
        idle = max(1, round(o.idle_timeout_s))
        return [
            f"client_max_body_size {max(1, round(o.max_body_mb * 2**20))};",
            # Bodies stream to Triton as they arrive (64 KiB in memory per request, no temporary
            # file); Triton's answers are relayed the same way.
            "client_body_buffer_size 64k;",
            "proxy_request_buffering off;",
            "proxy_max_temp_file_size 0;",
            f"client_header_timeout {max(1, round(min(o.header_timeout_s, o.idle_timeout_s)))}s;",
            f"client_body_timeout {max(1, round(min(o.body_timeout_s, o.idle_timeout_s)))}s;",
            f"send_timeout {idle}s;",
            f"keepalive_timeout {idle}s;",
            "lingering_time 5s;",  # reading what is left of a refused body
            "lingering_timeout 2s;",
            "reset_timedout_connection on;",
            "limit_conn_zone $server_port zone=step37_inflight:1m;",
            "limit_conn_zone $binary_remote_addr zone=step37_client:10m;",
            "limit_conn_status 503;",
            "limit_conn_log_level warn;",
        ]

    def text(self) -> str:
        """The whole nginx.conf (holds the API key when there is one: write it 0600).  Every file
        it names is relative to its own folder (nginx's prefix), so no path is parsed by nginx."""
        o = self.options
        lines = [
            "# Written by step37-deploy serve for this run only; regenerated at every start.",
            "daemon off;",
            "master_process on;",
            f"worker_processes {o.worker_processes};",
            f"worker_rlimit_nofile {o.open_files};",
            f"worker_shutdown_timeout {o.shutdown_timeout_s}s;",
            "pid nginx.pid;",
            "error_log stderr warn;",
            user_line(o.worker_user),
            f"events {{ worker_connections {o.worker_connections}; }}",
            "http {",
            # One line per answer into serve's counter (gatewaycount.py): a pipe on nginx's
            # stdout, blocking, so that no answer goes uncounted.
            f"    log_format step37_count '{LOG_FORMAT}';",
            "    access_log /dev/stdout step37_count;",
            "    server_tokens off;",
            "    default_type application/octet-stream;",
            *(f"    {what}_temp_path {what};" for what in TEMP_FOLDERS),
            *("    " + line for line in self._limit_lines()),
            "    proxy_http_version 1.1;",
            "    proxy_connect_timeout 5s;",
            f"    proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;",
            f"    proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;",
            "    grpc_connect_timeout 5s;",
            f"    grpc_read_timeout {UPSTREAM_TIMEOUT_S}s;",
            f"    grpc_send_timeout {UPSTREAM_TIMEOUT_S}s;",
            f"    {_GET_MAP}",
            f"    {_GRPC_DEADLINE_MAP}",
            f'    map $upstream_status $step37_retry_after {{ "503" {RETRY_AFTER_S}; default ""; }}',
            *("    " + line for line in self._key_maps()),
            *("    " + line for line in self._tls_lines()),
        ]
        for name in ("http", "grpc", "metrics"):
            keep = "" if name == "metrics" or self.draining else " keepalive 32;"
            lines.append(f"    upstream step37_triton_{name} {{ server 127.0.0.1:{self.upstream[name]};{keep} }}")
        for server in (self._http_server(), self._grpc_server(), self._metrics_server()):
            lines += ["    " + line for line in server]
        lines.append("}")
        return "\n".join(line for line in lines if line.strip()) + "\n"
