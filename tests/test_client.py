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
        with EmbedClient(f"127.0.0.1:{port}", protocol, timeout=5) as client:
            assert client.is_ready() is False
            with pytest.raises(ServerError, match=f"{protocol}://127.0.0.1:{port}"):
                client.embed(synthetic_image(32, 32))
