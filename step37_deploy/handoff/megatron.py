"""Megatron-Bridge hand-off: ``ImageForInsert`` groups from the tower's rows before the projector.

Megatron-Bridge's Step-3.7 model has a decoupled-encoder mode: the vision tower runs elsewhere (here:
our service, asked for ``vision_features``) and the decoder gets ``ImageForInsert`` items whose
``image_features`` are already set.  This module builds those items as a plain dataclass of torch
tensors with the same field names and order, so ``megatron_cls(**group.as_kwargs())`` makes the real
one; Megatron is never imported here.

What this relies on, read in ``NVIDIA-NeMo/Megatron-Bridge`` at commit 067f987 (2026-08-22) and in the
API page ``/work/shared/seeds/megatron-bridge-step37-image_insert_embedding.txt``:

- ``src/megatron/bridge/models/stepfun/modelling_step37/image_insert_embedding.py``:
  ``ImageForInsert(insert_start_token: int, images=None, image_features=None, rope_cu_seqlens=None,
  rope_max_seq_len=None)``.  ``image_features`` are "precomputed features before the language
  projector ([N, L, C])": ``ImageInsertEmbedding.forward`` applies its own ``align_projector``
  (Linear C -> hidden) to them, so these are our ``vision_features`` (C = 6144), never ``features``.
  ``insert_features`` finds every position where ``input_ids == insert_start_token`` (row-major over
  [B, S]), starts at the next position, and writes the k-th view's rows at the k-th occurrence; a
  count mismatch is only a logged warning that truncates.  So one group holds *all* views that share
  a flag, in sequence order: per-image groups are right for a sequence with one image, and a sequence
  with several images needs :func:`sequence_groups` (one crop group, one global group).
- ``.../modelling_step37/model.py``: ``_encode_images_for_insert`` passes an item whose
  ``image_features`` is set through unchanged (the vision tower is skipped), keeping
  ``insert_start_token`` and the RoPE fields.
- ``.../data/flickr8k/multimodal_utils.py``: ``build_image_for_insert`` makes one item per flag,
  ``<patch_start>`` (crops) first, then ``<im_start>`` (global views), and none for a kind with no
  views; ``compute_rope_args(images, patch_size=14)`` sets ``rope_cu_seqlens`` to the int32 prefix sum
  (leading 0, shape [N + 1]) of each view's patch count ``(H // 14) * (W // 14)`` and
  ``rope_max_seq_len`` to the largest count as a Python int.  For our views: 2704 per 728 global view,
  1296 per 504 crop.  They are carried along for the tower's 2-D RoPE; with precomputed features the
  tower does not run, but the fields are filled exactly as the data pipeline fills them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import InputError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig
from ..runtime import ImageEmbedding

#: The tower's patch size (pixels): ``compute_rope_args``' ``patch_size``.
VISION_PATCH_SIZE = 14


@dataclass
class ImageForInsert:
    """Megatron-Bridge's ``ImageForInsert`` (same fields, same order), without Megatron."""

    insert_start_token: int
    images: torch.Tensor | None = None
    image_features: torch.Tensor | list[torch.Tensor] | None = None
    rope_cu_seqlens: torch.Tensor | None = None
    rope_max_seq_len: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments (tensors not copied): ``ImageForInsert(**g.as_kwargs())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def rope_args(num_views: int, resolution: int, patch_size: int = VISION_PATCH_SIZE) -> tuple[torch.Tensor, int]:
    """``(rope_cu_seqlens, rope_max_seq_len)`` of ``num_views`` square views of ``resolution`` pixels,
    as ``compute_rope_args`` defines them: int32 ``[0, c, 2c, ...]`` of shape [N + 1], and ``c``."""
    count = (resolution // patch_size) ** 2
    return torch.arange(num_views + 1, dtype=torch.int32) * count, count


def _group(flag: int, rows: torch.Tensor, tokens_per_view: int, resolution: int, dtype: Any) -> ImageForInsert:
    feats = rows.reshape(-1, tokens_per_view, rows.shape[-1])  # [N, L, C]
    if dtype is not None:
        feats = feats.to(dtype)
    cu, longest = rope_args(feats.shape[0], resolution)
    return ImageForInsert(flag, image_features=feats, rope_cu_seqlens=cu, rope_max_seq_len=longest)


def _split(e: ImageEmbedding, i: int, cfg: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Image ``i``'s crop rows [n*81, C] and global rows [169, C] (torch), and its two flag ids."""
    v = e.vision_features
    if v is None:
        raise InputError(
            f"image {i} has no vision_features: Megatron-Bridge takes the rows before the projector; ask the "
            "service (or VisionEmbedder.embed_images) for outputs=('vision_features',)"
        )
    v = torch.as_tensor(v)
    crop_rows = e.num_crops * cfg.patch_tokens
    if v.ndim != 2 or v.shape[0] != crop_rows + cfg.image_tokens:
        raise InputError(
            f"image {i}: vision_features {tuple(v.shape)} do not fit {e.num_crops} crops "
            f"({crop_rows + cfg.image_tokens} rows expected)"
        )
    im_start = e.token_ids[-(cfg.image_tokens + 2)]  # the layout ends <im_start> 169 x <im_patch> <im_end>
    patch_start = e.token_ids[0]  # with crops the layout starts with <patch_start>
    return v[:crop_rows], v[crop_rows:], patch_start, im_start


def sequence_groups(
    embeddings: Sequence[ImageEmbedding], cfg: PreprocessConfig = DEFAULT_PREPROCESS, dtype: Any = None
) -> list[ImageForInsert]:
    """The groups of one sequence holding ``embeddings`` in order: the crop group (``<patch_start>``,
    [sum n_i, 81, C], if any image has crops), then the global group (``<im_start>``, [N, 169, C]).
    ``dtype``: cast the features (e.g. ``torch.bfloat16`` as Megatron's data pipeline does; default:
    as served)."""
    if not embeddings:
        return []
    crops, globals_, patch_flags, im_flags = [], [], set(), set()
    for i, e in enumerate(embeddings):
        c, g, patch_start, im_start = _split(e, i, cfg)
        globals_.append(g)
        im_flags.add(im_start)
        if e.num_crops:
            crops.append(c)
            patch_flags.add(patch_start)
    if len(im_flags) != 1 or len(patch_flags) > 1:
        raise InputError("the images' token layouts use different image tokens: they come from different checkpoints")
    groups = []
    if crops:
        groups.append(_group(patch_flags.pop(), torch.cat(crops), cfg.patch_tokens, cfg.patch_size, dtype))
    groups.append(_group(im_flags.pop(), torch.cat(globals_), cfg.image_tokens, cfg.image_size, dtype))
    return groups


def image_groups(
    embedding: ImageEmbedding, cfg: PreprocessConfig = DEFAULT_PREPROCESS, dtype: Any = None
) -> list[ImageForInsert]:
    """One image's groups: the crop group (``<patch_start>``, [n, 81, C]) when it has crops, and the
    global group (``<im_start>``, [1, 169, C]).  For a sequence with several images use
    :func:`sequence_groups` (Megatron inserts a group's k-th view at the k-th flag of the sequence)."""
    return sequence_groups([embedding], cfg, dtype)
