"""``loadtest``: drive a running service with concurrent (closed loop) or scheduled (open loop)
requests and check every answer against the in-process embedder; exit 1 on a wrong answer."""

from __future__ import annotations

import argparse

from .args import NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT
from .options import add_client_security, add_common, add_service


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="drive a running service with concurrent requests and check every answer against the in-process embedder",
    )
    add_service(p, old_name="--url")
    add_client_security(p)
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders of them (sent in order)")
    _add_load(p)
    _add_reference(p)
    _add_schedule(p)
    p.add_argument("--json", default=None, help="write the report here, atomically (default none)")
    add_common(p)
    p.set_defaults(func=run_loadtest)


def _add_load(p: argparse.ArgumentParser) -> None:
    """How much load: levels, requests, durations, and where Triton's metrics are."""
    p.add_argument(
        "--concurrency",
        type=POSITIVE,
        action="append",
        help="requests in flight; repeat for one run per level (default 1 and 8)",
    )
    p.add_argument("--requests", type=POSITIVE, default=200, help="requests per run at most (default 200)")
    p.add_argument("--duration", type=POSITIVE_FLOAT, default=60.0, help="seconds per run at most (default 60)")
    p.add_argument("--timeout", type=POSITIVE_FLOAT, default=60.0, help="seconds one request may take (default 60)")
    p.add_argument(
        "--metrics-url",
        default=None,
        help="HOST:PORT of Triton's metrics endpoint (default: the host of --server, port 8002)",
    )


def _add_reference(p: argparse.ArgumentParser) -> None:
    """The in-process embedder every answer is checked against (and optionally measured beside)."""
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint the service was built from (the reference's projector, tokens)"
    )
    p.add_argument(
        "--backend",
        choices=["onnx", "torch", "trt"],
        default="onnx",
        help="backend of the in-process reference embedder (default onnx)",
    )
    p.add_argument(
        "--artifacts",
        nargs="*",
        default=[],
        help="for --backend onnx/trt: the 728 and 504 files the service serves (default none)",
    )
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider (default cpu)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="also measure the in-process embedder on the same images in the same run (default off)",
    )
    p.add_argument(
        "--cache-mb",
        type=NON_NEGATIVE_FLOAT,
        default=0.0,
        help="embedding cache of the --in-process embedder in MiB; match the server's (default 0 = off)",
    )
    p.add_argument(
        "--tolerance",
        type=POSITIVE_FLOAT,
        default=1e-2,
        help="max relative L2 distance of an answer's features from the reference (default 0.01)",
    )


def _add_schedule(p: argparse.ArgumentParser) -> None:
    """Warm-up, alternation with the in-process embedder, open loop, retries."""
    p.add_argument("--warmup", type=NON_NEGATIVE, default=2, help="warm-up requests with generated images (default 2)")
    p.add_argument(
        "--rounds",
        type=POSITIVE,
        default=1,
        help="with --in-process: alternate served and in-process blocks this many times per level, so load "
        "changes on a shared machine hit both alike (default 1)",
    )
    p.add_argument(
        "--rate",
        type=POSITIVE_FLOAT,
        action="append",
        help="open loop: send this many requests per second for --duration whatever the answers, each with the "
        "deadline --timeout, and report goodput; repeat for one run per rate (default: closed loop, --concurrency)",
    )
    p.add_argument(
        "--retry",
        action="store_true",
        help="the client retries refusals (UNAVAILABLE) and connection errors with backoff within --timeout, as "
        "EmbedClient does by default (default off: one try per request, so the report shows every refusal)",
    )


def run_loadtest(args: argparse.Namespace, progress: bool) -> int:
    from ..serving import require_serve_extra

    require_serve_extra("loadtest", f"tritonclient.{args.protocol}", "prometheus_client")
    from ..serving.loadtest import LoadtestOptions, run_loadtest

    opts = LoadtestOptions(
        url=args.server,
        images=args.images,
        checkpoint=args.checkpoint,
        protocol=args.protocol,
        api_key_file=args.api_key_file,
        tls=args.tls or args.tls_ca is not None,
        tls_ca=args.tls_ca,
        backend=args.backend,
        artifacts=args.artifacts,
        provider=args.provider,
        concurrency=args.concurrency or [1, 8],
        requests=args.requests,
        duration_s=args.duration,
        timeout_s=args.timeout,
        metrics_url=args.metrics_url,
        in_process=args.in_process,
        cache_mb=args.cache_mb,
        tolerance=args.tolerance,
        warmup=args.warmup,
        rounds=args.rounds,
        rates=args.rate or (),
        retry=args.retry,
    )
    report = run_loadtest(opts, progress)
    print(report.table())
    if args.json:
        report.write_json(args.json)
    return 0 if report.ok else 1
