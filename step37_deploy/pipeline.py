"""The main job: checkpoint -> ONNX at both resolutions -> (TensorRT engines) -> accuracy report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .compare import Report, compare
from .export import ExportResult, export_onnx

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    exports: list[ExportResult] = field(default_factory=list)
    engines: list[Path] = field(default_factory=list)
    report: Report | None = None
    report_path: Path | None = None


def run_pipeline(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    resolutions: tuple[int, ...] = (728, 504),
    batches: tuple[int, ...] = (1, 3),
    opset: int | None = None,
    build_engines: bool | None = None,
    progress: bool = False,
    seed: int = 0,
    **calibration,
) -> PipelineResult:
    """``calibration``: ``calibrate``, ``calibration_images``, ``calibration_views`` for the FP16
    exports (``export_onnx``'s arguments)."""
    from .backends import OnnxrtRunner, TorchRunner, load_torch_model, session_from_onnx
    from .checkpoint import load_projector
    from .export import DEFAULT_OPSET

    out_dir = Path(out_dir)
    result = PipelineResult()
    for precision in precisions:
        for res in resolutions:
            result.exports.append(
                export_onnx(
                    checkpoint_dir, out_dir, precision, res, opset or DEFAULT_OPSET, progress=progress, **calibration
                )
            )

    engine_runners = []
    if build_engines is not False:
        from .engine import build_pipeline_engines

        result.engines, engine_runners = build_pipeline_engines(
            [e for e in result.exports if e.precision == "fp16"],
            out_dir,
            required=bool(build_engines),
            progress=progress,
        )

    reference = TorchRunner(load_torch_model(str(checkpoint_dir), "fp32", progress=progress), name="torch-fp32")
    runners = [
        OnnxrtRunner(session_from_onnx(e.onnx_path, "cpu"), name=f"onnxrt-cpu-{e.precision}") for e in result.exports
    ] + engine_runners
    proj = load_projector(checkpoint_dir, "fp32")
    bias = proj.bias.detach().numpy() if proj.bias is not None else None
    result.report = compare(
        reference,
        runners,
        proj.weight.detach().numpy(),
        bias,
        list(batches),
        list(resolutions),
        seed=seed,
        progress=progress,
    )
    result.report_path = out_dir / "accuracy_report.json"
    result.report.write_json(result.report_path)
    return result
