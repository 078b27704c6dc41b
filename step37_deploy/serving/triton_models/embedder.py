"""Triton Python-backend model ``step37_embedder``: one encoded image in, its embedding out.

Per request: check the image header (empty, corrupt and over-size images are refused before any
pixel is decoded), ``preprocess`` it exactly as the in-process ``VisionEmbedder`` does, send the
global view and the crops to the two tower models through Triton (BLS ``async_exec``: both towers
at once, and Triton's dynamic batcher merges them with the views of the other embedder instances'
requests), project, and answer ``features`` (crops then global view, token order), ``token_ids``
and ``num_crops``.  Every failure is that request's error response; the model keeps serving.
Where the repository says so (``tower_calls`` "local": ONNX Runtime / torch towers on a CPU), the
instance runs the towers itself, one after the other, with no BLS hop and no shared-memory copies.

Only what the request names (``request.requested_output_names()``) is computed and sent: the
tower's rows before the projector (``vision_features*``) skip the projector when no ``features*``
output is named, 16-bit answers (``*_fp16``, ``*_bf16``) are cast from the FP32 rows at the end,
and a request for ``token_ids``/``num_crops`` alone runs no tower at all (``contract.ROW_OUTPUTS``).

In front of all that sits the embedding cache (``runtime.EmbeddingCache``, config parameter
``cache_mb``, 0 = off): a request whose image bytes (SHA-256) were answered before gets the stored
FP32 tensors (a request for a row kind the entry lacks computes it and adds it to the entry).  Its
hits and misses are Prometheus counters on Triton's metrics endpoint
(``contract.CACHE_HITS_METRIC`` / ``CACHE_MISSES_METRIC``) and lines in the log.

At load it checks the repository against its record (``step37_repository.json``: file digests and
the weights each artifact was made from) and refuses to start on a mismatch.
"""

from __future__ import annotations

# ruff: noqa: E402
import os
import sys

# The backend stub's embedded interpreter ignores PYTHONPATH: honour it as ``python`` would, so the
# step37_deploy that ``step37-deploy serve`` runs from is the one imported here.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import asyncio
import json
import re
import traceback
import warnings
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

import step37_deploy
from step37_deploy.config import TokenIds
from step37_deploy.errors import InputError, Step37Error
from step37_deploy.fusion import project, project_torch
from step37_deploy.preprocess import PreprocessConfig, as_pixel_dtype, host_pixel_dtype, image_layout, preprocess
from step37_deploy.runtime import EmbeddingCache
from step37_deploy.serving import contract as C
from step37_deploy.serving.repository import _inside, read_record, verify_repository
from step37_deploy.serving.stages import StageLog, clock_ns
from step37_deploy.serving.threads import THREADS_PARAMETER, usable_cores
from step37_deploy.serving.towers import open_tower_runner


def check_not_empty(raw: bytes) -> None:
    """An empty ``image`` gets its own message (``preprocess`` checks everything else: unreadable
    and truncated files, and the pixel count from the header before decoding, decompression bombs)."""
    if not raw:
        raise InputError(f"input {C.EMBEDDER_INPUT!r} is empty (0 bytes): send one encoded image file")


def _cache_counters(model: str, version: str) -> tuple | None:
    """The cache's hit and miss counters (Triton custom metrics), or None where the backend has none."""
    if not hasattr(pb_utils, "MetricFamily"):
        return None
    labels = {"model": model, "version": version}
    families = [
        pb_utils.MetricFamily(name=name, description=what, kind=pb_utils.MetricFamily.COUNTER)
        for name, what in (
            (C.CACHE_HITS_METRIC, "embedding cache lookups that found the image (SHA-256 of its bytes)"),
            (C.CACHE_MISSES_METRIC, "embedding cache lookups that did not"),
        )
    ]
    _FAMILIES.extend(families)  # a family must outlive its metrics
    return tuple(f.Metric(labels=labels) for f in families)


_FAMILIES: list = []


