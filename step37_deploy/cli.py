"""``step37-deploy``: the command line over the pipeline stages.

Every long command shows progress bars and logs at INFO; ``--quiet`` silences both.  Errors the
user can cause (:class:`~step37_deploy.errors.Step37Error`) print one line and exit with status 2;
a missed accuracy threshold exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import Step37Error, ThresholdError

log = logging.getLogger("step37_deploy")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    """FP16 export's activation-range calibration (step37_deploy.calibrate)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--calibrate",
        nargs="+",
        metavar="IMAGE",
        default=None,
        help="FP16: calibrate activation ranges on these images (default: seeded random CLIP-normalised views)",
    )
    g.add_argument(
        "--no-calibrate",
        action="store_true",
        help="FP16: skip the activation-range calibration and its overflow protection (default: calibrate)",
    )
    p.add_argument(
        "--calibration-views",
        type=int,
        default=2,  # calibrate.DEFAULT_VIEWS; not imported here so that --help stays torch-free
        help="FP16: number of random calibration views when no --calibrate images are given (default 2)",
    )
    p.add_argument(
        "--calibration-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="FP16: dtype the calibration runs the tower in (default fp32; bf16 measures the same ranges "
        "to ~1%% and is several times faster on CPUs with AMX)",
    )


def _calibration_kwargs(args: argparse.Namespace) -> dict:
    return {
        "calibrate": not args.no_calibrate,
        "calibration_images": args.calibrate,
        "calibration_views": args.calibration_views,
        "calibration_dtype": args.calibration_dtype,
    }


def _parse_batch_profile(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be MIN:OPT:MAX integers, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--batch must be MIN:OPT:MAX, got {text!r}")
    return parts  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="step37-deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write a synthetic checkpoint in the release layout")
    p.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--decoy-ratio",
        type=float,
        default=1.25,  # synthetic.DECOY_RATIO; not imported here so that --help stays torch-free
        help="decoy language-model bytes per vision byte (default 1.25; 0 for none)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--massive-activations",
        action="store_true",
        help="stress checkpoint: a few residual channels far above FP16's range from an early block on "
        "(default off; see docs/fp16.md)",
    )
    _add_common(p)

    p = sub.add_parser("export", help="export the vision tower to ONNX (one file per resolution)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="engines")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--resolution", type=int, action="append", help="728 (global view) and/or 504 (crops)")
    p.add_argument("--opset", type=int, default=None)
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
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser("compare", help="accuracy report of ONNX files / engines against PyTorch FP32")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", action="append", default=[], help="ONNX file (repeatable)")
    p.add_argument("--engine", action="append", default=[], help="TensorRT engine (repeatable)")
    p.add_argument(
        "--torch",
        action="append",
        default=[],
        choices=["fp32", "fp16", "bf16"],
        help="also compare eager PyTorch in this dtype",
    )
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--device", default="cpu", help="torch device for the --torch runners (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 3)")
    p.add_argument("--resolution", type=int, action="append")
    p.add_argument("--images", nargs="*", help="image files instead of random images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here (atomically)")
    p.add_argument("--cos-min", type=float, default=None, help="override the min cosine threshold")
    p.add_argument("--rel-l2", type=float, default=None, help="override the relative L2 threshold")
    p.add_argument(
        "--per-block",
        action="store_true",
        help="also compare every block's output of the (one) --onnx file with PyTorch FP32 and name the "
        "first divergent block (default off; uses the first --batch and the file's resolution)",
    )
    _add_common(p)

    p = sub.add_parser("pipeline", help="export both resolutions (+ engines) and write the accuracy report")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="engines")
    p.add_argument("--precision", action="append", choices=["fp32", "fp16"])
    p.add_argument("--resolution", type=int, action="append")
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT build even if a flavour is installed")
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser("build", help="build a TensorRT engine from an FP16-typed ONNX file")
    p.add_argument("--onnx", required=True)
    p.add_argument("--out", required=True, help="engines/NAME.plan")
    p.add_argument("--batch", type=_parse_batch_profile, default=(1, 1, 8), help="MIN:OPT:MAX")
    p.add_argument("--timing-cache", default=None)
    p.add_argument("--workspace", type=float, default=None, help="GiB")
    p.add_argument("--opt-level", type=int, default=None)
    p.add_argument(
        "--compute-capability",
        action="append",
        default=None,
        help="X.Y; TensorRT-RTX ahead-of-time targets (repeatable)",
    )
    p.add_argument("--allow-fp32", action="store_true", help="accept an FP32-typed graph")
    _add_common(p)

    p = sub.add_parser("inspect", help="print an engine's manifest (and TensorRT's inspector output)")
    p.add_argument("engine")
    _add_common(p)

    p = sub.add_parser("bench", help="latency of backends side by side, as ratios")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", action="append", default=[])
    p.add_argument("--engine", action="append", default=[])
    p.add_argument("--torch", action="append", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--device", default="cpu", help="torch device for the torch runners")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--insertion", action="store_true", help="also benchmark insertion vs memcpy")
    p.add_argument("--json", default=None)
    _add_common(p)

    p = sub.add_parser("embed", help="image(s) -> projected features per image + token layout")
    p.add_argument("--backend", choices=["trt", "onnx", "torch"], required=True)
    p.add_argument(
        "--artifacts",
        required=True,
        nargs="+",
        help="checkpoint dir (projector, tokens) and, for onnx/trt, the 728 and 504 files",
    )
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--out", required=True, help="FILE.npy (a .json with the token layout is written beside it)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=8)
    _add_common(p)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party chatter (torch.onnx's registration notes, deprecation warnings): errors only
    # unless --verbose.
    for noisy in ("torch", "onnxscript", "onnx_ir", "polygraphy", "transformers"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    progress = not args.quiet
    try:
        return COMMANDS[args.command](args, progress)
    except ThresholdError as exc:
        print(f"step37-deploy: {exc}", file=sys.stderr)
        return 1
    except Step37Error as exc:
        print(f"step37-deploy: error: {exc}", file=sys.stderr)
        return 2


def _cmd_make_checkpoint(args: argparse.Namespace, progress: bool) -> int:
    from .synthetic import make_checkpoint

    out = make_checkpoint(
        args.out,
        args.preset,
        args.dtype,
        args.shards,
        args.seed,
        progress=progress,
        overwrite=args.overwrite,
        decoy_ratio=args.decoy_ratio,
        massive_activations=args.massive_activations,
    )
    print(out)
    return 0


def _cmd_export(args: argparse.Namespace, progress: bool) -> int:
    from .export import DEFAULT_OPSET, export_onnx
    from .model import PrecisionPolicy

    policy = PrecisionPolicy(residual_fp32=args.fp32_residual, softmax_fp32=not args.fp16_softmax)
    for res in args.resolution or [728, 504]:
        r = export_onnx(
            args.checkpoint,
            args.out,
            args.precision,
            res,
            args.opset or DEFAULT_OPSET,
            policy=policy,
            progress=progress,
            **_calibration_kwargs(args),
        )
        print(r.onnx_path)
    return 0


def _reference_and_projector(checkpoint: str, progress: bool = False):
    from .backends import TorchRunner, load_torch_model
    from .checkpoint import load_projector

    ref = TorchRunner(load_torch_model(checkpoint, "fp32", progress=progress), name="torch-fp32")
    proj = load_projector(checkpoint, "fp32")
    bias = proj.bias.detach().numpy() if proj.bias is not None else None
    return ref, proj.weight.detach().numpy(), bias


def _runners_from_args(args: argparse.Namespace) -> list:
    """Runners named on the command line; eager torch first, so it is the baseline in ``bench``."""
    from .backends import OnnxrtRunner, TorchRunner, load_torch_model, session_from_onnx

    runners = []
    for dtype in args.torch or []:
        device = getattr(args, "device", "cpu")
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
        from .backends.tensorrt import TensorRTRunner

        runners.append(TensorRTRunner(path, name=f"trt:{Path(path).name}"))
    return runners


def _cmd_compare(args: argparse.Namespace, progress: bool) -> int:
    from .compare import DEFAULT_THRESHOLDS, Thresholds, check, compare

    runners = _runners_from_args(args)
    if not runners:
        raise SystemExit("step37-deploy compare: give at least one --onnx, --engine or --torch")
    if args.per_block and len(args.onnx) != 1:
        from .errors import InputError

        raise InputError(f"--per-block compares one ONNX file block by block; {len(args.onnx)} --onnx given")
    thresholds = None
    if args.cos_min is not None or args.rel_l2 is not None:
        thresholds = {
            k: Thresholds(
                args.cos_min if args.cos_min is not None else v.cos_min,
                args.rel_l2 if args.rel_l2 is not None else v.rel_l2,
            )
            for k, v in DEFAULT_THRESHOLDS.items()
        }
    ref, w, b = _reference_and_projector(args.checkpoint, progress)
    report = compare(
        ref, runners, w, b, args.batch or [1, 3], args.resolution, args.seed, args.images, thresholds, progress
    )
    print(report.table())
    if args.per_block:
        from .compare import per_block_table

        report.per_block = _per_block(args, ref)
        print(per_block_table(report.per_block))
    if args.json:
        report.write_json(args.json)
    check(report)
    return 0


def _per_block(args: argparse.Namespace, ref) -> dict:
    from .compare import case_inputs, per_block
    from .export import read_metadata

    meta = read_metadata(args.onnx[0])
    res = int(meta.get("resolution") or (args.resolution or [728])[0])
    x = case_inputs(res, (args.batch or [1])[0], args.seed, args.images)
    return per_block(args.onnx[0], ref.activate().model, x, args.provider, args.threads)


def _cmd_pipeline(args: argparse.Namespace, progress: bool) -> int:
    from .compare import check
    from .pipeline import run_pipeline

    result = run_pipeline(
        args.checkpoint,
        args.out,
        tuple(args.precision or ("fp32", "fp16")),
        tuple(args.resolution or (728, 504)),
        tuple(args.batch or (1, 3)),
        args.opset,
        build_engines=False if args.no_engines else None,
        progress=progress,
        **_calibration_kwargs(args),
    )
    for e in result.exports:
        print(f"onnx    {e.onnx_path}")
    for p in result.engines:
        print(f"engine  {p}")
    print(result.report.table())
    print(f"report  {result.report_path}")
    check(result.report)
    return 0


def _cmd_build(args: argparse.Namespace, progress: bool) -> int:
    from .engine import BuildOptions, build_engine

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


def _cmd_inspect(args: argparse.Namespace, progress: bool) -> int:
    from .engine import inspect_engine

    print(inspect_engine(args.engine))
    return 0


def _cmd_bench(args: argparse.Namespace, progress: bool) -> int:
    from .bench import run_bench

    result = run_bench(args, progress)
    print(result.table())
    if args.json:
        result.write_json(args.json)
    return 0


def _cmd_embed(args: argparse.Namespace, progress: bool) -> int:
    from .runtime import embed_command

    embed_command(args, progress)
    return 0


COMMANDS = {
    "make-checkpoint": _cmd_make_checkpoint,
    "export": _cmd_export,
    "compare": _cmd_compare,
    "pipeline": _cmd_pipeline,
    "build": _cmd_build,
    "inspect": _cmd_inspect,
    "bench": _cmd_bench,
    "embed": _cmd_embed,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
