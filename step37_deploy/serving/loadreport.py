"""What a load test measures, and the server's own numbers read around each run.

:class:`Measurement` is one target (the server, or the in-process embedder) at one concurrency or
rate, made from the drivers' outcomes (:func:`measure`, :func:`measure_open_loop`); :class:`Run`
is one concurrency level or rate with the server's side: Triton's Prometheus counters per model
(:func:`parse_metrics`, :func:`model_timings`), the embedding cache's hits and misses
(:func:`cache_counts`) and the batch sizes the towers ran (:func:`batch_counts`, from the
statistics API).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .contract import CACHE_HITS_METRIC, CACHE_MISSES_METRIC
from .drivers import Outcome

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


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation), mean and max, in milliseconds; empty for no samples."""
    if not len(latencies_s):
        return {}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()), "max": float(ms.max())}


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


def measure(outcomes: Sequence[Outcome], sent: int, wall_s: float, cache: dict[str, int | None]) -> Measurement:
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


def measure_open_loop(
    outcomes: Sequence[Outcome], sent: int, wall_s: float, late: int, rate: float, deadline_s: float, duration_s: float
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
