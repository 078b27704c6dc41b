"""The EPD router on loopback, in front of a fake vLLM (an aiohttp app recording what it gets): the
image is embedded once into the cache under its content ID, the part gains ``uuid``, the answer comes
back unchanged; bad requests get an error and the router keeps serving; health tells the truth."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from PIL import Image
from safetensors.torch import load_file

from step37_deploy.handoff import vllm as hv
from step37_deploy.runtime import VisionEmbedder

from .preprocess_cases import synthetic_image

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402


def _data_url(w: int, h: int) -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(w, h)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), buf.getvalue()


def _chat(*urls: str) -> dict:
    parts = [{"type": "text", "text": "w5 w7"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}


@pytest.fixture(scope="module")
def embedder(tiny_fp32):
    return VisionEmbedder.from_artifacts(tiny_fp32, "torch")


def _fake_vllm(seen: list, healthy: dict) -> web.Application:
    async def chat(request):
        seen.append(await request.json())
        return web.json_response({"choices": [{"message": {"content": "ok"}}]})

    async def health(request):
        return web.Response(status=200 if healthy["ok"] else 500)

    async def models(request):
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


def test_router_end_to_end_on_loopback(tmp_path, embedder):
    calls = []

    def embed(images):
        calls.append(len(images))
        return embedder.embed_images(images)

    async def run():
        seen, healthy = [], {"ok": True}
        upstream = TestServer(_fake_vllm(seen, healthy), host="127.0.0.1")
        await upstream.start_server()
        writer = hv.VllmCacheWriter(tmp_path / "ec")
        producer = hv.VllmProducer(embed, writer, embedder.tokens)
        router = hv.EpdRouter(producer, str(upstream.make_url("")), limits=hv.RouterLimits(max_images=2))
        async with TestClient(TestServer(router.app(), host="127.0.0.1")) as client:
            url, raw = _data_url(728, 546)
            r = await client.post("/v1/chat/completions", json=_chat(url))
            assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "ok"
            part = seen[-1]["messages"][0]["content"][1]
            mm_id = hv.content_id(raw)
            assert part["uuid"] == mm_id and part["image_url"]["url"] == url  # vLLM still sizes from the image
            rows = load_file(str(writer.path_of(mm_id)))[hv.CACHE_TENSOR]
            assert rows.shape[0] == hv.vllm_rows(728, 546) == 331
            # the same image again: the file is reused, nothing embedded
            n = len(calls)
            assert (await client.post("/v1/chat/completions", json=_chat(url))).status == 200 and len(calls) == n
            # bad requests: an error each, the router keeps serving
            for body, status in (
                (_chat("http://169.254.169.254/latest/meta-data"), 400),
                (_chat("data:image/png;base64,@@@"), 400),
                (_chat(url, url, url), 400),
                ({"messages": "x"}, 400),
            ):
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status == status and "message" in (await r.json())["error"]
            r = await client.post(
                "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
            )
            assert r.status == 400
            assert (await (await client.get("/v1/models")).json())["data"][0]["id"] == "m"
            assert (await client.get("/health")).status == 200
            healthy["ok"] = False
            assert (await client.get("/health")).status == 503
            await upstream.close()
            r = await client.post("/v1/chat/completions", json=_chat(url))
            assert r.status == 502 and "did not answer" in (await r.json())["error"]["message"]
            assert (await client.get("/health")).status == 503
        assert len(seen) == 2 and json.dumps(seen[0]) == json.dumps(seen[1])

    asyncio.run(run())


def test_router_refuses_a_non_http_upstream(tmp_path, embedder):
    producer = hv.VllmProducer(embedder.embed_images, hv.VllmCacheWriter(tmp_path / "ec"), embedder.tokens)
    with pytest.raises(hv.InputError):
        hv.EpdRouter(producer, "127.0.0.1:8000")
