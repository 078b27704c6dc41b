"""Stage 2: pull only the vision tower and projector out of a (multi-hundred-GB) sharded checkpoint.

A Step-3.7 release keeps the vision weights in the same safetensors shards as the language model.
This module reads ``model.safetensors.index.json`` (or a single ``model.safetensors``), opens only
the shards that hold ``vision_model.*`` / ``vit_large_projector.*`` tensors, and reads only those
tensors through ``safetensors``' memory map.  Shards are re-opened every ``_REMAP_BYTES`` so that
the file pages already copied out do not stay mapped (they would otherwise count towards RSS and
double the peak when the on-disk and in-memory dtypes have the same width, e.g. bf16 -> fp16).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import Step37Config
from .errors import CheckpointError

log = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_model.", "model.vision_model.")
PROJECTOR_PREFIXES = ("vit_large_projector.", "model.multi_modal_projector.")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_REMAP_BYTES = 256 << 20

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of fp32, fp16, bf16") from None


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: the full key in the checkpoint and the shard that holds it."""

    key: str
    shard: Path


class CheckpointIndex:
    """The key -> shard map of a checkpoint folder (read from the index; no tensor data touched)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"checkpoint folder {self.root} does not exist")
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.root / INDEX_FILE
        if index.is_file():
            try:
                raw = json.loads(index.read_text())
                mapping = raw["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            return {key: self.root / shard for key, shard in mapping.items()}
        single = self.root / SINGLE_FILE
        if single.is_file():
            with _open(single) as f:
                return dict.fromkeys(f.keys(), single)
        raise CheckpointError(f"{self.root} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    def find(self, prefixes: tuple[str, ...]) -> dict[str, TensorRef]:
        """Tensors under the first prefix that matches any key, keyed by the name without it."""
        for prefix in prefixes:
            refs = {
                key[len(prefix) :]: TensorRef(key, shard)
                for key, shard in self.weight_map.items()
                if key.startswith(prefix)
            }
            if refs:
                return refs
        return {}


class _open:
    """``safe_open`` with errors that name the file (corrupt/truncated shards)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        if not self.path.is_file():
            raise CheckpointError(f"shard {self.path} listed in the index does not exist")
        try:
            self._cm = safe_open(str(self.path), framework="pt")
            return self._cm.__enter__()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"shard {self.path} is corrupt or truncated: {exc}") from exc

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """A safetensors file's header: (offset of the data section, tensor name -> entry with
    ``dtype``, ``shape``, ``data_offsets``).  ``ValueError``/``OSError`` for unreadable headers."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > size:
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    return 8 + n, {k: v for k, v in header.items() if k != "__metadata__"}


def _file_size_check(path: Path) -> None:
    """safetensors validates offsets against the header but a truncated data section still
    mmaps; compare the header's end offset with the file size to name truncation explicitly."""
    if not path.is_file():
        raise CheckpointError(f"shard {path} listed in the index does not exist")
    try:
        start, header = read_header(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"shard {path} is corrupt or truncated: {exc}") from exc
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    size = path.stat().st_size
    if start + end > size:
        raise CheckpointError(f"shard {path} is truncated: header needs {start + end} bytes, file has {size}")


#: Hook for tests: called with every full key this module reads.  Lets a test prove that no
#: language-model tensor is ever requested.
_read_hook: Callable[[str], None] | None = None


def iter_tensors(refs: dict[str, TensorRef], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` converted to ``dtype``, shard by shard, reading nothing else."""
    by_shard: dict[Path, list[tuple[str, TensorRef]]] = defaultdict(list)
    for name, ref in refs.items():
        by_shard[ref.shard].append((name, ref))
    for shard, items in by_shard.items():
        _file_size_check(shard)
        pending = list(items)
        while pending:
            read = 0
            with _open(shard) as f:
                while pending and read < _REMAP_BYTES:
                    name, ref = pending.pop(0)
                    if _read_hook is not None:
                        _read_hook(ref.key)
                    try:
                        t = f.get_tensor(ref.key)
                    except (SafetensorError, KeyError) as exc:
                        raise CheckpointError(
                            f"shard {shard} does not hold {ref.key} as its index says: {exc}"
                        ) from exc
                    read += t.numel() * t.element_size()
                    yield name, t.to(dtype) if t.dtype != dtype else t.clone()
                    del t


def load_state_dict(
    refs: dict[str, TensorRef], expected: dict[str, torch.Size], dtype: torch.dtype, what: str, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Read ``refs`` and validate strictly against ``expected`` names and shapes (one error listing all)."""
    missing = sorted(set(expected) - set(refs))
    unexpected = sorted(set(refs) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if problems:
        raise CheckpointError(f"{what} weights do not match the config: " + "; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    bad = []
    stream = iter_tensors(refs, dtype)
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, total=len(refs), desc=f"loading {what}", unit="tensor", leave=False)
    for name, tensor in stream:
        if tensor.shape != expected[name]:
            bad.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name])}")
            continue
        out[name] = tensor
    if bad:
        raise CheckpointError(f"{what} weights have wrong shapes: " + "; ".join(bad))
    return out


def _refs(checkpoint_dir: str | Path, prefixes: tuple[str, ...], what: str) -> dict[str, TensorRef]:
    refs = CheckpointIndex(checkpoint_dir).find(prefixes)
    if not refs:
        raise CheckpointError(f"{checkpoint_dir} has no {what} tensors (prefixes {prefixes})")
    return refs


def _load_module(
    checkpoint_dir: str | Path,
    prefixes: tuple[str, ...],
    what: str,
    factory: Callable[[Step37Config], torch.nn.Module],
    dtype: str | torch.dtype,
    progress: bool,
) -> torch.nn.Module:
    """Build the module on the meta device and assign the checkpoint's tensors into it, so no
    randomly initialised copy of the weights is ever allocated."""
    refs = _refs(checkpoint_dir, prefixes, what)
    cfg = Step37Config.from_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        module = factory(cfg)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    state = load_state_dict(refs, expected, parse_dtype(dtype), what, progress)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_vision_model(
    checkpoint_dir: str | Path, dtype: str | torch.dtype = "fp32", progress: bool = False
) -> torch.nn.Module:
    """The vision tower of a checkpoint as a ready ``Step37VisionModel`` in eval mode."""
    from .model import Step37VisionModel

    return _load_module(
        checkpoint_dir, VISION_PREFIXES, "vision", lambda c: Step37VisionModel(c.vision), dtype, progress
    )


def load_projector(checkpoint_dir: str | Path, dtype: str | torch.dtype = "fp32") -> torch.nn.Module:
    """``vit_large_projector`` as a ready ``Step37Projector`` (eval mode)."""
    from .model import Step37Projector

    return _load_module(
        checkpoint_dir, PROJECTOR_PREFIXES, "projector", lambda c: Step37Projector(c.projector), dtype, False
    )


def vision_refs(checkpoint_dir: str | Path) -> dict[str, TensorRef]:
    return _refs(checkpoint_dir, VISION_PREFIXES, "vision")


def weights_digest(checkpoint_dir: str | Path) -> str:
    """SHA-256 over the vision tensors' names, shapes, dtypes and raw bytes (stable identity of
    the exported weights, recorded in ONNX metadata).  Reads only vision tensors."""
    refs = vision_refs(checkpoint_dir)
    h = hashlib.sha256()
    for name in sorted(refs):
        ref = refs[name]
        with _open(ref.shard) as f:
            t = f.get_tensor(ref.key)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        del t
    return h.hexdigest()
