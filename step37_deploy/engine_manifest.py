"""An engine's manifest (``NAME.plan.json``): what the engine was built from and where it can run.

``step37-deploy build`` writes one beside every engine (``engine.py``): flavour and version,
targets, profile, precision, resolution, I/O, the ONNX digest and the engine's own digest, the
source ONNX's metadata and what the builder did (``engine_facts.py``).  Readers get it through
:func:`read_manifest`, which refuses one that is missing, incomplete or has a field later code
could not use, and :func:`verify_engine_file` checks the engine's size and digest against it, so a
truncated or replaced engine is an :class:`EngineError`, never a segfault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EngineError
from .files import read_json
from .inputs import require_file

MANIFEST_SUFFIX = ".json"


@dataclass
class Manifest:
    """What an engine was built from and where it can run (``NAME.plan.json``)."""

    flavour: str
    trt_version: str
    targets: dict[str, Any]
    profile: dict[str, list[list[int]]]
    precision: str
    resolution: int | None
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    onnx_file: str
    onnx_sha256: str
    engine_sha256: str
    engine_bytes: int
    toolkit_version: str
    built_at: str
    build_seconds: float
    builder: dict[str, Any] = field(default_factory=dict)
    format: str = "step37-engine-manifest/1"
    #: The source ONNX's metadata (``step37.`` dropped): vision-weights digest and fingerprint,
    #: source checkpoint, precision... so that a server can check the engine against its checkpoint.
    onnx_metadata: dict[str, str] = field(default_factory=dict)
    #: What the builder did (``fusion_facts``): fused attention count, accumulators, activation memory.
    fusion: dict[str, Any] = field(default_factory=dict)
    #: The ONNX file's FP16 protection decision (``step37.fp16_protection``), None for older files.
    fp16_protection: dict[str, Any] | None = None


def manifest_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def read_manifest(engine_path: str | Path) -> dict[str, Any]:
    engine_path = Path(engine_path)
    mpath = manifest_path(engine_path)
    require_file(engine_path, EngineError, "engine")
    if not require_file(mpath, EngineError, "engine manifest", missing_ok=True):
        raise EngineError(f"engine {engine_path} has no manifest ({mpath.name}); rebuild it with step37-deploy build")
    manifest = read_json(mpath, EngineError)
    required = {"flavour", "trt_version", "targets", "profile", "engine_sha256", "engine_bytes", "inputs", "outputs"}
    missing = sorted(required - set(manifest))
    if missing:
        raise EngineError(f"manifest {mpath} lacks {missing}; it is not a step37 engine manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise EngineError(f"manifest {mpath} is not a valid step37 engine manifest: {problem}")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """The first field of a manifest that later code could not use, or ``None``."""
    for key in ("flavour", "trt_version", "engine_sha256"):
        if not isinstance(m[key], str):
            return f"{key} must be a string, got {m[key]!r:.40}"
    if isinstance(m["engine_bytes"], bool) or not isinstance(m["engine_bytes"], int) or m["engine_bytes"] < 0:
        return f"engine_bytes must be a byte count, got {m['engine_bytes']!r:.40}"
    if not isinstance(m["targets"], dict) or not isinstance(m["targets"].get("compute_capabilities", []), list):
        return "targets must be an object with a compute_capabilities list"
    for key, rank in (("inputs", 4), ("outputs", 3)):  # [batch, 3, H, W] -> [batch, tokens, dim]
        io = m[key]
        if not isinstance(io, dict) or len(io) != 1:
            return f"{key} must map exactly one tensor name to its dtype and shape"
        (spec,) = io.values()
        if not isinstance(spec, dict) or spec.get("dtype") not in ("float32", "float16", "uint8"):
            return f"{key}: dtype must be float32, float16 or uint8"
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) != rank or not all(d == "batch" or _is_count(d) for d in shape):
            return f"{key}: shape must be a list of {rank} sizes or 'batch'"
    (name,) = m["inputs"]
    profile = m["profile"]
    shapes = profile.get(name) if isinstance(profile, dict) else None
    if not (
        isinstance(shapes, list)
        and len(shapes) == 3
        and all(isinstance(s, list) and s and all(map(_is_count, s)) for s in shapes)
    ):
        return f"profile must give [min, opt, max] shapes of input {name!r}"
    return None


def _is_count(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def verify_engine_file(engine_path: str | Path, manifest: dict[str, Any]) -> bytes:
    """The engine bytes, after checking size and digest against the manifest (truncation etc.)."""
    try:
        data = Path(engine_path).read_bytes()
    except OSError as exc:
        raise EngineError(f"engine {engine_path} cannot be read: {exc.strerror or exc}") from None
    if len(data) != manifest["engine_bytes"]:
        raise EngineError(
            f"engine {engine_path} has {len(data)} bytes but its manifest says "
            f"{manifest['engine_bytes']}: the file is truncated or was replaced"
        )
    if hashlib.sha256(data).hexdigest() != manifest["engine_sha256"]:
        raise EngineError(f"engine {engine_path} does not match its manifest's digest: corrupt or replaced")
    return data


def is_step37_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("step37-engine-manifest/")
