"""Stage 6: interchangeable runners for the vision tower (torch, ONNX Runtime, TensorRT).

``make_runner`` builds one from a short spec so the CLI, ``compare`` and ``bench`` share one way
of naming backends.
"""

from __future__ import annotations

from .base import Runner, TensorSpec
from .onnxrt import OnnxrtRunner, session_from_onnx
from .torch_runner import TorchRunner, load_torch_model

__all__ = ["OnnxrtRunner", "Runner", "TensorSpec", "TorchRunner", "load_torch_model", "session_from_onnx"]
