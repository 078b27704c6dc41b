"""TensorRT runner: deserialise a checked engine and run it on torch CUDA tensors, no host round trip.

Before deserialising, the engine's manifest is checked against the installed TensorRT flavour and
version and the current GPU (a mismatch is an :class:`EngineError` naming both sides, never a
segfault inside TensorRT), and the engine file against the manifest's size and digest.

Inference binds torch tensors directly: ``set_input_shape``, ``set_tensor_address`` for input and
output, then ``execute_async_v3`` on the current torch CUDA stream.  Batches larger than the
profile's MAX are split into chunks.  With ``cuda_graph_batch=N`` the N-batch enqueue is captured
once into a CUDA graph and replayed (static input/output buffers), which removes per-call launch
overhead for a fixed serving batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import check_runtime_compat, read_manifest, verify_engine_file
from ..errors import EngineError, InputError
from .base import Runner, TensorSpec

_NP = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}


class TensorRTRunner(Runner):
    def __init__(self, engine_path: str | Path, name: str | None = None, cuda_graph_batch: int | None = None) -> None:
        super().__init__()
        self.engine_path = Path(engine_path)
        self.name = name or f"trt:{self.engine_path.name}"
        self.cuda_graph_batch = cuda_graph_batch
        self.manifest = read_manifest(self.engine_path)
        ((self._in_name, self._in_meta),) = self.manifest["inputs"].items()
        ((self._out_name, self._out_meta),) = self.manifest["outputs"].items()
        self._lock = threading.Lock()
        self._graph = None

    # -- lifecycle -------------------------------------------------------------------------------
    def _activate(self) -> None:
        import torch

        data = verify_engine_file(self.engine_path, self.manifest)
        trt = check_runtime_compat(self.manifest, self.engine_path)
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {self.engine_path} (see its log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.engine_path}")
        self._device = torch.device("cuda", torch.cuda.current_device())
        #: uint8-input engines take the raw views; the output dtype is the engine's compute dtype.
        self._in_dtype = torch.from_numpy(np.empty(0, self.input_spec().dtype)).dtype
        self._dtype = torch.from_numpy(np.empty(0, self.output_spec().dtype)).dtype
        if self.cuda_graph_batch:
            self._capture(self.cuda_graph_batch)

    def _deactivate(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None

    # -- description -----------------------------------------------------------------------------
    def input_spec(self) -> TensorSpec:
        shape = tuple(None if d == "batch" else int(d) for d in self._in_meta["shape"])
        return TensorSpec(self._in_name, np.dtype(_NP[self._in_meta["dtype"]]), shape)

    def output_spec(self) -> TensorSpec:
        shape = tuple(None if d == "batch" else int(d) for d in self._out_meta["shape"])
        return TensorSpec(self._out_name, np.dtype(_NP[self._out_meta["dtype"]]), shape)

    @property
    def max_batch(self) -> int:
        return int(self.manifest["profile"][self._in_name][2][0])

    @property
    def min_batch(self) -> int:
        return int(self.manifest["profile"][self._in_name][0][0])

    # -- inference -------------------------------------------------------------------------------
    def infer(self, pixel_values: Any) -> Any:
        import torch

        as_numpy = isinstance(pixel_values, np.ndarray)
        x = torch.from_numpy(pixel_values) if as_numpy else pixel_values
        self.validate(x)
        x = x.to(device=self._device, dtype=self._in_dtype, non_blocking=True).contiguous()
        with self._lock:
            if self._graph is not None and x.shape[0] == self.cuda_graph_batch:
                y = self._replay(x)
            else:
                chunks = [self._enqueue(c) for c in torch.split(x, self.max_batch)]
                y = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if as_numpy:
            torch.cuda.current_stream().synchronize()
            return y.float().cpu().numpy()
        return y

    def _enqueue(self, x):
        import torch

        if x.shape[0] < self.min_batch:
            raise InputError(f"batch {x.shape[0]} is below the engine profile's MIN {self.min_batch}")
        ctx = self.context
        if not ctx.set_input_shape(self._in_name, tuple(x.shape)):
            raise InputError(f"engine {self.engine_path.name} rejects input shape {tuple(x.shape)}")
        out_shape = tuple(ctx.get_tensor_shape(self._out_name))
        y = torch.empty(out_shape, dtype=self._dtype, device=self._device)
        ctx.set_tensor_address(self._in_name, x.data_ptr())
        ctx.set_tensor_address(self._out_name, y.data_ptr())
        stream = torch.cuda.current_stream(self._device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT failed to enqueue {self.engine_path.name}")
        return y

    def _capture(self, batch: int) -> None:
        import torch

        if not self.min_batch <= batch <= self.max_batch:
            raise InputError(
                f"CUDA-graph batch {batch} is outside the engine profile {self.min_batch}..{self.max_batch}"
            )
        spec = self.input_spec()
        self._static_in = torch.zeros((batch, *spec.shape[1:]), dtype=self._in_dtype, device=self._device)
        stream = torch.cuda.Stream(self._device)
        with torch.cuda.stream(stream):
            self._enqueue(self._static_in)  # warm-up: TensorRT allocates lazily on the first enqueue
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._static_out = self._enqueue(self._static_in)
        self._graph = graph

    def _replay(self, x):
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out.clone()
