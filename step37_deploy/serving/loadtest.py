"""A load test that checks every answer: ``step37-deploy loadtest``.

For each concurrency level, ``concurrency`` threads send one image per request through
:class:`~step37_deploy.serving.client.EmbedClient` until ``requests`` answers or ``duration`` seconds,
and every answer is compared with the in-process embedder's result for the same image (token
layout exactly, features by relative L2), so a lost, failed or swapped answer is counted, and any
one makes the command exit 1.  Around each run the server's own numbers are read: Triton's
Prometheus metrics (queue and compute time per model, the embedding cache's hit/miss counters) and
its statistics API (the batch sizes the tower models actually ran).  ``--in-process`` drives the
in-process :class:`~step37_deploy.runtime.VisionEmbedder` the same way on the same images in the same
run, so served/in-process ratios come from one machine at one moment; ``rounds`` > 1 alternates
the two in blocks, so that load changing on a shared machine hits both alike.

``rates`` (``--rate R``) runs open-loop instead: R requests per second are sent on schedule
whatever the answers (a worker pool large enough for every request to live out its deadline), each
with the client deadline ``--timeout``, and the report adds goodput: correct answers that arrived
within the deadline, per second of the run.  Latencies count from each request's scheduled send
time, so a client that falls behind cannot hide the server's queueing (no coordinated omission).
Refusals (UNAVAILABLE: a full queue, a queue timeout) and deadline misses are counted apart from
other errors; under overload they are the expected outcome, while a wrong, lost or otherwise
failed answer still fails the run.

Requests cycle through the images in order, so a run longer than the image list repeats images
(and shows cache hits when the server's cache is on).  Warm-up requests use generated images that
are not among them, so they never pre-fill the cache with the images measured.
"""

from __future__ import annotations

import io
import itertools
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ServerError, Step37Error
from ..files import write_json
from ..runtime import EmbeddingCache, ImageEmbedding, VisionEmbedder
from .client import API_KEY_HEADER, EmbedClient, image_bytes
from .contract import CACHE_HITS_METRIC, CACHE_MISSES_METRIC, EMBEDDER_MODEL, TOWER_MODELS
from .gateway import read_api_key

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Triton's per-model counters read around each run (cumulative; the report has per-run deltas).
TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
#: Relative L2 distance above which an answer is not the reference: far above batch-composition
#: noise (~1e-6 in FP32, ~1e-3 in FP16), far below the distance between two images' features.
DEFAULT_TOLERANCE = 1e-2


@dataclass
class LoadtestOptions:
    url: str
    images: Sequence[str | Path]
    checkpoint: str | Path
    protocol: str = "http"
    api_key_file: str | Path | None = None  # serve --api-key-file: sent as x-api-key
    tls: bool = False  # HTTPS / gRPC over TLS (serve --tls-cert)
    tls_ca: str | Path | None = None  # the certificates to trust (default: the system's)
    backend: str = "onnx"
    artifacts: Sequence[str | Path] = ()
    provider: str = "cpu"
    concurrency: Sequence[int] = (1, 8)
    requests: int = 200
    duration_s: float = 60.0
    timeout_s: float = 60.0
    metrics_url: str | None = None  # HOST:PORT; default: the url's host, port 8002
    in_process: bool = False
    cache_mb: float = 0.0  # the in-process embedder's cache in the --in-process measurement
    tolerance: float = DEFAULT_TOLERANCE
    warmup: int = 2
    rounds: int = 1  # alternate served / in-process blocks this many times per concurrency level
    rates: Sequence[float] = ()  # open-loop runs, requests per second (instead of the concurrency levels)
    retry: bool = False  # the client retries refusals and connection errors within the deadline


