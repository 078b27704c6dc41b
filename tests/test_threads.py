"""What ``serve`` sets for the served processes' threads, and the stage log that measured why
(issue 21): pure functions first, then the shared server states its choice."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from step37_deploy.serving import contract as C
from step37_deploy.serving import stages, supervise
from step37_deploy.serving.threads import POOL_VARIABLES, plan_threads, thread_options, usable_cores


@pytest.mark.parametrize(
    ("cores", "instances", "tower", "embedder"),
    [(2, 2, 2, 1), (2, None, 2, 1), (16, 4, 16, 4), (4, 8, 4, 1), (1, 1, 1, 1), (16, 3, 16, 5)],
)
def test_plan_from_cores_and_instances(cores, instances, tower, embedder):
    plan = plan_threads(cores=cores, embedder_instances=instances, environ={})
    assert (plan.tower_threads, plan.embedder_threads) == (tower, embedder)
    assert plan.embedder_instances == (instances or cores) and not plan.spinning
    line = plan.describe()
    assert f"{cores} usable cores" in line and f"x {embedder} BLAS" in line and f"x {tower} intra-op" in line
    assert plan.tower_instances == min(2, cores) and f"towers {min(2, cores)} instance(s) each" in line
    assert "spinning off" in line and "kept" not in line


def test_plan_keeps_what_the_operator_set():
    plan = plan_threads(cores=8, embedder_instances=2, tower_threads=3, environ={"OMP_NUM_THREADS": "6"})
    assert plan.tower_threads == 3  # --tower-threads wins
    env = plan.env({"OMP_NUM_THREADS": "6", "PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "6" and env["PATH"] == "/bin"
    assert all(env[v] == "4" for v in POOL_VARIABLES if v != "OMP_NUM_THREADS")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "kept from the environment: OMP_NUM_THREADS" in plan.describe()


def test_serve_writes_the_plan_into_the_configs(monkeypatch):
    from step37_deploy.serving.repository import RepositoryOptions, TowerArtifact, embedder_config, tower_config

    monkeypatch.setattr("step37_deploy.serving.threads.usable_cores", lambda: 4)
    opts, plan = thread_options(RepositoryOptions(preprocess_instances=2))
    assert (opts.preprocess_instances, opts.tower_threads, opts.embedder_threads, plan.cores) == (2, 4, 2, 4)
    onnx = TowerArtifact(728, "onnx", Path("t.onnx"), "float32", "fp32", 169, 64, None)
    cfg = tower_config(onnx, opts)
    assert cfg.parameters["threads"].string_value == "4"
    assert cfg.instance_group[0].count == 2  # serve's default: a second batch fills the first one's idle cores
    assert tower_config(onnx, RepositoryOptions()).instance_group[0].count == 1  # triton-repo: one
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0  # CPU towers do not wait to batch
    emb = embedder_config(opts)
    assert emb.parameters["threads"].string_value == "2" and emb.instance_group[0].count == 2
    # What the user chose is kept; engines still wait to batch by default.
    opts, _ = thread_options(RepositoryOptions(tower_threads=1, max_queue_delay_us=500, tower_instances=1))
    assert opts.tower_threads == 1 and tower_config(onnx, opts).dynamic_batching.max_queue_delay_microseconds == 500
    assert tower_config(onnx, opts).instance_group[0].count == 1
    trt = TowerArtifact(728, "trt", Path("t.plan"), "float16", "fp16", 169, 64, None, profile=(1, 4, 8))
    assert tower_config(trt, RepositoryOptions()).dynamic_batching.max_queue_delay_microseconds == 2000


@pytest.mark.parametrize(
    ("backend", "instances", "towers", "asked", "want"),
    [
        ("onnx", 2, None, None, "local"),  # 2 cores: an embedder instance per tower instance, so no hop
        ("onnx", 3, None, None, "bls"),  # more embedder instances than tower copies: the towers batch them
        ("torch", 2, 1, None, "bls"),
        ("onnx", 2, None, "bls", "bls"),
        ("onnx", 8, None, "local", "local"),
        ("trt", 1, None, None, "bls"),  # Triton's TensorRT backend runs engines: always their own models
    ],
)
def test_where_the_towers_run(monkeypatch, backend, instances, towers, asked, want):
    from step37_deploy.serving.repository import RepositoryOptions, embedder_config

    monkeypatch.setattr("step37_deploy.serving.threads.usable_cores", lambda: 2)
    opts = RepositoryOptions(preprocess_instances=instances, tower_instances=towers, tower_calls=asked)
    opts, plan = thread_options(opts, backend)
    assert opts.tower_calls == plan.tower_calls == want
    line = plan.describe()
    assert ("towers run in each embedder instance x 2 intra-op" in line) == (want == "local"), line
    assert embedder_config(opts).parameters[C.TOWER_THREADS_PARAMETER].string_value == "2"


def test_tower_calls_are_checked():
    from step37_deploy.errors import ConfigError
    from step37_deploy.serving.configs import resolve_tower_calls
    from step37_deploy.serving.repository import RepositoryOptions

    with pytest.raises(ConfigError, match="--tower-calls must be one of local, bls, got 'rpc'"):
        RepositoryOptions(tower_calls="rpc").validate()
    with pytest.raises(ConfigError, match="--tower-calls local: TensorRT towers"):
        resolve_tower_calls(RepositoryOptions(tower_calls="local"), {"trt"})


def test_server_env_carries_the_plan_to_the_stubs():
    from step37_deploy.serving.server import TritonInstall, server_env

    install = TritonInstall(Path("/x/tritonserver"), None, None, None)
    plan = plan_threads(cores=2, embedder_instances=2, environ={})
    env = server_env(install, {"PATH": "/bin"}, threads=plan)
    assert [env[v] for v in POOL_VARIABLES] == ["1", "1", "1"] and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_NUM_THREADS" not in server_env(install, {"PATH": "/bin"})


def test_supervisor_wait_wakes_on_an_exit():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"], start_new_session=True)
    try:
        sup = supervise.Supervisor()
        sup.watch("gateway", child, front=True)
        assert sup.check() is None
        t0 = time.monotonic()
        while sup.check() is None and time.monotonic() - t0 < 60:
            sup.wait(30.0)  # returns when the child exits, not after 30 s
        assert sup.check() == "gateway exited with status 0" and time.monotonic() - t0 < 30
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        sup.close()


def test_stage_log_round_trip_and_stages(tmp_path, monkeypatch):
    monkeypatch.delenv(stages.STAGE_LOG_ENV, raising=False)
    assert stages.StageLog.from_env() is None  # off unless the server's environment asks
    log = stages.StageLog.from_env({stages.STAGE_LOG_ENV: str(tmp_path / "s.jsonl")})
    ms = 1_000_000
    log.write({"m": "embedder", "id": "a", "exec": 10 * ms, "read": 11 * ms, "pre": 31 * ms, "proj": 140 * ms,
               "built": 141 * ms, "bls": [{"id": "a/728/0", "sent": 31 * ms, "numpy": 130 * ms},
                                          {"id": "a/504/0", "sent": 32 * ms, "numpy": 138 * ms}]})  # fmt: skip
    log.write({"m": "tower", "model": "step37_vision_728", "ids": ["a/728/0"], "exec": 35 * ms, "read": 36 * ms,
               "infer": 120 * ms, "built": 121 * ms})  # fmt: skip
    log.write({"m": "tower", "model": "step37_vision_504", "ids": ["a/504/0"], "exec": 36 * ms, "read": 37 * ms,
               "infer": 135 * ms, "built": 136 * ms})  # fmt: skip
    log.close()
    (tmp_path / "s.jsonl").open("a").write('{"m": "tow')  # a torn last line is skipped
    records = stages.read_stage_log(tmp_path / "s.jsonl")
    assert len(records) == 3
    (row,) = stages.served_stages({"a": {"send": 0, "recv": 150 * ms}, "lost": {"send": 0, "recv": 1}}, records)
    assert row == {
        "front": 10.0, "input": 1.0, "preprocess": 20.0, "answer": 1.0, "back": 9.0, "total": 150.0,
        # the crops' tower answered last: the request waited for it
        "bls_send": 4.0, "tower_input": 1.0, "tower_compute": 98.0, "tower_output": 1.0, "bls_return": 2.0,
        "projector": 2.0,
    }  # fmt: skip
    assert set(row) == {n for n, _ in stages.SERVED_STAGES}
    summary = stages.summarize([row, {**row, "front": 20.0}], ["front", "nothing"])
    assert summary == {"front": {"mean": 15.0, "p50": 15.0, "n": 2}}
    # Towers run in the embedder (--tower-calls local): one after the other, no BLS stage.
    local = {"m": "embedder", "id": "b", "exec": 10 * ms, "read": 11 * ms, "pre": 31 * ms, "proj": 140 * ms,
             "built": 141 * ms, "bls": [], "local": [{"res": 728, "start": 32 * ms, "end": 100 * ms},
                                                  {"res": 504, "start": 100 * ms, "end": 138 * ms}]}  # fmt: skip
    (row,) = stages.served_stages({"b": {"send": 0, "recv": 150 * ms}}, [local])
    assert row["tower_compute"] == 106.0 and row["projector"] == 2.0 and "bls_send" not in row


def test_the_server_states_its_threads(tiny_server):
    """The start-up line and Triton's model-config API say what ``serve`` chose (the shared server
    runs 4 embedder instances)."""
    cores = usable_cores()
    text = tiny_server.log.read_text()
    m = re.search(
        r"threads: (\d+) usable cores: embedder (\d+) instances x (\d+) BLAS"
        r".* towers (\d+) instance\(s\) each x (\d+) intra-op",
        text,
    )
    want = (str(cores), "4", str(max(1, cores // 4)), str(min(2, cores)), str(cores))
    assert m and m.groups() == want, text[-2000:]

    def config(model: str) -> dict:
        with urllib.request.urlopen(f"http://{tiny_server.http_url}/v2/models/{model}/config", timeout=10) as r:
            return json.loads(r.read())

    for model in C.TOWER_MODELS.values():
        assert config(model)["parameters"]["threads"]["string_value"] == str(cores)
        assert config(model)["instance_group"][0]["count"] == min(2, cores)
    assert config(C.EMBEDDER_MODEL)["parameters"]["threads"]["string_value"] == str(max(1, cores // 4))
