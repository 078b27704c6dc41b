"""``EmbedClient``: what it sends and how it reads answers (no server), then over gRPC and HTTP
against ``serve`` on the tiny checkpoint."""

import io

import numpy as np
import pytest
from PIL import Image

from step37_deploy.config import TokenIds
from step37_deploy.errors import InputError, ServerError
from step37_deploy.preprocess import image_layout, preprocess, to_rgb
from step37_deploy.serving.client import EmbedClient, embedding_from_outputs, image_bytes

from .preprocess_cases import synthetic_image


@pytest.mark.parametrize("size", [(300, 300), (700, 300), (1000, 800), (1600, 500), (300, 1200)])
def test_layout_is_read_back_from_the_token_ids(size):
    """newline mask and text rebuilt from the served token ids equal the in-process ones."""
    tokens = TokenIds()
    pre = preprocess(synthetic_image(*size))
    text, ids = image_layout(pre.num_crops, pre.newline_mask, tokens)
    rows = pre.num_crops * 81 + 169
    e = embedding_from_outputs(np.zeros((rows, 4), np.float32), np.asarray(ids, np.int64), pre.num_crops)
    assert e.token_ids == ids and e.text == text and e.newline_mask == pre.newline_mask
    assert e.num_crops == pre.num_crops


def test_malformed_answers_are_server_errors():
    _, ids = image_layout(2, [True, False], TokenIds())
    ok = np.zeros((2 * 81 + 169, 4), np.float32)
    embedding_from_outputs(ok, np.asarray(ids), 2)
    with pytest.raises(ServerError, match="malformed"):
        embedding_from_outputs(ok[:-1], np.asarray(ids), 2)  # rows do not fit the crops
    with pytest.raises(ServerError, match="malformed"):
        embedding_from_outputs(ok, np.asarray(ids[:-5]), 2)  # token ids cut short
    bad = list(ids)
    bad[5] = 7  # not <im_patch> inside the first crop block
    with pytest.raises(ServerError, match="layout"):
        embedding_from_outputs(ok, np.asarray(bad), 2)


def test_image_bytes_keeps_the_pixels(tmp_path):
    arr = synthetic_image(64, 48)
    rgba = np.concatenate([arr, np.full((48, 64, 1), 128, np.uint8)], -1)
    for image in (arr, Image.fromarray(arr), rgba, Image.fromarray(rgba, "RGBA").convert("P")):
        data = image_bytes(image)
        got = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(got, np.asarray(to_rgb(image)))
    f = tmp_path / "a.png"
    f.write_bytes(b"any bytes")
    assert image_bytes(f) == image_bytes(str(f)) == b"any bytes"
    with pytest.raises(InputError, match="missing.png"):
        image_bytes(tmp_path / "missing.png")
    with pytest.raises(InputError, match="must be a path"):
        image_bytes(3.5)


def test_bad_arguments_and_no_server():
    with pytest.raises(InputError, match="protocol"):
        EmbedClient("127.0.0.1:1", protocol="udp")
    with pytest.raises(InputError, match="HOST:PORT"):
        EmbedClient("http://127.0.0.1:1")
    import socket

    with socket.socket() as s:  # a free loopback port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for protocol in ("grpc", "http"):
        with EmbedClient(f"127.0.0.1:{port}", protocol, timeout=1) as client:  # retried within 1 s
            assert client.is_ready() is False
            with pytest.raises(ServerError, match=f"{protocol}://127.0.0.1:{port}"):
                client.embed(synthetic_image(32, 32))


# -- against `serve` (the session's tiny_server: ONNX FP32 towers on the tiny checkpoint) ---------------


@pytest.fixture(scope="module")
def twin(tiny_server):
    """The in-process embedder on exactly what the server serves."""
    from step37_deploy.runtime import VisionEmbedder

    return VisionEmbedder.from_artifacts(tiny_server.checkpoint, "onnx", list(tiny_server.artifacts))


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_embeddings_equal_the_in_process_ones(tiny_server, twin, protocol, tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(synthetic_image(1300, 500)).save(path)  # 2 rows of crops: a newline in the layout
    images = [
        path,
        _png_bytes(synthetic_image(900, 700)),
        Image.fromarray(synthetic_image(500, 600)),
        synthetic_image(650, 300),
    ]
    want = twin.embed_images(images)
    url = tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url
    with EmbedClient(url, protocol) as client:
        assert client.is_ready()
        one = [client.embed(im) for im in images]
        many = client.embed_many(images * 2, concurrency=4)
        assert len(client._clients) == 1  # the pool's connections were closed with its threads
    assert any(w.num_crops for w in want) and any(any(w.newline_mask) for w in want)
    for got, w in zip(one + many, want * 3, strict=True):
        assert got.token_ids == w.token_ids and got.text == w.text
        assert got.num_crops == w.num_crops and got.newline_mask == w.newline_mask
        assert got.features.dtype == np.float32 and got.features.shape == w.features.shape
        assert _rel_l2(got.features, w.features) <= 1e-5


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_errors_arrive_typed_with_the_servers_message(tiny_server, protocol):
    url = tiny_server.grpc_url if protocol == "grpc" else tiny_server.http_url
    with EmbedClient(url, protocol) as client:
        with pytest.raises(ServerError, match="cannot read image") as err:
            client.embed(b"this is not a .png!")
        assert isinstance(err.value, ServerError) and f"{protocol}://{url}" in str(err.value)
        with pytest.raises(ServerError, match="empty"):
            client.embed(b"")
        e = client.embed(synthetic_image(40, 40))  # and the server keeps serving
        assert e.features.shape[0] == 169
    with (
        EmbedClient(url, protocol, model="no_such_model") as other,
        pytest.raises(ServerError, match="unknown model|not found"),
    ):
        other.embed(synthetic_image(40, 40))


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
