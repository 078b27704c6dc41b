"""``serve`` is safe to expose (issue 15) and its gateway bounds what one client can cost (issue 16).

Three real services, all on loopback:

* the session ``tiny_server`` (default flags): no network client can load code, unload or
  reconfigure a model, register shared memory or change logging/trace settings, neither through
  the gateway nor on Triton's own loopback ports (its restricted APIs, the only layer under
  ``--no-gateway``);
* ``keyed``, one per module: ``--api-key-file``, ``--max-connections 8``, ``--idle-timeout-s 4``:
  the key over both protocols, compressed and oversized bodies, 2,000 idle connections, the
  in-flight bound, the idle timeout;
* ``tls``, one per module: ``--tls-cert/--tls-key``, HTTPS and gRPC over TLS.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pwd
import re
import resource
import select
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EVIL_CONFIG, rel_l2, start_serve, stop_serve

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the [serve] extra (tritonclient) is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="the [serve] extra (tritonclient) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from step37_deploy.errors import ServerError  # noqa: E402
from step37_deploy.serving import contract as C  # noqa: E402
from step37_deploy.serving.client import EmbedClient  # noqa: E402
from step37_deploy.serving.gateway import find_nginx  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (apt-get install -y nginx)"),
]
SERVED = (*C.TOWER_MODELS.values(), C.EMBEDDER_MODEL)
INFER = f"/v2/models/{C.EMBEDDER_MODEL}/infer"


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def triton_ports(log: Path) -> dict[str, int]:
    """Triton's own loopback ports behind the gateway, from serve's log."""
    m = re.search(r"-> Triton on 127\.0\.0\.1 ports http (\d+), grpc (\d+), metrics (\d+)", log.read_text())
    assert m, "serve's log does not name Triton's ports"
    return dict(zip(("http", "grpc", "metrics"), map(int, m.groups()), strict=True))


def http(port: int, path: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, body) of one plain HTTP request; errors are answers too."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_status(sock: socket.socket, timeout: float = 10.0) -> int:
    """The status code of the response waiting on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    assert m, f"no HTTP response: {data[:200]!r}"
    return int(m.group(1))


def raw_answer(sock: socket.socket, timeout: float = 10.0) -> tuple[int, object]:
    """(status, JSON body) of the response waiting on ``sock`` (its Content-Length)."""
    status, _head, body = raw_reply(sock, timeout)
    return status, body