@dataclass
class Measurement:
    """One target (the server, or the in-process embedder) at one concurrency."""

    requests: int
    errors: int
    mismatches: int
    lost: int
    duration_s: float
    throughput_ips: float
    latency_ms: dict[str, float]
    cache: dict[str, int | None]
    error_messages: list[str] = field(default_factory=list)
    # Open loop (--rate) only: what was asked and what came of it.
    rate: float | None = None  # requests per second sent on schedule
    deadline_s: float | None = None  # the client deadline of each request
    goodput_ips: float | None = None  # correct answers within the deadline, per second of the run
    refused: int | None = None  # errors the server answered UNAVAILABLE (queue full, queue timeout)
    deadline_exceeded: int | None = None  # errors because the deadline passed first
    late_sends: int | None = None  # requests sent more than 100 ms after their scheduled time

    @property
    def failed(self) -> int:
        """Requests that count against the run: under open-loop overload refusals and deadline misses
        are the expected outcome; every other error, a wrong and a lost answer are not."""
        expected = (self.refused or 0) + (self.deadline_exceeded or 0)
        return self.errors - expected + self.mismatches + self.lost


@dataclass
class Run:
    concurrency: int
    server: Measurement
    tower_batch_sizes: dict[str, dict[str, int]]
    models: dict[str, dict[str, float]] | None
    in_process: Measurement | None = None

    def ratios(self) -> dict[str, float] | None:
        if self.in_process is None or not self.in_process.throughput_ips or not self.in_process.latency_ms:
            return None
        s, p = self.server, self.in_process
        return {
            "throughput_served_over_in_process": s.throughput_ips / p.throughput_ips,
            "p50_served_over_in_process": s.latency_ms["p50"] / p.latency_ms["p50"],
        }

    def to_json(self) -> dict[str, Any]:
        """The issue's schema: the server's measurement at the top level of each run."""
        out: dict[str, Any] = {"concurrency": self.concurrency, **asdict(self.server)}
        out["tower_batch_sizes"] = self.tower_batch_sizes
        out["models"] = self.models
        if self.in_process is not None:
            out["in_process"] = asdict(self.in_process)
            out["ratios"] = self.ratios()
        return out


