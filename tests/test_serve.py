"""``step37-deploy serve`` for real: a tritonserver subprocess on loopback, gRPC and HTTP clients.

The session server (``tiny_server`` in conftest) runs the ONNX FP32 towers of the tiny checkpoint;
every answer is compared with the in-process ``VisionEmbedder`` on the same files.  ``secured``
(``--api-key-file`` and TLS, the default stop options) hosts the secrets check and the attack on
Triton's loopback ports, and then the drain test, which stops it (so it comes last).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EVIL_CONFIG, rel_l2, start_serve, stop_serve

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the [serve] extra (tritonclient) is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="the [serve] extra (tritonclient) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from step37_deploy.serving import contract as C  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def embed(client, raw: bytes, module=grpcclient):
    inp = module.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
    inp.set_data_from_numpy(np.array([raw], dtype=np.object_))
    res = client.infer(C.EMBEDDER_MODEL, [inp])
    return tuple(res.as_numpy(name) for name in C.EMBEDDER_OUTPUTS)


def assert_same(got, ref) -> None:
    features, token_ids, num_crops = got
    assert features.dtype == np.float32 and features.shape == ref.features.shape
    assert rel_l2(features, ref.features) <= 1e-5
    assert token_ids.dtype == np.int64 and token_ids.tolist() == ref.token_ids
    assert num_crops.dtype == np.int32 and num_crops.tolist() == [ref.num_crops]


@pytest.fixture(scope="module")
def reference(tiny_server):
    from step37_deploy.runtime import VisionEmbedder

    return VisionEmbedder.from_artifacts(tiny_server.checkpoint, "onnx", tiny_server.artifacts)


def test_grpc_and_http_equal_in_process(tiny_server, reference):
    images = [image_bytes(900, 600, 1), image_bytes(300, 300, 2, "JPEG"), image_bytes(300, 900, 3)]
    refs = reference.embed_images(images)
    assert [r.num_crops for r in refs] == [2, 0, 2]  # crops and no crops, wide and tall
    grpc = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    http = httpclient.InferenceServerClient(tiny_server.http_url)
    for raw, ref in zip(images, refs, strict=True):
        assert_same(embed(grpc, raw), ref)
        assert_same(embed(http, raw, httpclient), ref)
    http.close()  # Triton's HTTP server waits for open connections when it stops


def test_concurrent_requests_get_their_own_results_and_are_batched(tiny_server, reference):
    # 16 different images, some with crops; one client per thread, all sent at once.
    sizes = [(300 + 37 * i, 300 + 11 * i) if i % 3 else (800 + 20 * i, 520) for i in range(16)]
    images = [image_bytes(w, h, 100 + i) for i, (w, h) in enumerate(sizes)]
    refs = reference.embed_images(images)
    barrier = threading.Barrier(len(images))

    def one(raw: bytes):
        client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
        barrier.wait()
        return embed(client, raw)

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(one, images))
    for got, ref in zip(results, refs, strict=True):
        assert_same(got, ref)
    # The 728 tower gets exactly one view per request: a batch above 1 there can only be Triton's
    # dynamic batcher merging different requests' views.
    stats = grpcclient.InferenceServerClient(tiny_server.grpc_url).get_inference_statistics(
        C.TOWER_MODELS[728], as_json=True
    )
    batch_sizes = {int(b["batch_size"]) for b in stats["model_stats"][0].get("batch_stats", [])}
    assert batch_sizes and max(batch_sizes) > 1, batch_sizes


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")  # 144 MP of zeros: ~20 kB on the wire
    return buf.getvalue()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"this is not an image", "cannot read image"),
        (b"", "empty"),
        (image_bytes(600, 400, 7)[:300], "cannot read image"),  # truncated PNG
        (_bomb_png(), "decompression bomb"),
    ],
    ids=["corrupt", "empty", "truncated", "bomb"],
)
def test_bad_image_gets_an_error_and_the_next_request_succeeds(tiny_server, reference, raw, message):
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    with pytest.raises(InferenceServerException, match=message):
        embed(client, raw)
    good = image_bytes(320, 240, 8)
    assert_same(embed(client, good), reference.embed_images([good])[0])


def test_wrong_tensor_name_dtype_shape_get_errors(tiny_server, reference):
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    raw = image_bytes(320, 240, 9)

    def send(name: str, array: np.ndarray, dtype: str):
        inp = grpcclient.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        return client.infer(C.EMBEDDER_MODEL, [inp])

    with pytest.raises(InferenceServerException, match="pictures|image"):
        send("pictures", np.array([raw], dtype=np.object_), "BYTES")
    with pytest.raises(InferenceServerException, match="(?i)data.?type|datatype|FP32"):
        send(C.EMBEDDER_INPUT, np.zeros([1], np.float32), "FP32")
    with pytest.raises(InferenceServerException, match=r"(?i)shape|dims"):
        send(C.EMBEDDER_INPUT, np.array([raw, raw], dtype=np.object_), "BYTES")
    # A tower with a view of the wrong resolution.
    bad = grpcclient.InferInput(C.TOWER_INPUT, [1, 3, 504, 504], "FP32")
    bad.set_data_from_numpy(np.zeros([1, 3, 504, 504], np.float32))
    with pytest.raises(InferenceServerException, match=r"(?i)shape|dims"):
        client.infer(C.TOWER_MODELS[728], [bad])
    assert_same(embed(client, raw), reference.embed_images([raw])[0])


def test_server_imports_this_checkout(tiny_server):
    import step37_deploy

    here = str(Path(step37_deploy.__file__).parent)
    assert f"step37_deploy 0.1.0 at {here}" in tiny_server.log.read_text(errors="replace")


# -- serve with --api-key-file and TLS: no secret anywhere a local user reads; the drain (issue 22) ----

KEY = "s3cReT-" + "Zq81vLm0PxR4tY7w" * 2


@pytest.fixture(scope="module")
def secured(tiny_fp32, exported, tmp_path_factory):
    """``serve`` with ``--api-key-file`` and ``--tls-cert/--tls-key`` and the default stop options
    (``--exit-timeout``), 4 embedder instances and a 1 s tower queue delay (every request stays in
    flight for more than a second).  Yields (server, certificate, TLS key file)."""
    from tests.conftest import ServedEmbedder

    folder = tmp_path_factory.mktemp("secured")
    cert, tls_key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(tls_key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_key.chmod(0o600)
    key_file = folder / "api.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    artifacts = (exported[("fp32", 728)], exported[("fp32", 504)])
    args = ["--checkpoint", str(tiny_fp32), "--backend", "onnx", "--artifacts", *map(str, artifacts)]
    args += ["--preprocess-instances", "4", "--max-queue-delay-us", "1000000", "--queue-timeout-ms", "60000"]
    args += ["--api-key-file", str(key_file), "--tls-cert", str(cert), "--tls-key", str(tls_key)]
    context = ssl.create_default_context(cafile=str(cert))

    def ready(ports: dict[str, int]) -> bool:
        return _https(ports["http"], f"/v2/models/{C.EMBEDDER_MODEL}/ready", context)[0] == 200

    proc, ports = start_serve(args, folder / "serve.log", ready=ready)
    try:
        served = ServedEmbedder(
            proc, ports["http"], ports["grpc"], ports["metrics"], tiny_fp32, artifacts, folder / "serve.log"
        )
        yield served, cert, tls_key
    finally:
        stop_serve(proc)


@pytest.fixture(scope="module")
def secured_reference(secured):
    from step37_deploy.runtime import VisionEmbedder

    served = secured[0]
    return VisionEmbedder.from_artifacts(served.checkpoint, "onnx", served.artifacts)


def _https(port: int, path: str, context, body: bytes | None = None, headers: dict | None = None):
    """(status, body) of one HTTPS request on a new connection; errors are answers too, (0, b"")
    when nothing answers."""
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _keyed_grpc(served, cert: Path):
    return grpcclient.InferenceServerClient(served.grpc_url, ssl=True, root_certificates=str(cert))


def _embed_keyed(client, raw: bytes):
    inp = grpcclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
    inp.set_data_from_numpy(np.array([raw], dtype=np.object_))
    res = client.infer(C.EMBEDDER_MODEL, [inp], headers={"x-api-key": KEY}, client_timeout=60)
    return tuple(res.as_numpy(name) for name in C.EMBEDDER_OUTPUTS)


def _serve_tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _raw_http(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> int:
    """The status of one HTTP/1.1 request sent byte for byte (header values as given, newlines
    included: urllib would refuse them); 0 when the connection closes without an answer."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            data += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else 0


