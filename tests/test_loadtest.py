"""The load test: its pieces (percentiles, Prometheus and statistics parsing, answer checks, the
request driver, the report) on their own, then ``step37-deploy loadtest`` against ``serve``."""

import itertools
import json
import threading
import time

import numpy as np
import pytest

from step37_deploy.errors import InputError, ServerError
from step37_deploy.runtime import ImageEmbedding
from step37_deploy.serving import loadtest as lt
from step37_deploy.serving.contract import CACHE_HITS_METRIC, CACHE_MISSES_METRIC, EMBEDDER_MODEL, TOWER_MODELS
from tests.test_bad_input import argparse_error

V728, V504 = TOWER_MODELS[728], TOWER_MODELS[504]

METRICS = f"""# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="{EMBEDDER_MODEL}",version="1"}} 10
nv_inference_request_success{{model="{V728}",version="1"}} 10
# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{{model="{V728}",version="1"}} 4
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="{V728}",version="1"}} 5000
nv_inference_queue_duration_us{{model="{EMBEDDER_MODEL}",version="1"}} 100
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="{V728}",version="1"}} 20000
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{{model="{V728}",version="1"}} 0
# HELP {CACHE_HITS_METRIC} hits
# TYPE {CACHE_HITS_METRIC} counter
{CACHE_HITS_METRIC}{{model="{EMBEDDER_MODEL}",version="1"}} 7
# HELP {CACHE_MISSES_METRIC} misses
# TYPE {CACHE_MISSES_METRIC} counter
{CACHE_MISSES_METRIC}{{model="{EMBEDDER_MODEL}",version="1"}} 3
"""


def test_latency_summary_percentiles():
    s = lt.latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert s["max"] == pytest.approx(100) and s["mean"] == pytest.approx(50.5)
    assert lt.latency_summary([]) == {}


def test_metrics_parsing_and_per_run_deltas():
    before = lt.parse_metrics(METRICS)
    assert before[("nv_inference_queue_duration_us", V728)] == 5000
    after = dict(before)
    after[("nv_inference_request_success", V728)] += 10
    after[("nv_inference_exec_count", V728)] += 3
    after[("nv_inference_queue_duration_us", V728)] += 2000
    after[("nv_inference_compute_infer_duration_us", V728)] += 40000
    after[(CACHE_HITS_METRIC, EMBEDDER_MODEL)] += 5
    after[(CACHE_MISSES_METRIC, EMBEDDER_MODEL)] += 1
    t = lt.model_timings(before, after, [V728, V504])
    assert t[V728]["requests"] == 10 and t[V728]["executions"] == 3
    assert t[V728]["queue_us_per_request"] == 200 and t[V728]["compute_infer_us_per_request"] == 4000
    assert t[V504]["requests"] == 0 and t[V504]["queue_us_per_request"] == 0.0
    assert lt.cache_counts(before, after) == {"hits": 5, "misses": 1}
    assert lt.cache_counts(None, after) == {"hits": None, "misses": None}
    no_cache = {k: v for k, v in after.items() if "cache" not in k[0]}
    assert lt.cache_counts(no_cache, no_cache) == {"hits": None, "misses": None}


def test_batch_stats_deltas():
    grpc_like = {"batch_stats": [{"batch_size": "1", "compute_infer": {"count": "4", "ns": "9"}}]}
    http_like = {
        "batch_stats": [
            {"batch_size": 1, "compute_infer": {"count": 6}},
            {"batch_size": 3, "compute_infer": {"count": 2}},
        ]
    }
    assert lt.batch_counts(grpc_like) == {"1": 4}
    assert lt.batch_delta(lt.batch_counts(grpc_like), lt.batch_counts(http_like)) == {"1": 2, "3": 2}
    assert lt.batch_counts({}) == {}