@dataclass
class LoadtestReport:
    options: LoadtestOptions
    images: list[str]
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every request of every run answered correctly, and at least one was sent per run."""
        return all(
            m.failed == 0 and m.requests > m.errors + m.lost  # at least one answer was checked
            for r in self.runs
            for m in (r.server, r.in_process)
            if m is not None
        ) and bool(self.runs)

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "url": o.url,
            "protocol": o.protocol,
            "checkpoint": str(o.checkpoint),
            "backend": o.backend,
            "artifacts": [str(a) for a in o.artifacts],
            "images": self.images,
            "max_requests": o.requests,
            "max_duration_s": o.duration_s,
            "rounds": o.rounds,
            "tolerance_rel_l2": o.tolerance,
            "ok": self.ok,
            "requests": sum(r.server.requests for r in self.runs),
            "errors": sum(r.server.errors + r.server.lost for r in self.runs),
            "mismatches": sum(r.server.mismatches for r in self.runs),
            "runs": [r.to_json() for r in self.runs],
        }

    def write_json(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    def table(self) -> str:
        lines = [
            f"load test of {self.options.protocol}://{self.options.url}, {len(self.images)} images, "
            f"answers checked against the in-process embedder ({self.options.backend})",
            f"{'target':<11} {'conc':>4} {'reqs':>5} {'err':>4} {'wrong':>5} {'img/s':>8} "
            f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  cache hit/miss",
        ]
        for r in self.runs:
            for name, m in (("served", r.server), ("in-process", r.in_process)):
                if m is None:
                    continue
                lat = m.latency_ms or {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
                lines.append(
                    f"{name:<11} {r.concurrency:>4} {m.requests:>5} {m.errors + m.lost:>4} {m.mismatches:>5} "
                    f"{m.throughput_ips:>8.2f} {lat['p50']:>8.1f} {lat['p90']:>8.1f} {lat['p99']:>8.1f}  "
                    f"{m.cache['hits']}/{m.cache['misses']}"
                )
            m = r.server
            if m.rate is not None:
                lines.append(
                    f"  open loop {m.rate:g} req/s, deadline {m.deadline_s:g}s: goodput {m.goodput_ips:.2f}/s, "
                    f"refused {m.refused}, deadline exceeded {m.deadline_exceeded}, other errors "
                    f"{m.errors - m.refused - m.deadline_exceeded}, sent late {m.late_sends}"
                )
            for model, sizes in r.tower_batch_sizes.items():
                lines.append(f"  {model} batches run (size: count): {sizes or 'none'}")
            for model, s in (r.models or {}).items():
                lines.append(
                    f"  {model}: {s['requests']:.0f} requests in {s['executions']:.0f} executions, "
                    f"queue {s['queue_us_per_request']:.0f} us, compute {s['compute_infer_us_per_request']:.0f} us "
                    "per request"
                )
            ratios = r.ratios()
            if ratios:
                lines.append(
                    f"  served/in-process: throughput {ratios['throughput_served_over_in_process']:.3f}, "
                    f"p50 {ratios['p50_served_over_in_process']:.3f}"
                )
            for msg in r.server.error_messages[:3]:
                lines.append(f"  error: {msg}")
        lines.append("OK: every answer matched" if self.ok else "FAILED: answers lost, failed or wrong (see above)")
        return "\n".join(lines)


# -- pieces ---------------------------------------------------------------------------------------------


def image_files(specs: Sequence[str | Path]) -> list[Path]:
    """Files named, plus the image files (by suffix, sorted) of the folders named."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"--images {spec}: no such file or folder")
    if not out:
        raise InputError(f"--images {' '.join(map(str, specs))}: no image files")
    return out


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation), mean and max, in milliseconds; empty for no samples."""
    if not len(latencies_s):
        return {}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()), "max": float(ms.max())}


def rel_l2(a: Any, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def mismatch(got: ImageEmbedding, ref: ImageEmbedding, tolerance: float) -> str | None:
    """Why ``got`` is not ``ref`` (layout differs, shape differs, features too far), or None."""
    if got.num_crops != ref.num_crops or list(got.token_ids) != list(ref.token_ids):
        return f"token layout differs ({got.num_crops} vs {ref.num_crops} crops)"
    if list(got.newline_mask) != list(ref.newline_mask):
        return "newline mask differs"
    feats = _numpy(got.features)
    if feats.shape != ref.features.shape:
        return f"features {feats.shape} vs {ref.features.shape}"
    d = rel_l2(feats, ref.features)
    return None if d <= tolerance else f"features differ (rel L2 {d:.3g} > {tolerance:g})"


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """Prometheus text -> {(metric name, model label): value}, summed over the other labels.  A
    counter's value is under its family's name as Triton spells it (the parser adds ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = family.name if s.name in (family.name, f"{family.name}_total") else s.name
            key = (name, s.labels.get("model", ""))
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


def model_timings(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], models: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per model, what happened between two scrapes: requests, executions, and the mean queue and
    compute times per request in microseconds."""
    out = {}
    for m in models:
        d = {c: after.get((c, m), 0.0) - before.get((c, m), 0.0) for c in TRITON_COUNTERS}
        n = d["nv_inference_request_success"]
        out[m] = {
            "requests": n,
            "failures": d["nv_inference_request_failure"],
            "inferences": d["nv_inference_count"],
            "executions": d["nv_inference_exec_count"],
        }
        for part in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
            out[m][f"{part}_us_per_request"] = d[f"nv_inference_{part}_duration_us"] / n if n else 0.0
    return out


def cache_counts(
    before: dict[tuple[str, str], float] | None, after: dict[tuple[str, str], float] | None
) -> dict[str, int | None]:
    """The served embedding cache's hits and misses between two scrapes (None when the server
    exports no cache counters: an older repository, or no metrics endpoint)."""
    if before is None or after is None:
        return {"hits": None, "misses": None}
    out: dict[str, int | None] = {}
    for k, name in (("hits", CACHE_HITS_METRIC), ("misses", CACHE_MISSES_METRIC)):
        keys = [key for key in after if key[0] == name]
        out[k] = int(sum(after[key] - before.get(key, 0.0) for key in keys)) if keys else None
    return out


def batch_counts(stats: dict[str, Any]) -> dict[str, int]:
    """``{batch size: executions}`` from one model's Triton statistics (``batch_stats``)."""
    out = {}
    for b in stats.get("batch_stats", []):
        n = int(b.get("compute_infer", {}).get("count", 0))
        if n:
            out[str(int(b["batch_size"]))] = n
    return out