def test_no_secret_on_any_command_line_or_environment_of_the_serve_tree(secured):
    """Every process of ``serve`` (itself, tritonserver, its stubs, nginx's master and workers):
    neither the API key nor the TLS private key is in its command line or environment, no
    credential-like variable was added to the environment it inherited, and Triton's restricted
    APIs are locked with a value no client can send (a newline), not opened by a key."""
    served, _cert, tls_key = secured
    assert served.proc.poll() is None, "the drain test stops this server: run it last"
    tree = _serve_tree(served.proc.pid)
    names = [p.name() for p in tree]
    assert "tritonserver" in names and names.count("nginx") >= 2, names
    assert sum(n.startswith("triton_python") for n in names) >= 6, names  # 2 towers + 4 embedders
    pem = tls_key.read_text().splitlines()
    secrets = [KEY.encode(), *(line.encode() for line in pem if len(line) >= 32)]
    assert len(secrets) > 10
    inherited = set(os.environ)
    for p in tree:
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        for secret in secrets:
            assert secret not in cmdline and secret not in environ, (p.pid, names[tree.index(p)])
        added = {e.split(b"=", 1)[0].decode() for e in environ.split(b"\0") if e} - inherited
        assert not [n for n in added if re.search(r"(?i)key|token|secret|pass|cred|auth", n)], (p.pid, added)
        for arg in cmdline.split(b"\0"):
            assert b"admin-key" not in arg
            if arg.startswith((b"--http-restricted-api=", b"--grpc-restricted-protocol=")):
                assert b"\n" in arg.split(b"=", 2)[2], arg  # the lock's value: no client can send it


