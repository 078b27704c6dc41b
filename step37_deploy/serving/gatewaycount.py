"""Every answer the gateway gives, counted by outcome in a Prometheus series (issue 22 item 20).

Triton 2.51's ``nv_inference_request_failure`` misses refusals by a full queue and most
cancellations, and the gateway's own refusals (its in-flight bounds, a wrong key, a body too
large, a draining server) are in no Triton series at all.  Every one of them is an answer nginx
gives, so nginx's access log is the one place that sees them all: the gateway logs one short line
per answer (:data:`LOG_FORMAT`: the listening port, the HTTP status, the gRPC status) to its
stdout, a pipe that a thread of ``serve`` reads (as :mod:`.gatewaylog` reads its stderr).  The
thread classifies each answer (:func:`classify`), counts it in ``prometheus_client`` counters of
a private registry, and writes them at most once a second (:data:`WRITE_EVERY_S`) to a file that
nginx's metrics listener serves at ``/metrics/gateway``, with the same TLS and key as ``/metrics``.

* Every label value comes from a closed set (:data:`LISTENERS`, :data:`OUTCOMES`, the codes in
  :data:`HTTP_CODES` and gRPC's 0-16; anything else is ``other``): no client can create a series.
* The pipe blocks nginx's writer instead of dropping a line, so the counts are exact; a line is
  a few dozen bytes (one ``write``, atomic under ``PIPE_BUF``), the pipe holds about 20,000 of
  them (1 MiB where the kernel allows) and the thread does nothing slow between two reads, so a
  worker never waits on it for long.
* A line that is not one of ours (or longer than :data:`MAX_LINE`) is counted in
  ``step37_gateway_log_lines_unparsed_total``, never in the answers.
* The file is replaced atomically (a scrape sees the old or the new counts, never half of
  each), readable by the workers' group when they run as another user, and by nobody else.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import time
from collections.abc import Mapping
from pathlib import Path

from .gatewaylog import PipeReader

log = logging.getLogger("step37_deploy.serving.gateway")

#: The access log line nginx writes for every answer: the port it was received on, the HTTP
#: status, and the gRPC status as a header (nginx's own refusals, Triton's trailers-only answers)
#: and as a trailer (Triton's answers with a message).
LOG_FORMAT = "step37 $server_port $status $sent_http_grpc_status $sent_trailer_grpc_status"
#: Where the counts are, relative to the gateway's folder (nginx's prefix), and what serves them.
COUNTS_FILE = "counts/gateway.prom"
COUNTS_PATH = "/metrics/gateway"
WRITE_EVERY_S = 1.0  # the served counts are at most this old
MAX_LINE = 128  # bytes: our lines are under 40
PIPE_SIZE = 1 << 20  # asked of the kernel (its default unprivileged maximum); 64 KiB otherwise

LISTENERS = ("http", "grpc", "metrics", "other")
OUTCOMES = ("ok", "refused", "cancelled", "deadline", "client_error", "server_error", "other")
#: HTTP statuses that get a series of their own (the gateway's, Triton's and nginx's own); any
#: other status is counted under ``code="other"``.
HTTP_CODES = frozenset(
    {200, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 411, 413, 414, 415, 416, 429, 494, 499}
    | {500, 501, 502, 503, 504}
)
#: gRPC status -> outcome (0-16 are gRPC's codes; anything else is ``other``).
GRPC_OUTCOMES = {
    0: "ok",
    1: "cancelled",  # CANCELLED: the client went away
    4: "deadline",  # DEADLINE_EXCEEDED
    8: "refused",  # RESOURCE_EXHAUSTED
    14: "refused",  # UNAVAILABLE: a full queue, a queue timeout, a busy tower, the gateway's bounds, draining
    **{code: "client_error" for code in (3, 5, 6, 7, 9, 11, 12, 16)},
    **{code: "server_error" for code in (2, 10, 13, 15)},
}


def http_outcome(status: int) -> str:
    """An HTTP status's outcome: 429/503 a refusal (overload, shutting down), nginx's 499 a client
    that went away, 504 a deadline, then by class."""
    if status in (429, 503):
        return "refused"
    if status == 499:
        return "cancelled"
    if status == 504:
        return "deadline"
    if 100 <= status < 400:
        return "ok"
    if 400 <= status < 500:
        return "client_error"
    if 500 <= status < 600:
        return "server_error"
    return "other"


def _number(field: bytes, digits: int) -> int | None:
    """``field`` as an integer of at most ``digits`` ASCII digits; None for nginx's ``-`` (empty)."""
    if field == b"-":
        return None
    if not (field.isdigit() and field.isascii() and 0 < len(field) <= digits):
        raise ValueError(field)
    return int(field)


