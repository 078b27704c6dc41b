"""SGLang hand-off: a prompt with images plus our embeddings -> the body of SGLang's ``/generate``.

SGLang takes image rows computed outside it as one item per modality,
``image_data=[{"format": "precomputed_embedding", "feature": [L_total, hidden]}]`` (every image's rows
concatenated in prompt order), together with ``input_ids`` that are already fully expanded: every
``<patch_start>``/``<patch_end>``/``<patch_newline>``/``<im_start>``/``<im_end>`` marker and one
``<im_patch>`` per row.  That is :class:`~step37_deploy.runtime.ImageEmbedding` exactly: ``features``
are the rows after the projector in token order (all crops row-major, then the global view) and
``token_ids``/``text`` are the image's expansion.

Checked against SGLang's source (it cannot run here: its wheel needs CUDA-only packages), the
``sgl-project/sglang`` files and commits read on 2026-11-30:

- ``python/sglang/srt/multimodal/processors/step3_vl.py`` (commit 0b142c7): ``Step3VLProcessor``
  expands each ``<im_patch>`` placeholder into, per crop, ``<patch_start>`` + 81 x ``<im_patch>`` +
  ``<patch_end>`` (+ ``<patch_newline>`` where a crop row ends), then ``<im_start>`` + 169 x
  ``<im_patch>`` + ``<im_end>``; its image token (``mm_tokens.image_token``) is ``<im_patch>``, and
  its crop plan uses ``long <= 728`` like transformers' (vLLM's differs: see docs/handoff.md).
- ``python/sglang/srt/multimodal/processors/base_processor.py`` (commit 3b05740): ``load_mm_data``
  keeps the text of a precomputed (dict) item as given instead of re-expanding it, dict items skip
  the HF processor, and each item's offsets are the runs of the image token id in ``input_ids``.
- ``python/sglang/srt/managers/mm_utils.py`` (commit 005fa83): ``_get_precomputed_embedding``
  concatenates the items' precomputed embeddings and reshapes them to ``[-1, hidden]``; the rows go
  to the ``<im_patch>`` positions in order (``_get_multimodal_mask``), so the row count must equal
  the number of ``<im_patch>`` tokens.
- The request field names (``format``/``feature``, one entry with all images) are those of SGLang
  0.5.23's ``/generate`` (issue 17's facts).

Prompt text becomes ids the way transformers' ``Step3p7Processor`` does it (the reference): each
``<im_patch>`` in the prompt stands for one image and is replaced by that image's expansion
(``ImageEmbedding.text``), then the whole string goes through the checkpoint's tokenizer with its
defaults.  The result is checked against the embeddings' own ``token_ids`` so a tokenizer that maps
the image tokens elsewhere is refused instead of misplacing rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..runtime import ImageEmbedding

log = logging.getLogger(__name__)

#: The placeholder a prompt carries once per image (``Step3p7Processor.image_token``).
IMAGE_PLACEHOLDER = "<im_patch>"
#: The ``format`` of an ``image_data`` item holding rows computed outside SGLang.
PRECOMPUTED_FORMAT = "precomputed_embedding"


def expand_prompt(prompt: str, embeddings: Sequence[ImageEmbedding], placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """``prompt`` with its i-th ``placeholder`` replaced by image i's expansion (``ImageEmbedding.text``)."""
    parts = prompt.split(placeholder)
    if len(parts) - 1 != len(embeddings):
        raise InputError(
            f"the prompt has {len(parts) - 1} {placeholder} placeholder(s) but {len(embeddings)} image(s) were given: "
            f"put one {placeholder} where each image goes"
        )
    out = [parts[0]]
    for e, rest in zip(embeddings, parts[1:], strict=True):
        out += [e.text, rest]
    return "".join(out)