def _lock_headers(triton_cmdline: list[str]) -> list[tuple[str, str]]:
    """Every (header, value) a local process can read off Triton's restricted-API flags, and the
    values a client could send in their place (the value cut at its newline, the newline made a
    space or removed)."""
    out = []
    for arg in triton_cmdline:
        if arg.startswith(("--http-restricted-api=", "--grpc-restricted-protocol=")):
            name, _, value = arg.split(":", 1)[1].partition("=")
            for v in (value, value.split("\n")[0], value.replace("\n", " "), value.replace("\n", "")):
                out.append((name, v))
    return sorted(set(out))


def test_code_upload_on_tritons_loopback_ports_fails_with_all_a_local_process_reads(
    secured, secured_reference, tmp_path
):
    """With Triton's ports and every header name and value parsed from its command line: load with
    uploaded ``model.py`` and with a config override, unload, and registering shared memory are all
    refused, over HTTP and gRPC; the served models stay ready and answer correctly after."""
    from multiprocessing import shared_memory

    served, cert, _ = secured
    (triton,) = [p for p in _serve_tree(served.proc.pid) if p.name() == "tritonserver"]
    flags = dict(a[2:].split("=", 1) for a in triton.cmdline() if a.startswith("--") and "=" in a)
    http_port, grpc_port = int(flags["http-port"]), int(flags["grpc-port"])
    lock = _lock_headers(triton.cmdline())
    assert lock, "no restricted-API flag on tritonserver's command line"
    marker = tmp_path / "uploaded-code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    upload = {"parameters": {"config": EVIL_CONFIG, "file:1/model.py": base64.b64encode(code.encode()).decode()}}
    override = {"parameters": {"config": json.dumps({"instance_group": [{"count": 6, "kind": "KIND_CPU"}]})}}
    region = shared_memory.SharedMemory(create=True, size=4096)
    try:
        region.buf[:] = bytes(range(256)) * 16
        shm = {"key": f"/{region.name}", "offset": 0, "byte_size": 4096}
        attempts = [
            ("/v2/repository/models/evil/load", upload),
            (f"/v2/repository/models/{C.EMBEDDER_MODEL}/load", override),
            (f"/v2/repository/models/{C.EMBEDDER_MODEL}/unload", {}),
            ("/v2/systemsharedmemory/region/x/register", shm),
        ]
        for path, body in attempts:
            for header in [None, *lock]:
                status = _raw_http(http_port, "POST", path, [header] if header else [], json.dumps(body).encode())
                # A raw newline ends the header line: what follows is malformed (400, or Triton
                # closes the connection without an answer: 0).
                allowed = {0, 400, 403} if header and "\n" in header[1] else {403}
                assert status in allowed, (path, header, status)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        calls = [
            lambda h: client.load_model("evil", h, EVIL_CONFIG, {"file:1/model.py": code.encode()}),
            lambda h: client.load_model(C.EMBEDDER_MODEL, h, override["parameters"]["config"]),
            lambda h: client.unload_model(C.EMBEDDER_MODEL, h),
            lambda h: client.register_system_shared_memory("x", f"/{region.name}", 4096, headers=h),
        ]
        grpc_headers = [None, *({n: v} for n, v in lock), *({f"triton-grpc-protocol-{n}": v} for n, v in lock)]
        for call in calls:
            for headers in grpc_headers:
                with pytest.raises(InferenceServerException) as exc:
                    call(headers)
                if headers and "\n" in next(iter(headers.values())):
                    continue  # the client refuses to send it
                assert "UNAVAILABLE" in str(exc.value.status()) and "restricted" in str(exc.value), (headers, exc.value)
        time.sleep(1)
        assert not marker.exists()
        assert bytes(region.buf) == bytes(range(256)) * 16
    finally:
        region.close()
        region.unlink()
    assert _raw_http(http_port, "GET", "/v2/models/evil/ready", []) != 200
    assert _raw_http(http_port, "GET", f"/v2/models/{C.EMBEDDER_MODEL}/ready", []) == 200
    raw = image_bytes(900, 600, 31)
    assert_same(_embed_keyed(_keyed_grpc(served, cert), raw), secured_reference.embed_images([raw])[0])
    config = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").get_model_config(C.EMBEDDER_MODEL, as_json=True)
    assert [int(g["count"]) for g in config["config"]["instance_group"]] == [4]  # not the override's 6


