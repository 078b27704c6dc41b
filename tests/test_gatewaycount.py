"""The gateway's answer counter (issue 22 item 20): nginx's access log lines, classified into a
closed set of labels, counted, and written as a Prometheus text file; no server needed.  The
counts of a running gateway are checked in ``test_security.py`` (401s and per-client 503s) and
``test_resilience.py`` (every refusal of an open-loop overload)."""

from __future__ import annotations

import os
import random
import stat
import time
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="the [serve] extra (prometheus-client) is not installed")
from prometheus_client.parser import text_string_to_metric_families

from step37_deploy.serving import gatewaycount as gc

PORTS = {8000: "http", 8001: "grpc", 8002: "metrics"}


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"step37 8000 200 - -", ("http", "200", "ok")),
        (b"step37 8000 503 - -", ("http", "503", "refused")),  # a full queue, the gateway's bounds, draining
        (b"step37 8000 429 - -", ("http", "429", "refused")),
        (b"step37 8000 499 - -", ("http", "499", "cancelled")),  # the client went away
        (b"step37 8000 504 - -", ("http", "504", "deadline")),
        (b"step37 8000 401 - -", ("http", "401", "client_error")),
        (b"step37 8000 413 - -", ("http", "413", "client_error")),
        (b"step37 8000 500 - -", ("http", "500", "server_error")),
        (b"step37 8000 299 - -", ("http", "other", "ok")),  # a status without a series of its own
        (b"step37 8000 999 - -", ("http", "other", "other")),
        (b"step37 8001 204 14 -", ("grpc", "14", "refused")),  # the gateway's own gRPC refusal: a header
        (b"step37 8001 200 - 14", ("grpc", "14", "refused")),  # Triton's: a trailer
        (b"step37 8001 200 - 0", ("grpc", "0", "ok")),
        (b"step37 8001 200 0 -", ("grpc", "0", "ok")),  # a trailers-only answer
        (b"step37 8001 204 8 -", ("grpc", "8", "refused")),
        (b"step37 8001 204 16 -", ("grpc", "16", "client_error")),
        (b"step37 8001 200 - 4", ("grpc", "4", "deadline")),
        (b"step37 8001 200 - 1", ("grpc", "1", "cancelled")),
        (b"step37 8001 200 - 13", ("grpc", "13", "server_error")),
        (b"step37 8001 499 - -", ("grpc", "499", "cancelled")),  # reset by the client before any answer
        (b"step37 8001 200 - 99", ("grpc", "other", "other")),
        (b"step37 8001 200 - -", ("grpc", "200", "other")),  # a gRPC answer cut before its status
        (b"step37 8002 200 - -", ("metrics", "200", "ok")),
        (b"step37 9999 200 - -", ("other", "200", "ok")),
    ],
)
def test_each_answer_gets_its_outcome(line, expected):
    assert gc.classify(line, PORTS) == expected


@pytest.mark.parametrize(
    "line",
    [
        *(b"", b"hello", b"step37 8000 200 -", b"step37 8000 200 - - -", b"step37 x 200 - -", b"step37 8000 20 - -"),
        *(b"step37 8000 2000 - -", b"step37 8000 200 abc -", b"step37 8000 200 - 123", b"STEP37 8000 200 - -"),
        *(b"step37 800000 200 - -", "step37 8000 2\u0660\u0660 - -".encode(), b"step37  8000 200 - -"),
    ],
)
def test_a_line_that_is_not_ours_is_not_an_answer(line):
    assert gc.classify(line, PORTS) is None


def test_every_label_comes_from_a_closed_set():
    """Whatever the numbers on a line, no client can create a series: listener, code and outcome
    each take a value from a fixed, small set."""
    rng = random.Random(0)
    codes = {str(c) for c in gc.HTTP_CODES} | {str(c) for c in gc.GRPC_OUTCOMES} | {"other"}
    seen = set()
    for _ in range(20000):
        port, status = rng.choice([8000, 8001, 8002, rng.randrange(65536)]), rng.randrange(1000)
        header, trailer = (rng.choice(["-", str(rng.randrange(100))]) for _ in range(2))
        found = gc.classify(f"step37 {port} {status:03d} {header} {trailer}".encode(), PORTS)
        assert found is not None
        listener, code, outcome = found
        assert listener in gc.LISTENERS and code in codes and outcome in gc.OUTCOMES, found
        seen.add(found)
    assert len(seen) <= len(gc.LISTENERS) * len(codes) * len(gc.OUTCOMES)


def _samples(path: Path) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            if s.name.endswith("_total"):
                out[(s.name, *(s.labels[k] for k in sorted(s.labels)))] = s.value
    return out


