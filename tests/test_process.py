"""The shared helpers of issue 20: process liveness by PID and start time (a reused PID is not the
writer of a leftover), the child set-up ``serve`` gives its processes, the probe addresses, and
``serve``'s gateway options derived without touching the ``limits`` it is given."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step37_deploy import files
from step37_deploy.errors import ConfigError
from step37_deploy.process import alive, child_setup, current_umask, started_at, umask
from step37_deploy.serving.net import free_port, host_port, probe_host


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_alive_knows_this_process_a_dead_one_and_not_a_pid_at_all():
    assert alive(os.getpid()) and alive(os.getpid(), written_at=0.0)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not alive(done.pid)
    assert not alive(2**31 - 2) and not alive(10**30)  # above pid_max; not even a C int


def test_a_reused_pid_is_not_the_writer_of_an_older_leftover(sleeper):
    born = started_at(sleeper.pid)
    assert born is not None and abs(born - time.time()) < 30
    assert alive(sleeper.pid) and alive(sleeper.pid, written_at=time.time())
    # a leftover last written an hour before this process started cannot be its
    assert not alive(sleeper.pid, written_at=born - 3600)


def test_the_sweep_removes_a_temporary_whose_pid_now_runs_another_process(tmp_path, sleeper, monkeypatch):
    stale = tmp_path / f".x.plan{files.TMP_MARK}{files.HOST}-{sleeper.pid}-deadbeef"
    stale.write_bytes(b"partial engine of a killed run")
    live = tmp_path / f".y.plan{files.TMP_MARK}{files.HOST}-{sleeper.pid}-cafef00d"
    live.write_bytes(b"written by the live process")  # now: after that process started
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))  # written long before that PID's process started
    monkeypatch.setattr(files, "_PROCESS_START", time.time() + 10)  # both older than this run
    assert files.remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists()


def test_umask_block_and_child_setup():
    before = current_umask()
    with umask(0o077) as old:
        assert old == before and current_umask() == 0o077
    assert current_umask() == before
    out = subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True, preexec_fn=child_setup(0o027))
    assert out.stdout.strip() == "0027"


def test_probe_hosts_and_urls():
    assert [probe_host(h) for h in ("0.0.0.0", "", "::", "10.1.2.3")] == ["127.0.0.1", "127.0.0.1", "::1", "10.1.2.3"]
    assert host_port("::1", 8000) == "[::1]:8000" and host_port("127.0.0.1", 8000) == "127.0.0.1:8000"
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it was free
    if socket.has_ipv6:
        try:
            assert free_port("::1") > 0
        except OSError:
            pytest.skip("no IPv6 loopback here")


def test_gateway_options_are_a_new_value_and_refuse_keys_inside_limits():
    from step37_deploy.serving.gateway import GatewayOptions
    from step37_deploy.serving.prepare import gateway_options

    limits = GatewayOptions(max_body_mb=8.0)
    tls = (Path("c.pem"), Path("k.pem"))
    got = gateway_options(limits, "k" * 32, tls, True, 7)
    assert (got.max_body_mb, got.api_key, got.tls, got.allow_shared_memory, got.shutdown_timeout_s) == (
        8.0,
        "k" * 32,
        tls,
        True,
        7,
    )
    assert limits == GatewayOptions(max_body_mb=8.0)  # untouched
    with pytest.raises(ConfigError, match="api_key_file"):
        gateway_options(GatewayOptions(api_key="x" * 32), None, None, False, 30)