def test_a_server_whose_embedder_runs_the_towers_reports_no_tower_models():
    """``--tower-calls local``: the server has no tower models, so neither their timings nor their
    batch sizes are reported (no zeros for models that do not exist); with them, both are."""

    class Client:
        tls = False

        def __init__(self, models):
            self.models = models

        def inference_statistics(self, model: str = ""):
            assert model == ""  # one call for every loaded model
            return {m: {"batch_stats": [{"batch_size": 1, "compute_infer": {"count": 2}}]} for m in self.models}

    only_embedder = {k: v for k, v in lt.parse_metrics(METRICS).items() if k[1] == EMBEDDER_MODEL}
    probe = lt._ServerProbe(Client([EMBEDDER_MODEL]), "unused:1")
    batches, timings = lt._server_side((only_embedder, probe.batches()), (only_embedder, probe.batches()))
    assert batches == {} and list(timings) == [EMBEDDER_MODEL]
    probe = lt._ServerProbe(Client([EMBEDDER_MODEL, V728, V504]), "unused:1")
    full = lt.parse_metrics(METRICS)
    batches, timings = lt._server_side((full, probe.batches()), (full, probe.batches()))
    assert batches == {V728: {}, V504: {}} and list(timings) == [EMBEDDER_MODEL, V728]  # 504 has no series


def _emb(rows: int, seed: int, crops: int = 0) -> ImageEmbedding:
    feats = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    return ImageEmbedding(feats, [1, 2, 3], "t", crops, [False] * crops)


def test_mismatch_checks_layout_shape_and_features():
    ref = _emb(4, 0)
    assert lt.mismatch(_emb(4, 0), ref, 1e-5) is None
    near = ImageEmbedding(ref.features * (1 + 1e-6), [1, 2, 3], "t", 0, [])
    assert lt.mismatch(near, ref, 1e-5) is None
    assert "features differ" in lt.mismatch(_emb(4, 1), ref, 1e-2)
    assert "features (5, 8)" in lt.mismatch(_emb(5, 0), ref, 1e-2)
    assert "token layout" in lt.mismatch(ImageEmbedding(ref.features, [1, 2], "t", 0, []), ref, 1e-2)
    assert "newline" in lt.mismatch(ImageEmbedding(ref.features, [1, 2, 3], "t", 0, [True]), ref, 1e-2)


def test_the_answer_check_never_calls_blas(monkeypatch):
    """Issue 21: ``np.linalg.norm`` of a whole answer is a BLAS dot whose OpenBLAS workers then spin
    in the load generator's process, on the cores of the server it measures; the check sums in
    numpy instead, to the same value."""
    from step37_deploy.serving import drivers

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((169, 96)), rng.standard_normal((169, 96))
    want = float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def no_blas(*args, **kwargs):
        raise AssertionError("the answer check called BLAS")

    monkeypatch.setattr(np.linalg, "norm", no_blas)
    monkeypatch.setattr(np, "dot", no_blas)
    monkeypatch.setattr(np, "vdot", no_blas)
    assert drivers.rel_l2(a, b) == pytest.approx(want, rel=1e-12)
    assert drivers.rel_l2(b, b) == 0.0 and drivers.rel_l2(a, np.zeros_like(a)) > 1e20


def test_drive_counts_errors_swaps_and_bounds():
    refs = [_emb(4, i) for i in range(3)]
    payloads = [bytes([i]) for i in range(3)]
    seen = []
    lock = threading.Lock()

    def call(data: bytes) -> ImageEmbedding:
        with lock:
            seen.append(data[0])
            n = len(seen)
        if n == 5:
            raise ServerError("boom from the server")
        if n == 7:
            return refs[(data[0] + 1) % 3]  # another image's answer
        return refs[data[0]]

    out, sent, wall = lt.drive(call, payloads, refs, 20, 4, 60.0, 5.0, 1e-3, "t", False)
    m = lt.measure(out, sent, wall, {"hits": 0, "misses": 0})
    assert sent == 20 and len(out) == 20 and sorted(seen) == sorted([i % 3 for i in range(20)])
    assert (m.errors, m.mismatches, m.lost) == (1, 1, 0) and m.failed == 2
    assert any("boom from the server" in e for e in m.error_messages)
    assert any("features differ" in e for e in m.error_messages)
    assert m.throughput_ips > 0 and m.latency_ms["p50"] >= 0
    # Bounded in time: a zero-length window sends nothing, and nothing sent is a failed run.
    out, sent, wall = lt.drive(call, payloads, refs, 20, 4, 1e-9, 5.0, 1e-3, "t", False)
    assert sent == 0 and not lt.LoadtestReport(None, [], [lt.Run(1, lt.measure(out, sent, wall, {}), {}, None)]).ok


