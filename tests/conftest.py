"""Shared fixtures: synthetic checkpoints and exported ONNX files, made once per test session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from step37_deploy.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    """Tiny preset, FP32 on disk (exact parity checks), 2 shards with decoys."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp32", "tiny", dtype="fp32", shards=2, seed=1)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    """Tiny preset, bf16 on disk like the release."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", "tiny", dtype="bf16", shards=3, seed=2)


@pytest.fixture(scope="session")
def exported(tiny_fp32, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The tiny checkpoint exported at both precisions and both resolutions."""
    from step37_deploy.export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    return {(p, r): export_onnx(tiny_fp32, out, p, r).onnx_path for p in ("fp32", "fp16") for r in (728, 504)}


@pytest.fixture(scope="session")
def hf_model(tiny_fp32):
    """transformers' Step3p7Model loaded from the same files by transformers' own loader."""
    transformers = pytest.importorskip("transformers", minversion="5.23")
    model = transformers.Step3p7Model.from_pretrained(str(tiny_fp32), dtype=torch.float32)
    return model.eval()


def rel_l2(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def edit_config(ckpt: Path, **vision_changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_config"].update(vision_changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def exported_uint8(tiny_fp32, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The tiny checkpoint exported with uint8 input (normalisation folded into conv1), both
    precisions and resolutions."""
    from step37_deploy.export import export_onnx

    out = tmp_path_factory.mktemp("onnx-uint8")
    return {
        (p, r): export_onnx(tiny_fp32, out, p, r, input_kind="uint8").onnx_path
        for p in ("fp32", "fp16")
        for r in (728, 504)
    }


@pytest.fixture(scope="session")
def massive(tmp_path_factory):
    """Tiny stress checkpoint (bf16 like the release, massive activations), exported FP16 at 504
    without and with calibration, and its FP32 model: (checkpoint, plain, calibrated, model).
    test_fp16_calibration checks the calibration; test_engine_fusion builds the calibrated graph."""
    from step37_deploy import load_vision_model
    from step37_deploy.export import export_onnx

    root = tmp_path_factory.mktemp("massive")
    ck = make_checkpoint(root / "ck", "tiny", dtype="bf16", seed=3, massive_activations=True)
    plain = export_onnx(ck, root / "plain", "fp16", 504, calibrate=False).onnx_path
    calibrated = export_onnx(ck, root / "calibrated", "fp16", 504).onnx_path
    return ck, plain, calibrated, load_vision_model(ck, "fp32")


@pytest.fixture(scope="session")
def rtx_engines(exported, tmp_path_factory) -> dict[int, tuple[Path, dict, Path]]:
    """TensorRT-RTX engines of the tiny FP16 exports, built ahead of time on this CPU once per
    session (profile 1:2:4, SM86 and SM89, one timing cache): resolution -> (plan, manifest, ONNX).
    test_engine checks the build; test_serving_repo puts the same engines in repositories."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install '.[rtx]') is needed to build engines")
    from step37_deploy.engine import BuildOptions, build_engine, engine_filename

    out = tmp_path_factory.mktemp("plans")
    result = {}
    for res in (728, 504):
        onnx_path = exported[("fp16", res)]
        plan = out / engine_filename(onnx_path.name)
        options = BuildOptions(
            batch=(1, 2, 4),
            compute_capabilities=["8.6", "8.9"],
            flavour="tensorrt_rtx",
            timing_cache=str(out / "tc.cache"),
        )
        result[res] = (plan, build_engine(onnx_path, plan, options), onnx_path)
    return result


# -- serving (issue 8): one real `step37-deploy serve` per test session --------------------------------


@dataclass
class ServedEmbedder:
    """A running ``step37-deploy serve`` on loopback: where it listens and what it serves."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    checkpoint: Path
    artifacts: tuple[Path, Path]  # the 728 and 504 ONNX files its towers run
    log: Path  # the server's stdout + stderr

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def start_serve(
    args: list[str], log: Path, timeout_s: float = 240.0, ready=None
) -> tuple[subprocess.Popen, dict[str, int]]:
    """``step37-deploy serve ARGS`` as a subprocess on loopback and free ports; returns once every
    served model is ready (``ready(ports)``; default: over plain HTTP), failing the test with the
    log's tail if it exits or times out."""
    from step37_deploy.serving.server import free_port, models_ready

    if ready is None:

        def ready(ports: dict[str, int]) -> bool:
            return models_ready(f"127.0.0.1:{ports['http']}")

    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "step37_deploy.cli", "serve", *args, "--host", "127.0.0.1"]
    cmd += [f"--{k}-port={v}" for k, v in ports.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env)
    deadline = time.monotonic() + timeout_s
    while not ready(ports):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_serve(proc)
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"serve did not become ready (exit status {proc.returncode}):\n{tail}")
        time.sleep(0.1)  # a refused connection costs nothing: every test server starts a little sooner
    return proc, ports


def stop_serve(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (serve drains and exits), SIGKILL if it does not within ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def tiny_server(tiny_fp32, exported, tmp_path_factory) -> Iterator[ServedEmbedder]:
    """``step37-deploy serve --backend onnx`` (FP32 ONNX towers) on the tiny checkpoint, 4 embedder
    instances, a 100 ms tower queue delay (so concurrent requests' views batch) and a 120 s queue
    timeout, stopped at the end."""
    pytest.importorskip("tritonclient.grpc", reason="the [serve] extra (tritonclient) is not installed")
    pytest.importorskip("pytriton", reason="the [serve] extra (nvidia-pytriton) is not installed")
    artifacts = (exported[("fp32", 728)], exported[("fp32", 504)])
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--checkpoint", str(tiny_fp32), "--backend", "onnx", "--artifacts", *map(str, artifacts)]
    args += ["--preprocess-instances", "4", "--max-queue-delay-us", "100000", "--exit-timeout", "10"]
    # Correctness tests send bursts that a loaded 2-core machine takes more than the default 5 s to
    # queue through; overload behaviour has its own tests (test_resilience.py).
    args += ["--queue-timeout-ms", "120000"]
    proc, ports = start_serve(args, log)
    try:
        yield ServedEmbedder(proc, ports["http"], ports["grpc"], ports["metrics"], tiny_fp32, artifacts, log)
    finally:
        stop_serve(proc)


def private_shm_allowed() -> bool:
    """Whether this machine lets a process mount a tmpfs on /dev/shm in a mount namespace of its
    own (with a user namespace unless root), asked of util-linux's ``unshare`` (it makes the mount
    private first), independently of ``serving/shm.py``; skips the test without ``unshare``."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to tell whether namespaces are allowed")
    mount = ["sh", "-c", "mount -t tmpfs none /dev/shm"]
    tries = [["unshare", "-m", *mount]] if os.geteuid() == 0 else []
    tries.append(["unshare", "-r", "-m", *mount])
    return any(subprocess.run(t, capture_output=True, timeout=30).returncode == 0 for t in tries)


#: A model config a hostile client tries to load (with its own ``model.py``): the security tests'
#: code-upload attempts, through the gateway and on Triton's own loopback ports.
EVIL_CONFIG = json.dumps(
    {
        "name": "evil",
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}],
    }
)
