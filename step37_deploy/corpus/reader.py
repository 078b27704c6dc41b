"""Reading feature shards back: samples with their tensors and layout, and ``ImageForInsert`` groups.

:func:`read_shard` walks a feature shard; :func:`decode_sample` turns one WebDataset / Energon
sample dict (``{"vision_features.safetensors": bytes, "layout.json": bytes, ...}``) into a
:class:`FeatureSample`, so the same code serves a plain loop, ``webdataset`` and an Energon
``sample_loader`` / joiner.  :func:`insert_groups` gives Megatron-Bridge's ``ImageForInsert`` groups
through :mod:`step37_deploy.handoff.megatron` (one image, or several in one sequence).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig
from .layout import KINDS
from .shard import LAYOUT_EXT, TENSOR_EXT, iter_members, read_manifest
from .sources import split_name


@dataclass
class FeatureSample:
    key: str
    layout: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)  # kind -> torch tensor [L, C]

    @property
    def vision_features(self) -> Any:
        return self.tensors.get("vision_features")

    @property
    def features(self) -> Any:
        return self.tensors.get("features")

    def embedding(self) -> Any:
        """The sample as an :class:`~step37_deploy.runtime.ImageEmbedding` (rows, token ids, crops)."""
        from ..runtime import ImageEmbedding

        lay = self.layout
        return ImageEmbedding(
            self.features,
            list(lay["token_ids"]),
            "",
            int(lay["num_crops"]),
            list(lay["newline_mask"]),
            self.vision_features,
        )


def _load_tensor(data: bytes, kind: str) -> Any:
    from safetensors.torch import load

    tensors = load(data)
    if kind not in tensors:
        raise InputError(f"safetensors member holds {sorted(tensors)}, not {kind!r}")
    return tensors[kind]


def decode_sample(sample: Mapping[str, Any], kinds: Sequence[str] = KINDS) -> FeatureSample:
    """A WebDataset-style dict (``__key__`` and extension -> bytes) as a :class:`FeatureSample`;
    ``layout.json`` may already be decoded (a dict)."""
    key = str(sample.get("__key__", ""))
    lay = sample.get(LAYOUT_EXT)
    if lay is None:
        raise InputError(f"sample {key!r} has no {LAYOUT_EXT}")
    layout = lay if isinstance(lay, dict) else json.loads(lay)
    tensors = {}
    for kind in kinds:
        data = sample.get(TENSOR_EXT.format(kind=kind))
        if data is not None:
            tensors[kind] = _load_tensor(bytes(data), kind)
    return FeatureSample(key, layout, tensors)


def read_shard(path: str | Path, kinds: Sequence[str] = KINDS) -> Iterator[FeatureSample]:
    """The samples of a feature shard, in order."""
    current: dict[str, Any] = {}
    for name, data in iter_members(path):
        parts = split_name(name)
        if parts is None:
            continue
        if current and parts[0] != current["__key__"]:
            yield decode_sample(current, kinds)
            current = {}
        current["__key__"] = parts[0]
        current[parts[1]] = data
    if current:
        yield decode_sample(current, kinds)


def read_manifest_of(shard: str | Path) -> dict[str, Any]:
    """The manifest beside a feature shard (``NAME.tar`` -> ``NAME.manifest.json``)."""
    p = Path(shard)
    m = read_manifest(p.with_name(p.name[: -len(".tar")] + ".manifest.json"))
    if m is None:
        raise InputError(f"{shard} has no manifest of step37-deploy beside it (an incomplete shard?)")
    return m


def insert_groups(
    samples: Sequence[FeatureSample], cfg: PreprocessConfig = DEFAULT_PREPROCESS, dtype: Any = None
) -> list[Any]:
    """Megatron-Bridge ``ImageForInsert`` groups for one sequence holding ``samples`` in order (the crop
    group, then the global group; :func:`~step37_deploy.handoff.megatron.sequence_groups`)."""
    from ..handoff.megatron import sequence_groups

    return sequence_groups([s.embedding() for s in samples], cfg, dtype)
