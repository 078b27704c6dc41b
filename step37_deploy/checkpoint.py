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
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import Step37Config
from .errors import CheckpointError
from .files import read_json
from .inputs import contained_path, require_dir, require_file

log = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_model.", "model.vision_model.")
PROJECTOR_PREFIXES = ("vit_large_projector.", "model.multi_modal_projector.")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_REMAP_BYTES = 256 << 20
#: How vision/projector tensors may be stored (safetensors dtype names).  Integer, bool and float8
#: storage would be "converted" silently into wrong weights, so it is refused by name.
FLOAT_STORAGE = ("F16", "BF16", "F32", "F64")
#: safetensors refuses headers above 100 MB; so do we, before allocating them.
_MAX_HEADER = 100_000_000

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
        self.root = require_dir(root, CheckpointError, "checkpoint")
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, Path]:
        """Every shard name is checked to stay inside the folder before any shard is opened."""
        index = self.root / INDEX_FILE
        if require_file(index, CheckpointError, "safetensors index", missing_ok=True):
            mapping = read_json(index, CheckpointError).get("weight_map")
            if not isinstance(mapping, dict):
                raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' must be an object")
            shards: dict[object, Path] = {}
            for shard in mapping.values():
                if not isinstance(shard, str) or shard not in shards:
                    shards[shard] = contained_path(self.root, shard, CheckpointError, f"{index}")
            return {key: shards[shard] for key, shard in mapping.items()}
        single = self.root / SINGLE_FILE
        if require_file(single, CheckpointError, "checkpoint file", missing_ok=True):
            return dict.fromkeys(read_header(single)[1], single)
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
        require_file(self.path, CheckpointError, "shard")
        try:
            self._cm = safe_open(str(self.path), framework="pt")
            return self._cm.__enter__()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"shard {self.path} is corrupt or truncated: {exc}") from exc

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """A safetensors file's header: (offset of the data section, tensor name -> entry with
    ``dtype``, ``shape``, ``data_offsets``), every entry checked for type and fit in the file.
    :class:`CheckpointError` naming the file for anything that is not such a header."""
    path = Path(path)
    require_file(path, CheckpointError, "shard")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n < 2 or n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise CheckpointError(f"shard {path} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8 included
        raise CheckpointError(f"shard {path} is corrupt or truncated: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {path} is corrupt: its header is not a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, entry in entries.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"shard {path} is corrupt: tensor {key!r} {problem}")
        if 8 + n + entry["data_offsets"][1] > size:
            raise CheckpointError(
                f"shard {path} is truncated: {key} needs {8 + n + entry['data_offsets'][1]} bytes, file has {size}"
            )
    return 8 + n, entries


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one header entry, or ``None``."""
    if not isinstance(entry, dict):
        return "has no header entry object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"has dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"has data_offsets {offsets!r}"
    return None


def check_storage(refs: dict[str, TensorRef], what: str) -> None:
    """Before any tensor is read: every ref is in its shard's header, inside the file, and stored
    in a floating-point dtype (:data:`FLOAT_STORAGE`); one error listing every offender."""
    bad: list[str] = []
    for shard, items in _by_shard(refs).items():
        _, header = read_header(shard)
        for _, ref in items:
            entry = header.get(ref.key)
            if entry is None:
                raise CheckpointError(f"shard {shard} does not hold {ref.key} as its index says")
            if entry["dtype"] not in FLOAT_STORAGE:
                bad.append(f"{ref.key} is {entry['dtype']} in {shard.name}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{what} tensors must be stored as floating point ({', '.join(FLOAT_STORAGE)}), but "
            + "; ".join(bad[:5])
            + more
        )


def _by_shard(refs: dict[str, TensorRef]) -> dict[Path, list[tuple[str, TensorRef]]]:
    by_shard: dict[Path, list[tuple[str, TensorRef]]] = defaultdict(list)
    for name, ref in refs.items():
        by_shard[ref.shard].append((name, ref))
    return by_shard


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one ``aminmax`` pass (NaN propagates to both ends, an Inf is one of
    them; nothing can overflow).  On the full preset it costs 0.5x (fp32) to 0.8x (bf16) the time
    to read and convert the tensors, where ``isfinite(t).all()`` costs 5-7x and an FP32-accumulated
    sum of bf16 tensors 2.6x (``scripts/measure_reader_checks.py``, docs/design.md)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def require_finite(t: torch.Tensor, key: str, shard: Path | str, what: str = "") -> None:
    """:class:`CheckpointError` naming the tensor and its shard when ``t`` holds NaN or Inf."""
    if not all_finite(t):
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(
            f"tensor {key} in shard {shard} has {n} NaN/Inf value(s){what}: "
            "the weights are corrupt; refusing to use them"
        )


#: Hook for tests: called with every full key this module reads.  Lets a test prove that no
#: language-model tensor is ever requested.
_read_hook: Callable[[str], None] | None = None


def iter_tensors(refs: dict[str, TensorRef], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` converted to ``dtype``, shard by shard, reading nothing else.
    Storage dtypes are checked first (:func:`check_storage`); every tensor is checked for NaN/Inf
    after conversion (an FP32 value beyond 65504 becomes Inf in FP16) while it is in memory."""
    check_storage(refs, "checkpoint")
    for shard, items in _by_shard(refs).items():
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
                    out = t.to(dtype) if t.dtype != dtype else t.clone()
                    if not all_finite(out):
                        require_finite(t, ref.key, shard)
                        require_finite(out, ref.key, shard, f" after conversion to {dtype}")
                    yield name, out
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
    check_storage(refs, what)
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
    """SHA-256 over the vision tensors' names, shapes, dtypes and raw bytes: the exact identity of
    the exported weights, recorded in ONNX metadata (``step37.vision_weights_sha256``).  Reads
    every vision byte (3.9 GB on the release), so serving checks use :func:`weights_fingerprint`."""
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


#: Fingerprint sampling: this many blocks of this many bytes per tensor, evenly spaced.
_FP_BLOCKS, _FP_BLOCK = 16, 4096
FINGERPRINT_KIND = "sampled-v1"


def weights_fingerprint(checkpoint_dir: str | Path) -> str:
    """A cheap identity of the vision weights (``step37.vision_weights_fingerprint``): SHA-256
    over every vision tensor's name, dtype and shape and over 16 evenly spaced 4 KiB blocks of its
    bytes (all of a tensor under 64 KiB), read with ``pread`` from the shards' headers' offsets:
    about 30 MB of 3.9 GB on the release, so a server can check its artifacts at every start.

    Two checkpoints with independently trained or fine-tuned vision weights differ in every
    sampled block; it is not meant to detect a single flipped byte (the full
    :func:`weights_digest` does, at export)."""
    refs = vision_refs(checkpoint_dir)
    headers = {shard: read_header(shard) for shard in _by_shard(refs)}
    fds: dict[Path, int] = {}
    h = hashlib.sha256(FINGERPRINT_KIND.encode())
    try:
        for name in sorted(refs):  # name order: independent of how the checkpoint is sharded
            ref = refs[name]
            start, header = headers[ref.shard]
            entry = header[ref.key]
            a, b = (start + o for o in entry["data_offsets"])
            h.update(f"{name}:{entry['dtype']}:{entry['shape']}:{b - a};".encode())
            if b - a <= _FP_BLOCKS * _FP_BLOCK:
                spans = [(a, b - a)]
            else:
                step = (b - a - _FP_BLOCK) // (_FP_BLOCKS - 1)
                spans = [(a + k * step, _FP_BLOCK) for k in range(_FP_BLOCKS)]
            if ref.shard not in fds:
                fds[ref.shard] = os.open(ref.shard, os.O_RDONLY)
            for offset, length in spans:
                h.update(os.pread(fds[ref.shard], length, offset))
    except OSError as exc:
        raise CheckpointError(f"cannot read the vision weights of {checkpoint_dir}: {exc}") from exc
    finally:
        for fd in fds.values():
            os.close(fd)
    return f"{FINGERPRINT_KIND}:{h.hexdigest()}"


def check_artifact_source(checkpoint_dir: str | Path, artifact: str | Path, recorded: dict[str, str]) -> None:
    """Refuse an ONNX file or engine whose vision weights are not the checkpoint's.

    ``recorded``: the artifact's ``step37.*`` metadata (an engine's manifest keeps its ONNX's as
    ``onnx_metadata``).  The fingerprint is compared when recorded (milliseconds); older files
    with only ``vision_weights_sha256`` get the full digest (reads every vision weight); a file
    with neither cannot be checked and a warning says so."""
    fingerprint, sha = recorded.get("vision_weights_fingerprint"), recorded.get("vision_weights_sha256")
    if fingerprint:
        key, mine, theirs = "fingerprint", weights_fingerprint(checkpoint_dir), fingerprint
    elif sha:
        log.info(
            "%s records only the full vision-weights digest: reading all of %s's vision weights",
            artifact,
            checkpoint_dir,
        )
        key, mine, theirs = "sha256", weights_digest(checkpoint_dir), sha
    else:
        log.warning(
            "%s records no vision-weights digest (not exported by step37-deploy?): cannot check that it "
            "belongs to checkpoint %s",
            artifact,
            checkpoint_dir,
        )
        return
    if mine != theirs:
        source = recorded.get("source_checkpoint", "another checkpoint")
        raise CheckpointError(
            f"{artifact} holds the vision weights of {source} (vision weights {key} {theirs[:23]}...), not "
            f"those of checkpoint {checkpoint_dir} ({mine[:23]}...), whose projector and token ids would be "
            f"used with it: export from {checkpoint_dir}, or give the checkpoint the artifact was exported from"
        )
