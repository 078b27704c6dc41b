"""``step37-deploy serve`` for real: a tritonserver subprocess on loopback, gRPC and HTTP clients.

The session server (``tiny_server`` in conftest) runs the ONNX FP32 towers of the tiny checkpoint;
every answer is compared with the in-process ``VisionEmbedder`` on the same files.  The SIGTERM test
starts its own server (torch towers) because it stops it.
"""

from __future__ import annotations

import io
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import rel_l2, start_serve, stop_serve

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


def test_sigterm_drains_in_flight_requests_and_cleans_up(tiny_fp32, tmp_path):
    """Torch towers (checkpoint weights in the repository), one embedder instance, 1 s tower queue
    delay.  At SIGTERM request A is executing and B is queued behind it, so every tower call of B
    happens after the signal (Triton alone would refuse those BLS calls): both are answered in full,
    a new request is refused, the exit status is 0 and the temporary repository is gone."""
    from step37_deploy.runtime import VisionEmbedder

    log = tmp_path / "serve.log"
    args = ["--checkpoint", str(tiny_fp32), "--backend", "torch", "--preprocess-instances", "1", "--cache-mb", "0"]
    args += ["--queue-timeout-ms", "120000"]  # B waits behind A longer than the default 5 s here
    proc, ports = start_serve([*args, "--max-queue-delay-us", "1000000", "--exit-timeout", "60"], log)
    try:
        repo = Path(re.search(r"repository (\S+/model_repository)", log.read_text()).group(1))
        assert repo.is_dir()
        url = f"127.0.0.1:{ports['grpc']}"
        images = {"A": image_bytes(2000, 1500, 11), "B": image_bytes(900, 600, 12)}
        ref = VisionEmbedder.from_artifacts(tiny_fp32, "torch").embed_images(list(images.values()))
        got: dict = {}

        def send(name: str) -> None:
            got[name] = embed(grpcclient.InferenceServerClient(url), images[name])
            got[name + "_done"] = time.monotonic()

        threads = {n: threading.Thread(target=send, args=(n,)) for n in images}
        threads["A"].start()
        time.sleep(0.2)
        threads["B"].start()
        time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(InferenceServerException):  # refused while draining, not dropped silently
            embed(grpcclient.InferenceServerClient(url), image_bytes(300, 300, 13))
        for t in threads.values():
            t.join(120)
        for name, r in zip(images, ref, strict=True):
            assert_same(got[name], r)
            assert got[name + "_done"] > signalled  # it was in flight when the signal came
        assert proc.wait(120) == 0
        text = log.read_text(errors="replace")
        assert "in-flight requests done; stopping tritonserver" in text and "stopped cleanly" in text
        assert not repo.exists() and not repo.parent.exists()
    finally:
        stop_serve(proc)
