"""One embedded sample as feature-shard members: its tensors (safetensors) and ``layout.json``.

The layout is what a data loader needs besides the rows: the views (crops row-major, then the global
view), rows per view, the crop grid, the processor's token ids, and Megatron-Bridge's insertion groups
(``<patch_start>`` for the crops, ``<im_start>`` for the global view) with their ``rope_cu_seqlens``
and ``rope_max_seq_len`` exactly as ``handoff.megatron`` computes them, plus the image's upright
size, member extension and the SHA-256 of its bytes (to tie a row to the exact file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig
from .shard import DTYPES, LAYOUT_EXT, TENSOR_EXT

#: Row kinds a feature shard can hold, in member order.
KINDS = ("vision_features", "features")


def crop_grid(num_crops: int, newline_mask: Sequence[bool]) -> tuple[int, int]:
    """``(columns, rows)`` of the crops, read off the newline mask (a newline ends every row but the
    last): (0, 0) without crops."""
    if not num_crops:
        return 0, 0
    first = next((i for i, nl in enumerate(newline_mask) if nl), num_crops - 1)
    cols = first + 1
    return cols, num_crops // cols


def layout_of(
    embedding: Any,
    size: tuple[int, int],
    member: str,
    sha256: str,
    nbytes: int,
    kinds: Sequence[str],
    dims: dict[str, int],
    dtype: str,
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
) -> dict[str, Any]:
    """The ``layout.json`` of one embedded image (``dims``: row width per kind)."""
    from ..handoff.megatron import rope_args

    n = int(embedding.num_crops)
    ids = [int(t) for t in embedding.token_ids]
    rows = n * cfg.patch_tokens + cfg.image_tokens
    groups = []
    if n:
        cu, longest = rope_args(n, cfg.patch_size)
        groups.append(_group(ids[0], n, cfg.patch_tokens, cfg.patch_size, cu, longest))
    cu, longest = rope_args(1, cfg.image_size)
    groups.append(_group(ids[-(cfg.image_tokens + 2)], 1, cfg.image_tokens, cfg.image_size, cu, longest))
    cols, grid_rows = crop_grid(n, embedding.newline_mask)
    return {
        "image": {"member": member, "width": size[0], "height": size[1], "bytes": nbytes, "sha256": sha256},
        "num_crops": n,
        "crop_grid": [cols, grid_rows],
        "views": n + 1,
        "rows_per_view": [cfg.patch_tokens] * n + [cfg.image_tokens],
        "rows": rows,
        "newline_mask": [bool(b) for b in embedding.newline_mask],
        "token_ids": ids,
        "groups": groups,
        "tensors": {k: {"dtype": DTYPES[dtype], "shape": [rows, dims[k]]} for k in kinds},
    }


def _group(flag: int, views: int, tokens: int, resolution: int, cu: Any, longest: int) -> dict[str, Any]:
    return {
        "insert_start_token": flag,
        "views": views,
        "tokens_per_view": tokens,
        "resolution": resolution,
        "rope_cu_seqlens": [int(x) for x in cu],
        "rope_max_seq_len": int(longest),
    }


def rows_of(embedding: Any, kind: str) -> Any:
    return embedding.vision_features if kind == "vision_features" else embedding.features


def sample_members(key: str, embedding: Any, layout: dict[str, Any], kinds: Sequence[str], dtype: str) -> list:
    """``[(member name, bytes)]`` of one sample, in member order: tensors, then the layout."""
    from .shard import tensor_bytes

    out = [(f"{key}.{TENSOR_EXT.format(kind=k)}", tensor_bytes(k, rows_of(embedding, k), dtype)) for k in kinds]
    out.append((f"{key}.{LAYOUT_EXT}", json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()))
    return out
