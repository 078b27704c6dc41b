"""ONNX Runtime runner (the embedded default backend): CPU or CUDA execution provider."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..inputs import require_file
from .base import Runner, TensorSpec

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def session_from_onnx(
    path: str | Path, provider: str = "cpu", threads: int | None = None, device_id: int = 0, spinning: bool = True
) -> Callable[[], Any]:
    """Loader: an ``InferenceSession`` for ``path`` on the CPU or CUDA provider.  ``spinning=False``:
    idle intra-op workers sleep at once instead of spin-waiting for the next run, which is what a
    session sharing its cores with other processes wants (``serving/threads.py`` has the numbers)."""

    def load():
        import onnxruntime as ort

        require_file(path, InputError, "ONNX file")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable(
                    "ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        elif provider == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise InputError(f"ONNX Runtime provider must be 'cpu' or 'cuda', got {provider!r}")
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT's pybind errors (InvalidProtobuf, InvalidGraph, Fail...) share no base
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InputError(f"ONNX Runtime cannot load {path}: {first}") from None
        if provider == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise BackendUnavailable("ONNX Runtime could not start its CUDA provider on this machine")
        return sess

    return load


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.from_numpy(np.empty(0, dtype)).dtype


class OnnxrtRunner(Runner):
    """Runs an exported ONNX file.  On CUDA, torch CUDA tensors are bound directly (IO binding)."""

    def __init__(self, session: Any, name: str | None = None, provider: str = "cpu") -> None:
        super().__init__()
        self._loader = session
        self.session = None if callable(session) else session
        self.provider = provider
        self.name = name or f"onnxrt-{provider}"

    def _activate(self) -> None:
        if self.session is None:
            self.session = self._loader()
        self._in = self.session.get_inputs()[0]
        self._out = self.session.get_outputs()[0]

    def _deactivate(self) -> None:
        if callable(self._loader):
            self.session = None

    @staticmethod
    def _spec(arg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
        return TensorSpec(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), shape)

    def input_spec(self) -> TensorSpec:
        return self._spec(self._in)

    def output_spec(self) -> TensorSpec:
        return self._spec(self._out)

    def metadata(self) -> dict[str, str]:
        meta = self.session.get_modelmeta().custom_metadata_map
        return {k.removeprefix("step37."): v for k, v in meta.items()}

    def infer(self, pixel_values: Any) -> Any:
        self.validate(pixel_values)
        want = self.input_spec().dtype
        if isinstance(pixel_values, np.ndarray):
            x = np.ascontiguousarray(pixel_values, dtype=want)
            return self.session.run([self._out.name], {self._in.name: x})[0]
        return self._infer_torch(pixel_values, want)

    def _infer_torch(self, x, want: np.dtype):
        import torch

        tdtype = _torch_dtype(want)
        if x.device.type != "cuda" or self.provider != "cuda":
            out = self.session.run([self._out.name], {self._in.name: x.detach().cpu().to(tdtype).numpy()})[0]
            return torch.from_numpy(out).to(x.device)
        # IO binding: no host round trip for CUDA tensors.
        x = x.detach().to(tdtype).contiguous()
        b = x.shape[0]
        out_spec = self.output_spec()
        y = torch.empty((b, *out_spec.shape[1:]), dtype=_torch_dtype(out_spec.dtype), device=x.device)
        binding = self.session.io_binding()
        dev = x.device.index or 0
        binding.bind_input(self._in.name, "cuda", dev, want, tuple(x.shape), x.data_ptr())
        binding.bind_output(self._out.name, "cuda", dev, out_spec.dtype, tuple(y.shape), y.data_ptr())
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return y
