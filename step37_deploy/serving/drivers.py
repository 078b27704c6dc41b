"""The load test's request drivers: threads that send requests and check every answer as it arrives.

One mechanism, :class:`WorkerPool`, runs both: worker threads take the next request from a source
and record its outcome (latency, error and the error's kind, or why the answer is not the reference).
The two drivers differ only in where requests come from and when their latency starts:

* :func:`drive` (closed loop): ``concurrency`` workers each send the next request as soon as their
  previous one is answered, until ``requests`` were sent or ``duration_s`` passed; latency counts
  from the send.
* :func:`drive_open_loop`: request ``i`` is due at ``i / rate`` seconds whatever the answers; this
  thread puts requests on a queue on schedule and a pool large enough for every request to live
  out its deadline takes them; latency counts from the scheduled time (no coordinated omission),
  and each request is sent with the deadline time it has left.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import Step37Error
from ..runtime import ImageEmbedding
from .client import OVERLOAD_STATUSES


@dataclass
class Outcome:
    latency_s: float
    error: str | None
    wrong: str | None
    kind: str | None = None  # errors: "refused", "deadline" or None (any other)


@dataclass
class Request:
    """One request as a worker takes it."""

    index: int  # the request's number in the run
    image: int  # which payload (and reference)
    start: float  # when its latency starts (time.perf_counter)
    args: tuple  # what the call gets


# -- checking an answer ---------------------------------------------------------------------------
def as_numpy(x: Any) -> np.ndarray:
    """A tensor or an array as float32 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def _norm(x: np.ndarray) -> float:
    """The L2 norm by numpy's own summation, never BLAS: ``np.linalg.norm`` of a large array is a
    BLAS ``dot``, whose OpenBLAS worker threads then spin-wait for the next call.  Every answer
    ``loadtest`` checks woke them, and on the server's machine they took a core from the server
    it measured (the 728 tower's compute 145 against 106 ms per request at concurrency 1)."""
    return float(np.sqrt(np.square(x).sum()))


