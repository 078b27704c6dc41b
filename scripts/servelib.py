"""What the serving benchmarks in scripts/ share: a ``serve`` of this checkout on free loopback
ports, started as a user would start it and waited for until every model is ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step37_deploy.serving.server import free_port, models_ready  # noqa: E402


def start_serve(
    checkpoint: Path, backend: str, log: Path, extra: list[str] = (), timeout_s: float = 600
) -> tuple[subprocess.Popen, dict[str, int]]:
    """``step37-deploy serve`` (2 embedder instances, a 10 s exit timeout, ``extra``) on 127.0.0.1
    and free ports, its output in ``log``; returns the process and its ports once every model is
    ready, and exits the script with the log's tail when it is not within ``timeout_s``."""
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [sys.executable, "-m", "step37_deploy.cli", "serve", "--checkpoint", str(checkpoint), "--backend", backend]
    cmd += ["--host", "127.0.0.1", "--preprocess-instances", "2", "--exit-timeout", "10", *extra]
    cmd += [f"--{k}-port={v}" for k, v in ports.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout_s
    while not models_ready(f"127.0.0.1:{ports['http']}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"serve did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, ports


def stop_serve(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (``serve`` drains and stops), SIGKILL if it is not gone within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
