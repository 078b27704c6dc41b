"""Embedding a stream of samples, in order, with decoding and writing hidden behind the towers.

:class:`InProcessCompute` owns a :class:`~step37_deploy.runtime.VisionEmbedder` (torch, ONNX Runtime
or TensorRT).  Samples are decoded and preprocessed by a small thread pool up to ``prefetch``
batches ahead (Pillow and numpy release the GIL), the towers run one batch of ``batch`` images at a
time through :meth:`VisionEmbedder.embed_preprocessed` (the service's preprocessing, batching and
rows), and the caller's writer thread serialises the previous batch meanwhile.  Memory is bounded
by ``batch x (prefetch + 2)`` images, whatever the size of the shard or the corpus.

:class:`ServiceCompute` sends each image to a running ``serve`` fleet through
:class:`~step37_deploy.serving.client.EmbedClient`, ``concurrency`` requests in flight.

Both yield one :class:`Outcome` per sample, in input order: rows and layout, or the sample's error
(an image the service would refuse: corrupt, truncated, empty, not an image, over the pixel limit).
An image is never replaced by another one.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServerError
from ..preprocess import PreprocessConfig
from .sources import Sample

log = logging.getLogger(__name__)


@dataclass
class EngineSpec:
    """How a worker builds its embedder (picklable: sent to worker processes and Ray actors)."""

    checkpoint: str
    backend: str = "torch"  # torch | onnx | trt
    artifacts: tuple[str, ...] = ()
    device: str = "cpu"
    provider: str = "cpu"
    server: str | None = None  # HOST:PORT of a serve fleet instead of an in-process engine
    client: dict[str, Any] = field(default_factory=dict)  # EmbedClient keyword arguments
    concurrency: int = 8  # server: requests in flight
    max_pixels: int = PreprocessConfig.max_pixels
    batch: int = 8  # images per tower batch
    prefetch: int = 2  # batches decoded ahead
    decode_threads: int = 2
    threads: int | None = None  # torch / ONNX Runtime threads in this worker (None: the library's default)


@dataclass
class Outcome:
    """One sample's result: ``embedding`` (an ``ImageEmbedding``) or ``error`` (class, message)."""

    sample: Sample
    embedding: Any = None
    size: tuple[int, int] = (0, 0)  # upright width, height (EXIF orientation applied)
    sha256: str = ""
    error: tuple[str, str] | None = None


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


class InProcessCompute:
    def __init__(self, spec: EngineSpec) -> None:
        from ..runtime import VisionEmbedder

        _set_threads(spec.threads)
        self.spec = spec
        self.pcfg = PreprocessConfig(max_pixels=spec.max_pixels)
        self.embedder = VisionEmbedder.from_artifacts(
            spec.checkpoint,
            spec.backend,
            list(spec.artifacts),
            provider=spec.provider,
            device=spec.device,
            batch_size=spec.batch,
            preprocess_cfg=self.pcfg,
        )
        if spec.threads and spec.backend == "onnx":
            log.debug("ONNX Runtime sessions use their own thread settings; --threads applies to torch")
        self.pixel_dtype = self.embedder.pixel_dtype
        self._pool = ThreadPoolExecutor(max(1, spec.decode_threads), thread_name_prefix="corpus-decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _prepare(self, sample: Sample) -> tuple[Any, tuple[int, int], str]:
        from ..preprocess import preprocess, to_rgb

        im = to_rgb(sample.data, self.pcfg.max_pixels)
        pre = preprocess(im, self.pcfg, pixel_dtype=self.pixel_dtype)
        return pre, (im.width, im.height), hashlib.sha256(sample.data or b"").hexdigest()

    def run(self, samples: Iterator[Sample], outputs: Sequence[str]) -> Iterator[list[Outcome]]:
        """Batches of outcomes, in input order (errors in their place among the embedded)."""
        window: deque[tuple[Sample, Future | None]] = deque()
        ahead = self.spec.batch * (self.spec.prefetch + 1)
        pending: list[Outcome] = []
        ready: list[tuple[Outcome, Any]] = []
        it = iter(samples)
        exhausted = False
        while window or not exhausted:
            while not exhausted and len(window) < ahead:
                s = next(it, None)
                if s is None:
                    exhausted = True
                    break
                window.append((s, None if s.error else self._pool.submit(self._prepare, s)))
            if not window:
                break
            sample, fut = window.popleft()
            out = self._finish(sample, fut)
            pending.append(out)
            if out.error is None:
                ready.append((out, out.embedding))
            if len(ready) >= self.spec.batch:
                yield self._embed(pending, ready, outputs)
                pending, ready = [], []
        if pending:
            yield self._embed(pending, ready, outputs)

    @staticmethod
    def _finish(sample: Sample, fut: Future | None) -> Outcome:
        if fut is None:
            return Outcome(sample, error=sample.error)
        try:
            pre, size, sha = fut.result()
        except Exception as exc:  # the sample's error, recorded with its key
            return Outcome(sample, error=(type(exc).__name__, str(exc)))
        return Outcome(sample, embedding=pre, size=size, sha256=sha)

    def _embed(self, pending: list[Outcome], ready: list[tuple[Outcome, Any]], outputs: Sequence[str]) -> list[Outcome]:
        if ready:
            embs = self.embedder.embed_preprocessed([pre for _, pre in ready], outputs)
            for (out, _), e in zip(ready, embs, strict=True):
                out.embedding = e
        return pending


class ServiceCompute:
    """Embeds through a running service; the server preprocesses, so only headers are read here."""

    def __init__(self, spec: EngineSpec, dtype: str) -> None:
        from ..serving.client import EmbedClient

        self.spec, self.dtype = spec, dtype
        self.client = EmbedClient(spec.server or "", **spec.client)
        self._pool = ThreadPoolExecutor(max(1, spec.concurrency), thread_name_prefix="corpus-request")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def _request(self, sample: Sample, outputs: Sequence[str]) -> Outcome:
        from .sizing import image_size

        data = sample.data or b""
        sha = hashlib.sha256(data).hexdigest()
        try:
            e = self.client.embed(data, outputs=outputs, dtype=self.dtype)
        except ServerError as exc:
            if exc.retryable or exc.status in (None, "timeout", "connection"):
                raise  # the service is unreachable or overloaded: the shard fails, a rerun resumes it
            return Outcome(sample, error=("ServerError", str(exc)))
        size = image_size(data) or (0, 0)
        return Outcome(sample, embedding=e, size=size, sha256=sha)

    def run(self, samples: Iterator[Sample], outputs: Sequence[str]) -> Iterator[list[Outcome]]:
        window: deque[tuple[Sample, Future | None]] = deque()
        ahead = 2 * max(1, self.spec.concurrency)
        for s in samples:
            window.append((s, None if s.error else self._pool.submit(self._request, s, outputs)))
            if len(window) >= ahead:
                yield [self._take(*window.popleft())]
        while window:
            yield [self._take(*window.popleft())]

    @staticmethod
    def _take(sample: Sample, fut: Future | None) -> Outcome:
        return Outcome(sample, error=sample.error) if fut is None else fut.result()


def make_compute(spec: EngineSpec, dtype: str) -> InProcessCompute | ServiceCompute:
    return ServiceCompute(spec, dtype) if spec.server else InProcessCompute(spec)
