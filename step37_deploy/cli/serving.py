"""Serving on Triton: ``triton-repo`` (write a model repository) and ``serve`` (run tritonserver on
it, behind the nginx gateway, in the foreground; exit 4 when a served process crashed)."""

from __future__ import annotations

import argparse

from ..serving.contract import DEFAULT_EXIT_TIMEOUT_S
from .args import NON_NEGATIVE, PORT, POSITIVE, POSITIVE_FLOAT
from .options import add_common, add_repository_options, add_security_options, repository_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton model repository (two towers + the embedder)")
    add_repository_options(p)
    p.add_argument("--out", required=True, help="the repository folder to write (required; must be new or empty)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a repository step37-deploy wrote there before (default off)"
    )
    add_common(p)
    p.set_defaults(func=run_triton_repo)
    _add_serve(sub)


def run_triton_repo(args: argparse.Namespace, progress: bool) -> int:
    from ..serving import require_serve_extra

    require_serve_extra("triton-repo", "tritonclient.grpc")
    from ..serving.repository import write_repository

    out = write_repository(
        args.checkpoint, args.backend, args.artifacts, args.out, repository_options(args), overwrite=args.overwrite
    )
    print(out)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the embedder with a real tritonserver, in the foreground")
    add_repository_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the service listens on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
    )
    p.add_argument("--http-port", type=PORT, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus metrics port (default 8002; 0: free)")
    p.add_argument(
        "--tritonserver",
        default=None,
        help="your own tritonserver binary (default: the one nvidia-pytriton ships, with its Python backend)",
    )
    p.add_argument(
        "--exit-timeout",
        type=POSITIVE,
        default=DEFAULT_EXIT_TIMEOUT_S,
        help=f"on SIGINT/SIGTERM, seconds to finish in-flight requests (default {DEFAULT_EXIT_TIMEOUT_S})",
    )
    p.add_argument(
        "--ready-timeout",
        type=POSITIVE_FLOAT,
        default=600,
        help="seconds to wait until every model is loaded (default 600)",
    )
    p.add_argument("--log-verbose", type=NON_NEGATIVE, default=0, help="tritonserver --log-verbose level (default 0)")
    add_security_options(p)
    add_common(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace, progress: bool) -> int:
    from ..serving import require_serve_extra

    require_serve_extra("serve", "tritonclient.grpc", *(() if args.tritonserver else ("pytriton",)))
    from ..serving.gateway import GatewayOptions
    from ..serving.server import serve

    return serve(
        args.checkpoint,
        args.backend,
        args.artifacts,
        repository_options(args),
        host=args.host,
        http_port=args.http_port or None,
        grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None,
        tritonserver=args.tritonserver,
        exit_timeout_s=args.exit_timeout,
        ready_timeout_s=args.ready_timeout,
        log_verbose=args.log_verbose,
        gateway=not args.no_gateway,
        limits=GatewayOptions(
            max_body_mb=args.max_body_mb,
            max_connections=args.max_connections,
            idle_timeout_s=args.idle_timeout_s,
            max_client_requests=args.max_client_requests,
            header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
            workers=args.gateway_workers,
            worker_user=args.gateway_user,
        ),
        api_key_file=args.api_key_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        allow_shared_memory=args.allow_shared_memory,
    )