def test_blocks_alternate_over_the_whole_request_range():
    assert lt.blocks(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert lt.blocks(2, 5) == [(0, 1), (1, 1)] and lt.blocks(5, 1) == [(0, 5)]
    refs = [_emb(4, i) for i in range(3)]
    seen = []
    lt.drive(
        lambda d: seen.append(d[0]) or refs[d[0]], [b"\0", b"\1", b"\2"], refs, 2, 1, 60, 5, 1e-3, "", False, first=4
    )
    assert seen == [1, 2]  # requests 4 and 5 of the run: images 4 % 3 and 5 % 3


def test_report_json_schema(tmp_path):
    m = lt.Measurement(40, 0, 0, 0, 2.0, 20.0, {"p50": 1.0, "p90": 2.0, "p99": 3.0}, {"hits": 30, "misses": 10})
    p = lt.Measurement(40, 0, 0, 0, 1.6, 25.0, {"p50": 0.8, "p90": 1.0, "p99": 2.0}, {"hits": 0, "misses": 0})
    opts = lt.LoadtestOptions(url="127.0.0.1:1", images=["a.png"], checkpoint="ckpt", in_process=True)
    report = lt.LoadtestReport(opts, ["a.png"], [lt.Run(8, m, {V728: {"1": 2, "4": 5}}, None, p)])
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] is True and data["requests"] == 40 and data["errors"] == 0
    (run,) = data["runs"]
    assert run["concurrency"] == 8 and run["requests"] == 40 and run["errors"] == 0 and run["mismatches"] == 0
    assert run["throughput_ips"] == 20.0 and set(run["latency_ms"]) >= {"p50", "p90", "p99"}
    assert run["tower_batch_sizes"] == {V728: {"1": 2, "4": 5}} and run["cache"] == {"hits": 30, "misses": 10}
    assert run["in_process"]["throughput_ips"] == 25.0
    assert run["ratios"]["throughput_served_over_in_process"] == pytest.approx(0.8)
    assert run["ratios"]["p50_served_over_in_process"] == pytest.approx(1.25)
    assert "served/in-process: throughput 0.800, p50 1.250" in report.table()


