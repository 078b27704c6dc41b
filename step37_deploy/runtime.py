"""Stage 8: the serving runtime.  Images in, projected features (and fused embeddings) out.

:class:`VisionEmbedder` holds one runner per resolution (728 global views, 504 crops) on whichever
backend is deployed (TensorRT engine, ONNX Runtime, or PyTorch from the checkpoint), the projector
weights and the token ids.  It keeps no per-call state, so one instance serves many threads: ONNX
Runtime sessions and eager torch modules are safe to run concurrently and the TensorRT runner
serialises its execution context with its own lock.

:class:`EmbeddingCache` is an optional LRU of finished embeddings keyed by the SHA-256 of the image
bytes: chat traffic re-sends the same image every turn, and a hit skips decoding, both towers and
the projector.  The Triton embedder model uses the same class.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Runner
from .config import Step37Config, TokenIds
from .errors import InputError, OutputError
from .files import check_output_file, check_replaceable_json, refuse_inputs
from .fusion import insert_features, insert_features_torch, project, project_torch
from .preprocess import (
    PreprocessConfig,
    PreprocessedImage,
    as_pixel_dtype,
    host_pixel_dtype,
    image_layout,
    preprocess,
)

log = logging.getLogger(__name__)


#: What :meth:`VisionEmbedder.embed_images` can compute per image (the served ``contract.ROW_KINDS``).
ROW_KINDS = ("features", "vision_features")
_FEATURES_ONLY = frozenset({"features"})


@dataclass
class ImageEmbedding:
    """One image's projected features in token order (crops first, then the global view).

    ``vision_features`` are the tower's rows before the projector ([L, 6144], the same row order),
    present only when asked for; ``features`` is None when only those were asked for."""

    features: Any  # [L, hidden]: numpy, or a torch tensor on the runner's device
    token_ids: list[int]
    text: str
    num_crops: int
    newline_mask: list[bool]
    vision_features: Any = None  # [L, 6144] before the projector, when asked for


class EmbeddingCache:
    """A thread-safe LRU of embeddings keyed by the SHA-256 of the image bytes, bounded in bytes.

    ``max_mb`` is the budget in MiB (0 turns the cache off: every lookup is a miss that is not
    counted).  Values are opaque to the cache; the caller states each one's size, and an entry larger
    than the whole budget is not stored.  Hits, misses and evictions are counted for reports and
    logged at DEBUG.
    """

    def __init__(self, max_mb: float = 0.0) -> None:
        if not max_mb >= 0:  # also rejects NaN
            raise InputError(f"cache size must be >= 0 MB, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def key_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def get(self, key: str | None) -> Any | None:
        """The value stored under ``key`` (now the most recently used), or None (a miss)."""
        if not self.enabled or key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        log.debug("embedding cache %s %s", "miss" if entry is None else "hit", key[:16])
        return None if entry is None else entry[0]

    def put(self, key: str | None, value: Any, nbytes: int) -> None:
        """Store ``value``, evicting least recently used entries until it fits the budget."""
        if not self.enabled or key is None or nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old[1]
            while self._entries and self.used_bytes + nbytes > self.max_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self.used_bytes -= size
                self.evictions += 1
            self._entries[key] = (value, nbytes)
            self.used_bytes += nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "entries": len(self._entries),
                "bytes": self.used_bytes,
                "max_bytes": self.max_bytes,
            }


def image_key(image: Any) -> str | None:
    """Cache key of an image: SHA-256 of its file's bytes, of the bytes given, or of a uint8 array's
    shape and pixels; None (not cached) for PIL images and unreadable paths, which ``preprocess``
    then reports."""
    if isinstance(image, bytes):
        return EmbeddingCache.key_of(image)
    if isinstance(image, (str, Path)):
        try:
            return EmbeddingCache.key_of(Path(image).read_bytes())
        except OSError:
            return None
    if isinstance(image, np.ndarray):
        header = f"ndarray:{image.dtype.str}:{image.shape}:".encode()
        return EmbeddingCache.key_of(header + np.ascontiguousarray(image).tobytes())
    return None


def _nbytes(f: Any) -> int:
    if f is None:
        return 0
    return int(f.nbytes if isinstance(f, np.ndarray) else f.element_size() * f.nelement())


def _embedding_nbytes(e: ImageEmbedding) -> int:
    feats = _nbytes(e.features) + _nbytes(e.vision_features)
    return feats + 8 * len(e.token_ids) + len(e.text) + len(e.newline_mask) + 256


def _copy_rows(f: Any) -> Any:
    if f is None:
        return None
    return f.copy() if isinstance(f, np.ndarray) else f.clone()


def _copy_embedding(e: ImageEmbedding) -> ImageEmbedding:
    """A private copy, so that a caller editing its result cannot change what the cache returns."""
    return ImageEmbedding(
        _copy_rows(e.features),
        list(e.token_ids),
        e.text,
        e.num_crops,
        list(e.newline_mask),
        _copy_rows(e.vision_features),
    )


class VisionEmbedder:
    def __init__(
        self,
        global_runner: Runner,
        crop_runner: Runner,
        projector_weight: Any,
        projector_bias: Any | None,
        tokens: TokenIds,
        batch_size: int = 8,
        preprocess_cfg: PreprocessConfig | None = None,
        cache_mb: float = 0.0,
    ) -> None:
        self.cache = EmbeddingCache(cache_mb)
        self.global_runner = global_runner.activate()
        self.crop_runner = crop_runner.activate()
        self.weight, self.bias = projector_weight, projector_bias
        self.tokens = tokens
        self.batch_size = batch_size
        self.pcfg = preprocess_cfg = preprocess_cfg or PreprocessConfig()
        #: Device of GPU runners (torch on CUDA, TensorRT): views go there as torch tensors.
        self.device = None if isinstance(projector_weight, np.ndarray) else projector_weight.device
        for runner, res in (
            (self.global_runner, preprocess_cfg.image_size),
            (self.crop_runner, preprocess_cfg.patch_size),
        ):
            if runner.resolution not in (None, res):
                raise InputError(
                    f"runner {runner.name} is built for {runner.resolution}x{runner.resolution}, "
                    f"but it must serve {res}x{res} views"
                )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_artifacts(
        cls,
        checkpoint: str | Path,
        backend: str = "onnx",
        files: Sequence[str | Path] = (),
        provider: str = "cpu",
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 8,
        preprocess_cfg: PreprocessConfig | None = None,
        cache_mb: float = 0.0,
    ) -> VisionEmbedder:
        """``backend``: ``"torch"`` (tower from the checkpoint), ``"onnx"`` or ``"trt"`` (the 728 and
        504 files in ``files``, told apart by their metadata/manifest).  The checkpoint always
        provides the projector and the token ids, so each file must hold that checkpoint's vision
        weights (:func:`~step37_deploy.checkpoint.check_artifact_source`, a typed error naming both).
        ``cache_mb``: embedding cache budget (0 = off)."""
        from .checkpoint import check_artifact_source, load_projector

        cfg = Step37Config.from_checkpoint(checkpoint)
        if backend == "torch":
            from .backends import TorchRunner
            from .checkpoint import load_vision_model

            model = load_vision_model(checkpoint, dtype=dtype).to(device)
            g = c = TorchRunner(model, name=f"torch-{dtype}")
        elif backend in ("onnx", "trt"):
            runners = {}
            files_by_res: dict[int, str | Path] = {}
            for f in files:
                check_artifact_source(checkpoint, f, _recorded_metadata(backend, f))
                if backend == "onnx":
                    from .backends import OnnxrtRunner, session_from_onnx

                    r: Runner = OnnxrtRunner(session_from_onnx(f, provider), provider=provider).activate()
                else:
                    from .backends.tensorrt import TensorRTRunner

                    r = TensorRTRunner(f).activate()
                if r.resolution in runners:
                    raise InputError(
                        f"{files_by_res[r.resolution]} and {f} are both for resolution {r.resolution}: "
                        "give one file per resolution"
                    )
                runners[r.resolution] = r
                files_by_res[r.resolution] = f
            pc = PreprocessConfig()
            missing = [res for res in (pc.image_size, pc.patch_size) if res not in runners]
            if missing:
                raise InputError(
                    f"{backend} backend needs one file per resolution; none for {missing} among {list(files)}"
                )
            g, c = runners[pc.image_size], runners[pc.patch_size]
        else:
            raise InputError(f"backend must be torch, onnx or trt, got {backend!r}")
        proj = load_projector(checkpoint, "fp32")
        w = proj.weight.detach()
        b = proj.bias.detach() if proj.bias is not None else None
        if (backend == "torch" and device != "cpu") or backend == "trt":
            import torch

            dev = torch.device(device if backend == "torch" else "cuda")
            half = dtype in ("fp16", "bf16") or backend == "trt"
            w = w.to(dev, torch.float16 if half else torch.float32)
            b = b.to(dev, w.dtype) if b is not None else None
        else:
            w, b = w.numpy(), (b.numpy() if b is not None else None)
        return cls(g, c, w, b, cfg.tokens, batch_size, preprocess_cfg, cache_mb=cache_mb)

    # -- inference --------------------------------------------------------------------------------
    def _project(self, feats: Any) -> Any:
        if isinstance(self.weight, np.ndarray):
            return project(np.asarray(feats), self.weight, self.bias, out_dtype=np.float32)
        return project_torch(feats, self.weight, self.bias)

    def _run(self, runner: Runner, views: Any) -> Any:
        if self.device is not None and isinstance(views, np.ndarray):
            import torch  # GPU runners: upload once, keep features on the device

            views = torch.from_numpy(views).to(self.device, non_blocking=True)
        outs = [runner.infer(views[i : i + self.batch_size]) for i in range(0, len(views), self.batch_size)]
        if not outs:
            return None
        if isinstance(outs[0], np.ndarray):
            return np.concatenate(outs)
        import torch

        return torch.cat(outs)

    def encode(self, pixel_values: Any) -> Any:
        """Tower features [B, P', 6144] for a batch of 728 or 504 views (projector not applied)."""
        res = int(pixel_values.shape[-1])
        runner = {self.pcfg.image_size: self.global_runner, self.pcfg.patch_size: self.crop_runner}.get(res)
        if runner is None:
            raise InputError(f"views must be {self.pcfg.image_size} or {self.pcfg.patch_size} square, got {res}")
        return self._run(runner, pixel_values)

    @property
    def pixel_dtype(self) -> str:
        """What :func:`preprocess` makes for these runners: their declared input dtype (``uint8``
        for uint8-input artifacts: no float conversion on the host), or uint8 when the two differ
        (then normalised per runner)."""
        return host_pixel_dtype(r.input_spec().dtype for r in (self.global_runner, self.crop_runner))

    def embed_images(self, images: Sequence[Any], outputs: Sequence[str] = ("features",)) -> list[ImageEmbedding]:
        """Preprocess (to the runners' input dtype), run all global views and all crops in batches,
        project, and reassemble per image in token order.  With the cache on, only images not in it
        are computed (each distinct one once) and every result is a private copy.

        ``outputs``: the row kinds to compute (:data:`ROW_KINDS`): ``features`` (projected, the
        default) and/or ``vision_features`` (the towers' rows, before the projector: without
        ``features`` the projector does not run and ``ImageEmbedding.features`` is None)."""
        kinds = frozenset(outputs)
        if not kinds or not kinds <= set(ROW_KINDS):
            raise InputError(f"outputs must be one or more of {ROW_KINDS}, got {list(outputs)}")
        if not self.cache.enabled:
            return self._embed_uncached(images, kinds)
        suffix = "" if kinds == {"features"} else ":" + ",".join(sorted(kinds))  # one entry per answer kind
        keys = [k if k is None else k + suffix for k in (image_key(im) for im in images)]
        out: list[ImageEmbedding | None] = [self.cache.get(k) for k in keys]
        todo: dict[Any, list[int]] = {}  # one computation per distinct missing image
        for i, (k, e) in enumerate(zip(keys, out, strict=True)):
            if e is None:
                todo.setdefault(k if k is not None else ("uncached", i), []).append(i)
        fresh = self._embed_uncached([images[idx[0]] for idx in todo.values()], kinds)
        for (k, idx), e in zip(todo.items(), fresh, strict=True):
            if isinstance(k, str):
                self.cache.put(k, e, _embedding_nbytes(e))
            for i in idx:
                out[i] = e
        return [_copy_embedding(e) for e in out]  # type: ignore[arg-type]

    def _embed_uncached(self, images: Sequence[Any], kinds: frozenset[str] = _FEATURES_ONLY) -> list[ImageEmbedding]:
        pixel_dtype = self.pixel_dtype
        return self.embed_preprocessed([preprocess(im, self.pcfg, pixel_dtype=pixel_dtype) for im in images], kinds)

    def embed_preprocessed(
        self, pre: Sequence[PreprocessedImage], outputs: Sequence[str] = ("features",)
    ) -> list[ImageEmbedding]:
        """:meth:`embed_images` after preprocessing: ``pre`` made by :func:`preprocess` with this
        config and ``pixel_dtype=self.pixel_dtype`` (the corpus job decodes and preprocesses in
        threads ahead of the towers and batches here).  Same batching, same rows, no cache."""
        kinds = frozenset(outputs)
        if not kinds or not kinds <= set(ROW_KINDS):
            raise InputError(f"outputs must be one or more of {ROW_KINDS}, got {list(outputs)}")
        globals_ = np.stack([p.global_view for p in pre]) if pre else None
        crops = [p.crops for p in pre if p.num_crops]
        gdtype, cdtype = self.global_runner.input_spec().dtype, self.crop_runner.input_spec().dtype
        gtower = self.encode(as_pixel_dtype(globals_, gdtype)) if pre else None
        ctower = self.encode(as_pixel_dtype(np.concatenate(crops), cdtype)) if crops else None
        rows: dict[str, list[Any]] = {}
        if "vision_features" in kinds:
            rows["vision_features"] = _per_image(pre, gtower, ctower)
        if "features" in kinds:
            gfeat = self._project(gtower) if pre else None
            cfeat = self._project(ctower) if crops else None
            rows["features"] = _per_image(pre, gfeat, cfeat)
        out = []
        for i, p in enumerate(pre):
            text, ids = image_layout(p.num_crops, p.newline_mask, self.tokens, self.pcfg)
            feats, vision = (rows[k][i] if k in rows else None for k in ROW_KINDS)
            out.append(ImageEmbedding(feats, ids, text, p.num_crops, p.newline_mask, vision))
        return out

    def fuse(
        self,
        input_ids: Any,
        text_embeddings: Any,
        images: Sequence[Any] | Sequence[ImageEmbedding],
        batch_first: bool = False,
        inplace: bool = False,
    ) -> Any:
        """Insert each image's features after its ``<patch_start>``/``<im_start>`` flags, in order.

        ``images`` may be raw images or the :class:`ImageEmbedding` s of :meth:`embed_images`; the
        features are cast to the embeddings' dtype (and device)."""
        embs = [im if isinstance(im, ImageEmbedding) else None for im in images]
        if any(e is None for e in embs):
            embs = self.embed_images(list(images))
        groups = []
        for e in embs:
            rows_per = [self.pcfg.patch_tokens] * e.num_crops + [self.pcfg.image_tokens]
            start = 0
            for n in rows_per:
                groups.append(e.features[start : start + n])
                start += n
        flags = [self.tokens.patch_start, self.tokens.im_start]
        if isinstance(text_embeddings, np.ndarray):
            groups = [np.asarray(g).astype(text_embeddings.dtype) for g in groups]
            return insert_features(
                text_embeddings,
                groups,
                input_ids,
                flags,
                self.tokens.im_patch,
                batch_first=batch_first,
                inplace=inplace,
            )
        import torch

        groups = [torch.as_tensor(g).to(text_embeddings.device, text_embeddings.dtype) for g in groups]
        return insert_features_torch(
            text_embeddings, groups, input_ids, flags, self.tokens.im_patch, batch_first=batch_first, inplace=inplace
        )


def _recorded_metadata(backend: str, path: str | Path) -> dict[str, str]:
    """What an ONNX file (its ``step37.*`` metadata) or an engine (its manifest's copy of its
    ONNX's) says about the weights it was made from; read without loading any weights."""
    if backend == "onnx":
        from .export import read_metadata

        return read_metadata(path)
    from .engine import read_manifest

    recorded = read_manifest(path).get("onnx_metadata", {})
    return recorded if isinstance(recorded, dict) else {}


def _per_image(pre: Sequence[Any], gfeat: Any, cfeat: Any) -> list[Any]:
    """Per image, its rows in token order: its crops' rows (row-major crop order), then its global
    view's, cut from the batched global [N, P, D] and crop [sum n_i, P', D] outputs."""
    out, k = [], 0
    for i, p in enumerate(pre):
        parts = []
        if p.num_crops:
            parts.append(cfeat[k : k + p.num_crops].reshape(-1, cfeat.shape[-1]))
            k += p.num_crops
        parts.append(gfeat[i])
        out.append(parts[0] if len(parts) == 1 else _cat(parts))
    return out


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def check_embed_outputs(out: str | Path, artifacts: Sequence[str], images: Sequence[str]) -> tuple[Path, Path]:
    """``--out FILE.npy`` and its layout ``FILE.json``, checked before any work: a ``.npy`` name (so
    the two cannot be one file), writable, none of the inputs, and an existing file only where it
    is what this command writes (a ``.npy`` array, a layout JSON)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise OutputError(f"--out {out} must name a .npy file (the token layout is written beside it as .json)")
    side = out.with_suffix(".json")
    check_output_file(out, "--out")
    check_output_file(side, "the layout file")
    refuse_inputs({"--out": out, "the layout file": side}, {"--artifacts": artifacts, "--image": images})
    check_replaceable_json(side, "the layout file", {"hidden_size", "images"})
    if out.exists():
        # Only a pair this command wrote (an array with its layout report beside it) is replaced.
        if not side.is_file() or _head(out, 6) != b"\x93NUMPY":
            raise OutputError(
                f"--out {out} exists and is not an embed output (a .npy with its layout {side.name} beside it): "
                "refusing to replace it"
            )
        log.info("replacing %s and %s (written by embed before)", out, side)
    return out, side


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""