def _gpu_projector(weight: np.ndarray, bias: np.ndarray | None, record: dict) -> tuple | None:
    """Projector weights on the GPU for TensorRT towers (FP16, as ``VisionEmbedder`` does with
    TensorRT), else None: the numpy projector, as in process for the CPU backends."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of step37_deploy
        return None
    towers = record["towers"].values()
    if not torch.cuda.is_available() or not any(t["kind"] == "trt" for t in towers):
        return None
    half = any(t["precision"] == "fp16" for t in towers)
    dtype = torch.float16 if half else torch.float32
    w = torch.from_numpy(weight).to("cuda", dtype)
    return w, (torch.from_numpy(bias).to("cuda", dtype) if bias is not None else None)


class _Cancelled(Exception):
    """The request's client cancelled it or its deadline passed (gRPC)."""


class _TowerBusy(Exception):
    """A tower refused the views: its queue was full or the wait timed out."""


#: Triton's messages for a request its queue policy refused (``Exceeds maximum queue size``) or
#: timed out (``Request timeout expired``): only for a backend whose errors carry no code.
_BUSY_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


def _tower_busy(error) -> bool:
    """A tower's error is its queue's refusal: Triton answers both a full queue and a queue timeout
    with UNAVAILABLE (checked by code; by Triton's messages only where ``TritonError`` has no code)."""
    code = getattr(error, "code", None)
    if code is not None and code() == _code("UNAVAILABLE"):
        return True
    # A BLS call's queue timeout reaches the caller with another code (measured with 2.51: the
    # embedder answered INTERNAL "RuntimeError: tower ...: Request timeout expired"): Triton's own
    # message, whole, tells it; a model's message that merely contains those words does not.
    return error.message().strip() in _BUSY_MESSAGES


def _code(name: str):
    """A ``TritonError`` code by name, INTERNAL where this backend version lacks it."""
    return getattr(pb_utils.TritonError, name, pb_utils.TritonError.INTERNAL)


def _cancelled(request) -> bool:
    """Triton (2.39+) marks a request cancelled when its gRPC client cancels or its deadline passes."""
    check = getattr(request, "is_cancelled", None)
    return bool(check()) if check is not None else False


