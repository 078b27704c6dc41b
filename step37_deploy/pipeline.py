"""The main job: checkpoint -> ONNX at both resolutions -> (TensorRT engines) -> accuracy report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import Runner
from .compare import Report, compare
from .errors import BackendUnavailable, EngineError
from .export import ExportResult, check_replaceable_exports, export_onnx, onnx_filename
from .files import check_output_dir, check_replaceable_json, refuse_inputs

log = logging.getLogger(__name__)

REPORT_NAME = "accuracy_report.json"


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
    input_kind: str = "float",
    **calibration,
) -> PipelineResult:
    """``input_kind="uint8"``: the exports (and engines) take uint8 views, normalisation in the graph.
    ``calibration``: ``calibrate``, ``calibration_images``, ``calibration_views``,
    ``calibration_dtype`` for the FP16 exports (``export_onnx``'s arguments)."""
    from .backends import OnnxrtRunner, TorchRunner, load_torch_model, session_from_onnx
    from .checkpoint import load_projector
    from .export import DEFAULT_OPSET

    out_dir = Path(out_dir)
    result = PipelineResult(report_path=out_dir / REPORT_NAME)
    # Before the long work: the report can be written and replaces nothing it should not.
    check_output_dir(out_dir, "--out")
    refuse_inputs({"the report": result.report_path}, {"--checkpoint": checkpoint_dir})
    check_replaceable_json(result.report_path, "the report", {"passed", "rows"})
    check_replaceable_exports(out_dir, [onnx_filename(p, r, input_kind) for p in precisions for r in resolutions])
    for precision in precisions:
        for res in resolutions:
            result.exports.append(
                export_onnx(
                    checkpoint_dir,
                    out_dir,
                    precision,
                    res,
                    opset if opset is not None else DEFAULT_OPSET,
                    progress=progress,
                    input_kind=input_kind,
                    **calibration,
                )
            )

    engine_runners = []
    if build_engines is not False:
        result.engines, engine_runners = build_pipeline_engines(
            [e for e in result.exports if e.precision == "fp16"],
            out_dir,
            required=bool(build_engines),
            progress=progress,
        )

    reference = TorchRunner(load_torch_model(str(checkpoint_dir), "fp32", progress=progress), name="torch-fp32")
    runners = [
        OnnxrtRunner(session_from_onnx(e.onnx_path, "cpu"), name=f"onnxrt-cpu-{e.precision}{_suffix(e)}")
        for e in result.exports
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
    result.report.write_json(result.report_path)
    return result


def build_pipeline_engines(
    exports: list[ExportResult], out_dir: Path, required: bool = False, progress: bool = False
) -> tuple[list[Path], list[Runner]]:
    """Engines for the pipeline's FP16 exports when a flavour is installed; runners where they can run."""
    from .backends.tensorrt import TensorRTRunner
    from .engine import BuildOptions, build_engine, check_runtime_compat, detect_flavour, engine_filename, read_manifest

    flavour = detect_flavour()
    if flavour is None:
        if required:
            raise BackendUnavailable("no TensorRT flavour is installed")
        log.info("no TensorRT flavour installed: skipping engine builds")
        return [], []
    paths, runners = [], []
    for e in exports:
        out = Path(out_dir) / engine_filename(e.onnx_path.name)
        build_engine(e.onnx_path, out, BuildOptions(batch=(1, 2, 8), flavour=flavour), progress=progress)
        paths.append(out)
        try:
            check_runtime_compat(read_manifest(out), out)
            runners.append(TensorRTRunner(out, name=f"trt-{e.precision}{_suffix(e)}"))
        except (EngineError, BackendUnavailable) as exc:
            log.info("engine %s built ahead of time; not run here: %s", out.name, exc)
    return paths, runners


def _suffix(e: ExportResult) -> str:
    return "-uint8" if e.input_dtype == "uint8" else ""