def expanded_input_ids(
    prompt: str, embeddings: Sequence[ImageEmbedding], tokenizer: Any, placeholder: str = IMAGE_PLACEHOLDER
) -> list[int]:
    """The fully expanded ``input_ids`` of ``prompt``: :func:`expand_prompt`, then ``tokenizer``
    (a transformers tokenizer, or any callable returning ``{"input_ids": [...]}``) with its defaults,
    as ``Step3p7Processor`` does.  Each image's ``token_ids`` must appear, in order, in the result."""
    ids = [int(t) for t in tokenizer(expand_prompt(prompt, embeddings, placeholder))["input_ids"]]
    pos = 0
    for i, e in enumerate(embeddings):
        at = _find(ids, e.token_ids, pos)
        if at < 0:
            raise InputError(
                f"the tokenizer does not turn image {i}'s expansion into the token ids the embedding carries "
                f"(first {e.token_ids[:2]}...): its image tokens differ from the checkpoint the service serves"
            )
        pos = at + len(e.token_ids)
    return ids


def _find(seq: list[int], sub: list[int], start: int) -> int:
    """First index >= ``start`` where ``sub`` occurs in ``seq`` (-1 if none)."""
    n = len(sub)
    first = sub[0]
    for i in range(start, len(seq) - n + 1):
        if seq[i] == first and seq[i : i + n] == sub:
            return i
    return -1


def image_rows(embeddings: Sequence[ImageEmbedding]) -> np.ndarray | Any:
    """All images' projected rows, concatenated in prompt order: ``[L_total, hidden]`` (numpy, or a
    torch tensor when the embeddings hold torch tensors, e.g. bfloat16 answers)."""
    feats = [e.features for e in embeddings]
    if any(f is None for f in feats):
        raise InputError("SGLang takes the rows after the projector: ask the service for `features`")
    hidden = {int(f.shape[-1]) for f in feats}
    if len(hidden) != 1:
        raise InputError(f"the images' rows have different widths {sorted(hidden)}: they come from different models")
    for i, (e, f) in enumerate(zip(embeddings, feats, strict=True)):
        want = e.token_ids.count(_patch_id(e))
        if f.ndim != 2 or f.shape[0] != want:
            raise InputError(f"image {i} has {tuple(f.shape)} rows for {want} <im_patch> tokens")
    if all(isinstance(f, np.ndarray) for f in feats):
        return np.concatenate(feats)
    import torch

    return torch.cat([torch.as_tensor(f) for f in feats])


def _patch_id(e: ImageEmbedding) -> int:
    """``<im_patch>``: the token just before ``<im_end>`` (the global view's last row) in any layout."""
    return e.token_ids[-2]


def generate_body(
    prompt: str,
    embeddings: Sequence[ImageEmbedding],
    tokenizer: Any,
    sampling_params: Mapping[str, Any] | None = None,
    *,
    as_json: bool = True,
    placeholder: str = IMAGE_PLACEHOLDER,
) -> dict[str, Any]:
    """The ``/generate`` body for ``prompt`` (one ``placeholder`` per image) and its images' embeddings.

    ``as_json``: rows as nested lists of floats (the HTTP body; 16-bit rows are written as the
    floats they hold), else the tensor itself (SGLang's offline ``Engine.generate(**body)``)."""
    input_ids = expanded_input_ids(prompt, embeddings, tokenizer, placeholder)
    body: dict[str, Any] = {"input_ids": input_ids, "sampling_params": dict(sampling_params or {})}
    if embeddings:
        rows = image_rows(embeddings)
        patch = _patch_id(embeddings[0])
        if sum(t == patch for t in input_ids) != rows.shape[0]:  # e.g. the prompt text itself holds <im_patch>
            raise InputError(
                f"input_ids hold {sum(t == patch for t in input_ids)} <im_patch> tokens for {rows.shape[0]} rows"
            )
        if as_json:
            rows = rows.float().tolist() if hasattr(rows, "float") else rows.astype(np.float32).tolist()
        body["image_data"] = [{"format": PRECOMPUTED_FORMAT, "feature": rows}]
    return body


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (``tokenizer.json``/``tokenizer_config.json`` in ``path``), read by
    transformers' ``AutoTokenizer`` as ``Step3p7Processor`` reads it."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise InputError(
            f"reading a tokenizer needs transformers: pip install 'step37-deploy[reference]' ({exc})"
        ) from None
    if not Path(path).is_dir():
        raise InputError(f"--tokenizer {path} is not a folder (give the checkpoint folder with tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"--tokenizer {path}: cannot read a tokenizer there: {' '.join(str(exc).split())}") from None
