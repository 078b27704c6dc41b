"""``EmbedClient``: what it sends and how it reads answers (no server), then over gRPC and HTTP
against ``serve`` on the tiny checkpoint."""

import contextlib
import io
import socket
import ssl
import time

import numpy as np
import pytest
from PIL import Image

from step37_deploy.config import TokenIds
from step37_deploy.errors import InputError, ServerError
from step37_deploy.preprocess import image_layout, preprocess, to_rgb
from step37_deploy.serving.client import EmbedClient, RetryBudget, classify, embedding_from_outputs, image_bytes

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


# -- what is retried (issue 22 item 9) ---------------------------------------------------------------


def _grpc_error(message: str, status: str = "StatusCode.UNAVAILABLE"):
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(msg=message, status=status)


CLASSIFIED = [
    (ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate"), "tls", False),
    (socket.gaierror(-2, "Name or service not known"), "dns", False),
    (ConnectionRefusedError(111, "Connection refused"), "connection", True),
    (ConnectionResetError(104, "Connection reset by peer"), "connection", True),
    (TimeoutError("timed out"), "timeout", False),
    (_grpc_error("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: Ssl handshake "
                 "failed: SSL_ERROR_SSL: error:1000007d:SSL routines:CERTIFICATE_VERIFY_FAILED"), "tls", False),
    (_grpc_error("DNS resolution failed for nosuch.invalid:8001: C-ares status is not ARES_SUCCESS"), "dns", False),
    (_grpc_error("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9: Connection refused"),
     "connection", True),
    (_grpc_error("Socket closed"), "connection", True),
    (_grpc_error("Exceeds maximum queue size"), "StatusCode.UNAVAILABLE", True),
    (_grpc_error("cannot read image", "StatusCode.INVALID_ARGUMENT"), "StatusCode.INVALID_ARGUMENT", False),
    (_grpc_error("Service Unavailable", "503"), "503", True),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "status", "retryable"), CLASSIFIED, ids=lambda v: str(v)[:40])
def test_errors_are_classified_by_what_a_retry_can_fix(exc, status, retryable):
    assert classify(exc) == (status, retryable)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_untrusted_certificate_is_tried_once(protocol, tmp_path):
    """A loopback TLS server whose self-signed certificate the client does not trust: one try, a
    "tls" error at once, not retries until the deadline (the old client retried every OSError)."""
    import subprocess
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True):
                pass  # the client refuses the handshake

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = EmbedClient(f"127.0.0.1:{listener.getsockname()[1]}", protocol, timeout=4.0, tls=True)
        tries = []
        once = client._embed_once

        def counted(*args, **kwargs):
            tries.append(1)
            return once(*args, **kwargs)

        client._embed_once = counted
        with client, pytest.raises(ServerError, match="tls failure") as err:
            client.embed(b"x")
        assert err.value.status == "tls" and not err.value.retryable
        assert len(tries) == 1 and client.retries == 0
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_the_retry_budget_bounds_retries_across_requests(monkeypatch):
    """Each request adds 0.2 tokens, each retry takes one: under a lasting overload the client sends
    at most 10 + 20 % extra tries, not (deadline / backoff) per request."""
    client = EmbedClient("127.0.0.1:1", "grpc", timeout=30.0, retry_budget=RetryBudget(0.2, 2, 10))
    tries = []

    def busy(data, left_s, **_request):
        tries.append(1)
        raise ServerError("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", retryable=True)

    monkeypatch.setattr(client, "_embed_once", busy)
    monkeypatch.setattr("step37_deploy.serving.client.backoff_s", lambda attempt: 0.0)
    for _ in range(10):
        with pytest.raises(ServerError, match="maximum queue size"):
            client.embed(b"x")
    assert client.retries == len(tries) - 10 <= 2 + 10 * 0.2 + 1e-9
    with pytest.raises(ServerError, match="retry budget"):
        client.embed(b"x")
    with pytest.raises(InputError, match="retry budget"):
        RetryBudget(-1)


def test_the_http_deadline_is_each_calls(monkeypatch):
    """A server that accepts and never answers: the HTTP call ends at the request's deadline (the
    old client waited for the connection's fixed network timeout, here 60 s)."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    try:
        client = EmbedClient(f"127.0.0.1:{listener.getsockname()[1]}", "http", timeout=60.0)
        t0 = time.monotonic()
        with client, pytest.raises(ServerError, match="no answer within") as err:
            client.embed(synthetic_image(32, 32), deadline=1.0)
        assert err.value.status == "timeout" and time.monotonic() - t0 < 30  # not the 60 s network timeout
    finally:
        listener.close()


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


def test_an_extreme_aspect_is_the_clients_error_from_the_server(tiny_server):
    """1x20000 (issue 22 item 17): refused from the header as INVALID_ARG, never retried, and the
    server keeps serving."""
    strip = io.BytesIO()
    Image.new("L", (1, 20000), 128).save(strip, format="PNG")
    with EmbedClient(tiny_server.grpc_url, "grpc") as client:
        with pytest.raises(ServerError, match="crop rule pads it") as err:
            client.embed(strip.getvalue())
        assert err.value.status == "StatusCode.INVALID_ARGUMENT" and client.retries == 0
        assert client.embed(synthetic_image(40, 40)).features.shape[0] == 169
