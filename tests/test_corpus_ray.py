"""The corpus job on a real Ray runtime (issue 23): the same shards as the local engine, and a
two-node cluster on loopback that loses a worker node in the middle of the run.

Every Ray address stays on 127.0.0.1: Ray 2.60 rewrites 127.0.0.1 into the machine's outward address
unless multi-node support is off for the process (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what the
job sets for a runtime of its own or a loopback ``--ray-address``).  ``ray start`` of a worker node
refuses that setting, so the worker node here starts through Ray's own CLI entry point with the one
function that picks the node's address (``node_ip_address_from_perspective``) kept to 127.0.0.1.
Token authentication is on, with a token file of mode 0600 in the test's folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from step37_deploy import files
from step37_deploy.corpus.compute import EngineSpec
from step37_deploy.corpus.reader import read_shard
from step37_deploy.corpus.run import CorpusOptions, run_corpus
from step37_deploy.serving.server import free_port
from tests.corpus_data import image_text_corpus, photo_dir

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
pytestmark = pytest.mark.skipif(photo_dir() is None, reason="scikit-image's bundled photos are not installed ([dev])")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return image_text_corpus(tmp_path_factory.mktemp("corpus"), shards=4, per_shard=3, seed=11)


@pytest.fixture(scope="module")
def ray_local():
    """One Ray runtime on this machine for the module (3 CPUs, loopback, private 0600 token),
    started the way the job starts its own; workers import this checkout (PYTHONPATH)."""
    from step37_deploy.corpus.ray_engine import ray_runtime

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), old or ""])
    try:
        with ray_runtime(None, 3, None) as r:
            yield r
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _manifests(out: Path) -> dict[str, dict]:
    found = {}
    for p in sorted(out.glob("*.manifest.json")):
        m = json.loads(p.read_text())
        m.pop("written_by")
        found[p.name] = m
    return found


def test_ray_engine_gives_the_local_engines_shards(corpus, tiny_fp32, tmp_path, ray_local):
    engine = EngineSpec(str(tiny_fp32), threads=1)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    try:
        run_corpus(CorpusOptions(list(map(str, corpus)), str(local), engine, dtype="fp32"), progress=False)
    finally:
        torch.set_num_threads(threads)
    o = CorpusOptions(list(map(str, corpus)), str(on_ray), engine, dtype="fp32", runner="ray", workers=2)
    s = run_corpus(o, progress=False)
    assert s.complete == 4 and s.ok == 12 and not s.failed
    for shard in corpus:
        assert (on_ray / shard.name).read_bytes() == (local / shard.name).read_bytes(), shard.name
    assert _manifests(on_ray) == _manifests(local)
    assert {json.loads(p.read_text())["written_by"]["engine"] for p in on_ray.glob("*.manifest.json")} == {"ray"}


WORKER_NODE = """
import os, sys
import ray._private.services as services
services.node_ip_address_from_perspective = lambda *a, **k: "127.0.0.1"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # its raylet, agents and workers: loopback too
from ray.scripts.scripts import main
sys.exit(main())
"""


def _wait_for(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"{what}: a process exited ({p.args})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _temp_pids(out: Path) -> set[int]:
    pids = set()
    for name in os.listdir(out) if out.exists() else []:
        m = files._TMP_RE.match(name)
        if m:
            pids.add(int(m.group(2)))
    return pids


@pytest.mark.slow
def test_two_node_cluster_loses_a_worker_node_mid_run(tiny_fp32, tmp_path):
    # 6 images a shard: a shard's temporary file lives long enough to be seen on the worker node
    # (with 2, an idle machine wrote every shard between two looks and the job ended unkilled)
    corpus = image_text_corpus(tmp_path / "in", shards=8, per_shard=6, seed=13)
    token = tmp_path / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=str(REPO))
    env.update(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000")
    env.update(RAY_health_check_failure_threshold="3", RAY_USAGE_STATS_ENABLED="0")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--disable-usage-stats", "--block"]
    head_log, worker_log = tmp_path / "head.log", tmp_path / "worker.log"
    (tmp_path / "worker_node.py").write_text(WORKER_NODE)
    head = worker = job = None
    try:
        head_cmd = [ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
        with open(head_log, "wb") as fh:
            head = subprocess.Popen(
                [*head_cmd, *common],
                env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for(lambda: b"Ray runtime started" in head_log.read_bytes(), 90, "the head node", [head])
        worker_cmd = [sys.executable, str(tmp_path / "worker_node.py"), "start", "--address", f"127.0.0.1:{port}"]
        with open(worker_log, "wb") as fh:
            worker = subprocess.Popen(
                [*worker_cmd, "--num-cpus", "1", *common],
                env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},  # the wrapper sets 0 for its children
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for(lambda: b"Ray runtime started" in worker_log.read_bytes(), 90, "the worker node", [worker])
        assert b"Local node IP: 127.0.0.1" in head_log.read_bytes() + worker_log.read_bytes()
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "step37_deploy.cli", "embed-corpus", *map(str, corpus), "--out", str(out)]
        cmd += ["--checkpoint", str(tiny_fp32), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]
        cmd += ["--workers", "2", "--quiet"]
        job_log = tmp_path / "job.log"
        with open(job_log, "wb") as fh:
            job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        # kill the worker node while one of its processes is writing a shard
        _wait_for(lambda: _temp_pids(out) & _tree(worker.pid), 180, "a shard written on the worker node", [job])
        _kill_group(worker)
        job.wait(timeout=240)
        text = job_log.read_text(errors="replace")
        assert job.returncode == 0, text[-3000:]
        assert "8/8 shards complete" in text and "48 ok, 0 errors" in text, text[-2000:]
        for shard in corpus:
            keys = [x.key for x in read_shard(out / shard.name)]
            manifest = json.loads((out / shard.name.replace(".tar", ".manifest.json")).read_text())
            assert keys == [e["key"] for e in manifest["samples"]] and len(set(keys)) == 6
        assert not [n for n in os.listdir(out) if files.TMP_MARK in n]  # the killed writer's swept
    finally:
        for p in (job, worker, head):
            if p is not None:
                _kill_group(p)