def batch_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    d = {k: after[k] - before.get(k, 0) for k in after}
    return {k: v for k, v in sorted(d.items(), key=lambda kv: int(kv[0])) if v}


def warmup_images(n: int) -> list[bytes]:
    """``n`` distinct noise PNGs, large and wide enough to have crops, so both towers warm up
    without putting any measured image into a cache."""
    from PIL import Image

    rng = np.random.default_rng(12345)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (800, 1100, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@dataclass
class _Outcome:
    latency_s: float
    error: str | None
    wrong: str | None
    kind: str | None = None  # errors: "refused", "deadline" or None (any other)


def _error_kind(exc: Exception) -> str | None:
    """An open-loop error's kind: the server refused it (retryable), or the deadline passed first."""
    status = getattr(exc, "status", None)
    if status in ("StatusCode.DEADLINE_EXCEEDED", "timeout"):
        return "deadline"
    if getattr(exc, "retryable", False):
        return "refused"
    return None


def _checked_call(
    call: Callable[..., ImageEmbedding], args: tuple, reference: ImageEmbedding, i: int, k: int, tolerance: float
) -> tuple[float, str | None, str | None, str | None]:
    """Request ``i`` (image ``k``): when it ended, its error and the error's kind, or why its answer
    is not ``reference``."""
    error = wrong = kind = None
    try:
        got = call(*args)
    except Step37Error as exc:
        error, kind = str(exc), _error_kind(exc)
    except Exception as exc:  # an unexpected failure is a failed request, counted
        error = f"{type(exc).__name__}: {exc}"
    t1 = time.perf_counter()
    if error is None:
        wrong = mismatch(got, reference, tolerance)
        if wrong:
            wrong = f"request {i} (image {k}): {wrong}"
    return t1, error, wrong, kind


def drive_open_loop(
    call: Callable[[bytes, float], ImageEmbedding],
    payloads: Sequence[bytes],
    references: Sequence[ImageEmbedding],
    rate: float,
    duration_s: float,
    deadline_s: float,
    tolerance: float,
    desc: str,
    progress: bool,
    on_exit: Callable[[], None] | None = None,
    max_workers: int = 512,
) -> tuple[list[_Outcome], int, float, int]:
    """Request ``i`` sent at ``i / rate`` seconds for ``duration_s`` seconds, whatever the answers:
    ``call(payload, deadline_s)`` runs on a pool of ``ceil(rate * (deadline_s + 1))`` workers (at most
    ``max_workers``), every answer checked.  Latency is counted from the scheduled time.  Returns the
    outcomes, the requests sent, the wall time from the first scheduled send to the last outcome,
    and how many were sent over 100 ms late (the pool was exhausted)."""
    import math
    import queue

    from tqdm import tqdm

    total = max(1, int(rate * duration_s))
    workers = max(1, min(max_workers, math.ceil(rate * (deadline_s + 1.0))))
    todo: queue.Queue = queue.Queue()
    lock = threading.Lock()
    outcomes: list[_Outcome] = []
    late = [0]
    bar = tqdm(total=total, desc=desc, unit="req", disable=not progress, leave=False)
    start = time.perf_counter() + 0.05
    last = [start]

    def worker() -> None:
        try:
            while True:
                item = todo.get()
                if item is None:
                    return
                i, due = item
                k = i % len(payloads)
                now = time.perf_counter()
                if now - due > 0.1:
                    with lock:
                        late[0] += 1
                left_s = max(0.001, deadline_s - (now - due))
                t1, error, wrong, kind = _checked_call(call, (payloads[k], left_s), references[k], i, k, tolerance)
                with lock:
                    outcomes.append(_Outcome(t1 - due, error, wrong, kind))
                    last[0] = max(last[0], t1)
                bar.update(1)
        finally:
            if on_exit is not None:
                on_exit()

    threads = [threading.Thread(target=worker, name=f"openloop-{j}", daemon=True) for j in range(workers)]
    for t in threads:
        t.start()
    for i in range(total):
        due = start + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        todo.put((i, due))
    for _ in threads:
        todo.put(None)
    end_by = time.perf_counter() + deadline_s + 10.0  # every request is bounded by its deadline
    for t in threads:
        t.join(max(0.0, end_by - time.perf_counter()))
    bar.close()
    with lock:
        return list(outcomes), total, last[0] - start, late[0]


def measure_open_loop(
    outcomes: Sequence[_Outcome], sent: int, wall_s: float, late: int, rate: float, deadline_s: float, duration_s: float
) -> Measurement:
    """:func:`measure` plus goodput (correct answers within the deadline per second of the schedule)
    and the refusals and deadline misses among the errors."""
    m = measure(outcomes, sent, wall_s, {"hits": None, "misses": None})
    good = [o for o in outcomes if o.error is None and not o.wrong and o.latency_s <= deadline_s]
    m.rate, m.deadline_s, m.late_sends = rate, deadline_s, late
    m.goodput_ips = len(good) / duration_s
    m.refused = sum(1 for o in outcomes if o.error and o.kind == "refused")
    m.deadline_exceeded = sum(1 for o in outcomes if o.error and o.kind == "deadline")
    return m


def drive(
    call: Callable[[bytes], ImageEmbedding],
    payloads: Sequence[bytes],
    references: Sequence[ImageEmbedding],
    requests: int,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    tolerance: float,
    desc: str,
    progress: bool,
    first: int = 0,
    on_exit: Callable[[], None] | None = None,
) -> tuple[list[_Outcome], int, float]:
    """``concurrency`` threads calling ``call`` on ``payloads`` (cycled, from request index
    ``first``) until ``requests`` were sent or ``duration_s`` passed; each answer is checked as it
    arrives; ``on_exit`` runs in each thread as it ends (it closes that thread's connection).
    Returns the outcomes, the number of requests sent, and the wall time from the first send to the
    last answer."""
    from tqdm import tqdm

    counter = itertools.count()
    lock = threading.Lock()
    outcomes: list[_Outcome] = []
    sent = [0]
    bar = tqdm(total=requests, desc=desc, unit="img", disable=not progress, leave=False)
    start = time.perf_counter()
    deadline = start + duration_s
    last = [start]

    def worker() -> None:
        try:
            _work()
        finally:
            if on_exit is not None:
                on_exit()

    def _work() -> None:
        while True:
            i = next(counter)  # atomic under the GIL
            if i >= requests or time.perf_counter() >= deadline:
                return
            with lock:
                sent[0] += 1
            k = (first + i) % len(payloads)
            t0 = time.perf_counter()
            t1, error, wrong, kind = _checked_call(call, (payloads[k],), references[k], i, k, tolerance)
            with lock:
                outcomes.append(_Outcome(t1 - t0, error, wrong, kind))
                last[0] = max(last[0], t1)
            bar.update(1)

    threads = [threading.Thread(target=worker, name=f"loadtest-{j}", daemon=True) for j in range(concurrency)]
    for t in threads:
        t.start()
    end_by = deadline + timeout_s + 5.0  # every request is bounded by the client's timeout
    for t in threads:
        t.join(max(0.0, end_by - time.perf_counter()))
    bar.close()
    with lock:
        return list(outcomes), sent[0], last[0] - start


def blocks(requests: int, rounds: int) -> list[tuple[int, int]]:
    """``(first request index, count)`` of ``rounds`` blocks as even as possible (none empty)."""
    rounds = max(1, min(rounds, requests))
    sizes = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    return [(sum(sizes[:r]), n) for r, n in enumerate(sizes)]


def _add(total: list[Any], result: tuple[list[_Outcome], int, float]) -> None:
    total[0] += result[0]
    total[1] += result[1]
    total[2] += result[2]


def measure(outcomes: Sequence[_Outcome], sent: int, wall_s: float, cache: dict[str, int | None]) -> Measurement:
    ok = [o for o in outcomes if o.error is None]
    messages = [o.error for o in outcomes if o.error] + [o.wrong for o in outcomes if o.wrong]
    return Measurement(
        requests=sent,
        errors=len(outcomes) - len(ok),
        mismatches=sum(1 for o in ok if o.wrong),
        lost=sent - len(outcomes),
        duration_s=wall_s,
        throughput_ips=len(ok) / wall_s if wall_s > 0 and ok else 0.0,
        latency_ms=latency_summary([o.latency_s for o in ok]),
        cache=cache,
        error_messages=[m for m in messages if m][:20],
    )


class _ServerProbe:
    """Reads the server's metrics endpoint and statistics API around a run."""

    def __init__(self, client: EmbedClient, metrics_url: str, api_key: str | None = None) -> None:
        self.client, self.metrics_url = client, metrics_url
        self._warned = self._warned_stats = False
        # serve's gateway gives the metrics port the same TLS and key as the API.
        self._headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._context = ssl.create_default_context(cafile=client.root_certificates) if client.tls else None

    def metrics(self) -> dict[tuple[str, str], float] | None:
        url = f"{'https' if self._context else 'http'}://{self.metrics_url}/metrics"
        try:
            request = urllib.request.Request(url, headers=self._headers)
            with urllib.request.urlopen(request, timeout=10, context=self._context) as resp:
                return parse_metrics(resp.read().decode())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if not self._warned:
                log.warning(
                    "no Triton metrics from %s (%s): queue/compute times and cache counts not reported", url, exc
                )
                self._warned = True
            return None

    def batches(self) -> dict[str, dict[str, int]]:
        """Batch sizes run so far per tower model; empty where the statistics API is refused (a
        server restricting it), which the report then shows as no batches."""
        out = {}
        for m in TOWER_MODELS.values():
            try:
                out[m] = batch_counts(self.client.inference_statistics(m))
            except ServerError as exc:
                if not self._warned_stats:
                    log.warning("no Triton statistics (%s): tower batch sizes not reported", exc)
                    self._warned_stats = True
                out[m] = {}
        return out


# -- the load test ----------------------------------------------------------------------------------------


def _default_metrics_url(url: str) -> str:
    host = url.rsplit(":", 1)[0]
    return f"{host}:8002"


def run_loadtest(opts: LoadtestOptions, progress: bool = True) -> LoadtestReport:
    """The whole load test; see the module docstring."""
    if opts.requests < 1 or opts.rounds < 1 or opts.duration_s <= 0 or any(c < 1 for c in opts.concurrency):
        raise InputError("--requests, --rounds and --concurrency must be >= 1 and --duration > 0")
    for name, value in (("--tolerance", opts.tolerance), ("--timeout", opts.timeout_s)):
        if not 0 < value < float("inf"):  # an infinite tolerance would make a check that checks nothing
            raise InputError(f"{name} must be a finite number > 0, got {value}")
    files = image_files(opts.images)
    payloads = [image_bytes(f) for f in files]
    log.info("computing the in-process reference of %d images (%s backend)", len(files), opts.backend)
    embedder = VisionEmbedder.from_artifacts(
        opts.checkpoint, opts.backend, list(opts.artifacts), provider=opts.provider, cache_mb=0
    )
    references = []
    for f, data in zip(files, payloads, strict=True):
        try:
            (ref,) = embedder.embed_images([data])
        except InputError as exc:
            raise InputError(f"--images {f}: {exc}") from exc
        references.append(
            ImageEmbedding(_numpy(ref.features), ref.token_ids, ref.text, ref.num_crops, ref.newline_mask)
        )

    if any(not 0 < r < float("inf") for r in opts.rates):
        raise InputError(f"--rate must be a finite number > 0, got {list(opts.rates)}")
    api_key = read_api_key(opts.api_key_file) if opts.api_key_file is not None else None
    client = EmbedClient(
        opts.url,
        opts.protocol,
        timeout=opts.timeout_s,
        api_key=api_key,
        tls=opts.tls,
        root_certificates=opts.tls_ca,
        retry=opts.retry,
    )
    report = LoadtestReport(opts, [str(f) for f in files])
    try:
        if not client.is_ready():
            raise InputError(f"--url {opts.url}: no ready {EMBEDDER_MODEL} there over {opts.protocol}")
        probe = _ServerProbe(client, opts.metrics_url or _default_metrics_url(opts.url), api_key)
        for data in warmup_images(opts.warmup):
            client.embed(data)
        embedder.cache = EmbeddingCache(opts.cache_mb)
        if opts.in_process:
            for data in warmup_images(opts.warmup):
                embedder.embed_images([data])
        for rate in opts.rates:
            m0, b0 = probe.metrics(), probe.batches()
            outcomes, sent, wall, late = drive_open_loop(
                client.embed, payloads, references, rate, opts.duration_s, opts.timeout_s, opts.tolerance,
                f"open loop {rate:g}/s", progress, on_exit=client.close_thread,
            )  # fmt: skip
            m1, b1 = probe.metrics(), probe.batches()
            server = measure_open_loop(outcomes, sent, wall, late, rate, opts.timeout_s, opts.duration_s)
            server.cache = cache_counts(m0, m1)
            models = [EMBEDDER_MODEL, *TOWER_MODELS.values()]
            report.runs.append(
                Run(
                    0,
                    server,
                    {m: batch_delta(b0[m], b1[m]) for m in b1},
                    model_timings(m0, m1, models) if m0 and m1 else None,
                )
            )
            log.info(
                "open loop %g/s: %d sent, goodput %.2f/s, %d refused, %d past the deadline, %d other failures",
                rate, sent, server.goodput_ips, server.refused, server.deadline_exceeded, server.failed,
            )  # fmt: skip
        for c in opts.concurrency if not opts.rates else ():
            served: list[Any] = [[], 0, 0.0]  # outcomes, sent, wall seconds, summed over the blocks
            local: list[Any] = [[], 0, 0.0]
            m0, b0 = probe.metrics(), probe.batches()
            h0, miss0 = embedder.cache.hits, embedder.cache.misses
            for r, (start, n) in enumerate(blocks(opts.requests, opts.rounds)):
                args = (payloads, references, n, c, opts.duration_s / opts.rounds, opts.timeout_s, opts.tolerance)
                tag = f" {r + 1}/{opts.rounds}" if opts.rounds > 1 else ""
                d = f"served c={c}{tag}"
                _add(served, drive(client.embed, *args, d, progress, first=start, on_exit=client.close_thread))
                if opts.in_process:
                    _add(
                        local,
                        drive(
                            lambda d: embedder.embed_images([d])[0],
                            *args,
                            desc=f"in-process c={c}{tag}",
                            progress=progress,
                            first=start,
                        ),
                    )
            m1, b1 = probe.metrics(), probe.batches()
            run = Run(
                c,
                measure(*served, cache_counts(m0, m1)),
                {m: batch_delta(b0[m], b1[m]) for m in b1},
                model_timings(m0, m1, [EMBEDDER_MODEL, *TOWER_MODELS.values()]) if m0 and m1 else None,
            )
            if opts.in_process:
                cache = {"hits": embedder.cache.hits - h0, "misses": embedder.cache.misses - miss0}
                run.in_process = measure(*local, cache)
            report.runs.append(run)
            for name, m in (("served", run.server), ("in-process", run.in_process)):
                if m is not None:
                    log.info(
                        "%s c=%d: %d requests, %d failed, %.3f img/s, embedding cache hits %s misses %s",
                        name,
                        c,
                        m.requests,
                        m.failed,
                        m.throughput_ips,
                        m.cache.get("hits"),
                        m.cache.get("misses"),
                    )
    finally:
        client.close()
    return report
