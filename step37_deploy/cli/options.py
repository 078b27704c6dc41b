"""Option groups that several commands share, defined once so that one name means one thing
everywhere (pip's ``cmdoptions``): the runners of ``compare``/``bench``, the FP16 calibration of
``export``/``pipeline``, the model configs of ``triton-repo``/``serve``, ``serve``'s gateway and
security, and the embedding service's address for its clients.

Defaults are read from the modules that own them (``config``, ``serving.contract``), which import
nothing heavy: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse

from ..config import CALIBRATION_VIEWS
from ..serving import contract as C
from .args import POSITIVE, POSITIVE_FLOAT, RenamedStore, add_old_name, int_at_least

#: ``--gateway-workers``: 0 (one per usable CPU) up to the contract's bound.
GATEWAY_WORKERS = int_at_least(0, C.MAX_GATEWAY_WORKERS)


def add_common(p: argparse.ArgumentParser) -> None:
    """``--quiet``/``--verbose``, last in every command (``main`` reads them)."""
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging; tracebacks of internal errors")


# -- the embedding service, for its clients --------------------------------------------------------
def add_service(p: argparse.ArgumentParser, required: bool = True, old_name: str | None = None) -> None:
    """``--server HOST:PORT`` and ``--protocol``: where the embedding service answers.  Without
    ``required`` the command embeds in process when no ``--server`` is given.  ``old_name``: the
    option's name before issue 20 (``--url``), still accepted with a deprecation warning."""
    server = p.add_argument(
        "--server",
        action=RenamedStore,
        required=required,
        default=None,
        metavar="HOST:PORT",
        help="the embedding service's address, at its --protocol endpoint"
        + ("" if required else " (default: embed in process)"),
    )
    if old_name:
        add_old_name(p, server, old_name)
    p.add_argument("--protocol", choices=C.PROTOCOLS, default=C.DEFAULT_PROTOCOL, help="--server's protocol")


def add_client_security(p: argparse.ArgumentParser) -> None:
    """The key and TLS a client needs for a ``serve --api-key-file/--tls-cert`` service."""
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="send x-api-key: <FILE's first line>, for a serve --api-key-file service (default: no key)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (HTTPS / gRPC over TLS), for a serve --tls-cert service (default off)",
    )
    p.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="with --tls: the certificate(s) to trust, e.g. the service's self-signed one (default: the system's)",
    )


def client_kwargs(args: argparse.Namespace) -> dict:
    """``EmbedClient``'s protocol, key and TLS from ``add_service``/``add_client_security``'s options
    (a plain dict: the corpus job hands it to its worker processes)."""
    from ..serving.auth import read_optional_api_key

    return {
        "protocol": args.protocol,
        "api_key": read_optional_api_key(args.api_key_file),
        "tls": args.tls or args.tls_ca is not None,
        "root_certificates": args.tls_ca,
    }


