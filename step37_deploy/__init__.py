"""step37-deploy: the Step-3.7 vision tower from a PyTorch checkpoint to ONNX / TensorRT and serving.

The modules read as the pipeline: ``config`` -> ``checkpoint`` -> ``model`` -> ``export`` ->
``engine`` -> ``backends`` -> ``fusion`` -> ``runtime`` -> ``compare`` / ``bench`` -> ``cli``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from .config import PRESETS, ProjectorConfig, Step37Config, TokenIds, VisionConfig
from .errors import (
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    EngineError,
    ExportError,
    InputError,
    PlaceholderError,
    Step37Error,
)

__all__ = [
    "PRESETS",
    "BackendUnavailable",
    "CheckpointError",
    "ConfigError",
    "EngineError",
    "ExportError",
    "InputError",
    "PlaceholderError",
    "ProjectorConfig",
    "Step37Config",
    "Step37Error",
    "TokenIds",
    "VisionConfig",
    "__version__",
    "load_projector",
    "load_vision_model",
]

#: Names served lazily (PEP 562): they import torch, and ``step37-deploy --help`` must not.
_LAZY = {"load_projector": "checkpoint", "load_vision_model": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