def classify(line: bytes, listeners: Mapping[int, str]) -> tuple[str, str, str] | None:
    """``(listener, code, outcome)`` of one access log line, or None when it is not one of ours.

    ``listeners``: port -> ``http``/``grpc``/``metrics``.  The code is the gRPC status when the
    answer carries one (as a trailer, else as a header), else the HTTP status."""
    parts = line.split(b" ")
    if len(parts) != 5 or parts[0] != b"step37":
        return None
    try:
        port, status = _number(parts[1], 5), _number(parts[2], 3)
        header, trailer = _number(parts[3], 2), _number(parts[4], 2)
    except ValueError:
        return None
    if port is None or status is None or len(parts[2]) != 3:
        return None
    listener = listeners.get(port, "other")
    grpc = trailer if trailer is not None else header
    if grpc is not None:
        return listener, str(grpc) if grpc in GRPC_OUTCOMES else "other", GRPC_OUTCOMES.get(grpc, "other")
    outcome = http_outcome(status)
    if listener == "grpc" and outcome == "ok":  # a gRPC answer that ended without a status is none
        outcome = "other"
    return listener, str(status) if status in HTTP_CODES else "other", outcome


class GatewayCount(PipeReader):
    """A pipe for nginx's stdout (:attr:`write_fd`, given to the child), the thread that counts
    what arrives on it, and the file it writes (``path``).  ``listen``: listener name -> port;
    ``group``: the group that may read the file (the workers', when they run as another user).
    :meth:`write` once before nginx starts (nginx then serves zeros), :meth:`start` once the child
    has the pipe, :meth:`join` after it exits."""

    def __init__(self, path: Path, listen: Mapping[str, int], group: int | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter  # the [serve] extra: only where nginx runs

        super().__init__("gateway-count")
        self.path, self.group = Path(path), group
        self.listeners = {port: name for name, port in listen.items() if name in LISTENERS}
        self.registry = CollectorRegistry(auto_describe=True)
        self.responses = Counter(
            "step37_gateway_responses",
            "Answers the gateway gave, by listener, code (HTTP status, or the gRPC status) and outcome",
            ("listener", "code", "outcome"),
            registry=self.registry,
        )
        self.unparsed = Counter(
            "step37_gateway_log_lines_unparsed",
            "Lines on the gateway's access log pipe that were not an answer's line (counted in no answer)",
            registry=self.registry,
        )
        with contextlib.suppress(OSError):  # a user over its pipe-buffer quota keeps 64 KiB
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.failing = False  # the last write failed (logged once until one succeeds)

    def count(self, line: bytes) -> None:
        """Count one line (without its newline)."""
        found = classify(line, self.listeners) if len(line) <= MAX_LINE else None
        if found is None:
            self.unparsed.inc()
        else:
            self.responses.labels(*found).inc()

    def write(self) -> None:
        """The counts in Prometheus' text format, replacing :attr:`path` atomically.
        (``prometheus_client.write_to_textfile`` does the same with the umask's mode, which under
        ``serve``'s 077 the workers could not read when they run as another user.)"""
        from prometheus_client import generate_latest

        data = generate_latest(self.registry)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                if self.group is not None:
                    os.fchown(fh.fileno(), -1, self.group)
                    os.fchmod(fh.fileno(), 0o640)
                fh.write(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self.path.parent.is_dir():  # serve's take-down removed the work folder: nobody serves it
                return
            if not self.failing:
                log.warning("the gateway's counts could not be written to %s: %s", self.path, exc)
            self.failing = True
            return
        self.failing = False

    def _run(self) -> None:
        """Read, count, and write at most every :data:`WRITE_EVERY_S` while something changed,
        until nginx (every process holding the pipe) is gone.  Nothing here may stop reading:
        nginx's workers would block on a full pipe."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        pending, skipping, dirty, written, eof = b"", False, False, time.monotonic(), False
        while not eof:
            wait_ms = None if not dirty else max(0, int((written + WRITE_EVERY_S - time.monotonic()) * 1000))
            try:
                chunk = os.read(self.read_fd, 65536) if poller.poll(wait_ms) else None  # None: time to write
            except OSError as exc:  # the pipe itself failed: nothing more will arrive
                log.warning("the gateway's access log pipe failed: %s", exc)
                break
            eof = chunk == b""
            try:
                if chunk:
                    pending, skipping = self._lines(pending + chunk, skipping)
                    dirty = True
                if dirty and (eof or time.monotonic() >= written + WRITE_EVERY_S):
                    self.write()
                    written, dirty = time.monotonic(), False
            except Exception:  # never stop reading: nginx's workers would block on a full pipe
                log.exception("the gateway's answer counter failed; counting goes on")
        if pending and not skipping:  # a last line without its newline
            self.count(pending)
            self.write()
        os.close(self.read_fd)

    def _lines(self, data: bytes, skipping: bool) -> tuple[bytes, bool]:
        """Count the complete lines of ``data``; returns what is left of the last one and whether
        it is the rest of an overlong line (counted once as unparsed, then skipped to its end)."""
        *lines, pending = data.split(b"\n")
        for line in lines:
            if skipping:
                skipping = False  # the end of the overlong line
                continue
            self.count(line)
        if len(pending) > MAX_LINE:
            if not skipping:
                self.unparsed.inc()
            return b"", True
        return pending, skipping