def test_sigterm_at_concurrency_8_answers_every_request_and_stops_within_25s(secured, secured_reference):
    """8 requests in flight through the gateway (gRPC over TLS, with the key), then SIGTERM to
    serve: readiness answers 503 within 1 s; a new request is refused at once (gRPC UNAVAILABLE,
    HTTP 503), not queued or hung; all 8 are answered correctly; serve exits 0 with the default stop
    options in less than 25 s (Kubernetes' grace period is 30 s) and removes its work folder."""
    from step37_deploy.serving.server import stop_bound_s

    assert stop_bound_s() < 25  # the sum of the bounded waits, read from the code
    served, cert, _ = secured
    context = ssl.create_default_context(cafile=str(cert))
    repo = Path(re.search(r"repository (\S+/model_repository)", served.log.read_text()).group(1))
    images = [image_bytes(900 + 20 * i, 600 + 10 * i, 200 + i) for i in range(8)]  # each with crops
    refs = secured_reference.embed_images(images)
    got: dict[int, object] = {}

    def send(i: int) -> None:
        try:
            got[i] = (_embed_keyed(_keyed_grpc(served, cert), images[i]), time.monotonic())
        except Exception as exc:  # reported by the assertion below
            got[i] = (exc, time.monotonic())

    assert _https(served.http_port, "/v2/health/ready", context)[0] == 200
    warm = [image_bytes(900, 600, 190 + i) for i in range(4)]  # every embedder instance's first request is slow
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda raw: _embed_keyed(_keyed_grpc(served, cert), raw), warm))
    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.6)  # sent; 4 executing (each waits >= 1 s for its tower batch), 4 queued behind them
    assert all(t.is_alive() for t in threads), "the requests must still be in flight at the signal"
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    not_ready_after = None
    while time.monotonic() - signalled < 5:
        if _https(served.http_port, "/v2/health/ready", context)[0] == 503:
            not_ready_after = time.monotonic() - signalled
            break
        time.sleep(0.1)
    assert not_ready_after is not None and not_ready_after < 1.0, not_ready_after
    client = _keyed_grpc(served, cert)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        client.is_server_ready()
    refused_at = time.monotonic()
    with pytest.raises(InferenceServerException, match="shutting down") as exc:
        _embed_keyed(client, image_bytes(300, 300, 13))
    assert "UNAVAILABLE" in str(exc.value.status())
    status, body = _https(served.http_port, f"/v2/models/{C.EMBEDDER_MODEL}/infer", context, b"{}", {"x-api-key": KEY})
    assert status == 503 and "shutting down" in json.loads(body)["error"]
    assert time.monotonic() - refused_at < 5  # refused at once, not queued behind the drain
    for t in threads:
        t.join(60)
    for i, ref in enumerate(refs):
        answer, done = got[i]
        assert not isinstance(answer, Exception), (i, str(answer), done - signalled)
        assert_same(answer, ref)
        assert done > signalled  # it was in flight when the signal came
    assert served.proc.wait(30) == 0
    took = time.monotonic() - signalled
    print(
        f"\nreadiness 503 after {not_ready_after:.2f} s; stop with the default options {took:.1f} s "
        f"(bound {stop_bound_s():.1f} s)"
    )
    assert took < 25
    text = served.log.read_text(errors="replace")
    assert re.search(r"in-flight requests done after [0-9.]+s; stopping tritonserver", text)
    assert "step37-deploy: error" not in text
    # Triton may exit with status 1 when its models' unloading outlasts its exit timeout (nothing is
    # in flight by then: every request was answered); serve still stops with 0.
    assert re.search(r"^INFO \S+: stopped( cleanly)?$", text, re.M)
    assert not repo.exists() and not repo.parent.exists()