def rel_l2(a: Any, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return _norm(a64 - b64) / max(_norm(b64), 1e-30)


def mismatch(got: ImageEmbedding, ref: ImageEmbedding, tolerance: float) -> str | None:
    """Why ``got`` is not ``ref`` (layout differs, shape differs, features too far), or None."""
    if got.num_crops != ref.num_crops or list(got.token_ids) != list(ref.token_ids):
        return f"token layout differs ({got.num_crops} vs {ref.num_crops} crops)"
    if list(got.newline_mask) != list(ref.newline_mask):
        return "newline mask differs"
    feats = as_numpy(got.features)
    if feats.shape != ref.features.shape:
        return f"features {feats.shape} vs {ref.features.shape}"
    d = rel_l2(feats, ref.features)
    return None if d <= tolerance else f"features differ (rel L2 {d:.3g} > {tolerance:g})"


def _error_kind(exc: Exception) -> str | None:
    """An open-loop error's kind: a live server refused it (its overload answer: Triton's
    UNAVAILABLE, a gateway's 503), or the deadline passed first.  A lost connection, a refused
    one, a TLS or name failure is none of these: the server is gone, which fails the run."""
    status = getattr(exc, "status", None)
    if status in ("StatusCode.DEADLINE_EXCEEDED", "timeout"):
        return "deadline"
    if status in OVERLOAD_STATUSES:
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


# -- the worker mechanism ---------------------------------------------------------------------------
class WorkerPool:
    """Worker threads that take :class:`Request` s from ``take`` (None: this worker is done), call
    ``call(*request.args)`` and check each answer against its reference as it arrives; ``on_exit``
    runs in each thread as it ends (it closes that thread's connection)."""

    def __init__(
        self,
        call: Callable[..., ImageEmbedding],
        references: Sequence[ImageEmbedding],
        tolerance: float,
        bar: Any,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.call, self.references, self.tolerance, self.bar, self.on_exit = call, references, tolerance, bar, on_exit
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.last = 0.0

    def _work(self, take: Callable[[], Request | None]) -> None:
        try:
            while (req := take()) is not None:
                ref = self.references[req.image]
                t1, error, wrong, kind = _checked_call(self.call, req.args, ref, req.index, req.image, self.tolerance)
                with self.lock:
                    self.outcomes.append(Outcome(t1 - req.start, error, wrong, kind))
                    self.last = max(self.last, t1)
                self.bar.update(1)
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def run(
        self,
        workers: int,
        name: str,
        take: Callable[[], Request | None],
        start: float,
        grace_s: float,
        feed: Callable[[], None] | None = None,
    ) -> tuple[list[Outcome], float]:
        """Start ``workers`` threads, run ``feed`` here (it puts requests where ``take`` finds them),
        then wait for the threads at most ``grace_s`` (every request is bounded by its timeout).
        Returns the outcomes and the wall time from ``start`` to the last answer."""
        self.last = start
        threads = [
            threading.Thread(target=self._work, args=(take,), name=f"{name}-{j}", daemon=True) for j in range(workers)
        ]
        for t in threads:
            t.start()
        if feed is not None:
            feed()
        end_by = time.perf_counter() + grace_s
        for t in threads:
            t.join(max(0.0, end_by - time.perf_counter()))
        self.bar.close()
        with self.lock:
            return list(self.outcomes), self.last - start


def _bar(total: int, desc: str, unit: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


# -- the two drivers --------------------------------------------------------------------------------
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
) -> tuple[list[Outcome], int, float]:
    """``concurrency`` threads calling ``call`` on ``payloads`` (cycled, from request index
    ``first``) until ``requests`` were sent or ``duration_s`` passed; each answer is checked as it
    arrives; ``on_exit`` runs in each thread as it ends (it closes that thread's connection).
    Returns the outcomes, the number of requests sent, and the wall time from the first send to the
    last answer."""
    counter = itertools.count()
    lock = threading.Lock()
    sent = [0]
    pool = WorkerPool(call, references, tolerance, _bar(requests, desc, "img", progress), on_exit)
    start = time.perf_counter()
    deadline = start + duration_s

    def take() -> Request | None:
        i = next(counter)  # atomic under the GIL
        if i >= requests or time.perf_counter() >= deadline:
            return None
        with lock:
            sent[0] += 1
        k = (first + i) % len(payloads)
        return Request(i, k, time.perf_counter(), (payloads[k],))

    outcomes, wall = pool.run(concurrency, "loadtest", take, start, duration_s + timeout_s + 5.0)
    with lock:
        return outcomes, sent[0], wall


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
) -> tuple[list[Outcome], int, float, int]:
    """Request ``i`` sent at ``i / rate`` seconds for ``duration_s`` seconds, whatever the answers:
    ``call(payload, deadline_s)`` runs on a pool of ``ceil(rate * (deadline_s + 1))`` workers (at most
    ``max_workers``), every answer checked.  Latency is counted from the scheduled time.  Returns the
    outcomes, the requests sent, the wall time from the first scheduled send to the last outcome,
    and how many were sent over 100 ms late (the pool was exhausted)."""
    total = max(1, int(rate * duration_s))
    workers = max(1, min(max_workers, math.ceil(rate * (deadline_s + 1.0))))
    todo: queue.Queue = queue.Queue()
    lock = threading.Lock()
    late = [0]
    pool = WorkerPool(call, references, tolerance, _bar(total, desc, "req", progress), on_exit)
    start = time.perf_counter() + 0.05

    def take() -> Request | None:
        item = todo.get()
        if item is None:
            return None
        i, due = item
        k = i % len(payloads)
        now = time.perf_counter()
        if now - due > 0.1:
            with lock:
                late[0] += 1
        left_s = max(0.001, deadline_s - (now - due))
        return Request(i, k, due, (payloads[k], left_s))

    def feed() -> None:
        for i in range(total):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            todo.put((i, due))
        for _ in range(workers):
            todo.put(None)

    outcomes, wall = pool.run(workers, "openloop", take, start, deadline_s + 10.0, feed)
    with lock:
        return outcomes, total, wall, late[0]