def raw_reply(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes, object]:
    """(status, header block, JSON body) of the response waiting on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"no complete HTTP response: {data[:200]!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return int(head[9:12]), head, json.loads(body[:length])


def same(got, ref) -> None:
    assert got.token_ids == ref.token_ids and got.num_crops == ref.num_crops
    assert rel_l2(got.features, ref.features) <= 1e-5


def both_layers(server) -> list[tuple[str, int, int, str]]:
    """(what, HTTP port, gRPC port, the gRPC refusal): the gateway's and Triton's own (whose
    restricted protocols answer UNAVAILABLE)."""
    t = triton_ports(server.log)
    return [
        ("gateway", server.http_port, server.grpc_port, "PERMISSION_DENIED"),
        ("triton", t["http"], t["grpc"], "UNAVAILABLE.*restricted"),
    ]


# -- default serve: nothing a client sends changes the server (tiny_server) ---------------------------


def test_code_upload_is_refused_and_never_runs(tiny_server, tmp_path):
    marker = tmp_path / "uploaded-code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    code += "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    body = json.dumps(
        {"parameters": {"config": EVIL_CONFIG, "file:1/model.py": base64.b64encode(code.encode()).decode()}}
    ).encode()
    for what, http_port, grpc_port, refusal in both_layers(tiny_server):
        status, answer = http(http_port, "/v2/repository/models/evil/load", body)
        assert status == 403, (what, status, answer)
        with pytest.raises(InferenceServerException, match=refusal):
            grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").load_model(
                "evil", config=EVIL_CONFIG, files={"file:1/model.py": code.encode()}
            )
    time.sleep(1)
    assert not marker.exists()
    assert http(tiny_server.http_port, "/v2/models/evil/ready")[0] != 200


def test_unload_and_reconfigure_are_refused(tiny_server):
    configs = {m: http(tiny_server.http_port, f"/v2/models/{m}/config") for m in SERVED}
    assert all(status == 200 for status, _ in configs.values())
    override = json.dumps(
        {"parameters": {"config": json.dumps({"instance_group": [{"count": 6, "kind": "KIND_CPU"}]})}}
    )
    for what, http_port, grpc_port, refusal in both_layers(tiny_server):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for m in SERVED:
            assert http(http_port, f"/v2/repository/models/{m}/unload", b"{}")[0] == 403, what
            assert http(http_port, f"/v2/repository/models/{m}/load", override.encode())[0] == 403, what
            with pytest.raises(InferenceServerException, match=refusal):
                client.unload_model(m)
            with pytest.raises(InferenceServerException, match=refusal):
                client.load_model(m, config=json.dumps({"instance_group": [{"count": 6, "kind": "KIND_CPU"}]}))
        assert http(http_port, "/v2/repository/index", b"{}")[0] == 403, what
    for m in SERVED:
        assert http(tiny_server.http_port, f"/v2/models/{m}/ready")[0] == 200
        assert http(tiny_server.http_port, f"/v2/models/{m}/config") == configs[m]


def test_registering_an_existing_shared_memory_region_is_refused(tiny_server):
    region = shared_memory.SharedMemory(create=True, size=4096)
    try:
        region.buf[:] = bytes(range(256)) * 16
        before = bytes(region.buf)
        body = json.dumps({"key": f"/{region.name}", "offset": 0, "byte_size": 4096}).encode()
        for what, http_port, grpc_port, refusal in both_layers(tiny_server):
            assert http(http_port, "/v2/systemsharedmemory/region/x/register", body)[0] == 403, what
            assert http(http_port, "/v2/cudasharedmemory/region/x/register", b"{}")[0] == 403, what
            with pytest.raises(InferenceServerException, match=refusal):
                grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").register_system_shared_memory(
                    "x", f"/{region.name}", 4096
                )
        # An inference asking for its output in that region: the region is unknown to the server.
        inp = grpcclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
        inp.set_data_from_numpy(np.array([png(320, 240, 1)], dtype=np.object_))
        out = grpcclient.InferRequestedOutput(C.EMBEDDER_OUTPUTS[0])
        out.set_shared_memory("x", 4096)
        with pytest.raises(InferenceServerException):
            grpcclient.InferenceServerClient(tiny_server.grpc_url).infer(C.EMBEDDER_MODEL, [inp], outputs=[out])
        assert bytes(region.buf) == before
    finally:
        region.close()
        region.unlink()


def test_logging_and_trace_settings_are_refused(tiny_server):
    for what, http_port, grpc_port, refusal in both_layers(tiny_server):
        assert http(http_port, "/v2/logging", json.dumps({"log_verbose_level": 10}).encode())[0] == 403, what
        assert http(http_port, "/v2/trace/setting", json.dumps({"trace_level": ["TIMESTAMPS"]}).encode())[0] == 403
        path = f"/v2/models/{C.EMBEDDER_MODEL}/trace/setting"
        assert http(http_port, path, json.dumps({"trace_level": ["TIMESTAMPS"]}).encode())[0] == 403, what
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException, match=refusal):
            client.update_log_settings({"log_verbose_level": 10})
        with pytest.raises(InferenceServerException, match=refusal):
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    # Streaming and generate endpoints are not served; the gateway answers as Triton would (JSON / gRPC status).
    status, answer = http(tiny_server.http_port, f"/v2/models/{C.EMBEDDER_MODEL}/generate", b"{}")
    assert status == 403 and json.loads(answer) == {"error": "this API is not served"}
    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    errors: list = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    inp = grpcclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
    inp.set_data_from_numpy(np.array([png(320, 240, 2)], dtype=np.object_))
    with contextlib.suppress(InferenceServerException):  # the stream may be refused before this request
        client.async_stream_infer(C.EMBEDDER_MODEL, [inp])
    client.stop_stream()
    assert errors and errors[0] is not None and "PERMISSION_DENIED" in str(errors[0].status()), errors
    # What stays open: health, metadata, statistics, metrics; nothing else answers on the metrics port.
    assert http(tiny_server.http_port, "/v2/health/live")[0] == 200
    assert http(tiny_server.http_port, "/v2")[0] == 200
    assert http(tiny_server.http_port, f"/v2/models/{C.EMBEDDER_MODEL}/stats")[0] == 200
    assert http(tiny_server.metrics_port, "/metrics")[0] == 200
    assert http(tiny_server.metrics_port, "/v2/health/live")[0] == 403


#: Raw URIs that nginx normalises to an allowlisted location while Triton gets them unchanged (the
#: gateway passes the raw URI on): only the gateway's raw-URI check refuses them.
PATH_TRICKS = [
    ("GET", "/v2/repository/index/../../health/live"),
    ("GET", f"/v2/repository/models/{C.EMBEDDER_MODEL}/../../../models/{C.EMBEDDER_MODEL}/ready"),
    ("GET", "/v2/%68ealth/live"),
    ("GET", "/v2/health/./live"),
    ("GET", "/v2//health/live"),
    ("POST", f"/v2/repository/models/evil/load/../../../../models/{C.EMBEDDER_MODEL}/infer"),
]


@pytest.mark.parametrize(("method", "path"), PATH_TRICKS)
def test_uris_nginx_would_normalise_are_refused_by_the_gateway(tiny_server, method, path):
    with socket.create_connection(("127.0.0.1", tiny_server.http_port)) as s:
        body = b"{}" if method == "POST" else b""
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, answer = raw_answer(s)
    assert (status, answer) == (400, {"error": "bad request"}), (path, status, answer)


# -- refused at start ---------------------------------------------------------------------------------


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "step37_deploy.cli", "serve", "--backend", "torch", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_key_files_and_no_gateway_key_are_refused(tiny_fp32, tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 32 + "\n")
    cases = {"mode": (0o644, "readable by group or others"), "empty": (0o600, "empty"), "missing": (None, "cannot")}
    for name, (mode, message) in cases.items():
        f = tmp_path / name
        if mode is not None:
            f.write_text("" if name == "empty" else "k" * 32)
            f.chmod(mode)
        r = serve_cli("--checkpoint", str(tiny_fp32), "--api-key-file", str(f))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    key.chmod(0o600)
    r = serve_cli("--checkpoint", str(tiny_fp32), "--api-key-file", str(key), "--no-gateway")
    assert r.returncode == 2 and "--no-gateway" in r.stderr and "k" * 32 not in r.stderr, r.stderr


def test_a_tls_key_readable_by_others_is_refused(tiny_fp32, cert, tmp_path):
    """As the API key file: a private key that group or others may read is refused (exit 2, one
    line), with and without the gateway."""
    loose = tmp_path / "key.pem"
    loose.write_bytes(cert[1].read_bytes())
    for mode in (0o640, 0o604):
        loose.chmod(mode)
        for extra in ((), ("--no-gateway",)):
            r = serve_cli("--checkpoint", str(tiny_fp32), "--tls-cert", str(cert[0]), "--tls-key", str(loose), *extra)
            assert r.returncode == 2 and "--tls-key" in r.stderr and "chmod 600" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_serve_refuses_to_start_without_nginx(tiny_fp32, monkeypatch):
    from step37_deploy.errors import BackendUnavailable
    from step37_deploy.serving import gateway
    from step37_deploy.serving.server import serve

    monkeypatch.setattr(gateway, "nginx_version", lambda path: (1, 18, 0))  # Ubuntu 22.04's
    with pytest.raises(BackendUnavailable, match=r"nginx 1\.18\.0; the gateway needs 1\.19\.7 or later"):
        serve(tiny_fp32, "torch")
    monkeypatch.setattr(gateway, "find_nginx", lambda: None)
    with pytest.raises(BackendUnavailable, match=r"apt-get install -y nginx.*--no-gateway"):
        serve(tiny_fp32, "torch")


# -- the API key and the limits (keyed) ----------------------------------------------------------------

KEY = "k3Y-" + "0123456789aBcDeF" * 3  # mixed case: its lower-, upper- and swapped-case forms all differ


@pytest.fixture(scope="module")
def keyed(tiny_fp32, exported, tmp_path_factory):
    from tests.conftest import ServedEmbedder

    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "api.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    artifacts = (exported[("fp32", 728)], exported[("fp32", 504)])
    args = ["--checkpoint", str(tiny_fp32), "--backend", "onnx", "--artifacts", *map(str, artifacts)]
    args += ["--preprocess-instances", "2", "--cache-mb", "0", "--exit-timeout", "10", "--api-key-file", str(key_file)]
    args += ["--max-connections", "8", "--idle-timeout-s", "4"]
    log = folder / "serve.log"
    proc, ports = start_serve(args, log)
    try:
        yield ServedEmbedder(proc, ports["http"], ports["grpc"], ports["metrics"], tiny_fp32, artifacts, log)
    finally:
        stop_serve(proc)


@pytest.fixture(scope="module")
def tiny_reference(tiny_server):
    from step37_deploy.runtime import VisionEmbedder

    return VisionEmbedder.from_artifacts(tiny_server.checkpoint, "onnx", tiny_server.artifacts)


@pytest.fixture(scope="module")
def reference(tiny_fp32, exported):
    from step37_deploy.runtime import VisionEmbedder

    return VisionEmbedder.from_artifacts(tiny_fp32, "onnx", (exported[("fp32", 728)], exported[("fp32", 504)]))


def test_api_key_is_required_for_inference_and_metadata_not_health(keyed, reference):
    images = [png(900, 600, 3), png(300, 300, 4)]
    refs = reference.embed_images(images)
    for protocol, url in (("grpc", keyed.grpc_url), ("http", keyed.http_url)):
        with EmbedClient(url, protocol, api_key=KEY) as client:
            for raw, ref in zip(images, refs, strict=True):
                same(client.embed(raw), ref)
        # HTTP/1.1 takes the spaces around a header value as syntax (RFC 9110 5.5), not as part
        # of the key; a gRPC metadata value keeps them.
        spaced = [f" {KEY} "] if protocol == "grpc" else []
        for wrong in (None, KEY[:-1] + "X", KEY.swapcase(), KEY.lower(), KEY.upper(), KEY[:-1], KEY + "0", *spaced):
            with EmbedClient(url, protocol, api_key=wrong) as client, pytest.raises(ServerError) as exc:
                client.embed(images[1])
            cause = exc.value.__cause__
            assert "x-api-key" in str(exc.value) or "401" in str(exc.value), exc.value
            if protocol == "grpc":
                assert cause.status() == "StatusCode.UNAUTHENTICATED", cause
            assert KEY not in str(exc.value)
    # Health and readiness are open; metadata, config and statistics are not.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{C.EMBEDDER_MODEL}/ready"):
        assert http(keyed.http_port, path)[0] == 200, path
    for path in ("/v2", f"/v2/models/{C.EMBEDDER_MODEL}", f"/v2/models/{C.EMBEDDER_MODEL}/config", "/v2/models/stats"):
        assert http(keyed.http_port, path)[0] == 401, path
        assert http(keyed.http_port, path, headers={"x-api-key": KEY})[0] == 200, path
    # Metrics: the same key, as x-api-key or as Prometheus' bearer token.
    assert http(keyed.metrics_port, "/metrics")[0] == 401
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert http(keyed.metrics_port, "/metrics", headers=headers)[0] == 200, headers
    for headers in ({"x-api-key": KEY.upper()}, {"Authorization": f"Bearer {KEY.swapcase()}"}, {"Authorization": KEY}):
        assert http(keyed.metrics_port, "/metrics", headers=headers)[0] == 401, headers
    g = grpcclient.InferenceServerClient(keyed.grpc_url)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(C.EMBEDDER_MODEL)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        g.get_model_metadata(C.EMBEDDER_MODEL)
    assert g.get_model_metadata(C.EMBEDDER_MODEL, headers={"x-api-key": KEY}).name == C.EMBEDDER_MODEL


def test_keys_are_in_no_log_no_command_line_and_the_config_is_private(keyed):
    text = keyed.log.read_text(errors="replace")
    assert KEY not in text
    assert "admin-key" not in text and "--model-control-mode=none" in text  # Triton holds no key either
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if KEY.encode() in cmdline.read_bytes():
                found.append(cmdline)
    assert not found
    repo = Path(re.search(r"repository (\S+/model_repository)", text).group(1))
    conf = repo.parent / "gateway" / "nginx.conf"
    # 0710 as root: the workers' group (nobody's) may pass through to the gateway's counts, no more.
    workdir_mode = 0o710 if os.geteuid() == 0 else 0o700
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and stat.S_IMODE(repo.parent.stat().st_mode) == workdir_mode
    assert not any(KEY.encode() in f.read_bytes() for f in repo.rglob("*") if f.is_file())


def test_gateway_workers_run_unprivileged(keyed):
    """nginx's workers, which parse what clients send, never run as root: as root, serve gives
    them the user nobody; otherwise they are serve's own user."""
    import psutil

    nginx = [p for p in psutil.Process(keyed.proc.pid).children(recursive=True) if p.name() == "nginx"]
    workers = [p for p in nginx if "worker process" in " ".join(p.cmdline())]
    assert workers and len(workers) < len(nginx), [p.cmdline() for p in nginx]
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    assert {w.uids().real for w in workers} == {expected} and {w.uids().effective for w in workers} == {expected}