def _time_left_us(request, started_ns: int) -> int:
    """What the client's ``timeout`` parameter (microseconds; ``EmbedClient`` sends what is left of
    its deadline) leaves since preprocessing started, for the towers' queues: a tower never
    computes views whose client stopped waiting.  0 when the request has none (the towers' own
    queue timeout applies).  An upper bound: the time the request spent in this model's own queue
    is not known here."""
    timeout = getattr(request, "timeout", None)
    total = int(timeout()) if timeout is not None else 0
    if total <= 0:
        return 0
    return max(1, total - (clock_ns() - started_ns) // 1000)


def _cancelled_response():
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError("request cancelled by its client (or its deadline passed)", _code("CANCELLED"))
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from PIL import Image
        from safetensors.numpy import load_file

        model_dir = Path(args["model_repository"])
        self.logger = pb_utils.Logger
        # All instances serve the same files: the first one checks their digests (multi-GB engines
        # hashed once, not once per instance); its failure fails the model's load.
        later = re.search(r"_0_[1-9]\d*$", args.get("model_instance_name", ""))
        record = read_record(model_dir.parent) if later else verify_repository(model_dir.parent)
        self.logger.log_info(
            f"{args['model_name']}: step37_deploy {step37_deploy.__version__} at {Path(step37_deploy.__file__).parent}"
        )
        proj = load_file(str(model_dir / args["model_version"] / C.PROJECTOR_FILE))
        self.weight, self.bias = proj["weight"], proj.get("bias")
        self.gpu_weights = _gpu_projector(self.weight, self.bias, record)
        self.tokens = TokenIds(**record["tokens"])
        self.pcfg = PreprocessConfig(**record["preprocess"])
        self.max_pixels = int(record["max_image_pixels"])
        # Pillow's own checks agree with the served limit (preprocess refuses above it from the header).
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        self.towers = {
            int(res): (t["model"], np.dtype(t["input_dtype"]), int(t["max_batch_size"]))
            for res, t in record["towers"].items()
        }
        # uint8-input towers get the uint8 views (normalised on the device); float towers their dtype.
        self.pixel_dtype = host_pixel_dtype(dtype for _, dtype, _ in self.towers.values())
        for res, (name, _, _) in self.towers.items():
            if res not in (self.pcfg.image_size, self.pcfg.patch_size) or name != C.TOWER_MODELS.get(res):
                raise ValueError(f"repository record names tower {name!r} for {res}: not the served contract")
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        # The queue timeout every model of the repository shares (--queue-timeout-ms): a tower call
        # never waits longer than that, nor longer than its client still waits (_time_left_us).
        policy = config.get("dynamic_batching", {}).get("default_queue_policy", {})
        self.queue_timeout_us = int(policy.get("default_timeout_microseconds", 0) or 0)
        threads = params.get(THREADS_PARAMETER, {}).get("string_value")
        if threads:  # serve's share of the cores per instance (serving/threads.py): torch's pool
            import torch

            torch.set_num_threads(int(threads))
        self.local = _local_towers(record, model_dir.parent, params)
        cache_mb = float(params.get(C.CACHE_MB_PARAMETER, {}).get("string_value", "0"))
        self.cache = EmbeddingCache(cache_mb)
        self.cache_counters = _cache_counters(args["model_name"], args["model_version"])
        self.logger.log_info(f"{args['model_name']}: embedding cache of {cache_mb:g} MiB (0 = off)")
        # Per-request stage stamps (serving/stages.py), only when the server's environment asks.
        self.stages = StageLog.from_env()

    async def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                if _cancelled(request):  # its client gave up while it waited: no work for nobody
                    responses.append(_cancelled_response())
                    continue
                marks = None
                if self.stages is not None:
                    marks = {"m": "embedder", "id": request.request_id(), "exec": clock_ns(), "bls": []}
                responses.append(await self._embed(request, marks))
                if marks is not None:
                    self.stages.write({**marks, "built": clock_ns()})
            except _Cancelled:
                responses.append(_cancelled_response())
            except _TowerBusy as exc:  # a tower's queue refused the views: retryable, as Triton's own refusals
                err = pb_utils.TritonError(str(exc), _code("UNAVAILABLE"))
                responses.append(pb_utils.InferenceResponse(error=err))
            except InputError as exc:  # the request's fault: INVALID_ARG, never retried
                err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
            except Step37Error as exc:  # the server's fault (a repository, an engine...): INTERNAL
                self.logger.log_error(traceback.format_exc())
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), _code("INTERNAL"))))
            except Exception as exc:  # answered, logged; the next request is served as usual
                self.logger.log_error(traceback.format_exc())
                err = pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=err))
        return responses

    def _image_bytes(self, request) -> bytes:
        tensor = pb_utils.get_input_tensor_by_name(request, C.EMBEDDER_INPUT)
        if tensor is None:
            raise InputError(f"request has no input {C.EMBEDDER_INPUT!r}")
        arr = tensor.as_numpy().reshape(-1)
        if arr.size != 1:
            raise InputError(f"input {C.EMBEDDER_INPUT!r} must hold exactly one image, got {arr.size}")
        raw = arr[0]
        return raw if isinstance(raw, bytes) else bytes(raw)

    @staticmethod
    def _requested(request) -> list[str]:
        """The outputs this request names, in its order; the classic three when it names none (Triton
        fills in every output then, but a backend that passes an empty list gets the old answer)."""
        names = list(request.requested_output_names()) if hasattr(request, "requested_output_names") else []
        return names or list(C.EMBEDDER_OUTPUTS)

    async def _embed(self, request, marks: dict | None = None):
        """The embedding cache in front of :meth:`_compute`: a hit answers the stored tensors.
        ``marks``: the request's stage stamps, when the stage log is on."""
        raw = self._image_bytes(request)
        if marks is not None:
            marks["read"] = clock_ns()
        names = self._requested(request)
        kinds = {C.ROW_OUTPUTS[n][0] for n in names if n in C.ROW_OUTPUTS}
        key = EmbeddingCache.key_of(raw) if self.cache.enabled else None
        stored = self.cache.get(key)
        hit = stored is not None and kinds <= stored.keys()
        if key is not None:
            self._count_cache(key, hit=hit)
        tensors = stored if hit else {**(stored or {}), **(await self._compute(request, raw, kinds, marks))}
        if key is not None and not hit:
            self.cache.put(key, tensors, sum(a.nbytes for a in tensors.values()) + 256)
        return pb_utils.InferenceResponse(output_tensors=[_answer(n, tensors) for n in names])

    def _count_cache(self, key: str, hit: bool) -> None:
        if self.cache_counters is not None:
            self.cache_counters[0 if hit else 1].increment(1)
        self.logger.log_verbose(f"embedding cache {'hit' if hit else 'miss'} {key[:16]}")
        if (self.cache.hits + self.cache.misses) % 100 == 0:
            st = self.cache.stats()
            self.logger.log_info(
                f"embedding cache: {st['hits']} hits, {st['misses']} misses, {st['entries']} entries, "
                f"{st['bytes'] / 2**20:.1f} of {st['max_bytes'] / 2**20:.0f} MiB"
            )

    async def _compute(self, request, raw: bytes, kinds: set[str], marks: dict | None = None) -> dict[str, np.ndarray]:
        """The FP32 tensors of ``raw``: the layout always, and the rows of each kind in ``kinds``
        (``vision_features``: the towers' rows; ``features``: projected).  No kind, no tower call."""
        check_not_empty(raw)
        started_ns = clock_ns()
        pre = preprocess(raw, self.pcfg, pixel_dtype=self.pixel_dtype)  # pcfg.max_pixels is --max-image-pixels
        _, ids = image_layout(pre.num_crops, pre.newline_mask, self.tokens, self.pcfg)
        out = {"token_ids": np.asarray(ids, dtype=np.int64), "num_crops": np.asarray([pre.num_crops], dtype=np.int32)}
        if marks is not None:
            marks["pre"] = marks["proj"] = clock_ns()
        if not kinds:
            return out
        if _cancelled(request):  # given up during preprocessing: the towers never see it
            raise _Cancelled
        left_us = _time_left_us(request, started_ns)
        if self.queue_timeout_us and left_us:
            left_us = min(left_us, self.queue_timeout_us)
        jobs = [self._tower(self.pcfg.image_size, pre.global_view[None], marks, request, left_us)]
        if pre.num_crops:
            jobs.append(self._tower(self.pcfg.patch_size, pre.crops, marks, request, left_us))
        feats = await asyncio.gather(*jobs)
        if "vision_features" in kinds:
            out["vision_features"] = _token_rows(feats)
        if "features" in kinds:
            out["features"] = _token_rows([self._project(f) for f in feats])
        if marks is not None:
            marks["proj"] = clock_ns()
        return out

    def _project(self, feats: np.ndarray) -> np.ndarray:
        """The projector: on the GPU for TensorRT towers, else in numpy (as the in-process embedder
        does for each backend); FP32 out either way."""
        if self.gpu_weights is None:
            return project(feats, self.weight, self.bias, out_dtype=np.float32)
        import torch

        w, b = self.gpu_weights
        x = torch.from_numpy(np.ascontiguousarray(feats)).to(w.device, non_blocking=True)
        return project_torch(x, w, b, torch.float32).cpu().numpy()

    async def _tower(
        self, resolution: int, views: np.ndarray, marks: dict | None = None, request=None, left_us: int = 0
    ) -> np.ndarray:
        """Features of ``views`` from the tower model, in chunks of at most its ``max_batch_size``.
        Nothing is sent for a ``request`` already cancelled, and each call may wait in the tower's
        queue at most ``left_us`` (what the client's own ``timeout`` leaves; 0: the tower's
        default), so a tower never computes views whose client is gone."""
        name, dtype, max_batch = self.towers[resolution]
        sent = clock_ns() if marks is not None else 0
        x = np.ascontiguousarray(as_pixel_dtype(views, dtype))
        if resolution in self.local:
            return self._run_local(resolution, x, marks, request)
        kwargs = {"timeout": left_us} if left_us > 0 else {}
        if hasattr(pb_utils, "PreferredMemory"):  # features back in host memory, also from GPU towers
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        if request is not None and _cancelled(request):  # cancelled while the views were cast
            raise _Cancelled
        if marks is not None:  # the towers log these ids: the breakdown joins on them
            ids = [f"{marks['id']}/{resolution}/{i}" for i in range(0, len(x), max_batch)]
        calls = [
            pb_utils.InferenceRequest(
                model_name=name,
                requested_output_names=[C.TOWER_OUTPUT],
                inputs=[pb_utils.Tensor(C.TOWER_INPUT, x[i : i + max_batch])],
                **({"request_id": ids[k]} if marks is not None else {}),
                **kwargs,
            ).async_exec()
            for k, i in enumerate(range(0, len(x), max_batch))
        ]
        outs = []
        for resp in await asyncio.gather(*calls):
            if resp.has_error():
                message = resp.error().message()
                if _tower_busy(resp.error()):  # retryable: say when, as the gateway's refusals do
                    raise _TowerBusy(f"tower {name}: {message}; retry after {C.RETRY_AFTER_S} s")
                raise RuntimeError(f"tower {name}: {message}")
            outs.append(pb_utils.get_output_tensor_by_name(resp, C.TOWER_OUTPUT).as_numpy())
        rows = np.concatenate(outs)
        if marks is not None:
            marks["bls"] += [{"id": i, "sent": sent, "numpy": clock_ns()} for i in ids]
        return rows

    def _run_local(self, resolution: int, x: np.ndarray, marks: dict | None, request) -> np.ndarray:
        """Features of ``x`` from the tower this instance runs itself (``--tower-calls local``), in
        chunks of at most its ``max_batch_size``; no chunk starts for a cancelled request."""
        _, _, max_batch = self.towers[resolution]
        outs = []
        for i in range(0, len(x), max_batch):
            if request is not None and _cancelled(request):
                raise _Cancelled
            start = clock_ns() if marks is not None else 0
            outs.append(np.asarray(self.local[resolution].infer(x[i : i + max_batch]), dtype=np.float32))
            if marks is not None:
                marks.setdefault("local", []).append({"res": resolution, "start": start, "end": clock_ns()})
        return np.concatenate(outs)


