"""Stage 6: interchangeable runners for the vision tower (torch, ONNX Runtime, TensorRT).

``make_runner`` builds one from a short spec so the CLI, ``compare`` and ``bench`` share one way
of naming backends.  The torch runner is imported on first use: importing torch takes about 2 s
of CPU, which every ONNX tower and embedder process of ``serve`` paid at start for nothing.
"""

from __future__ import annotations

from typing import Any

from .base import Runner, TensorSpec
from .onnxrt import OnnxrtRunner, session_from_onnx

__all__ = ["OnnxrtRunner", "Runner", "TensorSpec", "TorchRunner", "load_torch_model", "session_from_onnx"]

_LAZY = ("TorchRunner", "load_torch_model")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import torch_runner

        return getattr(torch_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
