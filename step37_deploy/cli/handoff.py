"""Hand-off to LLM engines: ``handoff sglang`` (SGLang's ``/generate`` body for a prompt),
``vllm-cache`` (vLLM encoder-cache files) and ``epd-router`` (an OpenAI front that embeds and
forwards to vLLM by ID).  The engines' formats live in :mod:`step37_deploy.handoff`; this module
turns options into calls of it."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..handoff.vllm.cache import DTYPES, Retention
from ..handoff.vllm.router import RouterLimits
from .args import NON_NEGATIVE_FLOAT, PORT, POSITIVE, POSITIVE_FLOAT, float_in
from .options import add_client_security, add_common, add_service, client_kwargs

log = logging.getLogger(__name__)
_MIB = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    _add_sglang(sub)
    _add_vllm_cache(sub)
    _add_epd_router(sub)


# -- handoff sglang --------------------------------------------------------------------------------
def _add_sglang(sub: argparse._SubParsersAction) -> None:
    """``handoff TARGET``: one target per LLM engine (``step37_deploy/handoff/TARGET.py``)."""
    p = sub.add_parser("handoff", help="turn the service's embeddings into an LLM engine's request")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET", help="the LLM engine: sglang")
    t = targets.add_parser(
        "sglang",
        help="write SGLang's /generate body (expanded input_ids + precomputed_embedding rows) for a prompt",
        formatter_class=p.formatter_class,
    )
    add_service(t, old_name="--url")
    add_client_security(t)
    t.add_argument("--timeout", type=POSITIVE_FLOAT, default=60.0, help="seconds one embedding request may take")
    t.add_argument("--tokenizer", required=True, help="folder with the checkpoint's tokenizer (tokenizer.json)")
    t.add_argument("--prompt", required=True, help="prompt text with one <im_patch> where each --image goes")
    t.add_argument("--image", action="append", required=True, help="image file, repeatable, in prompt order")
    t.add_argument("--out", required=True, help="the JSON body to write (atomically; replaces only such a body)")
    t.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="rows asked of the service: bf16 rounds them as a bf16 LLM will (half the bytes from the service)",
    )
    t.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="sampling_params.max_new_tokens")
    t.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="sampling_params.temperature")
    add_common(t)
    t.set_defaults(func=run_sglang)


def run_sglang(args: argparse.Namespace, progress: bool) -> int:
    """Embed ``--image`` through the service, write the ``/generate`` body to ``--out``."""
    from ..files import atomic_path, check_output_file, check_replaceable_json, refuse_inputs
    from ..handoff.sglang import generate_body, load_tokenizer

    out = check_output_file(args.out, "--out")
    refuse_inputs({"--out": out}, {"--image": args.image, "--tokenizer": args.tokenizer})
    check_replaceable_json(out, "--out", {"input_ids", "sampling_params"})
    tokenizer = load_tokenizer(args.tokenizer)
    with _client(args, timeout=args.timeout) as client:
        embeddings = [client.embed(image, dtype=args.dtype) for image in args.image]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    body = generate_body(args.prompt, embeddings, tokenizer, sampling)
    with atomic_path(out) as tmp:  # compact: a 12-crop image is ~4.7 M numbers
        tmp.write_text(json.dumps(body, separators=(",", ":")))
    rows = sum(e.features.shape[0] for e in embeddings)
    log.info("wrote %s: %d input ids, %d image rows (%s)", out, len(body["input_ids"]), rows, args.dtype)
    print(args.out)
    return 0


def _client(args: argparse.Namespace, **kwargs: Any) -> Any:
    """The service's client with the key and TLS of ``add_client_security``'s options."""
    from ..serving.client import EmbedClient

    return EmbedClient(args.server, **client_kwargs(args), **kwargs)


# -- vLLM: vllm-cache, epd-router ------------------------------------------------------------------
def _add_vllm_options(p: argparse.ArgumentParser) -> None:
    """What both vLLM commands write: the files' folder, dtype, crop policy and retention."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder: token ids (and weights for torch; required)")
    p.add_argument("--dir", required=True, help="vLLM's shared_storage_path: files go to DIR/ID/ (required)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the LLM's dtype, the files' (default bf16)")
    p.add_argument(
        "--mismatch",
        choices=["vllm", "refuse"],
        default="vllm",
        help="images vLLM 0.32 crops unlike the reference: follow vLLM's layout, or refuse (default vllm)",
    )
    p.add_argument(
        "--max-age-s",
        type=float_in(0, 1e9),
        default=Retention.max_age_s,
        help=f"retention: remove our files older than this many seconds (default {Retention.max_age_s:g}; 0: no limit)",
    )
    p.add_argument(
        "--max-gb",
        type=float_in(0, 1e6),
        default=Retention.max_bytes / 1e9,
        help="retention: keep our files under this many GB, oldest removed first "
        f"(default {Retention.max_bytes / 1e9:g}; 0: no limit)",
    )
    p.add_argument(
        "--min-age-s",
        type=float_in(0, 1e9),
        default=Retention.min_age_s,
        help="retention: never remove a file younger than this, so vLLM can load what it just found; the "
        f"router needs at least its upstream timeout (default {Retention.min_age_s:g})",
    )


