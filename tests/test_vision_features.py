"""Rows before the projector (``vision_features``) and 16-bit answers: in process and served.

The served checks run against the session's ``tiny_server`` (ONNX FP32 towers on the tiny checkpoint,
embedding cache on): ``vision_features`` through the checkpoint's projector equal ``features``, the
16-bit outputs equal the FP32 answer cast (and take half the bytes on the wire), only what a request
names is computed, and a client that asks for what it always asked gets exactly that."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from step37_deploy.checkpoint import load_projector
from step37_deploy.errors import InputError
from step37_deploy.fusion import project
from step37_deploy.runtime import VisionEmbedder
from step37_deploy.serving import contract as C

from .conftest import rel_l2
from .preprocess_cases import synthetic_image

SIZES = [(300, 300), (1000, 800), (400, 1300)]  # no crops; 2x2 crops; a tall column of crops


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(w, h)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def projector(tiny_fp32):
    p = load_projector(tiny_fp32, "fp32")
    return p.weight.detach().numpy(), (p.bias.detach().numpy() if p.bias is not None else None)


@pytest.fixture(scope="module")
def twin(tiny_fp32, exported):
    return VisionEmbedder.from_artifacts(tiny_fp32, "onnx", [exported[("fp32", 728)], exported[("fp32", 504)]])


def test_contract_keeps_the_classic_outputs_first():
    names = [t.name for t in C.EMBEDDER_IO["outputs"]]
    assert names[:3] == list(C.EMBEDDER_OUTPUTS) == ["features", "token_ids", "num_crops"]
    assert set(C.ROW_OUTPUTS) <= set(names) and len(set(names)) == len(names)
    assert C.row_output("vision_features", "bf16") == "vision_features_bf16"
    with pytest.raises(ValueError, match="dtype"):
        C.row_output("features", "int8")


# -- in process ---------------------------------------------------------------------------------------


def test_in_process_vision_features_project_to_features(twin, projector):
    images = [synthetic_image(*s) for s in SIZES]
    both = twin.embed_images(images, outputs=("features", "vision_features"))
    plain = twin.embed_images(images)
    only = twin.embed_images(images, outputs=("vision_features",))
    assert [e.num_crops for e in both] == [0, 4, 3]
    for b, p, o in zip(both, plain, only, strict=True):
        assert p.vision_features is None and o.features is None  # the default answer is unchanged
        rows = b.num_crops * 81 + 169
        assert b.vision_features.shape == (rows, 4 * 64) and b.features.shape[0] == rows
        assert rel_l2(project(b.vision_features, *projector), b.features) <= 1e-6
        np.testing.assert_array_equal(p.features, b.features)
        np.testing.assert_array_equal(o.vision_features, b.vision_features)
        assert o.token_ids == b.token_ids == p.token_ids


def test_in_process_cache_keeps_answer_kinds_apart(tiny_fp32, exported):
    emb = VisionEmbedder.from_artifacts(
        tiny_fp32, "onnx", [exported[("fp32", 728)], exported[("fp32", 504)]], cache_mb=64
    )
    raw = _png(900, 700)
    first = emb.embed_images([raw])[0]
    vision = emb.embed_images([raw], outputs=("vision_features",))[0]
    again = emb.embed_images([raw])[0]
    assert first.vision_features is None and vision.vision_features is not None and vision.features is None
    np.testing.assert_array_equal(first.features, again.features)
    assert emb.cache.stats()["hits"] == 1
    with pytest.raises(InputError, match="outputs"):
        emb.embed_images([raw], outputs=("pixels",))


# -- served ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_vision_features_and_16_bit_answers(tiny_server, twin, projector, protocol):
    from step37_deploy.serving.client import EmbedClient

    url = tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url
    images = [_png(*s) for s in SIZES]
    ref = twin.embed_images(images, outputs=("features", "vision_features"))
    with EmbedClient(url, protocol) as client:
        for raw, r in zip(images, ref, strict=True):
            old = client.embed(raw)  # what every existing caller does
            assert old.vision_features is None and old.features.dtype == np.float32
            assert rel_l2(old.features, r.features) <= 1e-5 and old.token_ids == r.token_ids
            full = client.embed(raw, outputs=("features", "vision_features"))
            assert full.vision_features.dtype == np.float32 and full.vision_features.shape == r.vision_features.shape
            assert rel_l2(full.vision_features, r.vision_features) <= 1e-5
            assert rel_l2(project(full.vision_features, *projector), full.features) <= 1e-6
            np.testing.assert_array_equal(full.features, old.features)
            only = client.embed(raw, outputs=("vision_features",))
            assert only.features is None
            np.testing.assert_array_equal(only.vision_features, full.vision_features)
            half = client.embed(raw, outputs=("features", "vision_features"), dtype="fp16")
            assert half.features.dtype == np.float16 and half.vision_features.dtype == np.float16
            np.testing.assert_array_equal(half.features, full.features.astype(np.float16))
            np.testing.assert_array_equal(half.vision_features, full.vision_features.astype(np.float16))
            bf = client.embed(raw, outputs=("features", "vision_features"), dtype="bf16")
            assert bf.features.dtype == torch.bfloat16 and bf.vision_features.dtype == torch.bfloat16
            assert torch.equal(bf.features, torch.from_numpy(full.features).to(torch.bfloat16))
            assert torch.equal(bf.vision_features, torch.from_numpy(full.vision_features).to(torch.bfloat16))
            assert bf.token_ids == half.token_ids == old.token_ids and bf.num_crops == r.num_crops
        with pytest.raises(InputError, match="dtype"):
            client.embed(images[0], dtype="fp8")
        with pytest.raises(InputError, match="outputs"):
            client.embed(images[0], outputs=())


def _http_infer(url: str, raw: bytes, names: list[str]):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        inp = httpclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
        inp.set_data_from_numpy(np.array([raw], dtype=np.object_), binary_data=True)
        outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in names]
        return client.infer(C.EMBEDDER_MODEL, [inp], outputs=outs)
    finally:
        client.close()


def test_wire_bytes_halve_and_only_named_outputs_come_back(tiny_server):
    raw = _png(1000, 800)
    names = ["features", "features_fp16", "features_bf16", "vision_features", "vision_features_fp16"]
    res = _http_infer(tiny_server.http_url, raw, [*names, "token_ids", "num_crops"])
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in res.get_response()["outputs"]}
    assert sizes["features"] == 2 * sizes["features_fp16"] == 2 * sizes["features_bf16"] > 0
    assert sizes["vision_features"] == 2 * sizes["vision_features_fp16"] > sizes["features"]  # 4*64 > hidden
    assert set(sizes) == {*names, "token_ids", "num_crops"}
    # The classic three, named as old clients name them: exactly those come back, as FP32.
    old = _http_infer(tiny_server.http_url, raw, list(C.EMBEDDER_OUTPUTS))
    outs = old.get_response()["outputs"]
    assert {o["name"]: o["datatype"] for o in outs} == {"features": "FP32", "token_ids": "INT64", "num_crops": "INT32"}
    assert old.as_numpy("features").shape == res.as_numpy("features").shape
    # The layout alone: no tower runs, and the answer still has the image's crops and ids.
    layout = _http_infer(tiny_server.http_url, raw, ["token_ids", "num_crops"])
    assert layout.as_numpy("num_crops").tolist() == [4]
    np.testing.assert_array_equal(layout.as_numpy("token_ids"), res.as_numpy("token_ids"))


def test_a_request_naming_no_outputs_gets_every_output(tiny_server):
    """Triton's rule (KServe v2): no ``outputs`` in the request means all of the model's outputs, so
    such a client gets the classic three unchanged plus the optional ones (computed for it)."""
    raw = _png(300, 300)
    res = _http_infer(tiny_server.http_url, raw, [])
    got = {o["name"] for o in res.get_response()["outputs"]}
    assert got == {t.name for t in C.EMBEDDER_IO["outputs"]}
    np.testing.assert_array_equal(res.as_numpy("features_fp16"), res.as_numpy("features").astype(np.float16))
