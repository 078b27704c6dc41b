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
            mm_id = writer.content_id(raw)
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


def _recording_vllm(seen: list) -> web.Application:
    """A fake vLLM that records every request it gets, on any path and method."""

    async def anything(request):
        seen.append((request.method, request.path))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def _refused_bodies(url: str, other_id: str) -> list[tuple[dict, str]]:
    """Issue 22 item 3: every way past the router's image check that vLLM 0.32 would accept, with a
    word of the refusal each gets."""
    img = {"type": "image_url", "image_url": {"url": url}}
    parts = [
        ({"type": "input_image", "image_url": "http://169.254.169.254/x"}, "type 'input_image'"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "type 'image_embeds'"),
        ({"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}}, "type 'video_url'"),
        ({"type": "audio_url", "audio_url": {"url": "http://example.com/a.wav"}}, "type 'audio_url'"),
        ({"type": "image_pil", "image_pil": "x"}, "type 'image_pil'"),
        ({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "data:image"),
        ({"type": "image_url", "image_url": "https://example.com/a.png"}, "data:image"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "data:image"),
        ({**img, "uuid": other_id}, "set by the router"),  # another image's (or deployment's) file
        ({"type": "text", "text": "x", "uuid": other_id}, "set by the router"),
        ({"type": "image_url", "image_url": {"url": url, "uuid": other_id}}, "unknown key"),
        ({"type": "text", "text": ["not a string"]}, "must be a string"),
        ("a bare string part", "type None"),
    ]
    chats = [({"model": "m", "messages": [{"role": "user", "content": [b]}]}, why) for b, why in parts]
    chats.append(({"model": "m", "messages": [{"role": "user", "content": {"type": "text"}}]}, "list of parts"))
    chats.append(({"model": "m", "messages": ["not an object"]}, "object"))
    chats += [({**_chat(url), f: {"image": {}}}, f) for f in ("mm_processor_kwargs", "media_io_kwargs")]
    return chats


def test_router_cannot_be_walked_around(tmp_path, embedder):
    calls = []

    def embed(images):
        calls.append(len(images))
        return embedder.embed_images(images)

    async def run():
        seen: list = []
        upstream = TestServer(_recording_vllm(seen), host="127.0.0.1")
        await upstream.start_server()
        writer = hv.VllmCacheWriter(tmp_path / "ec")
        router = hv.EpdRouter(hv.VllmProducer(embed, writer, embedder.tokens), str(upstream.make_url("")))
        url, _ = _data_url(400, 300)
        async with TestClient(TestServer(router.app(), host="127.0.0.1")) as client:
            for body, why in _refused_bodies(url, "sha256-" + "0" * 64):
                r = await client.post("/v1/chat/completions", json=body)
                msg = (await r.json())["error"]["message"] if r.status == 400 else f"HTTP {r.status}"
                assert why in msg and "\n" not in msg, (body, msg)
            assert seen == [] and calls == []  # nothing embedded, nothing reached vLLM
            # only the documented routes: others are the router's own JSON 404 / 405
            for method, path, status in (
                ("GET", "/v1/completions", 404),
                ("POST", "/v1/completions", 404),
                ("POST", "/v1/embeddings", 404),
                ("POST", "/v1/responses", 404),
                ("GET", "/metrics", 404),
                ("POST", "/v1/models", 405),
                ("DELETE", "/v1/models", 405),
                ("GET", "/v1/chat/completions", 405),
                ("PUT", "/v1/chat/completions", 405),
                ("POST", "/health", 405),
            ):
                r = await client.request(method, path)
                assert r.status == status and (await r.json())["error"]["code"] == status, (method, path)
            assert seen == []
            assert (await client.get("/v1/models?x=1")).status == 200 and seen == [("GET", "/v1/models")]
            r = await client.post("/v1/chat/completions", json={**_chat(url), "chat_template_kwargs": {}})
            assert r.status == 200 and seen[-1] == ("POST", "/v1/chat/completions")
        await upstream.close()

    asyncio.run(run())


def test_router_refuses_a_retention_that_could_remove_a_file_vllm_is_loading(tmp_path, embedder):
    retention = hv.Retention(min_age_s=60)
    producer = hv.VllmProducer(
        embedder.embed_images, hv.VllmCacheWriter(tmp_path / "ec", retention=retention), embedder.tokens
    )
    with pytest.raises(hv.InputError, match="min_age_s"):
        hv.EpdRouter(producer, "http://127.0.0.1:8000", limits=hv.RouterLimits(upstream_timeout_s=600))
    hv.EpdRouter(producer, "http://127.0.0.1:8000", limits=hv.RouterLimits(upstream_timeout_s=60))
