"""The TensorRT runner's mechanics on a real GPU, with TensorRT itself simulated.

No TensorRT can run on the GPU machines this project is lent (no wheels reach them, and
TensorRT-RTX has no Hopper target), so this test swaps the TensorRT module for a stand-in whose
execution context reads and writes the *raw device pointers* the runner binds (through CuPy) and
computes the tower with PyTorch on the stream the runner passes.  What it checks is everything
the runner does around TensorRT: manifest and digest checks, ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3`` on the current torch stream, chunking above the
profile's MAX, numpy in/out, and CUDA-graph capture and replay.  Skips without CUDA and CuPy.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the TensorRT runner binds device pointers)", allow_module_level=True)
cupy = pytest.importorskip("cupy", reason="needs CuPy to read the raw device pointers the runner binds")


def _tensor_at(ptr: int, shape: tuple[int, ...], dtype) -> torch.Tensor:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, n, None), 0)
    return torch.from_dlpack(cupy.ndarray(shape, dtype=dtype, memptr=mem))


class _Context:
    def __init__(self, model, profile_max: int, calls: list):
        self.model, self.max, self.calls = model, profile_max, calls
        self.shapes, self.addr = {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return 1 <= shape[0] <= self.max

    def get_tensor_shape(self, name):
        b, _, h, w = self.shapes["pixel_values"]
        return (b, self.model.config.num_output_tokens(h, w), self.model.config.output_dim)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        shape = self.shapes["pixel_values"]
        self.calls.append((shape[0], stream_handle))
        # Everything on the stream the runner passed (CuPy's default stream would break a CUDA-graph
        # capture, as a real TensorRT enqueue on the wrong stream would).
        with cupy.cuda.ExternalStream(stream_handle), torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
            x = _tensor_at(self.addr["pixel_values"], shape, np.float16)
            y = _tensor_at(self.addr["image_features"], self.get_tensor_shape("image_features"), np.float16)
            y.copy_(self.model(x))
        return True


def _fake_trt(model, version: str, profile_max: int, calls: list):
    class Engine:
        def create_execution_context(self):
            return _Context(model, profile_max, calls)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class TRT:
        __version__ = version

    TRT.Runtime, TRT.Logger = Runtime, Logger
    return TRT


@pytest.fixture()
def fake_engine(tmp_path, monkeypatch):
    from step37_deploy.config import preset
    from step37_deploy.model import Step37VisionModel

    torch.manual_seed(0)
    model = Step37VisionModel(preset("tiny").vision).cuda().half().eval()
    plan = tmp_path / "fake.plan"
    data = b"not a real engine; TensorRT is simulated"
    plan.write_bytes(data)
    manifest = {
        "flavour": "tensorrt",
        "trt_version": "10.99",
        "targets": {"compute_capabilities": ["9.0"]},
        "profile": {"pixel_values": [[1, 3, 504, 504], [2, 3, 504, 504], [4, 3, 504, 504]]},
        "inputs": {"pixel_values": {"dtype": "float16", "shape": ["batch", 3, 504, 504]}},
        "outputs": {"image_features": {"dtype": "float16", "shape": ["batch", 81, 256]}},
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "engine_bytes": len(data),
    }
    (tmp_path / "fake.plan.json").write_text(json.dumps(manifest))
    calls: list = []
    import step37_deploy.backends.tensorrt as rt

    monkeypatch.setattr(rt, "check_runtime_compat", lambda m, p: _fake_trt(model, "10.99", 4, calls))
    return plan, model, calls


def test_runner_binds_pointers_chunks_and_replays(fake_engine):
    from step37_deploy.backends.tensorrt import TensorRTRunner

    plan, model, calls = fake_engine
    runner = TensorRTRunner(plan).activate()
    x = torch.randn(6, 3, 504, 504, device="cuda")
    with torch.inference_mode():
        ref = model(x.half())
        got = runner.infer(x)  # 6 > profile MAX 4: two enqueues
    torch.cuda.synchronize()
    assert [c[0] for c in calls] == [4, 2]
    assert all(c[1] == torch.cuda.current_stream().cuda_stream for c in calls)
    assert got.is_cuda and got.dtype == torch.float16 and torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    out_np = runner.infer(x[:1].cpu().numpy())  # numpy in -> numpy out
    assert isinstance(out_np, np.ndarray) and np.allclose(out_np, ref[:1].float().cpu().numpy(), atol=1e-3)

    n_before = len(calls)
    graphed = TensorRTRunner(plan, cuda_graph_batch=2).activate()
    assert len(calls) == n_before + 2  # warm-up enqueue + the captured one
    with torch.inference_mode():
        a = graphed.infer(x[:2])
        b = graphed.infer(x[2:4])
    torch.cuda.synchronize()
    assert len(calls) == n_before + 2  # replays run the graph; they do not enqueue again
    assert torch.allclose(a, ref[:2], atol=1e-3, rtol=1e-3) and torch.allclose(b, ref[2:4], atol=1e-3, rtol=1e-3)


if __name__ == "__main__":  # the lent GPU machine may have no pytest
    import sys

    sys.exit(pytest.main([__file__, "-q"]) if "pytest" in sys.modules else 0)