def _feed(count: gc.GatewayCount, data: bytes) -> None:
    """Write ``data`` as nginx would (its own copy of the pipe's write end), then close it."""
    fd = os.dup(count.write_fd)
    count.start()
    os.write(fd, data)
    os.close(fd)
    count.join(10)
    assert not count.thread.is_alive()


def test_lines_through_the_pipe_are_counted_and_garbage_is_counted_apart(tmp_path):
    path = tmp_path / "gateway.prom"
    count = gc.GatewayCount(path, {"http": 8000, "grpc": 8001, "metrics": 8002})
    count.write()
    assert _samples(path) == {("step37_gateway_log_lines_unparsed_total",): 0}  # nothing yet, but the file is there
    lines = [b"step37 8000 503 - -"] * 3 + [b"step37 8001 204 14 -", b"step37 8001 200 - 0", b"garbage"]
    lines += [b"step37 8000 200 - -" + b"x" * 300, b"\x1b[2J step37 8000 200 - -", b"step37 8002 200 - -"]
    _feed(count, b"\n".join(lines) + b"\nstep37 8000 401 - -")  # the last line without its newline
    assert _samples(path) == {
        ("step37_gateway_responses_total", "503", "http", "refused"): 3,
        ("step37_gateway_responses_total", "14", "grpc", "refused"): 1,
        ("step37_gateway_responses_total", "0", "grpc", "ok"): 1,
        ("step37_gateway_responses_total", "200", "metrics", "ok"): 1,
        ("step37_gateway_responses_total", "401", "http", "client_error"): 1,
        ("step37_gateway_log_lines_unparsed_total",): 3,
    }
    assert not list(tmp_path.glob(".*tmp"))  # replaced atomically: no temporary left


def test_an_overlong_line_split_across_reads_is_one_unparsed_line(tmp_path):
    count = gc.GatewayCount(tmp_path / "gateway.prom", {"http": 8000})
    _feed(count, b"y" * 200_000 + b"\nstep37 8000 200 - -\n")  # longer than one read of the pipe
    assert _samples(count.path) == {
        ("step37_gateway_responses_total", "200", "http", "ok"): 1,
        ("step37_gateway_log_lines_unparsed_total",): 1,
    }


def test_a_line_without_an_end_is_never_held_whole(tmp_path):
    """What the thread keeps of an unfinished line is bounded, however long the line runs on."""
    count = gc.GatewayCount(tmp_path / "gateway.prom", {"http": 8000})
    pending, skipping = b"", False
    for _ in range(64):  # 4 MiB without a newline
        pending, skipping = count._lines(pending + b"y" * 65536, skipping)
        assert len(pending) <= gc.MAX_LINE
    count.close()


def test_counts_are_written_while_nginx_runs_and_readable_by_the_workers_group_only(tmp_path):
    """The file follows the counts within about a second, without waiting for nginx to exit, and
    is 0640 with the workers' group (0600 without one)."""
    path = tmp_path / "gateway.prom"
    count = gc.GatewayCount(path, {"http": 8000}, group=os.getgid())
    count.write()
    fd = os.dup(count.write_fd)
    count.start()
    try:
        os.write(fd, b"step37 8000 503 - -\n" * 5)
        deadline = time.monotonic() + 5
        while _samples(path).get(("step37_gateway_responses_total", "503", "http", "refused")) != 5:
            assert time.monotonic() < deadline, "the counts were not written while the pipe stayed open"
            time.sleep(0.1)
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    finally:
        os.close(fd)
        count.join(10)
    alone = gc.GatewayCount(tmp_path / "alone.prom", {"http": 8000})
    alone.write()
    alone.close()
    assert stat.S_IMODE(alone.path.stat().st_mode) & 0o077 == 0


def test_the_gateway_config_logs_every_answer_and_serves_the_counts_with_the_metrics_rules():
    """Every answer goes to the counter's pipe in the counter's format, and the counts are served
    on the metrics listener only, GET only, behind the same key as /metrics."""
    from step37_deploy.serving.nginxconf import GatewayOptions, NginxConfig

    listen, upstream = {"http": 1, "grpc": 2, "metrics": 3}, {"http": 11, "grpc": 12, "metrics": 13}
    for key in (None, "k" * 32):
        text = NginxConfig(GatewayOptions(api_key=key), "127.0.0.1", listen, upstream).text()
        assert f"log_format step37_count '{gc.LOG_FORMAT}';" in text
        assert "access_log /dev/stdout step37_count;" in text and "access_log off" not in text
        servers = text.split("\n    server {")[1:]
        where = [gc.COUNTS_PATH in s for s in servers]
        assert where == [False, False, True], where
        (line,) = [x for x in servers[2].splitlines() if f"location = {gc.COUNTS_PATH} " in x]
        assert f"alias {gc.COUNTS_FILE};" in line and "return 405" in line
        assert ("$step37_metrics_ok = 0) { return 401; }" in line) == (key is not None), line
