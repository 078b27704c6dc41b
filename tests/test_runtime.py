import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from step37_deploy.cli import main
from step37_deploy.errors import InputError
from step37_deploy.runtime import VisionEmbedder

from .conftest import rel_l2
from .preprocess_cases import synthetic_image

IMAGES = [synthetic_image(1000, 800), synthetic_image(300, 300), synthetic_image(700, 300)]


@pytest.fixture(scope="module")
def torch_embedder(tiny_fp32):
    return VisionEmbedder.from_artifacts(tiny_fp32, "torch", batch_size=2)


@pytest.fixture(scope="module")
def onnx_embedder(tiny_fp32, exported):
    return VisionEmbedder.from_artifacts(
        tiny_fp32, "onnx", [exported[("fp32", 504)], exported[("fp32", 728)]], batch_size=3
    )


def test_embed_images_layout_and_shapes(torch_embedder):
    out = torch_embedder.embed_images(IMAGES)
    assert [e.num_crops for e in out] == [4, 0, 3]
    for e in out:
        assert e.features.shape == (e.num_crops * 81 + 169, 96)
        assert e.token_ids.count(torch_embedder.tokens.im_patch) == e.features.shape[0]


def test_embed_matches_transformers_get_image_features(torch_embedder, hf_model):
    """End to end against the reference: our preprocessing + tower + projector + token-order
    assembly equals transformers' get_image_features on the same pixel values."""
    from step37_deploy.preprocess import preprocess

    pre = [preprocess(im) for im in IMAGES]
    pv = torch.from_numpy(np.stack([p.global_view for p in pre]))
    local = torch.from_numpy(np.concatenate([p.crops for p in pre if p.num_crops]))
    with torch.no_grad():
        ref = hf_model.get_image_features(pv, local, [p.num_crops for p in pre]).pooler_output
    got = torch_embedder.embed_images(IMAGES)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.features.shape and rel_l2(g.features, r) <= 1e-5


def test_onnx_backend_agrees_with_torch(torch_embedder, onnx_embedder):
    a = torch_embedder.embed_images(IMAGES[:2])
    b = onnx_embedder.embed_images(IMAGES[:2])
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and rel_l2(y.features, x.features) <= 1e-5


def test_fuse_places_features_after_flags(onnx_embedder):
    embs = onnx_embedder.embed_images(IMAGES[:2])
    ids = [1, 2]
    for e in embs:
        ids += [*e.token_ids, 3]
    ids_arr = np.array([ids])
    text = np.random.default_rng(0).standard_normal((len(ids), 1, 96)).astype(np.float32)
    fused = onnx_embedder.fuse(ids_arr, text, embs)
    ph = ids_arr[0] == onnx_embedder.tokens.im_patch
    np.testing.assert_array_equal(fused[ph, 0], np.concatenate([e.features for e in embs]))
    np.testing.assert_array_equal(fused[~ph], text[~ph])
    fused_t = onnx_embedder.fuse(torch.from_numpy(ids_arr), torch.from_numpy(text).half(), IMAGES[:2])
    assert fused_t.dtype == torch.float16
    np.testing.assert_allclose(fused_t.float().numpy(), fused.astype(np.float16).astype(np.float32))
    with pytest.raises(Exception, match="flag token"):
        onnx_embedder.fuse(ids_arr, text, embs[:1])


def test_thread_safe(onnx_embedder):
    ref = [e.features for e in onnx_embedder.embed_images(IMAGES)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: onnx_embedder.embed_images([IMAGES[i % 3]])[0].features, range(8)))
    for i, r in enumerate(results):
        np.testing.assert_allclose(r, ref[i % 3], rtol=1e-5, atol=1e-5)


def test_bad_artifacts(tiny_fp32, exported):
    with pytest.raises(InputError, match="none for"):
        VisionEmbedder.from_artifacts(tiny_fp32, "onnx", [exported[("fp32", 728)]])
    with pytest.raises(InputError, match="backend must be"):
        VisionEmbedder.from_artifacts(tiny_fp32, "tflite")


def _embed(tiny_fp32, exported, image, out):
    files = [str(exported[("fp16", 728)]), str(exported[("fp16", 504)])]
    args = ["embed", "--backend", "onnx", "--artifacts", str(tiny_fp32), *files]
    return main([*args, "--image", str(image), "--image", str(image), "--out", str(out), "-q"])


def test_cli_embed(tiny_fp32, exported, tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(IMAGES[0]).save(img)
    out = tmp_path / "feats.npy"
    assert _embed(tiny_fp32, exported, img, out) == 0
    feats = np.load(out)
    layout = json.loads(out.with_suffix(".json").read_text())
    assert feats.shape == (2 * (4 * 81 + 169), 96) and layout["images"][1]["rows"] == [493, 986]
    assert layout["images"][0]["num_crops"] == 4 and layout["images"][0]["text"].endswith("<im_end>")
    assert _embed(tiny_fp32, exported, tmp_path / "missing.png", tmp_path / "x.npy") == 2
    assert not (tmp_path / "x.npy").exists()