# -- runners and artifacts ------------------------------------------------------------------------
def add_runner_options(p: argparse.ArgumentParser, torch_default: list[str] | None, torch_help: str) -> None:
    """The runners ``compare`` and ``bench`` take (built by ``backends.factory.runners_from_args``)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder: reference and projector (required)")
    p.add_argument("--onnx", action="append", default=[], help="ONNX file, repeatable (default: none)")
    p.add_argument("--engine", action="append", default=[], help="TensorRT engine, repeatable (default: none)")
    p.add_argument("--torch", action="append", default=torch_default, choices=["fp32", "fp16", "bf16"], help=torch_help)
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider")
    p.add_argument("--device", default="cpu", help="torch device for the --torch runners (cpu, cuda)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="CPU threads per runner (default: all cores)")


def add_input_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        choices=["float", "uint8"],
        default="float",
        help="pixel_values the graph takes: float (CLIP-normalised views, default) or uint8 "
        "(raw 0..255 views; the normalisation is folded into conv1, the host skips the float conversion)",
    )


def add_calibration(p: argparse.ArgumentParser) -> None:
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
        type=POSITIVE,
        default=CALIBRATION_VIEWS,
        help=f"FP16: number of random calibration views when no --calibrate images are given "
        f"(default {CALIBRATION_VIEWS})",
    )
    p.add_argument(
        "--calibration-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="FP16: dtype the calibration runs the tower in (default fp32; bf16 measures the same ranges "
        "to ~1%% and is several times faster on CPUs with AMX)",
    )


def calibration_kwargs(args: argparse.Namespace) -> dict:
    """``export_onnx``/``run_pipeline``'s calibration arguments from :func:`add_calibration`'s options."""
    return {
        "calibrate": not args.no_calibrate,
        "calibration_images": args.calibrate,
        "calibration_views": args.calibration_views,
        "calibration_dtype": args.calibration_dtype,
    }


# -- the served models (triton-repo, serve) --------------------------------------------------------
def add_repository_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``triton-repo`` and ``serve`` (what goes into the model configs)."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder: projector, token ids, config; weights for torch (required)",
    )
    p.add_argument("--backend", choices=["trt", "onnx", "torch"], required=True, help="what runs the towers (required)")
    p.add_argument(
        "--artifacts",
        nargs="+",
        default=[],
        metavar="FILE",
        help="trt: the 728 and 504 engines; onnx: the 728 and 504 ONNX files (default: none, for torch)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="towers' max_batch_size (default: the engine profile MAX for trt, never above it; "
        f"{C.DEFAULT_MAX_BATCH} otherwise)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=None,
        help=f"dynamic batching: how long a tower waits for more views (default {C.DEFAULT_QUEUE_DELAY_US} "
        f"microseconds for trt towers, {C.CPU_QUEUE_DELAY_US} for onnx/torch towers on the CPU)",
    )
    p.add_argument(
        "--preprocess-instances",
        type=int,
        default=None,
        help="embedder instances, i.e. parallel preprocessing processes (default: the number of usable CPUs)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=C.DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse larger images as decompression bombs (default {C.DEFAULT_MAX_IMAGE_PIXELS}, Pillow's own limit)",
    )
    p.add_argument("--cuda-graphs", action="store_true", help="trt towers: capture CUDA graphs (default off)")
    p.add_argument("--no-warmup", action="store_true", help="trt towers: no warmup request at load (default: warm up)")
    p.add_argument(
        "--tower-threads",
        type=int,
        default=None,
        help="onnx/torch towers: intra-op threads each (default: the usable cores; serve states its choice)",
    )
    p.add_argument(
        "--tower-instances",
        type=int,
        default=None,
        help="onnx/torch towers: instances of each, each a process with its own copy of the weights (default: "
        "serve 2 on a machine of 2 or more usable cores, so one batch runs while another one's serial steps "
        "leave cores idle; triton-repo 1)",
    )
    p.add_argument(
        "--tower-calls",
        choices=["local", "bls"],
        default=None,
        help="onnx/torch towers: local runs them inside each embedder instance (no hop, no copies of the "
        "views), bls as Triton models of their own that batch the views of all instances (default: local "
        "when the embedder instances are no more than the tower instances, so the weights are copied as "
        "often either way, else bls; TensorRT towers are always bls)",
    )
    _add_queue_options(p)


def _add_queue_options(p: argparse.ArgumentParser) -> None:
    """The embedding cache and the models' queue bounds."""
    p.add_argument(
        "--cache-mb",
        type=float,
        default=C.DEFAULT_CACHE_MB,
        help="embedding cache of each embedder instance, MiB, keyed by the image bytes' SHA-256 "
        f"(default {C.DEFAULT_CACHE_MB:g}; 0 = off)",
    )
    p.add_argument(
        "--max-queue-size",
        type=POSITIVE,
        default=C.DEFAULT_MAX_QUEUE_SIZE,
        help="requests each model may hold waiting; one more is refused at once with UNAVAILABLE "
        f"(default {C.DEFAULT_MAX_QUEUE_SIZE}; towers get at least what the embedder instances can send them)",
    )
    p.add_argument(
        "--queue-timeout-ms",
        type=POSITIVE,
        default=C.DEFAULT_QUEUE_TIMEOUT_MS,
        help="longest wait in a model's queue before a request is refused with UNAVAILABLE; a client's own "
        f"timeout request parameter overrides it (default {C.DEFAULT_QUEUE_TIMEOUT_MS})",
    )


