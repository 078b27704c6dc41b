"""The artifacts: ``export`` (ONNX), ``build`` (TensorRT engine), ``inspect`` (an engine's manifest)
and ``pipeline`` (export + engines + the accuracy report in one run)."""

from __future__ import annotations

import argparse
import json

from ..config import DEFAULT_OPSET, SUPPORTED_OPSETS
from .args import POSITIVE, float_in, int_at_least
from .options import add_calibration, add_common, add_input_option, calibration_kwargs

_OPSET_HELP = f"ONNX opset, {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}"


def register(sub: argparse._SubParsersAction) -> None:
    _add_export(sub)
    _add_pipeline(sub)
    _add_build(sub)
    p = sub.add_parser("inspect", help="print an engine's manifest (and TensorRT's inspector output)")
    p.add_argument("engine", help="engine file with its NAME.plan.json manifest beside it")
    add_common(p)
    p.set_defaults(func=run_inspect)


# -- export ------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the vision tower to ONNX (one file per resolution)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (required)")
    p.add_argument("--out", default="engines", help="output folder")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16", help="graph precision")
    p.add_argument(
        "--resolution",
        type=POSITIVE,
        action="append",
        help="728 (global view) and/or 504 (crops), repeatable (default: both)",
    )
    p.add_argument("--opset", type=POSITIVE, default=DEFAULT_OPSET, help=_OPSET_HELP)
    p.add_argument(
        "--fp32-residual",
        action="store_true",
        help="FP16 graph: keep the residual stream in FP32 too (see docs/fp16.md)",
    )
    p.add_argument(
        "--fp16-softmax",
        action="store_true",
        help="FP16 graph: softmax in FP16, a cast-free MatMul-Softmax-MatMul (see docs/fp16.md)",
    )
    add_input_option(p)
    add_calibration(p)
    add_common(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace, progress: bool) -> int:
    from ..export import export_onnx
    from ..model import PrecisionPolicy

    policy = PrecisionPolicy(residual_fp32=args.fp32_residual, softmax_fp32=not args.fp16_softmax)
    for res in args.resolution or [728, 504]:
        r = export_onnx(
            args.checkpoint,
            args.out,
            args.precision,
            res,
            args.opset,
            policy=policy,
            progress=progress,
            input_kind=args.input,
            **calibration_kwargs(args),
        )
        print(r.onnx_path)
    return 0


# -- pipeline ----------------------------------------------------------------------------------------
def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="export both resolutions (+ engines) and write the accuracy report")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (required)")
    p.add_argument("--out", default="engines", help="output folder")
    p.add_argument("--precision", action="append", choices=["fp32", "fp16"], help="repeatable (default: fp32 and fp16)")
    p.add_argument("--resolution", type=POSITIVE, action="append", help="repeatable (default: 728 and 504)")
    p.add_argument("--batch", type=POSITIVE, action="append", help="compare batch sizes, repeatable (default: 1 and 3)")
    p.add_argument("--opset", type=POSITIVE, default=DEFAULT_OPSET, help=_OPSET_HELP)
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT build even if a flavour is installed")
    add_input_option(p)
    add_calibration(p)
    add_common(p)
    p.set_defaults(func=run_pipeline)


def run_pipeline(args: argparse.Namespace, progress: bool) -> int:
    from ..compare import check
    from ..pipeline import run_pipeline

    result = run_pipeline(
        args.checkpoint,
        args.out,
        tuple(args.precision or ("fp32", "fp16")),
        tuple(args.resolution or (728, 504)),
        tuple(args.batch or (1, 3)),
        args.opset,
        build_engines=False if args.no_engines else None,
        progress=progress,
        input_kind=args.input,
        **calibration_kwargs(args),
    )
    for e in result.exports:
        print(f"onnx    {e.onnx_path}")
    for p in result.engines:
        print(f"engine  {p}")
    print(result.report.table())
    print(f"report  {result.report_path}")
    check(result.report)
    return 0


# -- build, inspect ----------------------------------------------------------------------------------
def parse_batch_profile(text: str) -> tuple[int, int, int]:
    """``--batch MIN:OPT:MAX``: three sizes >= 1 (their order is the engine builder's check)."""
    try:
        parts = tuple(int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be MIN:OPT:MAX integers, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"must be MIN:OPT:MAX, got {text!r}")
    if min(parts) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return parts  # type: ignore[return-value]


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a TensorRT engine from an FP16-typed ONNX file")
    p.add_argument("--onnx", required=True, help="FP16-typed ONNX file from export (required)")
    p.add_argument("--out", required=True, help="engine file, e.g. engines/NAME.plan; NAME.plan.json beside it")
    p.add_argument(
        "--batch",
        type=parse_batch_profile,
        default="1:1:8",
        help="optimisation profile MIN:OPT:MAX, 1 <= MIN <= OPT <= MAX",
    )
    p.add_argument(
        "--timing-cache",
        default=None,
        help="TensorRT timing cache to read if present and (re)write after the build (default: none)",
    )
    p.add_argument(
        "--workspace",
        type=float_in(0, 1 << 20, lo_open=True),
        default=None,
        help="workspace limit in GiB (default: TensorRT's)",
    )
    p.add_argument(
        "--opt-level",
        type=int_at_least(0, 5),
        default=None,
        help="builder optimisation level 0..5 (default: TensorRT's)",
    )
    p.add_argument(
        "--compute-capability",
        action="append",
        default=None,
        help="X.Y; TensorRT-RTX ahead-of-time targets, repeatable (default: this GPU, else 8.6 and 8.9)",
    )
    p.add_argument("--allow-fp32", action="store_true", help="accept an FP32-typed graph")
    add_common(p)
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace, progress: bool) -> int:
    from ..engine import BuildOptions, build_engine

    opts = BuildOptions(
        batch=args.batch,
        timing_cache=args.timing_cache,
        workspace_gib=args.workspace,
        opt_level=args.opt_level,
        compute_capabilities=args.compute_capability,
        require_fp16=not args.allow_fp32,
    )
    manifest = build_engine(args.onnx, args.out, opts, progress=progress)
    print(json.dumps(manifest, indent=2))
    return 0


def run_inspect(args: argparse.Namespace, progress: bool) -> int:
    from ..engine import inspect_engine

    print(inspect_engine(args.engine))
    return 0
