"""Runners from command-line arguments: one way of naming backends for ``compare`` and ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Runner


def runners_from_args(args: Any) -> list[Runner]:
    """Runners named by ``args`` (``torch``, ``onnx``, ``engine``, ``checkpoint``, ``provider``,
    ``device``, ``threads``, ``quiet``); eager torch first, so it is the baseline in ``bench``."""
    from .onnxrt import OnnxrtRunner, session_from_onnx

    runners: list[Runner] = []
    device = getattr(args, "device", "cpu")
    for dtype in args.torch or []:
        from .torch_runner import TorchRunner, load_torch_model

        runners.append(
            TorchRunner(
                load_torch_model(args.checkpoint, dtype, device, progress=not args.quiet),
                name=f"torch-{dtype}-{device}",
                threads=args.threads,
            )
        )
    for path in args.onnx:
        runners.append(
            OnnxrtRunner(
                session_from_onnx(path, args.provider, args.threads),
                name=f"onnxrt-{args.provider}:{Path(path).name}",
                provider=args.provider,
            )
        )
    for path in args.engine:
        from .tensorrt import TensorRTRunner

        runners.append(TensorRTRunner(path, name=f"trt:{Path(path).name}"))
    return runners
