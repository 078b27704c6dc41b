"""The client side of the service: image files in, the same :class:`ImageEmbedding` as in-process.

:class:`EmbedClient` sends one encoded image per request to the ``step37_embedder`` model over
Triton's gRPC or HTTP protocol (``tritonclient``) and rebuilds the :class:`ImageEmbedding` that
:meth:`VisionEmbedder.embed_images` returns for the same image: the features as served, the token
ids as served, and the newline mask and text read back from the token layout (and checked against
it).  Every failure, from a refused connection to the server's own error response, is a
:class:`~step37_deploy.errors.ServerError` carrying the server's message.

Overload and outages are retried, bad requests never: ``embed`` gives each request one overall
deadline (``timeout``, or the ``deadline`` it is given) and sends the time left with every try,
as gRPC's deadline (Triton cancels a request whose client gave up), as the HTTP call's own limit
(a ``gevent.Timeout``: the HTTP client's socket timeouts are fixed when it connects), and as the
request's ``timeout`` parameter (Triton refuses it with UNAVAILABLE once it has waited that long
in a queue, instead of computing an answer nobody waits for).  UNAVAILABLE (a full queue, a
stopping server, HTTP 502/503/504) and lost connections are tried again after an exponential
backoff with full jitter (:func:`backoff_s`) while the deadline and the client's
:class:`RetryBudget` allow; INVALID_ARG, a certificate the client does not trust, a host name that
does not resolve, and every other answer are final (:func:`classify`).  A live server's refusal
(UNAVAILABLE, HTTP 503) also says when to come back (:func:`retry_after_s`: the "retry after N s"
that the gateway's and the embedder's refusals state, the contract's ``RETRY_AFTER_S`` for
Triton's own, which cannot say it): a retrying client waits at least that long before the retry,
and before the calling thread's next request when the refusal was final (a spent retry budget), so
that a closed loop of callers does not answer a refusal storm with an immediate new request.

Each thread gets its own ``tritonclient`` connection (the HTTP client is gevent-based and must not
be shared across threads), so one :class:`EmbedClient` may be used from many threads;
:meth:`EmbedClient.embed_many` does exactly that.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TokenIds
from ..errors import InputError, ServerError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig, image_layout, to_rgb
from ..runtime import ImageEmbedding
from .auth import API_KEY_HEADER
from .contract import (
    EMBEDDER_INPUT,
    EMBEDDER_IO,
    EMBEDDER_MODEL,
    EMBEDDER_OUTPUTS,
    PROTOCOLS,
    RETRY_AFTER_S,
    ROW_DTYPES,
    ROW_KINDS,
    row_output,
)

_FEATURES, _TOKEN_IDS, _NUM_CROPS = EMBEDDER_OUTPUTS
#: Statuses worth another try: the server is overloaded, stopping, or not there (yet).
RETRYABLE_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "502", "503", "504"})
#: The server's own overload answers (Triton's UNAVAILABLE, a gateway's 503): a live server refused.
OVERLOAD_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "503"})
#: gRPC reports transport failures as UNAVAILABLE too; its text (the status message or the core's
#: debug string) tells them from a server's answer.  Certificate and name failures are final.
_GRPC_TLS = ("ssl", "handshake", "certificate", "tls")
_GRPC_DNS = ("dns resolution failed", "name or service not known", "could not resolve")
_GRPC_TRANSPORT = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "socket closed",
    "broken pipe",
    "endpoint closing",
    "goaway",
    "settings frame",
    "connections to all backends failing",
)
#: First backoff and its cap, seconds (each retry doubles the cap of the random wait).
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0


def backoff_s(attempt: int, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_MAX_S) -> float:
    """Wait before retry number ``attempt`` (0 = the first): uniform in [0, min(cap, base * 2^attempt)]
    ("full jitter"), so that clients refused together do not come back together."""
    return random.uniform(0.0, min(cap_s, base_s * (2**attempt)))


#: A refusal's own "retry after N s" (the gateway's 503 and the embedder's busy-tower answer).
_RETRY_AFTER = re.compile(r"retry after (\d{1,4}(?:\.\d{1,3})?) ?s\b")
#: The longest wait a refusal can ask for (a hint is advice; a typo on the server must not park a client).
MAX_RETRY_AFTER_S = 30.0


def retry_after_s(exc: ServerError) -> float:
    """How long the server asked the client to wait before its next request, seconds: the "retry
    after N s" its refusal states (at most :data:`MAX_RETRY_AFTER_S`), else the contract's
    :data:`~.contract.RETRY_AFTER_S` for a live server's overload answer (Triton's own queue
    refusals, which cannot carry a hint), else 0 (a lost connection: plain backoff)."""
    found = _RETRY_AFTER.search(str(exc))
    if found and exc.status in OVERLOAD_STATUSES:
        return min(float(found.group(1)), MAX_RETRY_AFTER_S)
    return RETRY_AFTER_S if exc.status in OVERLOAD_STATUSES else 0.0


def classify(exc: BaseException) -> tuple[str | None, bool]:
    """``(status, retryable)`` of a failed call.

    Server answers keep their protocol status (retryable when :data:`RETRYABLE_STATUSES`); a gRPC
    UNAVAILABLE that never reached a server is ``"connection"`` (retryable), ``"tls"`` or ``"dns"``
    (final: trying again cannot fix a certificate or a name).  Python exceptions (the HTTP client):
    ``ssl.SSLError`` -> ``"tls"``, ``socket.gaierror`` -> ``"dns"``, a timeout -> ``"timeout"``
    (the deadline is spent), any other ``OSError`` (refused, reset) -> ``"connection"``."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status()) if exc.status() is not None else None
        if status == "StatusCode.UNAVAILABLE":
            text = f"{exc.message()} {exc.debug_details() or ''}".lower()
            if any(m in text for m in _GRPC_DNS):
                return "dns", False
            if any(m in text for m in _GRPC_TLS):
                return "tls", False
            if any(m in text for m in _GRPC_TRANSPORT):
                return "connection", True
        return status, status in RETRYABLE_STATUSES
    if isinstance(exc, ssl.SSLError):  # SSLCertVerificationError included
        return "tls", False
    if isinstance(exc, socket.gaierror):
        return "dns", False
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "Timeout":  # gevent.Timeout: the deadline
        return "timeout", False
    if isinstance(exc, OSError):
        return "connection", True
    return None, False


