"""The gateway's (nginx's) error log, relayed into ``serve``'s log with a bound on its size.

Clients decide much of what nginx logs: the request line they sent (escape sequences included)
and how often a line is written (one per refused request, one per connection the budget cannot
take).  Written straight to ``serve``'s stderr, one client with a few threads wrote 23 MB/s.  So
nginx's stderr is a pipe that a thread of ``serve`` reads and forwards through ``logging``:

* every byte outside printable ASCII is escaped (``\\x1b``): what a client sent cannot drive the
  terminal or forge a line;
* each line is cut at :data:`MAX_LINE` characters;
* at most :data:`RATE` lines a second pass (bursts of :data:`BURST`); the rest are counted, and
  the count is logged once per :data:`REPORT_S`;
* nginx's end of the pipe is non-blocking: when this thread falls behind, nginx drops lines
  instead of stalling a worker on its log.

So the gateway adds at most about ``RATE * MAX_LINE`` bytes a second (240 KB a minute at the
defaults) to ``serve``'s log, however it is attacked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time

log = logging.getLogger("step37_deploy.serving.gateway")

RATE = 10.0  # lines a second, sustained
BURST = 50  # lines at once
MAX_LINE = 400  # characters of one line (nginx's own lines are under 200; a request line is not)
REPORT_S = 10.0  # how often the count of dropped lines is logged

_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")
_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] ")
_ERRORS = ("emerg", "alert", "crit", "error")


def escape(line: bytes, limit: int = MAX_LINE) -> str:
    """``line`` as printable ASCII (other bytes as ``\\xNN``), cut at ``limit`` characters."""
    text = _UNPRINTABLE.sub(lambda m: b"\\x%02x" % m.group()[0], line[: 4 * limit]).decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PipeReader:
    """A pipe for one of nginx's outputs (:attr:`write_fd`, given to the child) and the thread
    that reads it (:meth:`_run`); :meth:`start` once the child has it, :meth:`join` after the
    child exits (the thread ends when every holder of the write end is gone)."""

    def __init__(self, name: str) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Close this process's copy of the write end (nginx holds its own) and start reading."""
        os.close(self.write_fd)
        self.thread.start()

    def close(self) -> None:
        """Both ends, when the child never started."""
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def join(self, timeout_s: float = 2.0) -> None:
        """Wait until every line nginx wrote before it exited is handled."""
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def _run(self) -> None:
        raise NotImplementedError


class GatewayLog(PipeReader):
    """nginx's stderr, relayed into ``serve``'s log: escaped, cut, rate-limited."""

    def __init__(self, rate: float = RATE, burst: int = BURST, report_s: float = REPORT_S) -> None:
        super().__init__("gateway-log")
        os.set_blocking(self.write_fd, False)
        self.rate, self.burst, self.report_s = rate, burst, report_s
        self.tokens = float(burst)
        self.dropped = 0
        self.last = self.reported = time.monotonic()

    def _run(self) -> None:
        pending = b""
        with open(self.read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > 4 * MAX_LINE:  # a line without an end: relay what fits
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    self._line(line)
        if pending:
            self._line(pending)
        self._report(force=True)

    def _line(self, line: bytes) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            self.dropped += 1
        elif line.strip():
            self.tokens -= 1.0
            text = escape(line.rstrip(b"\r"))
            m = _PREFIX.match(text)
            level = logging.ERROR if m and m.group(1) in _ERRORS else logging.WARNING
            log.log(level, "nginx: %s", text[m.end() - len(m.group(1)) - 3 :] if m else text)
        self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.dropped and (force or now - self.reported >= self.report_s):
            log.warning(
                "nginx: %d more log lines in the last %.0f s were dropped (more than %g a second)",
                self.dropped,
                now - self.reported,
                self.rate,
            )
            self.dropped = 0
        if force or now - self.reported >= self.report_s:
            self.reported = now