def _add_vllm_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vllm-cache", help="embed images and write vLLM encoder-cache files (ec_consumer input)")
    _add_vllm_options(p)
    add_service(p, required=False)
    add_client_security(p)
    p.add_argument(
        "--backend",
        choices=["trt", "onnx", "torch"],
        default=None,
        help="in-process runner instead of --server (default none)",
    )
    p.add_argument("--artifacts", nargs="+", default=[], help="onnx/trt: the 728 and 504 files (default: none)")
    p.add_argument("--image", action="append", required=True, help="image file, repeatable (required)")
    p.add_argument(
        "--id",
        action="append",
        default=None,
        help="multi_modal_uuid per image, repeatable (default: sha256 of its bytes)",
    )
    add_common(p)
    p.set_defaults(func=run_vllm_cache)


def _add_epd_router(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("epd-router", help="OpenAI-compatible front: embed via the service, forward to vLLM by ID")
    _add_vllm_options(p)
    add_service(p)
    add_client_security(p)
    p.add_argument("--vllm-url", required=True, help="vLLM's OpenAI server (ec_consumer), http://HOST:PORT (required)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=8100, help="port to listen on (default 8100)")
    p.add_argument(
        "--max-body-mb",
        type=POSITIVE_FLOAT,
        default=RouterLimits.max_body_bytes / _MIB,
        help=f"largest request body (default {RouterLimits.max_body_bytes / _MIB:g} MiB)",
    )
    p.add_argument(
        "--max-images",
        type=POSITIVE,
        default=RouterLimits.max_images,
        help=f"images per request (default {RouterLimits.max_images})",
    )
    p.add_argument(
        "--max-inflight",
        type=POSITIVE,
        default=RouterLimits.max_inflight,
        help=f"requests in flight; more get 429 (default {RouterLimits.max_inflight})",
    )
    add_common(p)
    p.set_defaults(func=run_epd_router)


def _producer(args: argparse.Namespace) -> tuple[Any, Callable[[], bool], Callable[[], None]]:
    """The producer of ``vllm-cache`` / ``epd-router``: the service's client (``--server``) or an
    in-process embedder; returns it with a readiness probe and a close function."""
    from ..config import Step37Config
    from ..handoff.vllm.cache import VllmCacheWriter
    from ..handoff.vllm.producer import VllmProducer

    config = Step37Config.from_checkpoint(args.checkpoint)
    retention = Retention(
        max_age_s=args.max_age_s or None, max_bytes=int(args.max_gb * 1e9) or None, min_age_s=args.min_age_s
    )
    writer = VllmCacheWriter(
        args.dir, args.dtype, retention, weights=_weights_identity(args.checkpoint), hidden=config.text_hidden_size
    )
    tokens = config.tokens
    if args.server:
        client = _client(args)
        return VllmProducer(client.embed_many, writer, tokens, args.mismatch), client.is_ready, client.close
    if getattr(args, "backend", None) is None:
        raise InputError("give --server HOST:PORT (the embedding service) or --backend (embed in process)")
    from ..runtime import VisionEmbedder

    emb = VisionEmbedder.from_artifacts(args.checkpoint, args.backend, args.artifacts)
    return VllmProducer(emb.embed_images, writer, tokens, args.mismatch), lambda: True, lambda: None


def _weights_identity(checkpoint: str) -> str:
    """What names the vision weights in the files' identity: their fingerprint, or (a checkpoint
    folder without weights, used only for its token ids beside ``--server``) its config's hash."""
    import hashlib

    from ..checkpoint import weights_fingerprint
    from ..errors import Step37Error

    try:
        return weights_fingerprint(checkpoint)
    except Step37Error as exc:
        log.warning("no vision weights in %s (%s): files are identified by its config.json alone", checkpoint, exc)
        return "config-" + hashlib.sha256((Path(checkpoint) / "config.json").read_bytes()).hexdigest()


def run_vllm_cache(args: argparse.Namespace, progress: bool) -> int:
    """One file per ``--image``; prints one JSON line per image with its ID, rows, layout and the
    ``multi_modal_uuids`` to send."""
    from ..files import os_reason

    if args.id is not None and len(args.id) != len(args.image):
        raise InputError(f"{len(args.id)} --id for {len(args.image)} --image: give one per image or none")
    datas = []
    for path in args.image:
        try:
            datas.append(Path(path).read_bytes())
        except OSError as exc:
            raise InputError(f"cannot read --image {path}: {os_reason(exc)}") from None
    producer, _, close = _producer(args)
    ids = args.id or [producer.writer.content_id(d) for d in datas]
    try:
        made = producer.produce_many(datas, ids)
    finally:
        close()
    for path, p in zip(args.image, made, strict=True):
        line = {"image": path, "id": p.id, "rows": p.rows, "layout": p.layout, "file": str(p.path)}
        print(json.dumps({**line, "multi_modal_uuids": {"image": [p.id]}}))
    return 0


def run_epd_router(args: argparse.Namespace, progress: bool) -> int:
    """Serve :class:`~step37_deploy.handoff.vllm.router.EpdRouter` until interrupted."""
    from aiohttp import web

    from ..handoff.vllm.router import EpdRouter

    producer, ready, close = _producer(args)
    limits = RouterLimits(int(args.max_body_mb * _MIB), args.max_images, args.max_inflight)
    router = EpdRouter(producer, args.vllm_url, ready, limits)
    log.info("EPD router on http://%s:%d -> %s (files in %s)", args.host, args.port, args.vllm_url, args.dir)
    try:
        web.run_app(router.app(), host=args.host, port=args.port, print=None)
    finally:
        close()
    return 0