class RetryBudget:
    """Retries allowed as a share of requests, so retries cannot multiply an overload.

    A token bucket shared by a client's threads: every request adds ``ratio`` tokens (up to
    ``max_tokens``), every retry takes one; with less than one token a retryable failure is final.
    It starts with ``min_tokens`` so an idle client may still retry a few failures (gRPC's retry
    throttling and Finagle's RetryBudget work the same way)."""

    def __init__(self, ratio: float = 0.2, min_tokens: float = 10.0, max_tokens: float = 100.0) -> None:
        if ratio < 0 or min_tokens < 0 or max_tokens < min_tokens:
            raise InputError(
                f"retry budget needs ratio >= 0 and 0 <= min_tokens <= max_tokens, got {ratio}, "
                f"{min_tokens}, {max_tokens}"
            )
        self.ratio, self.max_tokens = ratio, max_tokens
        self.tokens = min_tokens
        self._lock = threading.Lock()

    def deposit(self) -> None:
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        """Take a retry's token; False when the budget is spent."""
        with self._lock:
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            return True


def image_bytes(image: Any) -> bytes:
    """The encoded bytes the service receives: a file's bytes, bytes as given, or a PIL image /
    uint8 array converted to RGB as :func:`~step37_deploy.preprocess.to_rgb` does and encoded
    losslessly as PNG, so the server preprocesses exactly the pixels the in-process embedder would."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read image {image}: {exc}") from exc
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG")  # to_rgb: the same conversion the server applies
    return buf.getvalue()


def embedding_from_outputs(
    features: Any,
    token_ids: np.ndarray,
    num_crops: int,
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    vision_features: Any = None,
) -> ImageEmbedding:
    """An :class:`ImageEmbedding` from the served tensors (``features`` / ``vision_features``: None
    when not asked for).  The newline mask is read off the token layout (a crop block followed by
    neither ``<patch_start>`` nor ``<im_start>`` ends a row) and the whole layout is rebuilt from it
    and compared, so a malformed answer is a ``ServerError``."""
    ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
    block = cfg.patch_tokens + 2
    glob = cfg.image_tokens + 2
    rows = num_crops * cfg.patch_tokens + cfg.image_tokens
    shapes = [tuple(a.shape) for a in (features, vision_features) if a is not None]
    if num_crops < 0 or len(ids) < num_crops * block + glob or any(len(s) != 2 or s[0] != rows for s in shapes):
        raise ServerError(
            f"malformed answer: {num_crops} crops, {len(ids)} token ids, rows {shapes} (expected {rows} rows)"
        )
    im_start = ids[-glob]
    patch_start = ids[0] if num_crops else -1
    mask, pos, newline = [], 0, None
    for _ in range(num_crops):
        pos += block
        nl = ids[pos] not in (patch_start, im_start)
        if nl:
            newline, pos = ids[pos], pos + 1
        mask.append(nl)
    tokens = TokenIds(
        im_start=im_start,
        im_end=ids[-1],
        im_patch=ids[-2],
        patch_start=patch_start,
        patch_end=ids[block - 1] if num_crops else -1,
        patch_newline=newline if newline is not None else -1,
        source="server",
    )
    text, expected = image_layout(num_crops, mask, tokens, cfg)
    if expected != ids:
        raise ServerError(f"malformed answer: the token layout of {num_crops} crops is not Step3p7Processor's")
    return ImageEmbedding(features, ids, text, num_crops, mask, vision_features)


def _answer_rows(arr: np.ndarray, dtype: str) -> Any:
    """Served rows as the caller asked: numpy float32 / float16, or a torch bfloat16 tensor (numpy
    has none; tritonclient gives BF16 as ``ml_dtypes.bfloat16`` since r26.06, as float32 before:
    both convert exactly)."""
    if dtype != "bf16":
        return np.asarray(arr, dtype=np.float32 if dtype == "fp32" else np.float16)
    import torch

    a = np.asarray(arr)
    if a.dtype.itemsize == 2:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(torch.bfloat16)


class EmbedClient:
    """A client of the ``step37_embedder`` model.

    ``url`` is ``host:port`` of the chosen protocol's endpoint (gRPC 8001 / HTTP 8000 by Triton's
    defaults).  ``api_key`` is sent as ``x-api-key`` with
    every call (``serve --api-key-file``).  ``tls`` connects with HTTPS / gRPC over TLS, trusting
    ``root_certificates`` (a PEM file, e.g. a self-signed server certificate) or else the default
    trust store (``serve --tls-cert``).
    ``timeout`` is each :meth:`embed`'s overall deadline in seconds, retries included;
    ``retry=False`` makes every failure final at once; ``retry_budget`` bounds the retries of all
    calls together (default: :class:`RetryBudget`'s, 20 % of requests plus 10).
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout: float = 60.0,
        model: str = EMBEDDER_MODEL,
        preprocess_cfg: PreprocessConfig = DEFAULT_PREPROCESS,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        retry: bool = True,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if "://" in url or ":" not in url:
            raise InputError(f"url must be HOST:PORT (no scheme), got {url!r}")
        self.url, self.protocol, self.timeout, self.model = url, protocol, timeout, model
        self.pcfg = preprocess_cfg
        self._headers = {API_KEY_HEADER: api_key} if api_key else None  # never in a repr or a message
        self.tls = tls or root_certificates is not None
        self.root_certificates = str(root_certificates) if root_certificates is not None else None
        if self.root_certificates is not None and not Path(self.root_certificates).is_file():
            raise InputError(f"root certificates {self.root_certificates} is not a file")
        self.retry = retry
        self.budget = retry_budget or RetryBudget()
        self.retries = 0  # tries sent again so far, all threads together
        # One connection per thread, held in a thread-local (never handed to a later thread that
        # happens to reuse a finished one's id: gevent refuses that), and listed for close().
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    # -- connections ------------------------------------------------------------------------------
    def _lib(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as lib
        else:
            import tritonclient.http as lib
        return lib

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            lib = self._lib()
            if self.protocol == "grpc":
                client = lib.InferenceServerClient(self.url, ssl=self.tls, root_certificates=self.root_certificates)
            else:
                ssl_options = {"ca_certs": self.root_certificates} if self.root_certificates else None
                client = lib.InferenceServerClient(
                    self.url,
                    connection_timeout=self.timeout,
                    network_timeout=self.timeout,
                    ssl=self.tls,
                    ssl_options=ssl_options,
                )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every connection (those of threads still running reconnect on their next call)."""
        with self._lock:
            clients, self._clients = self._clients, []
            self._local = threading.local()
        for c in clients:
            with contextlib.suppress(Exception):  # closing a dead connection is not an error
                c.close()

    def close_thread(self) -> None:
        """Close the calling thread's connection: worker threads call it before they end, so no
        idle keep-alive connection outlives them (Triton waits for those when it shuts down)."""
        client = getattr(self._local, "client", None)
        if client is None:
            return
        del self._local.client
        with self._lock:
            self._clients = [c for c in self._clients if c is not client]
        with contextlib.suppress(Exception):
            client.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, *args: Any, deadline_s: float | None = None, **kwargs: Any) -> Any:
        """Run one tritonclient call, turning every failure into a ServerError with its message
        and :func:`classify`'s status; over HTTP, ``deadline_s`` bounds the call."""
        from tritonclient.utils import InferenceServerException

        try:
            if deadline_s is not None and self.protocol == "http":
                return self._http_within(deadline_s, fn, *args, **kwargs)
            return fn(*args, **kwargs)
        except (InferenceServerException, OSError) as exc:
            status, retryable = classify(exc)
            text = exc.message() if isinstance(exc, InferenceServerException) else f"{type(exc).__name__}: {exc}"
            if status in ("tls", "dns", "connection", "timeout"):
                text = f"{status} failure: {text}"
            raise ServerError(f"{self.protocol}://{self.url} {what}: {text}", status, retryable) from exc

    @staticmethod
    def _http_within(deadline_s: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn`` (a gevent-based HTTP call) stopped after ``deadline_s``: the HTTP client's socket
        timeouts are fixed when it connects, so the request's deadline is a ``gevent.Timeout``
        (a BaseException: the HTTP client's own retry of socket errors cannot swallow it)."""
        import gevent

        timer = gevent.Timeout(deadline_s)
        timer.start()
        try:
            return fn(*args, **kwargs)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise TimeoutError(f"no answer within {deadline_s:.3g} s") from None
        finally:
            timer.close()

    # -- the API ------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server and the embedder model are ready."""
        try:
            c = self._client()
            return bool(self._call("ready", c.is_server_ready, headers=self._headers)) and bool(
                self._call("ready", c.is_model_ready, self.model, headers=self._headers)
            )
        except ServerError:
            return False

    def embed(
        self,
        image: Any,
        deadline: float | None = None,
        outputs: Sequence[str] = ("features",),
        dtype: str = "fp32",
    ) -> ImageEmbedding:
        """One image (path, bytes, PIL image or uint8 array) -> its :class:`ImageEmbedding`, within
        ``deadline`` seconds (default: the client's ``timeout``), retrying what is worth retrying.

        ``outputs``: the row kinds to ask for (``contract.ROW_KINDS``): ``features`` (projected,
        [L, hidden]) and/or ``vision_features`` (the tower's rows before the projector, [L, 6144];
        ``ImageEmbedding.features`` is None when only these are asked for, and the server skips the
        projector).  ``dtype``: ``fp32`` (numpy float32, the default answer), ``fp16`` (numpy float16)
        or ``bf16`` (torch bfloat16 tensors): 16-bit rows are cast by the server from its FP32 rows
        and take half the bytes on the wire."""
        kinds = list(dict.fromkeys(outputs))
        if not kinds or any(k not in ROW_KINDS for k in kinds):
            raise InputError(f"outputs must be one or more of {ROW_KINDS}, got {list(outputs)}")
        if dtype not in ROW_DTYPES:
            raise InputError(f"dtype must be one of {sorted(ROW_DTYPES)}, got {dtype!r}")
        names = [row_output(k, dtype) for k in kinds] + [_TOKEN_IDS, _NUM_CROPS]
        data = image_bytes(image)
        budget = self.timeout if deadline is None else deadline
        if not budget > 0:
            raise InputError(f"deadline must be > 0 seconds, got {budget}")
        end = time.monotonic() + budget
        self._wait_as_asked(end)
        attempt = 0
        self.budget.deposit()
        while True:
            try:
                return self._embed_once(data, end - time.monotonic(), names=names, kinds=kinds, dtype=dtype)
            except ServerError as exc:
                hint = retry_after_s(exc) if self.retry and exc.retryable else 0.0
                if hint:  # this thread's next request waits too, if this one is not retried
                    self._local.not_before = time.monotonic() + hint
                wait = hint + backoff_s(attempt)  # the jitter keeps clients refused together apart
                if not (self.retry and exc.retryable) or time.monotonic() + wait >= end - 0.001:
                    raise
                if not self.budget.withdraw():
                    raise ServerError(f"{exc} (not retried: the client's retry budget is spent)", exc.status) from exc
            time.sleep(wait)
            attempt += 1
            with self._lock:
                self.retries += 1

    def _wait_as_asked(self, end: float) -> None:
        """Before a new request, wait out what the server asked of this thread's last refused one
        (within this request's deadline): a refusal's retry-after holds for the caller's next
        request too, as HTTP's ``Retry-After`` does.  Never with ``retry=False``: that caller paces
        itself (an open-loop load test would otherwise send late)."""
        pause = getattr(self._local, "not_before", 0.0) - time.monotonic()
        if self.retry and pause > 0:
            time.sleep(min(pause, max(0.0, end - time.monotonic() - 0.001)))

    def _embed_once(
        self, data: bytes, left_s: float, *, names: list[str], kinds: list[str], dtype: str
    ) -> ImageEmbedding:
        """One try with ``left_s`` seconds: gRPC's deadline and the request's queue timeout."""
        lib = self._lib()
        (spec,) = EMBEDDER_IO["inputs"]
        inp = lib.InferInput(EMBEDDER_INPUT, list(spec.dims), "BYTES")
        arr = np.array([data], dtype=np.object_).reshape(spec.dims)
        if self.protocol == "http":
            inp.set_data_from_numpy(arr, binary_data=True)
            outs = [lib.InferRequestedOutput(n, binary_data=True) for n in names]
        else:
            inp.set_data_from_numpy(arr)
            outs = [lib.InferRequestedOutput(n) for n in names]
        client = self._client()
        left_s = max(left_s, 0.001)
        kwargs: dict[str, Any] = {"timeout": max(1, int(left_s * 1e6))}  # Triton: microseconds in queues
        if self.protocol == "grpc":
            kwargs["client_timeout"] = left_s  # gRPC deadline: Triton cancels the request when it passes
        try:
            result = self._call(
                f"{self.model} infer",
                client.infer,
                self.model,
                [inp],
                outputs=outs,
                headers=self._headers,
                deadline_s=left_s,
                **kwargs,
            )
        except ServerError as exc:
            if exc.status in ("timeout", "connection") and self.protocol == "http":
                self.close_thread()  # a connection cut mid-answer is not reused
            raise
        try:
            rows = {k: _answer_rows(result.as_numpy(row_output(k, dtype)), dtype) for k in kinds}
            ids = result.as_numpy(_TOKEN_IDS)
            crops = int(np.asarray(result.as_numpy(_NUM_CROPS)).reshape(-1)[0])
        except (TypeError, ValueError, IndexError) as exc:
            raise ServerError(f"{self.protocol}://{self.url} {self.model}: answer lacks an output: {exc}") from exc
        return embedding_from_outputs(rows.get(_FEATURES), ids, crops, self.pcfg, rows.get("vision_features"))

    def embed_many(self, images: Sequence[Any], concurrency: int = 4) -> list[ImageEmbedding]:
        """Embeddings of ``images`` in order, ``concurrency`` requests in flight (each its own
        request, so the server's dynamic batcher can combine their views).  The first failure is
        raised after the others finished."""
        if concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {concurrency}")
        results: list[Any] = [None] * len(images)
        todo = iter(enumerate(images))
        lock = threading.Lock()

        def worker() -> None:
            try:
                while True:
                    with lock:
                        item = next(todo, None)
                    if item is None:
                        return
                    i, image = item
                    try:
                        results[i] = self.embed(image)
                    except Exception as exc:  # kept, raised below in request order
                        results[i] = exc
            finally:
                self.close_thread()

        threads = [threading.Thread(target=worker, name=f"embed-{k}") for k in range(min(concurrency, len(images)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def inference_statistics(self, model: str = "") -> dict[str, Any]:
        """Triton's statistics of one model (cumulative since it loaded), as a JSON-like dict with
        integer counts on both protocols; ``model`` "": of every loaded model, by name."""
        c = self._client()
        if self.protocol == "grpc":
            stats = self._call("statistics", c.get_inference_statistics, model, headers=self._headers, as_json=True)
        else:
            stats = self._call("statistics", c.get_inference_statistics, model, headers=self._headers)
        entries = stats.get("model_stats", [])
        if not model:
            return {e["name"]: e for e in entries}
        if not entries:
            raise ServerError(f"{self.protocol}://{self.url} has no statistics for model {model!r}")
        return entries[-1]