def _local_towers(record: dict, root: Path, params: dict) -> dict:
    """{resolution: activated runner} of the towers the repository says this model runs itself
    (``tower_calls`` local: no BLS hop, no shared-memory copies of the views), each with the
    intra-op threads ``serve`` chose; empty when the towers are Triton models of their own."""
    if record.get("tower_calls") != "local":
        return {}
    threads = int(params.get(C.TOWER_THREADS_PARAMETER, {}).get("string_value") or usable_cores())
    runners = {}
    for res, t in record["towers"].items():
        artifact = _inside(root, t["artifact"], "repository record")
        runners[int(res)] = open_tower_runner(t["kind"], artifact, threads, t["input_dtype"])
    return runners


def _token_rows(parts: list[np.ndarray]) -> np.ndarray:
    """[L, D] FP32 rows in token order from ``[global [1, P, D], crops [n, P', D]]``: every crop's
    rows (row-major crop order), then the global view's."""
    rows = [parts[1].reshape(-1, parts[1].shape[-1])] if len(parts) > 1 else []
    rows.append(parts[0][0])
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


def _answer(name: str, tensors: dict[str, np.ndarray]):
    """Output ``name`` from the FP32 tensors: as stored, or its rows cast to FP16 / BF16 (numpy has no
    bfloat16: that one goes through torch and DLPack, which the Python backend carries as TYPE_BF16)."""
    if name not in C.ROW_OUTPUTS:
        return pb_utils.Tensor(name, tensors[name])
    kind, dtype = C.ROW_OUTPUTS[name]
    rows = tensors[kind]
    if dtype == "fp32":
        return pb_utils.Tensor(name, rows)
    if dtype == "fp16":
        return pb_utils.Tensor(name, rows.astype(np.float16))
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(rows).to(torch.bfloat16)))
