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

Modules: this one holds the options, the steps of :func:`run_loadtest` and the report;
``drivers.py`` the worker threads that send requests and check answers (closed and open loop);
``loadreport.py`` the measurements and the server's metrics and statistics read around each run.
"""

from __future__ import annotations

import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ServerError
from ..files import write_json
from ..preprocess import encode_png
from ..runtime import EmbeddingCache, ImageEmbedding, VisionEmbedder
from .auth import API_KEY_HEADER, read_optional_api_key
from .client import EmbedClient, image_bytes
from .contract import EMBEDDER_MODEL, TOWER_MODELS
from .drivers import Outcome, drive, drive_open_loop, mismatch
from .drivers import as_numpy as _numpy
from .loadreport import (
    Measurement,
    Run,
    batch_counts,
    batch_delta,
    cache_counts,
    latency_summary,
    measure,
    measure_open_loop,
    model_timings,
    parse_metrics,
)

#: What ``from step37_deploy.serving.loadtest import ...`` gives, the drivers' and the report's names included.
__all__ = [
    "DEFAULT_TOLERANCE",
    "IMAGE_SUFFIXES",
    "LoadtestOptions",
    "LoadtestReport",
    "Measurement",
    "Run",
    "batch_counts",
    "batch_delta",
    "blocks",
    "cache_counts",
    "drive",
    "drive_open_loop",
    "image_files",
    "latency_summary",
    "measure",
    "measure_open_loop",
    "mismatch",
    "model_timings",
    "parse_metrics",
    "run_loadtest",
    "warmup_images",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
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


def warmup_images(n: int) -> list[bytes]:
    """``n`` distinct noise PNGs, large and wide enough to have crops, so both towers warm up
    without putting any measured image into a cache."""
    rng = np.random.default_rng(12345)
    return [encode_png(rng.integers(0, 256, (800, 1100, 3), dtype=np.uint8)) for _ in range(n)]


def blocks(requests: int, rounds: int) -> list[tuple[int, int]]:
    """``(first request index, count)`` of ``rounds`` blocks as even as possible (none empty)."""
    rounds = max(1, min(rounds, requests))
    sizes = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    return [(sum(sizes[:r]), n) for r, n in enumerate(sizes)]


def _add(total: list[Any], result: tuple[list[Outcome], int, float]) -> None:
    total[0] += result[0]
    total[1] += result[1]
    total[2] += result[2]


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
        """Batch sizes run so far per tower model the server has (none where the embedder runs its
        towers itself, ``--tower-calls local``); empty where the statistics API is refused (a server
        restricting it), which the report then shows as no batches."""
        try:
            stats = self.client.inference_statistics()
        except ServerError as exc:
            if not self._warned_stats:
                log.warning("no Triton statistics (%s): tower batch sizes not reported", exc)
                self._warned_stats = True
            return {}
        return {m: batch_counts(stats[m]) for m in TOWER_MODELS.values() if m in stats}


def _default_metrics_url(url: str) -> str:
    host = url.rsplit(":", 1)[0]
    return f"{host}:8002"


# -- the load test, step by step ------------------------------------------------------------------------
def check_options(opts: LoadtestOptions) -> None:
    """One line naming the option that would make the test meaningless (or a check check nothing)."""
    if opts.requests < 1 or opts.rounds < 1 or opts.duration_s <= 0 or any(c < 1 for c in opts.concurrency):
        raise InputError("--requests, --rounds and --concurrency must be >= 1 and --duration > 0")
    for name, value in (("--tolerance", opts.tolerance), ("--timeout", opts.timeout_s)):
        if not 0 < value < float("inf"):  # an infinite tolerance would make a check that checks nothing
            raise InputError(f"{name} must be a finite number > 0, got {value}")


def reference_answers(
    opts: LoadtestOptions, files: Sequence[Path], payloads: Sequence[bytes]
) -> tuple[VisionEmbedder, list[ImageEmbedding]]:
    """The in-process embedder (no cache) and its answer for every image, the reference each served
    answer is checked against."""
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
    return embedder, references


def connect(opts: LoadtestOptions) -> EmbedClient:
    """The client the load goes through (key, TLS, retries as asked)."""
    return EmbedClient(
        opts.url,
        opts.protocol,
        timeout=opts.timeout_s,
        api_key=read_optional_api_key(opts.api_key_file),
        tls=opts.tls,
        root_certificates=opts.tls_ca,
        retry=opts.retry,
    )


def warm_up(opts: LoadtestOptions, client: EmbedClient, embedder: VisionEmbedder) -> None:
    """Warm-up requests on generated images (never measured ones, so no cache is pre-filled); the
    in-process embedder gets its measured cache now."""
    for data in warmup_images(opts.warmup):
        client.embed(data)
    embedder.cache = EmbeddingCache(opts.cache_mb)
    if opts.in_process:
        for data in warmup_images(opts.warmup):
            embedder.embed_images([data])


def _server_side(
    before: tuple[dict | None, dict], after: tuple[dict | None, dict]
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]] | None]:
    """What the server did between two readings: tower batch sizes, and per-model timings."""
    (m0, b0), (m1, b1) = before, after
    served = {m for (_, m) in m1} if m1 else set()  # the towers are models only under --tower-calls bls
    models = [EMBEDDER_MODEL, *(m for m in TOWER_MODELS.values() if m in served)]
    return {m: batch_delta(b0.get(m, {}), b1[m]) for m in b1}, model_timings(m0, m1, models) if m0 and m1 else None


def open_loop_run(
    opts: LoadtestOptions,
    client: EmbedClient,
    probe: _ServerProbe,
    payloads: Sequence[bytes],
    references: Sequence[ImageEmbedding],
    rate: float,
    progress: bool,
) -> Run:
    """``rate`` requests per second for ``--duration`` seconds, each with the ``--timeout`` deadline."""
    before = probe.metrics(), probe.batches()
    outcomes, sent, wall, late = drive_open_loop(
        client.embed, payloads, references, rate, opts.duration_s, opts.timeout_s, opts.tolerance,
        f"open loop {rate:g}/s", progress, on_exit=client.close_thread,
    )  # fmt: skip
    after = probe.metrics(), probe.batches()
    server = measure_open_loop(outcomes, sent, wall, late, rate, opts.timeout_s, opts.duration_s)
    server.cache = cache_counts(before[0], after[0])
    log.info(
        "open loop %g/s: %d sent, goodput %.2f/s, %d refused, %d past the deadline, %d other failures",
        rate, sent, server.goodput_ips, server.refused, server.deadline_exceeded, server.failed,
    )  # fmt: skip
    return Run(0, server, *_server_side(before, after))


def closed_loop_run(
    opts: LoadtestOptions,
    client: EmbedClient,
    embedder: VisionEmbedder,
    probe: _ServerProbe,
    payloads: Sequence[bytes],
    references: Sequence[ImageEmbedding],
    concurrency: int,
    progress: bool,
) -> Run:
    """``concurrency`` requests in flight, served and (``--in-process``) in-process alternating in
    ``--rounds`` blocks over the same request range."""
    c = concurrency
    served: list[Any] = [[], 0, 0.0]  # outcomes, sent, wall seconds, summed over the blocks
    local: list[Any] = [[], 0, 0.0]
    before = probe.metrics(), probe.batches()
    h0, miss0 = embedder.cache.hits, embedder.cache.misses
    for r, (start, n) in enumerate(blocks(opts.requests, opts.rounds)):
        args = (payloads, references, n, c, opts.duration_s / opts.rounds, opts.timeout_s, opts.tolerance)
        tag = f" {r + 1}/{opts.rounds}" if opts.rounds > 1 else ""
        _add(
            served, drive(client.embed, *args, f"served c={c}{tag}", progress, first=start, on_exit=client.close_thread)
        )
        if opts.in_process:
            in_process = lambda d: embedder.embed_images([d])[0]  # noqa: E731
            _add(local, drive(in_process, *args, desc=f"in-process c={c}{tag}", progress=progress, first=start))
    after = probe.metrics(), probe.batches()
    run = Run(c, measure(*served, cache_counts(before[0], after[0])), *_server_side(before, after))
    if opts.in_process:
        cache = {"hits": embedder.cache.hits - h0, "misses": embedder.cache.misses - miss0}
        run.in_process = measure(*local, cache)
    for name, m in (("served", run.server), ("in-process", run.in_process)):
        if m is not None:
            log.info(
                "%s c=%d: %d requests, %d failed, %.3f img/s, embedding cache hits %s misses %s",
                name, c, m.requests, m.failed, m.throughput_ips, m.cache.get("hits"), m.cache.get("misses"),
            )  # fmt: skip
    return run


def run_loadtest(opts: LoadtestOptions, progress: bool = True) -> LoadtestReport:
    """The whole load test; see the module docstring."""
    check_options(opts)
    files = image_files(opts.images)
    payloads = [image_bytes(f) for f in files]
    embedder, references = reference_answers(opts, files, payloads)
    if any(not 0 < r < float("inf") for r in opts.rates):
        raise InputError(f"--rate must be a finite number > 0, got {list(opts.rates)}")
    client = connect(opts)
    report = LoadtestReport(opts, [str(f) for f in files])
    try:
        if not client.is_ready():
            raise InputError(f"--server {opts.url}: no ready {EMBEDDER_MODEL} there over {opts.protocol}")
        probe = _ServerProbe(
            client, opts.metrics_url or _default_metrics_url(opts.url), read_optional_api_key(opts.api_key_file)
        )
        warm_up(opts, client, embedder)
        for rate in opts.rates:
            report.runs.append(open_loop_run(opts, client, probe, payloads, references, rate, progress))
        for c in opts.concurrency if not opts.rates else ():
            report.runs.append(closed_loop_run(opts, client, embedder, probe, payloads, references, c, progress))
    finally:
        client.close()
    return report
