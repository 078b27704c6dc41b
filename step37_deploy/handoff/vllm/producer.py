"""The vLLM encoder-cache producer: embeds images through any embed function and writes each one's
file in vLLM's layout, plus the request examples that name those files.

Who writes: the **client side**.  A :class:`VllmProducer` is fed by any embed function
(:class:`~step37_deploy.serving.client.EmbedClient` ``.embed_many`` or the in-process
:class:`~step37_deploy.runtime.VisionEmbedder` ``.embed_images``), so the service stays stateless
and needs no access to vLLM's storage.  Where the two crop layouts differ (:mod:`.layout`) the
producer follows vLLM's (``mismatch="vllm"``, the default): the global view is the reference's (the
two agree on it), and the crops are vLLM's own tiles (:func:`~.layout.vllm_tiles`: its boxes, zero
padding included), sent through the same embed function packed in 1 x k strips that the reference
tiles back into exactly those tiles (:func:`~.layout.tile_strips`).  ``mismatch="refuse"`` refuses
such images with one line instead.  Either way a file is written only when its rows equal vLLM's
placeholder count (``vllm/model_executor/models/step3p7.py``: the projector output ``[L, text
hidden]`` is the cache).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...config import TokenIds
from ...errors import InputError
from ...preprocess import PreprocessConfig, encode_png, image_layout
from ...runtime import ImageEmbedding
from .cache import VllmCacheWriter, check_id
from .layout import (
    STRIP_MIN,
    VLLM_VERSION,
    CropLayout,
    check_rows,
    image_size,
    layouts_agree,
    reference_layout,
    tile_strips,
    vllm_layout,
    vllm_tiles,
)

#: ``mismatch``: what to do with an image vLLM crops unlike the reference.
MISMATCH_POLICIES = ("vllm", "refuse")


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
            inputs += [encode_png(strip, compress_level=1) for strip, _ in packed]
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