def test_loadtest_with_an_api_key_file(keyed, tmp_path):
    from step37_deploy.serving.loadtest import LoadtestOptions, run_loadtest

    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(png(400 + 100 * i, 300, 20 + i))
    opts = LoadtestOptions(
        url=keyed.grpc_url,
        images=[tmp_path],
        checkpoint=keyed.checkpoint,
        protocol="grpc",
        api_key_file=key_file,
        artifacts=keyed.artifacts,
        concurrency=[2],
        requests=4,
        warmup=1,
        metrics_url=f"127.0.0.1:{keyed.metrics_port}",
    )
    report = run_loadtest(opts, progress=False)
    assert report.ok and report.runs[0].server.requests == 4
    assert report.runs[0].models, "the metrics port's key: loadtest sends the same one"


def descendants_rss(pid: int) -> int:
    import psutil

    total = 0
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class Background:
    """A client embedding one image over and over (and RSS sampled) while the test does its worst.
    ``fresh``: a new connection per request (else one kept-alive connection throughout)."""

    def __init__(self, server, reference, api_key: str | None = None, fresh: bool = False) -> None:
        self.image = png(500, 400, 30)
        self.ref = reference.embed_images([self.image])[0]
        self.server, self.api_key, self.fresh = server, api_key, fresh
        self.done, self.answers, self.errors = threading.Event(), 0, []
        self.base = self.peak = descendants_rss(server.proc.pid)
        self.threads = [threading.Thread(target=self._client), threading.Thread(target=self._rss)]

    def _client(self) -> None:
        with EmbedClient(self.server.grpc_url, "grpc", api_key=self.api_key) as client:
            while not self.done.is_set():
                try:
                    same(client.embed(self.image), self.ref)
                    self.answers += 1
                except Exception as exc:  # collected, asserted below
                    self.errors.append(exc)
                if self.fresh:
                    client.close()
                time.sleep(0.05)

    def _rss(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, descendants_rss(self.server.proc.pid))
            time.sleep(0.05)

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors and self.answers > 0, (self.answers, self.errors[:3])


