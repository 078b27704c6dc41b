"""The one runner interface that torch, ONNX Runtime and TensorRT runners share.

Modelled on Polygraphy's backends: a *loader* is a callable that produces the heavy object
(a torch module, an ``InferenceSession``, a deserialised engine) and a *runner* wraps it behind
``activate``/``deactivate``, ``input_specs``/``output_specs`` and ``infer``.  ``compare`` and
``bench`` only ever see this interface, so any runner can be swapped for any other.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one input or output; ``None`` marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def check(self, array_shape: tuple[int, ...], what: str = "input") -> None:
        if len(array_shape) != len(self.shape) or any(
            want is not None and want != got for want, got in zip(self.shape, array_shape, strict=False)
        ):
            raise InputError(f"{what} {self.name!r} must have shape {_fmt(self.shape)}, got {tuple(array_shape)}")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"


class Runner(abc.ABC):
    """Runs the vision tower: ``pixel_values`` [B, 3, H, W] -> ``image_features`` [B, P', D]."""

    #: Short name used in reports ("torch-fp32", "onnxrt-cpu-fp16", "trt-fp16", ...).
    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False

    # -- lifecycle -------------------------------------------------------------------------------
    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- description -----------------------------------------------------------------------------
    @abc.abstractmethod
    def input_spec(self) -> TensorSpec: ...

    @abc.abstractmethod
    def output_spec(self) -> TensorSpec: ...

    @property
    def precision(self) -> str:
        """The precision its accuracy is judged by (``fp32``, ``fp16`` or ``bf16``): the output's
        dtype, which is the compute dtype for float and uint8 inputs alike."""
        return "fp16" if self.output_spec().dtype == np.float16 else "fp32"

    @property
    def resolution(self) -> int | None:
        """Fixed spatial size of this runner, or ``None`` when it accepts any multiple of 14."""
        h = self.input_spec().shape[2]
        return int(h) if h is not None else None

    # -- inference -------------------------------------------------------------------------------
    @abc.abstractmethod
    def infer(self, pixel_values: Any) -> Any:
        """Run one batch.  numpy in -> numpy out; a torch tensor in -> a torch tensor out."""

    def validate(self, pixel_values: Any) -> None:
        spec = self.input_spec()
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != 3:
            raise InputError(f"pixel_values must be [B, 3, H, W], got shape {shape}")
        spec.check(shape)
        kind = getattr(pixel_values, "dtype", None)
        if spec.dtype == np.uint8:  # uint8-input artifact: raw 0..255 views, normalised in the graph
            if str(kind).removeprefix("torch.") != "uint8":
                raise InputError(f"{self.name} takes uint8 pixels (0..255, not normalised), got {kind}")
            return
        is_float = (
            pixel_values.is_floating_point()
            if hasattr(pixel_values, "is_floating_point")
            else np.issubdtype(kind, np.floating)
        )
        if not is_float:
            raise InputError(f"pixel_values must be floating point, got {kind}")