def repository_options(args: argparse.Namespace):
    """``RepositoryOptions`` from :func:`add_repository_options`' options (imports the repository writer)."""
    from ..serving.repository import RepositoryOptions

    return RepositoryOptions(
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        preprocess_instances=args.preprocess_instances,
        max_image_pixels=args.max_image_pixels,
        cuda_graphs=args.cuda_graphs,
        warmup=not args.no_warmup,
        tower_threads=args.tower_threads,
        tower_instances=args.tower_instances,
        tower_calls=args.tower_calls,
        cache_mb=args.cache_mb,
        max_queue_size=args.max_queue_size,
        queue_timeout_ms=args.queue_timeout_ms,
    )


# -- serve's gateway, limits, key and TLS (docs/serving.md, "Security") ---------------------------
def add_gateway_limits(p: argparse.ArgumentParser) -> None:
    """The gateway's per-client, time and worker limits (``GatewayOptions``' fields of the same
    names; their defaults live in ``serving.contract``)."""
    p.add_argument(
        "--max-client-requests",
        type=POSITIVE,
        default=None,
        metavar="N",
        help="gateway: requests in flight from one client address, both API ports together, at most "
        "--max-connections; more are refused at once like a full port (default: an eighth of --max-connections, "
        "at least 4)",
    )
    p.add_argument(
        "--header-timeout-s",
        type=POSITIVE_FLOAT,
        default=C.DEFAULT_HEADER_TIMEOUT_S,
        help="gateway: a request's whole header must arrive within this of the connection's accept; at most "
        f"--idle-timeout-s (default {C.DEFAULT_HEADER_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--body-timeout-s",
        type=POSITIVE_FLOAT,
        default=C.DEFAULT_BODY_TIMEOUT_S,
        help="gateway: longest pause between two reads of a request body; at most --idle-timeout-s "
        f"(default {C.DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--gateway-workers",
        type=GATEWAY_WORKERS,
        default=0,
        metavar="N",
        help=f"gateway: nginx worker processes (default 0: one per usable CPU, at most {C.MAX_AUTO_GATEWAY_WORKERS})",
    )
    p.add_argument(
        "--gateway-user",
        default=C.DEFAULT_GATEWAY_USER,
        metavar="USER",
        help="gateway: the unprivileged user nginx's workers run as when serve runs as root; it must exist and "
        f"not be root (default {C.DEFAULT_GATEWAY_USER}; as another user the workers run as that user)",
    )


def add_security_options(p: argparse.ArgumentParser) -> None:
    """``serve``'s gateway in front of tritonserver: its limits, API key, TLS and restricted APIs."""
    p.add_argument(
        "--no-gateway",
        action="store_true",
        help="no nginx in front: tritonserver listens on --host itself, with NO body-size, compressed-body, "
        "connection or idle limits, so one client can exhaust its memory or file descriptors "
        "(default: the nginx gateway)",
    )
    p.add_argument(
        "--max-body-mb",
        type=POSITIVE_FLOAT,
        default=C.DEFAULT_MAX_BODY_MB,
        help=f"gateway: refuse request bodies larger than this, MiB (default {C.DEFAULT_MAX_BODY_MB:g}: a 12 MP PNG "
        "of noise is 34 MiB)",
    )
    p.add_argument(
        "--max-connections",
        type=POSITIVE,
        default=C.DEFAULT_MAX_CONNECTIONS,
        help="gateway: requests in flight per port; more are refused at once (HTTP 503, gRPC UNAVAILABLE); "
        f"open connections are bounded at 2x this + 64, idle ones closed first (default {C.DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--idle-timeout-s",
        type=POSITIVE_FLOAT,
        default=C.DEFAULT_IDLE_TIMEOUT_S,
        help="gateway: close a connection idle this long, or sending a request's header or body this slowly "
        f"(default {C.DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    add_gateway_limits(p)
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="gateway: inference, metadata and statistics require the header x-api-key: <FILE's first line>; "
        "health stays open; FILE must be mode 600 (default: no key)",
    )
    p.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="TLS certificate (with --tls-key): HTTPS and gRPC over TLS at the gateway; with --no-gateway "
        "gRPC only (default: no TLS)",
    )
    p.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key of --tls-cert (default none)")
    p.add_argument(
        "--allow-shared-memory",
        action="store_true",
        help="open Triton's system/CUDA shared-memory APIs: any client that reaches the port can then make the "
        "server read and write shared memory regions of this host, including other processes' (default: refused)",
    )