def test_image_files(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [f.name for f in lt.image_files([tmp_path])] == ["a.JPG", "b.png"]
    with pytest.raises(InputError, match="no such file"):
        lt.image_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        lt.image_files([tmp_path / "empty"])


# -- `step37-deploy loadtest` against `serve` (the session's tiny_server) --------------------------------


def _write_images(folder, sizes):
    from PIL import Image

    from .preprocess_cases import synthetic_image

    folder.mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(synthetic_image(w, h)).save(folder / f"im{i}.png")
    return folder


def _loadtest(server, *args):
    from step37_deploy.cli import main

    return main(
        [
            "loadtest",
            "--metrics-url",
            f"127.0.0.1:{server.metrics_port}",
            "--checkpoint",
            str(server.checkpoint),
            "--artifacts",
            *map(str, server.artifacts),
            "--quiet",
            *args,
        ]
    )


def test_loadtest_against_serve(tiny_server, tmp_path, capsys):
    # Sizes no other test sends, so the server's cache has none of them yet: the first round misses
    # (its views reach the towers together and batch), the later rounds hit.
    images = _write_images(tmp_path / "img", [(610, 470), (530, 530), (700, 420), (450, 640), (980, 760), (620, 610)])
    out = tmp_path / "report.json"
    rc = _loadtest(
        tiny_server, "--server", tiny_server.http_url, "--protocol", "http", "--images", str(images),
        "--concurrency", "8", "--requests", "48", "--duration", "300", "--in-process", "--cache-mb", "64",
        "--rounds", "2", "--json", str(out),
    )  # fmt: skip
    table = capsys.readouterr().out
    assert rc == 0, table
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["protocol"] == "http" and len(data["images"]) == 6
    (run,) = data["runs"]
    assert run["concurrency"] == 8 and run["requests"] == 48
    assert run["errors"] == 0 and run["mismatches"] == 0 and run["lost"] == 0
    assert (
        run["throughput_ips"] > 0
        and 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p90"] <= run["latency_ms"]["p99"]
    )
    sizes = run["tower_batch_sizes"]
    assert set(sizes) == {V728, V504}
    assert max(int(b) for b in sizes[V728]) > 1, sizes  # global views of concurrent requests batched together
    assert sum(sizes[V728].values()) >= 1 and sizes[V504]  # 980x760 has crops
    # 6 images, 8 rounds; each of the 4 embedder instances keeps its own cache, so up to 4 x 6 first
    # lookups (and lookups racing an in-flight first one) miss; the rest hit.
    assert run["cache"]["hits"] + run["cache"]["misses"] == 48 and run["cache"]["misses"] >= 6
    assert run["cache"]["hits"] >= 8, run["cache"]
    emb = run["models"]["step37_embedder"]
    assert emb["requests"] == 48 and emb["compute_infer_us_per_request"] > 0
    assert run["models"][V728]["requests"] == sum(sizes[V728].values()) or run["models"][V728]["inferences"] > 0
    ip = run["in_process"]
    assert ip["requests"] == 48 and ip["errors"] == ip["mismatches"] == 0
    assert ip["cache"]["hits"] + ip["cache"]["misses"] == 48 and ip["cache"]["hits"] >= 24  # one cache
    assert run["ratios"]["throughput_served_over_in_process"] > 0
    assert "OK: every answer matched" in table and "served/in-process" in table


def test_loadtest_fails_on_wrong_answers_and_bad_input(tiny_server, tiny_bf16, tmp_path, capsys):
    """A reference from other weights: every answer is wrong and the command exits 1 (over gRPC)."""
    images = _write_images(tmp_path / "img", [(300, 200), (200, 300)])
    out = tmp_path / "report.json"
    from step37_deploy.cli import main

    rc = main(
        [
            "loadtest", "--server", tiny_server.grpc_url, "--protocol", "grpc", "--images", str(images),
            "--concurrency", "2", "--requests", "4", "--checkpoint", str(tiny_bf16), "--backend", "torch",
            "--metrics-url", f"127.0.0.1:{tiny_server.metrics_port}", "--json", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 1
    (run,) = json.loads(out.read_text())["runs"]
    assert run["mismatches"] == 4 and run["errors"] == 0
    assert all("features differ" in m for m in run["error_messages"])
    assert "FAILED" in capsys.readouterr().out
    # A file that is not an image is the user's error: exit 2, naming it.
    bad = images / "zz.png"
    bad.write_bytes(b"not an image")
    assert _loadtest(tiny_server, "--server", tiny_server.grpc_url, "--images", str(images), "--requests", "1") == 2
    assert "zz.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--tolerance", "inf", "finite number > 0"),  # would pass every answer: a check of nothing
        ("--tolerance", "nan", "finite number > 0"),
        ("--tolerance", "-1", "finite number > 0"),
        ("--tolerance", "0", "finite number > 0"),
        ("--timeout", "-5", "finite number > 0"),
        ("--timeout", "0", "finite number > 0"),
        ("--duration", "nan", "finite number > 0"),
        ("--cache-mb", "-1", "finite number >= 0"),
        ("--requests", "0", ">= 1"),
        ("--concurrency", "0", ">= 1"),
        ("--rounds", "-2", ">= 1"),
        ("--warmup", "-1", ">= 0"),
    ],
)
def test_loadtest_refuses_bad_numbers_before_any_work(option, value, words, capsys):
    args = ["loadtest", "--server", "127.0.0.1:1", "--images", "none.png", "--checkpoint", "none", option, value, "-q"]
    argparse_error(args, capsys, f"argument {option}", words)


