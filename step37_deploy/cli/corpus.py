"""``step37-deploy embed-corpus``: precomputed vision features for a whole corpus (docs/corpus.md).

Reads WebDataset tar shards and/or folders of images and writes one feature shard per input shard
(same basename, same keys) with its manifest, resumably, on this machine (``--engine local``) or on
a Ray cluster (``--engine ray``).  Exit status: 0 every key is accounted for (embedded, or recorded
with its error) and the error rate is within ``--max-error-rate``; 1 a shard failed or the error
rate is over it; 2 a bad argument, input or output (one line).
"""

from __future__ import annotations

import argparse

from ..config import MAX_PIXELS
from .args import POSITIVE, float_in, int_at_least
from .options import add_client_security, add_common, add_service, client_kwargs

NAME = "embed-corpus"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="embed a whole corpus: one feature shard per input shard, resumable, local or Ray")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="WebDataset .tar shards (paths, globs, brace ranges such as data-{000000..000099}.tar) and/or "
        "folders of images (required)",
    )
    p.add_argument("--out", required=True, help="folder of the feature shards and manifests (required)")
    _add_engine_options(p)
    _add_output_options(p)
    _add_runner_options(p)
    _add_client_options(p)
    add_common(p)
    p.set_defaults(func=handler)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder: weights (torch), projector, token ids (required)"
    )
    p.add_argument("--backend", choices=["torch", "onnx", "trt"], default="torch", help="in-process runner")
    p.add_argument("--artifacts", nargs="+", default=[], help="onnx/trt: the 728 and 504 files (default: none)")
    p.add_argument("--device", default="cpu", help="torch device of one local worker or of every Ray actor")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--batch", type=POSITIVE, default=8, help="images per tower batch")
    p.add_argument("--prefetch", type=int_at_least(0), default=2, help="batches decoded ahead of the towers")
    p.add_argument("--decode-threads", type=POSITIVE, default=2, help="decoding/preprocessing threads per worker")
    p.add_argument(
        "--threads", type=POSITIVE, default=None, help="torch threads per worker (default: the cores shared out)"
    )
    p.add_argument(
        "--max-pixels",
        type=POSITIVE,
        default=MAX_PIXELS,
        help="larger images are recorded as errors before decoding (default: Pillow's bomb limit, %(default)s)",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--outputs",
        nargs="+",
        choices=["vision_features", "features"],
        default=["vision_features"],
        help="rows to store: vision_features (before the projector, Megatron-Bridge's image_features) and/or "
        "features (projected) (default vision_features)",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="storage dtype of the rows")
    p.add_argument("--shard-size", type=POSITIVE, default=1000, help="images per virtual shard of a folder input")
    p.add_argument(
        "--image-ext",
        action="append",
        default=None,
        help="image member extensions, in order of preference, repeatable (default jpg jpeg png webp)",
    )
    p.add_argument("--max-image-mb", type=float_in(0, 1e6, lo_open=True), default=64.0, help="larger files are errors")
    p.add_argument(
        "--max-error-rate",
        type=float_in(0, 1),
        default=0.01,
        help="exit 1 when more than this fraction of the samples are errors",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards this tool wrote with another fingerprint (default: refuse; never other files)",
    )
    p.add_argument("--no-space-check", action="store_true", help="skip the output-size estimate against the free space")
    p.add_argument(
        "--log-every-s", type=float_in(0, 1e6, lo_open=True), default=30.0, help="progress log period off a terminal"
    )


def _add_runner_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where the shards run")
    p.add_argument(
        "--workers", type=POSITIVE, default=1, help="local worker processes (CPU: cores shared out) or Ray actors"
    )
    p.add_argument(
        "--devices",
        nargs="+",
        default=[],
        help="local: one worker per device, e.g. cuda:0 cuda:1 (default: --workers on --device)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster HOST:PORT (default: a Ray runtime on this machine, 127.0.0.1, for this job)",
    )
    p.add_argument("--cpus-per-worker", type=float_in(0, 1024, lo_open=True), default=1.0, help="Ray: CPUs per actor")
    p.add_argument("--gpus-per-worker", type=float_in(0, 64), default=0.0, help="Ray: GPUs per actor")


def _add_client_options(p: argparse.ArgumentParser) -> None:
    add_service(p, required=False)
    p.add_argument(
        "--timeout", type=float_in(0, 1e6, lo_open=True), default=60.0, help="--server: deadline per image, s"
    )
    p.add_argument("--concurrency", type=POSITIVE, default=8, help="--server: requests in flight per worker")
    add_client_security(p)


def options_from_args(args: argparse.Namespace):  # -> CorpusOptions (imported here: --help stays light)
    from ..corpus.compute import EngineSpec
    from ..corpus.run import CorpusOptions
    from ..corpus.sources import IMAGE_EXTS

    engine = EngineSpec(
        checkpoint=args.checkpoint,
        backend=args.backend,
        artifacts=tuple(args.artifacts),
        device=args.device,
        provider=args.provider,
        server=args.server,
        client={**client_kwargs(args), "timeout": args.timeout} if args.server else {},
        concurrency=args.concurrency,
        max_pixels=args.max_pixels,
        batch=args.batch,
        prefetch=args.prefetch,
        decode_threads=args.decode_threads,
        threads=args.threads,
    )
    return CorpusOptions(
        inputs=args.inputs,
        out=args.out,
        engine=engine,
        outputs=tuple(dict.fromkeys(args.outputs)),
        dtype=args.dtype,
        runner=args.engine,
        workers=args.workers,
        devices=tuple(args.devices),
        ray_address=args.ray_address,
        ray_cpus=args.cpus_per_worker,
        ray_gpus=args.gpus_per_worker,
        shard_size=args.shard_size,
        image_exts=tuple(e.lower().lstrip(".") for e in args.image_ext) if args.image_ext else IMAGE_EXTS,
        max_image_mb=args.max_image_mb,
        overwrite=args.overwrite,
        space_check=not args.no_space_check,
        log_every_s=args.log_every_s,
    )


def handler(args: argparse.Namespace, progress: bool) -> int:
    from ..corpus.run import run_corpus

    summary = run_corpus(options_from_args(args), progress)
    print(summary.line(), flush=True)
    if summary.failed or summary.complete < summary.shards:
        return 1
    return 1 if summary.error_rate > args.max_error_rate else 0
