"""Accuracy and speed against PyTorch: ``compare`` (the accuracy report, exit 1 on a missed
threshold) and ``bench`` (latency side by side, as ratios)."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .args import NON_NEGATIVE, POSITIVE
from .options import add_common, add_runner_options


def register(sub: argparse._SubParsersAction) -> None:
    _add_compare(sub)
    _add_bench(sub)


# -- compare -----------------------------------------------------------------------------------------
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="accuracy report of ONNX files / engines against PyTorch FP32")
    add_runner_options(p, [], "also compare eager PyTorch in this dtype, repeatable (default: none)")
    p.add_argument("--batch", type=POSITIVE, action="append", help="batch sizes, repeatable (default: 1 and 3)")
    p.add_argument(
        "--resolution",
        type=POSITIVE,
        action="append",
        help="resolutions to compare, repeatable (default: each runner's own, else 728 and 504)",
    )
    p.add_argument("--images", nargs="*", help="image files instead of random images (default: random images)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the random images")
    p.add_argument("--json", default=None, help="write the report here, atomically (default: not written)")
    p.add_argument(
        "--cos-min", type=float, default=None, help="override the min cosine threshold (default: per precision)"
    )
    p.add_argument(
        "--rel-l2", type=float, default=None, help="override the relative L2 threshold (default: per precision)"
    )
    p.add_argument(
        "--per-block",
        action="store_true",
        help="also compare every block's output of the (one) --onnx file with PyTorch FP32 and name the "
        "first divergent block (default off; uses the first --batch and the file's resolution)",
    )
    add_common(p)
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace, progress: bool) -> int:
    from ..backends.factory import runners_from_args
    from ..compare import DEFAULT_THRESHOLDS, Thresholds, check, compare

    if not (args.onnx or args.engine or args.torch):
        raise UsageError("compare: give at least one --onnx, --engine or --torch")
    _check_report_path(args, {"passed", "rows"})
    if args.per_block and len(args.onnx) != 1:
        raise UsageError(f"--per-block compares one ONNX file block by block; {len(args.onnx)} --onnx given")
    thresholds = None
    if args.cos_min is not None or args.rel_l2 is not None:
        thresholds = {
            k: Thresholds(
                args.cos_min if args.cos_min is not None else v.cos_min,
                args.rel_l2 if args.rel_l2 is not None else v.rel_l2,
            )
            for k, v in DEFAULT_THRESHOLDS.items()
        }
    runners = runners_from_args(args)  # after the thresholds: a bad --cos-min fails before any loading
    ref, w, b = _reference_and_projector(args.checkpoint, progress)
    report = compare(
        ref, runners, w, b, args.batch or [1, 3], args.resolution, args.seed, args.images, thresholds, progress
    )
    print(report.table())
    if args.per_block:
        from ..compare import per_block_table

        report.per_block = _per_block(args, ref)
        print(per_block_table(report.per_block))
    if args.json:
        report.write_json(args.json)
    check(report)
    return 0


def _reference_and_projector(checkpoint: str, progress: bool = False):
    from ..backends import TorchRunner, load_torch_model
    from ..checkpoint import load_projector

    ref = TorchRunner(load_torch_model(checkpoint, "fp32", progress=progress), name="torch-fp32")
    proj = load_projector(checkpoint, "fp32")
    bias = proj.bias.detach().numpy() if proj.bias is not None else None
    return ref, proj.weight.detach().numpy(), bias


def _per_block(args: argparse.Namespace, ref) -> dict:
    from ..compare import case_views, per_block
    from ..export import read_metadata

    meta = read_metadata(args.onnx[0])
    res = int(meta.get("resolution") or (args.resolution or [728])[0])
    x = case_views(res, (args.batch or [1])[0], args.seed, args.images)
    return per_block(args.onnx[0], ref.activate().model, x, args.provider, args.threads)


def _check_report_path(args: argparse.Namespace, keys: set[str]) -> None:
    """``--json``: a writable file that is none of the command's inputs and, if it exists, a report
    of this command (JSON with ``keys``), checked before any work."""
    from ..files import check_output_file, check_replaceable_json, refuse_inputs

    if args.json:
        check_output_file(args.json, "--json")
        refuse_inputs(
            {"--json": args.json},
            {
                "--checkpoint": args.checkpoint,
                "--onnx": args.onnx,
                "--engine": args.engine,
                "--images": getattr(args, "images", None) or [],
            },
        )
        check_replaceable_json(args.json, "--json", keys)


# -- bench -------------------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency of backends side by side, as ratios")
    add_runner_options(
        p, None, "eager PyTorch in this dtype, repeatable; the first runner is the baseline (default: fp32)"
    )
    p.add_argument("--batch", type=POSITIVE, default=1, help="batch size")
    p.add_argument(
        "--resolution", type=POSITIVE, default=None, help="input resolution (default: the files' own, else 728)"
    )
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="untimed calls per runner")
    p.add_argument("--iters", type=POSITIVE, default=10, help="timed calls per runner")
    p.add_argument("--insertion", action="store_true", help="also benchmark insertion vs memcpy")
    p.add_argument("--json", default=None, help="write the result here, atomically (default: not written)")
    add_common(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace, progress: bool) -> int:
    from ..bench import run_bench

    _check_report_path(args, {"timings", "notes"})
    result = run_bench(args, progress)
    print(result.table())
    if args.json:
        result.write_json(args.json)
    return 0