def test_compressed_and_oversized_bodies_are_refused(keyed, reference):
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    mib = bytes(2**20)
    gz = b"".join(zeros.compress(mib) for _ in range(512)) + zeros.flush()  # 512 MiB of zeros, ~0.5 MiB
    assert len(gz) < 2**20
    headers = {"x-api-key": KEY, "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}
    with Background(keyed, reference, KEY) as bg:
        for encoding in ("gzip", "deflate", "br"):
            status, _ = http(keyed.http_port, INFER, gz, {**headers, "Content-Encoding": encoding})
            assert status == 415, (encoding, status)
        g = grpcclient.InferenceServerClient(keyed.grpc_url)
        inp = grpcclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
        inp.set_data_from_numpy(np.array([png(320, 240, 5)], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
            g.infer(C.EMBEDDER_MODEL, [inp], headers={"x-api-key": KEY}, compression_algorithm="gzip")
        # 300 MB announced: refused from the header, before one byte of the body is sent.
        with socket.create_connection(("127.0.0.1", keyed.http_port)) as s:
            s.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Length: 300000000\r\n\r\n".encode()
            )
            assert raw_status(s) == 413
        # 300 MB streamed (chunked, no length): refused once past the limit (64 MiB), not buffered whole.
        sent = 0
        with socket.create_connection(("127.0.0.1", keyed.http_port)) as s:
            s.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            )
            chunk = b"%x\r\n" % len(mib) + mib + b"\r\n"
            with contextlib.suppress(OSError):
                while sent < 300 * 2**20 and not select.select([s], [], [], 0)[0]:
                    s.sendall(chunk)
                    sent += len(mib)
            assert raw_status(s) == 413
        assert sent < 128 * 2**20, sent
    assert bg.peak - bg.base < 2**30, (bg.base, bg.peak)


def hold_idle_connections(server, reference, n: int, api_key: str | None, fresh: bool) -> list[str]:
    """``n`` idle connections (half HTTP, half gRPC) while another client embeds, health answers and
    new clients over both protocols get correct answers; returns serve's new log lines."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n + 1024, hard), hard))
    lines_before = len(server.log.read_text(errors="replace").splitlines())
    idle: list[socket.socket] = []
    try:
        with Background(server, reference, api_key, fresh):
            for i in range(n):
                idle.append(socket.create_connection(("127.0.0.1", (server.http_port, server.grpc_port)[i % 2])))
            time.sleep(1.0)
            assert http(server.http_port, "/v2/health/ready")[0] == 200
            raw = png(640, 480, 31)
            ref = reference.embed_images([raw])[0]
            for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                with EmbedClient(url, protocol, api_key=api_key) as client:
                    same(client.embed(raw), ref)
            time.sleep(1.0)
    finally:
        for s in idle:
            s.close()
    return server.log.read_text(errors="replace").splitlines()[lines_before:]


def test_2000_idle_connections_neither_block_others_nor_flood_the_log(tiny_server, tiny_reference):
    """Default limits (--max-connections 1024: room for 2,112 connections): all held, nobody waits."""
    new = hold_idle_connections(tiny_server, tiny_reference, 2000, None, fresh=False)
    assert len(new) < 20 and not any("Too many open files" in line for line in new), new[:20]


def gateway_config(server) -> str:
    """The nginx.conf of a running serve (its work folder is named in the log)."""
    repo = Path(re.search(r"repository (\S+/model_repository)", server.log.read_text(errors="replace")).group(1))
    return (repo.parent / "gateway" / "nginx.conf").read_text()


def test_idle_connections_beyond_the_budget_are_recycled(keyed, reference):
    """Past every worker's budget (--max-connections 8: the floor of 1,024 connections a worker),
    nginx closes the oldest idle connections to accept new ones, and says so at most once a second."""
    conf = gateway_config(keyed)
    workers = int(re.search(r"worker_processes (\d+);", conf).group(1))
    budget = workers * int(re.search(r"worker_connections (\d+);", conf).group(1))
    new = hold_idle_connections(keyed, reference, budget + 600 * workers, KEY, fresh=True)
    assert len(new) < 20 and not any("Too many open files" in line for line in new), new[:20]
    assert any("worker_connections are not enough, reusing connections" in line for line in new), new


def connect_from(address: str, port: int) -> socket.socket:
    """A connection to the gateway from another loopback address (Linux routes 127/8 to lo)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((address, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_more_than_max_connections_in_flight_are_refused(keyed, reference):
    """--max-connections 8 in flight per port, at most 4 (an eighth, at least 4) from one address:
    requests whose body never comes hold a slot each."""
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
    held = []
    try:
        for address in ("127.0.0.2",) * 4 + ("127.0.0.3",) * 4:
            held.append(connect_from(address, keyed.http_port))
            held[-1].sendall(head)
        time.sleep(0.5)
        for address in ("127.0.0.2", "127.0.0.4"):  # the first one's own bound; then every slot taken
            with connect_from(address, keyed.http_port) as s:
                s.sendall(head)
                status, headers, body = raw_reply(s)  # says when to come back (issue 22 item 20)
                assert status == 503 and re.search(rb"(?i)\r\nretry-after: 1(\r\n|$)", headers), (address, headers)
                assert body == {"error": "too many requests in flight; retry after 1 s"}, body
        assert http(keyed.http_port, "/v2/health/ready")[0] == 200  # probes are not counted
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    raw = png(320, 240, 32)
    with EmbedClient(keyed.http_url, "http", api_key=KEY) as client:
        same(client.embed(raw), reference.embed_images([raw])[0])


def gateway_counts(port: int) -> dict[tuple[str, str, str], float]:
    """``step37_gateway_responses_total`` by (listener, code, outcome), as the metrics port serves it."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http(port, "/metrics/gateway", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, body[:200]
    families = text_string_to_metric_families(body.decode())
    samples = [s for f in families for s in f.samples if s.name == "step37_gateway_responses_total"]
    return {(s.labels["listener"], s.labels["code"], s.labels["outcome"]): s.value for s in samples}


def counted_since(port: int, before: dict, expected: dict, within_s: float = 5.0) -> dict:
    """What the gateway counted since ``before``, once it reaches ``expected`` (written at most a
    second after the answers) or ``within_s`` passes."""
    deadline = time.monotonic() + within_s
    while True:
        now = gateway_counts(port)
        delta = {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}
        if all(delta.get(k, 0) >= v for k, v in expected.items()) or time.monotonic() > deadline:
            return delta
        time.sleep(0.2)


def test_the_gateways_refusals_are_counted_exactly_behind_the_metrics_key(keyed):
    """Issue 22 item 20: the 401s (HTTP, gRPC, the metrics port) and the per-client 503s this
    test provokes are each counted once in ``step37_gateway_responses_total`` on
    ``/metrics/gateway``, which needs the key as ``/metrics`` does."""
    before = gateway_counts(keyed.metrics_port)
    assert http(keyed.metrics_port, "/metrics/gateway")[0] == 401
    assert http(keyed.metrics_port, "/metrics/gateway", headers={"x-api-key": KEY.swapcase()})[0] == 401
    for _ in range(3):
        assert http(keyed.http_port, INFER, body=b"{}")[0] == 401
    g = grpcclient.InferenceServerClient(keyed.grpc_url)
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            g.get_model_metadata(C.EMBEDDER_MODEL)
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
    held = []
    try:
        for _ in range(4):  # --max-connections 8: 4 in flight from one address
            held.append(connect_from("127.0.0.5", keyed.http_port))
            held[-1].sendall(head)
        time.sleep(0.5)
        for _ in range(2):
            with connect_from("127.0.0.5", keyed.http_port) as s:
                s.sendall(head)
                assert raw_reply(s)[0] == 503
    finally:
        for s in held:
            s.close()
    expected = {
        ("metrics", "401", "client_error"): 2,
        ("http", "401", "client_error"): 3,
        ("grpc", "16", "client_error"): 2,  # UNAUTHENTICATED
        ("http", "503", "refused"): 2,
    }
    delta = counted_since(keyed.metrics_port, before, expected)
    assert {k: delta.get(k, 0) for k in expected} == expected, delta
    assert sum(v for k, v in delta.items() if k[2] == "refused") == 2, delta


def test_idle_connections_are_closed_after_the_idle_timeout(keyed):
    for request in (b"", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", keyed.http_port)) as s:
            start = time.monotonic()
            s.sendall(request)
            if request:
                assert raw_status(s) == 200
            s.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):
                    pass
            elapsed = time.monotonic() - start
        assert 3.0 <= elapsed <= 10.0, (request, elapsed)  # --idle-timeout-s 4


# -- TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl; the `cryptography` package is not a dependency)."""
    folder = tmp_path_factory.mktemp("cert")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def serve_tiny(tiny_fp32, exported, folder: Path, extra: list[str], ready=None):
    from tests.conftest import ServedEmbedder

    artifacts = (exported[("fp32", 728)], exported[("fp32", 504)])
    args = ["--checkpoint", str(tiny_fp32), "--backend", "onnx", "--artifacts", *map(str, artifacts)]
    args += ["--preprocess-instances", "1", "--exit-timeout", "10", *extra]
    log = folder / "serve.log"
    proc, ports = start_serve(args, log, ready=ready)
    return ServedEmbedder(proc, ports["http"], ports["grpc"], ports["metrics"], tiny_fp32, artifacts, log)


@pytest.fixture(scope="module")
def tls(tiny_fp32, exported, tmp_path_factory, cert):
    context = ssl.create_default_context(cafile=str(cert[0]))

    def ready(ports: dict[str, int]) -> bool:
        try:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{ports['http']}/v2/models/{C.EMBEDDER_MODEL}/ready", timeout=2, context=context
            ) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    extra = ["--tls-cert", str(cert[0]), "--tls-key", str(cert[1])]
    served = serve_tiny(tiny_fp32, exported, tmp_path_factory.mktemp("tls"), extra, ready)
    try:
        yield served, cert[0]
    finally:
        stop_serve(served.proc)


@pytest.fixture(scope="module")
def no_gateway(tiny_fp32, exported, tmp_path_factory, cert):
    extra = ["--no-gateway", "--tls-cert", str(cert[0]), "--tls-key", str(cert[1])]
    served = serve_tiny(tiny_fp32, exported, tmp_path_factory.mktemp("nogw"), extra)
    try:
        yield served, cert[0]
    finally:
        stop_serve(served.proc)


def test_tls_on_both_protocols(tls, reference):
    served, cert = tls
    raw = png(900, 600, 40)
    ref = reference.embed_images([raw])[0]
    for protocol, url in (("grpc", served.grpc_url), ("http", served.http_url)):
        with EmbedClient(url, protocol, tls=True, root_certificates=cert) as client:
            assert client.is_ready()
            same(client.embed(raw), ref)
        with EmbedClient(url, protocol, timeout=5) as plain, pytest.raises(ServerError):
            plain.embed(raw)
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"https://127.0.0.1:{served.metrics_port}/metrics", timeout=10, context=context) as r:
        assert r.status == 200  # metrics: the same TLS
    assert http(served.metrics_port, "/metrics")[0] == 400  # plain HTTP on a TLS port


@pytest.mark.parametrize(
    ("cipher", "accepted"),
    [
        ("ECDHE-RSA-AES128-GCM-SHA256", True),
        ("ECDHE-RSA-CHACHA20-POLY1305", True),
        ("ECDHE-RSA-AES128-SHA", False),  # CBC
        ("ECDHE-RSA-AES256-SHA384", False),  # CBC
        ("AES128-GCM-SHA256", False),  # RSA key exchange: no forward secrecy
        ("AES256-SHA", False),
    ],
)
def test_tls_12_offers_only_forward_secret_aead_suites_and_no_tickets(tls, cipher, accepted):
    served, cert = tls
    context = ssl.create_default_context(cafile=str(cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    for port in (served.http_port, served.grpc_port, served.metrics_port):
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
            ):
                assert s.version() == "TLSv1.2" and s.cipher()[0] == cipher
                assert not s.session.has_ticket  # ssl_session_tickets off
                handshake = True
        except ssl.SSLError:
            handshake = False
        assert handshake == accepted, (port, cipher)


def test_no_gateway_keeps_tritons_restrictions_and_passes_tls_to_grpc(no_gateway, reference, tmp_path):
    served, cert = no_gateway
    text = served.log.read_text(errors="replace")
    assert "--no-gateway: tritonserver listens on 127.0.0.1 itself" in text and "nginx" not in text
    assert "--grpc-use-ssl=true" in text and "step37-lock=no\\nbody" in text and "admin-key" not in text
    # Triton alone refuses what the gateway would have: its restricted APIs.
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    body = {"parameters": {"config": EVIL_CONFIG, "file:1/model.py": base64.b64encode(code.encode()).decode()}}
    assert http(served.http_port, "/v2/repository/models/evil/load", json.dumps(body).encode())[0] == 403
    assert http(served.http_port, f"/v2/repository/models/{C.EMBEDDER_MODEL}/unload", b"{}")[0] == 403
    assert http(served.http_port, "/v2/logging", json.dumps({"log_verbose_level": 10}).encode())[0] == 403
    assert not marker.exists()
    raw = png(900, 600, 41)
    ref = reference.embed_images([raw])[0]
    with EmbedClient(served.grpc_url, "grpc", tls=True, root_certificates=cert) as client:  # gRPC over TLS
        same(client.embed(raw), ref)
    with EmbedClient(served.http_url, "http") as client:  # Triton's HTTP has no TLS
        same(client.embed(raw), ref)
    with EmbedClient(served.grpc_url, "grpc", timeout=5) as plain, pytest.raises(ServerError):
        plain.embed(raw)


def test_restricted_apis_on_tritons_command_line_are_locked_not_keyed(tmp_path):
    """No secret on tritonserver's command line: every model loads at start and the repository API
    can load nothing (``--model-control-mode=none``, no ``--load-model``); the restricted categories
    are locked by a header value that holds a newline, which no client can send."""
    from step37_deploy.serving.server import TritonInstall, TritonServer

    fake = TritonInstall(Path("/bin/true"), None, None, None)
    server = TritonServer(tmp_path, tmp_path, fake)
    cmd = server.command()
    assert "--model-control-mode=none" in cmd and not any(c.startswith("--load-model") for c in cmd)
    restricted = [c for c in cmd if c.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2
    for flag in restricted:
        categories, lock = flag.split("=", 1)[1].split(":", 1)
        assert categories == "model-repository,shared-memory,logging,trace"
        assert lock == "step37-lock=no\nbody"
    assert not hasattr(server, "admin_key")
    assert "\n" not in server.loggable(cmd) and "step37-lock=no\\nbody" in server.loggable(cmd)
    opened = TritonServer(tmp_path, tmp_path, fake, allow_shared_memory=True)
    opened_flags = [c for c in opened.command() if c.startswith(("--http-restricted-api=", "--grpc-restricted-"))]
    assert len(opened_flags) == 2 and all("shared-memory" not in c and "\n" in c for c in opened_flags)


def proxied_locations(text: str) -> dict[str, set[str]]:
    """Per server (by its listen port), the locations that pass requests on to Triton."""
    out: dict[str, set[str]] = {}
    for server in re.split(r"\n    server \{", text)[1:]:
        port = re.search(r"listen [^;]*:(\d+)", server).group(1)
        blocks = re.findall(r"location ([^{]+?) \{((?:[^{}]|\{[^{}]*\})*)\}", server)
        out[port] = {spec for spec, body in blocks if "proxy_pass" in body or "grpc_pass" in body}
    return out


MODEL_RE = "[A-Za-z0-9_][A-Za-z0-9_.-]*(/versions/[0-9]+)?"
ALLOWED_HTTP = {
    "= /v2/health/live",
    "= /v2/health/ready",
    f'~ "^/v2/models/{MODEL_RE}/ready$"',
    "= /v2",
    "= /v2/models/stats",
    f'~ "^/v2/models/{MODEL_RE}(/config|/stats)?$"',
    f'~ "^/v2/models/{MODEL_RE}/infer$"',
}
GRPC_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig")
GRPC_METHODS += ("ModelStatistics", "ModelInfer")
SHM_METHODS = tuple(f"{k}SharedMemory{v}" for k in ("System", "Cuda") for v in ("Status", "Register", "Unregister"))


@pytest.mark.parametrize("key", [None, "k" * 1024, "AbC.d+e/f=g-h_" * 3], ids=["no-key", "longest-key", "mixed"])
@pytest.mark.parametrize("tls_on", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("shm", [False, True], ids=["default", "allow-shared-memory"])
def test_every_gateway_config_is_valid_nginx(tmp_path, cert, key, tls_on, shm):
    """``nginx -t`` accepts the config of every option combination, also when the work folder and
    the TLS files' paths hold ``$`` and quotes; the only locations passed on to Triton are the
    allowlisted ones (plus the shared-memory APIs with --allow-shared-memory); the key is matched
    exactly."""
    from step37_deploy.serving.gateway import Gateway, GatewayOptions

    odd = tmp_path / 'a$host"b'
    odd.mkdir()
    tls = None
    if tls_on:
        tls = (odd / "c$x.pem", odd / "k$x.pem")
        for src, dst in zip(cert, tls, strict=True):
            dst.write_bytes(src.read_bytes())
            dst.chmod(0o600)
    opts = GatewayOptions(api_key=key, tls=tls, allow_shared_memory=shm)
    ports = {"http": 1, "grpc": 2, "metrics": 3}
    gw = Gateway(odd / "work$uri", "0.0.0.0", ports, {k: v + 10 for k, v in ports.items()}, opts)
    conf = gw.write_config()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    check = subprocess.run([*gw.command(), "-t", "-q"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    text = conf.read_text()
    assert str(odd) not in text and "$x" not in text and "$host" not in text and "$uri" not in text
    http_allowed = ALLOWED_HTTP | ({'~ "^/v2/(system|cuda)sharedmemory(/|$)"'} if shm else set())
    grpc_allowed = {f"= /inference.GRPCInferenceService/{m}" for m in GRPC_METHODS + (SHM_METHODS if shm else ())}
    assert proxied_locations(text) == {"1": http_allowed, "2": grpc_allowed, "3": {"= /metrics"}}
    # ... and every other path is refused by the server itself (not left to nginx's static files).
    assert [server.count("\n        location / { return 403; }\n") for server in text.split("\n    server {")[1:]] == [
        1
    ] * 3
    assert (key is not None) == ("$step37_key_ok" in text)
    if key is not None:  # a regex (~, case-sensitive), anchored at both ends
        exact = "^" + key.replace(".", "[.]").replace("+", "[+]") + "$"
        assert f'$step37_key_ok {{ default 0; "~{exact}" 1; }}' in text


def test_the_draining_config_refuses_readiness_and_inference_and_keeps_no_idle_upstream(tmp_path):
    """What ``serve`` reloads the gateway with when it stops: valid nginx, the same listeners;
    readiness (HTTP and gRPC, server and model) and inference answer 503 / UNAVAILABLE at once
    ("shutting down"), liveness, metadata and metrics are still passed on, and no keep-alive
    connection to Triton stays open (Triton waits for those before it exits)."""
    from step37_deploy.serving.gateway import Gateway, GatewayOptions

    ports = {"http": 1, "grpc": 2, "metrics": 3}
    gw = Gateway(
        tmp_path / "work", "127.0.0.1", ports, {k: v + 10 for k, v in ports.items()}, GatewayOptions(api_key=KEY)
    )
    serving = gw.write_config().read_text()
    draining = gw.write_config(draining=True).read_text()
    check = subprocess.run([*gw.command(), "-t", "-q"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert re.findall(r"listen [^;]*;", draining) == re.findall(r"listen [^;]*;", serving)
    refused_http = {"= /v2/health/ready", f'~ "^/v2/models/{MODEL_RE}/ready$"', f'~ "^/v2/models/{MODEL_RE}/infer$"'}
    refused_grpc = {f"= /inference.GRPCInferenceService/{m}" for m in ("ServerReady", "ModelReady", "ModelInfer")}
    grpc_allowed = {f"= /inference.GRPCInferenceService/{m}" for m in GRPC_METHODS}
    assert proxied_locations(serving) == {"1": ALLOWED_HTTP, "2": grpc_allowed, "3": {"= /metrics"}}
    assert proxied_locations(draining) == {
        "1": ALLOWED_HTTP - refused_http,
        "2": grpc_allowed - refused_grpc,
        "3": {"= /metrics"},
    }
    for spec in refused_http | refused_grpc:
        post_only = r'(if \(\$request_method != "POST"\) \{ return 405; \} )?'
        assert re.search(rf"location {re.escape(spec)} \{{\s*{post_only}return 503;", draining), spec
    assert "keepalive 32" in serving and "keepalive " not in draining.replace("keepalive_timeout", "")
    assert "shutting down" in draining and "shutting down" not in serving