@pytest.mark.parametrize(("field", "value"), [("tolerance", float("inf")), ("tolerance", -1.0), ("timeout_s", 0.0)])
def test_run_loadtest_refuses_bad_tolerance_and_timeout(field, value):
    opts = lt.LoadtestOptions(url="127.0.0.1:1", images=["none.png"], checkpoint="none", **{field: value})
    with pytest.raises(InputError, match="finite number > 0"):
        lt.run_loadtest(opts, progress=False)


def test_open_loop_sends_on_schedule_and_counts_goodput_refusals_and_deadlines():
    """40 requests/s for 1 s whatever the answers: every 4th refused (retryable), every 4th+1 slower
    than its 0.2 s deadline, one wrong; goodput counts only correct answers inside the deadline."""
    refs = [_emb(4, i) for i in range(2)]
    payloads = [bytes([i]) for i in range(2)]
    n = itertools.count()
    deadlines = []

    def call(data: bytes, left_s: float) -> ImageEmbedding:
        i = next(n)
        deadlines.append(left_s)
        if i % 4 == 0:
            raise ServerError("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", retryable=True)
        if i % 4 == 1:
            time.sleep(0.3)
            raise ServerError("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED")
        if i == 2:
            return refs[(data[0] + 1) % 2]
        time.sleep(0.05)  # slower than the send interval: answers overlap, the schedule holds
        return refs[data[0]]

    t0 = time.perf_counter()
    out, sent, wall, late = lt.drive_open_loop(call, payloads, refs, 40.0, 1.0, 0.2, 1e-3, "t", False)
    assert sent == 40 and len(out) == 40 and late == 0 and time.perf_counter() - t0 < 3
    assert all(0 < d <= 0.2 for d in deadlines)
    m = lt.measure_open_loop(out, sent, wall, late, 40.0, 0.2, 1.0)
    assert (m.refused, m.deadline_exceeded, m.mismatches, m.lost) == (10, 10, 1, 0)
    assert m.goodput_ips == pytest.approx(19.0) and m.failed == 1  # the wrong answer fails the run
    opts = lt.LoadtestOptions(url="127.0.0.1:1", images=["a.png"], checkpoint="ckpt", rates=[40.0])
    report = lt.LoadtestReport(opts, [], [lt.Run(0, m, {}, None)])
    assert not report.ok and "goodput 19.00/s, refused 10, deadline exceeded 10" in report.table()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_open_loop_fails_when_the_server_dies_mid_run(protocol):
    """Issue 22 item 10: 20 requests/s for 1 s; the first half answered or refused with UNAVAILABLE
    by a live server, then the server is gone (a loopback port nobody listens on, through the real
    client): those connection errors are failures, not expected refusals, and the run is not ok."""
    import socket

    from step37_deploy.serving.client import EmbedClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed: connections are refused, as after the server was killed
    refs = [_emb(4, i) for i in range(2)]
    payloads = [bytes([i]) for i in range(2)]
    n = itertools.count()
    client = EmbedClient(f"127.0.0.1:{dead}", protocol, retry=False)

    def call(data: bytes, left_s: float) -> ImageEmbedding:
        i = next(n)
        if i >= 10:
            return client.embed(data, deadline=left_s)
        if i % 2:
            raise ServerError("Exceeds maximum queue size", "StatusCode.UNAVAILABLE", retryable=True)
        return refs[data[0]]

    with client:
        out, sent, wall, late = lt.drive_open_loop(call, payloads, refs, 20.0, 1.0, 2.0, 1e-3, "t", False)
    m = lt.measure_open_loop(out, sent, wall, late, 20.0, 2.0, 1.0)
    gone = [o.error for o in out if o.error and o.kind is None]
    assert sent == 20 and m.refused == 5 and len(gone) == 10 and m.failed == 10, (m, gone[:1])
    assert all("connection failure" in e for e in gone), gone[:1]
    opts = lt.LoadtestOptions(url=f"127.0.0.1:{dead}", images=["a.png"], checkpoint="ckpt", rates=[20.0])
    assert not lt.LoadtestReport(opts, [], [lt.Run(0, m, {}, None)]).ok
