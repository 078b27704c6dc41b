"""PyTorch runner: the eager reference (FP32) and an eager FP16/BF16 baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .base import Runner, TensorSpec


def load_torch_model(
    checkpoint_dir: str, dtype: str = "fp32", device: str = "cpu", progress: bool = False, uint8_input: bool = False
) -> Callable[[], torch.nn.Module]:
    """Loader: returns a callable that loads the tower from a checkpoint when the runner activates
    (``uint8_input``: the model takes raw uint8 views, normalisation folded into conv1)."""

    def load() -> torch.nn.Module:
        from ..checkpoint import load_vision_model

        return load_vision_model(checkpoint_dir, dtype=dtype, progress=progress).to(device).set_uint8_input(uint8_input)

    return load


class TorchRunner(Runner):
    """Runs a ``Step37VisionModel`` (SDPA attention) on CPU or CUDA."""

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        name: str | None = None,
        threads: int | None = None,
        allow_tf32: bool = False,
    ) -> None:
        super().__init__()
        #: FP32 on a GPU means IEEE FP32 unless asked otherwise: cuDNN convolutions default to TF32,
        #: which alone moves the output by ~3e-4 relative L2 and fails FP32 accuracy checks.
        self.allow_tf32 = allow_tf32
        self._loader = model
        self.model: torch.nn.Module | None = model if isinstance(model, torch.nn.Module) else None
        self.threads = threads
        self.name = name or "torch"

    def _activate(self) -> None:
        if self.model is None:
            self.model = self._loader()
        if self.threads:
            torch.set_num_threads(self.threads)

    def _deactivate(self) -> None:
        if not isinstance(self._loader, torch.nn.Module):
            self.model = None

    @property
    def device(self) -> torch.device:
        return self.model.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.conv1.weight.dtype

    @property
    def precision(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")

    def input_spec(self) -> TensorSpec:
        if self.model.input_dtype == torch.uint8:
            return TensorSpec("pixel_values", np.dtype(np.uint8), (None, 3, None, None))
        return TensorSpec("pixel_values", self.output_spec().dtype, (None, 3, None, None))

    def output_spec(self) -> TensorSpec:
        cfg = self.model.config
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        return TensorSpec("image_features", np.dtype(np_dtype), (None, None, cfg.output_dim))

    @torch.inference_mode()
    def infer(self, pixel_values: Any) -> Any:
        as_numpy = isinstance(pixel_values, np.ndarray)
        x = torch.from_numpy(pixel_values) if as_numpy else pixel_values
        self.validate(x)
        x = x.to(device=self.device, dtype=self.model.input_dtype)
        if self.device.type == "cuda" and self.dtype == torch.float32:
            cudnn = torch.backends.cudnn
            with cudnn.flags(
                enabled=cudnn.enabled,
                benchmark=cudnn.benchmark,
                deterministic=cudnn.deterministic,
                allow_tf32=self.allow_tf32,
            ):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float().cpu().numpy() if as_numpy else y
