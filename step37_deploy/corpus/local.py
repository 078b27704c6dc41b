"""The local engine: the per-shard function on this machine, no extra needed.

One worker runs in this process.  Several run as worker processes (``spawn``), each with its own
embedder built once: one per GPU (``devices``: ``cuda:0``, ``cuda:1``...), or N CPU workers that
split the cores between them (``threads`` each).  Shards are handed out one at a time; a worker that
finishes one takes the next.  Workers die with this process (``PR_SET_PDEATHSIG``), so a killed run
leaves no worker writing behind it.

Runners share one small interface: ``run(todo, on_row, on_images)`` calls ``on_row`` with each
shard's row as it finishes and ``on_images(n)`` as images are embedded (the progress bar).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from typing import Any

from ..errors import OutputError
from .job import JobSpec, ShardWorker
from .sources import ShardSource

log = logging.getLogger(__name__)

RowFn = Callable[[dict[str, Any]], None]
ImagesFn = Callable[[int], None]


def split_cores(workers: int, cores: int | None = None) -> int:
    """Threads per CPU worker: the cores shared out, at least one each."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


class LocalRunner:
    def __init__(self, spec: JobSpec, workers: int = 1, devices: Sequence[str] = ()) -> None:
        self.spec = spec
        self.devices = list(devices)
        self.workers = len(self.devices) or max(1, workers)

    def run(self, todo: Sequence[ShardSource], on_row: RowFn, on_images: ImagesFn | None = None) -> None:
        if not todo:
            return
        if self.workers == 1 and len(self.devices) <= 1:
            self._run_here(todo, on_row, on_images)
        else:
            self._run_pool(todo, on_row, on_images)

    def _run_here(self, todo: Sequence[ShardSource], on_row: RowFn, on_images: ImagesFn | None) -> None:
        spec = self.spec
        if self.devices:
            spec = replace(spec, engine=replace(spec.engine, device=self.devices[0]))
        worker = ShardWorker(spec)
        try:
            for src in todo:
                row = worker(src, on_images)
                on_row(row)
                if row.get("fatal"):
                    raise OutputError(row["message"])
        finally:
            worker.close()

    def _run_pool(self, todo: Sequence[ShardSource], on_row: RowFn, on_images: ImagesFn | None) -> None:
        ctx = mp.get_context("spawn")
        progress: Any = ctx.Queue()
        devices: Any = ctx.Queue()
        for i in range(self.workers):
            devices.put(self.devices[i] if self.devices else None)
        threads = None if self.devices else (self.spec.engine.threads or split_cores(self.workers))
        spec = replace(self.spec, engine=replace(self.spec.engine, threads=threads))
        stop = threading.Event()
        drain = threading.Thread(target=_drain, args=(progress, on_images, stop), daemon=True)
        drain.start()
        pool = ProcessPoolExecutor(self.workers, ctx, initializer=_init_worker, initargs=(spec, devices, progress))
        try:
            pending: set[Future] = set()
            it = iter(todo)
            for src in it:  # a window of 2 shards per worker: nothing queued far ahead
                pending.add(pool.submit(_run_shard, src))
                if len(pending) >= 2 * self.workers:
                    break
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    row = fut.result()
                    on_row(row)
                    if row.get("fatal"):
                        raise OutputError(row["message"])
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.add(pool.submit(_run_shard, nxt))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            stop.set()
            drain.join(timeout=5)


def _drain(progress: Any, on_images: ImagesFn | None, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            n = progress.get(timeout=0.2)
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return
        if on_images is not None:
            on_images(n)


_WORKER: ShardWorker | None = None
_PROGRESS: Any = None


def _init_worker(spec: JobSpec, devices: Any, progress: Any) -> None:
    from ..process import die_with_parent

    global _WORKER, _PROGRESS
    die_with_parent()
    device = devices.get()
    if device is not None:
        spec = replace(spec, engine=replace(spec.engine, device=device))
    logging.basicConfig(level=logging.WARNING)
    _WORKER, _PROGRESS = ShardWorker(spec), progress


def _run_shard(src: ShardSource) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER(src, _PROGRESS.put)
