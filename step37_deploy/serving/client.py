"""The client side of the service: image files in, the same :class:`ImageEmbedding` as in-process.

:class:`EmbedClient` sends one encoded image per request to the ``step37_embedder`` model over
Triton's gRPC or HTTP protocol (``tritonclient``) and rebuilds the :class:`ImageEmbedding` that
:meth:`VisionEmbedder.embed_images` returns for the same image: the features as served, the token
ids as served, and the newline mask and text read back from the token layout (and checked against
it).  Every failure, from a refused connection to the server's own error response, is a
:class:`~step37_deploy.errors.ServerError` carrying the server's message.

Each thread gets its own ``tritonclient`` connection (the HTTP client is gevent-based and must not
be shared across threads), so one :class:`EmbedClient` may be used from many threads;
:meth:`EmbedClient.embed_many` does exactly that.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TokenIds
from ..errors import InputError, ServerError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig, image_layout, to_rgb
from ..runtime import ImageEmbedding
from .contract import EMBEDDER_INPUT, EMBEDDER_IO, EMBEDDER_MODEL, EMBEDDER_OUTPUTS, ROW_DTYPES, ROW_KINDS, row_output

PROTOCOLS = ("grpc", "http")
_FEATURES, _TOKEN_IDS, _NUM_CROPS = EMBEDDER_OUTPUTS


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
    defaults); ``timeout`` bounds each request in seconds.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        timeout: float = 60.0,
        model: str = EMBEDDER_MODEL,
        preprocess_cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if "://" in url or ":" not in url:
            raise InputError(f"url must be HOST:PORT (no scheme), got {url!r}")
        self.url, self.protocol, self.timeout, self.model = url, protocol, timeout, model
        self.pcfg = preprocess_cfg
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
                client = lib.InferenceServerClient(self.url)
            else:
                client = lib.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
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

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one tritonclient call, turning every failure into a ServerError with its message."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            raise ServerError(f"{self.protocol}://{self.url} {what}: {exc.message()}") from exc
        except (OSError, TimeoutError) as exc:  # refused / reset / timed out (HTTP)
            raise ServerError(f"{self.protocol}://{self.url} {what}: {type(exc).__name__}: {exc}") from exc

    # -- the API ------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """True when the server and the embedder model are ready."""
        try:
            c = self._client()
            return bool(self._call("ready", c.is_server_ready)) and bool(
                self._call("ready", c.is_model_ready, self.model)
            )
        except ServerError:
            return False

    def embed(self, image: Any, outputs: Sequence[str] = ("features",), dtype: str = "fp32") -> ImageEmbedding:
        """One image (path, bytes, PIL image or uint8 array) -> its :class:`ImageEmbedding`.

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
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._call(f"{self.model} infer", client.infer, self.model, [inp], outputs=outs, **kwargs)
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

    def inference_statistics(self, model: str) -> dict[str, Any]:
        """Triton's statistics of one model (cumulative since it loaded), as a JSON-like dict with
        integer counts on both protocols."""
        c = self._client()
        if self.protocol == "grpc":
            stats = self._call("statistics", c.get_inference_statistics, model, as_json=True)
        else:
            stats = self._call("statistics", c.get_inference_statistics, model)
        entries = stats.get("model_stats", [])
        if not entries:
            raise ServerError(f"{self.protocol}://{self.url} has no statistics for model {model!r}")
        return entries[-1]
