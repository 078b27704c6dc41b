"""Stage 5: build FP16 TensorRT engines from the FP16-typed ONNX, and say what each was built from.

Builds go through Polygraphy's loaders (network from ONNX -> config with one optimisation profile
-> engine bytes).  Networks are *strongly typed*: the FP16-typed graph decides every tensor's
precision, which is the only way TensorRT 11 builds FP16 (it has no FP16 builder flag) and is
equally right on TensorRT 10.x.  Two flavours are supported:

* ``tensorrt`` (10.x / 11.x) on a GPU machine: the engine targets the GPU it is built on.
* ``tensorrt_rtx`` ahead of time on any machine, CPU-only included, for the compute capabilities
  asked for (SM75..SM121; Polygraphy drives it with ``POLYGRAPHY_USE_TENSORRT_RTX=1``).

Every engine gets a JSON manifest beside it (``NAME.plan.json``) with the flavour and version,
targets, profile, precision, resolution, I/O, the ONNX digest and the engine's own digest, so that
the runner can refuse an engine that does not fit the installed TensorRT or the GPU with a clear
error instead of a segfault.  Engine and manifest are written to temporary files and renamed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BackendUnavailable, EngineError
from .files import atomic_path, check_output_file, read_json, refuse_inputs, temp_sibling
from .inputs import onnx_external_files, require_file

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".json"
DEFAULT_RTX_TARGETS = ("8.6", "8.9")


@dataclass
class BuildOptions:
    """What ``step37-deploy build`` takes besides the ONNX file and the output path."""

    batch: tuple[int, int, int] = (1, 1, 8)
    timing_cache: str | None = None
    workspace_gib: float | None = None
    opt_level: int | None = None
    compute_capabilities: list[str] | None = None
    require_fp16: bool = True
    flavour: str | None = None

    def validate(self) -> None:
        mn, opt, mx = self.batch
        if not (1 <= mn <= opt <= mx):
            raise EngineError(f"batch profile must satisfy 1 <= MIN <= OPT <= MAX, got {mn}:{opt}:{mx}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise EngineError(f"--workspace must be positive GiB, got {self.workspace_gib}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise EngineError(f"--opt-level must be 0..5, got {self.opt_level}")
        for cc in self.compute_capabilities or []:
            parse_cc(cc)


def parse_cc(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in str(text).split("."))
    except ValueError:
        raise EngineError(f"compute capability must look like 8.6, got {text!r}") from None
    return major, minor


# -- flavour detection ----------------------------------------------------------------------------
def _importable(name: str) -> Any | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # the PyPI 'tensorrt' placeholder raises on import; so may a broken install
        return None
    return module if hasattr(module, "Builder") else None


def detect_flavour(prefer: str | None = None) -> str | None:
    """``"tensorrt"`` or ``"tensorrt_rtx"`` (whichever imports, ``prefer`` first), else ``None``."""
    order = [prefer] if prefer else []
    order += [f for f in ("tensorrt", "tensorrt_rtx") if f not in order]
    for name in order:
        if _importable(name) is not None:
            return name
    return None


def trt_module(flavour: str) -> Any:
    module = _importable(flavour)
    if module is None:
        raise BackendUnavailable(
            f"{flavour} is not installed (pip install '.[{'trt' if flavour == 'tensorrt' else 'rtx'}]')"
        )
    return module


def _polygraphy_trt(flavour: str) -> Any:
    """Polygraphy's TensorRT backend, pointed at the flavour (it reads the switch at import)."""
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if flavour == "tensorrt_rtx" else "0"
    from polygraphy import config as pg_config

    pg_config.USE_TENSORRT_RTX = flavour == "tensorrt_rtx"
    import polygraphy.backend.trt as pgtrt
    from polygraphy.logger import G_LOGGER

    # Polygraphy logs through its own logger: follow ours (--quiet -> warnings only).
    G_LOGGER.module_severity = G_LOGGER.INFO if log.isEnabledFor(logging.INFO) else G_LOGGER.WARNING
    if not log.isEnabledFor(logging.INFO):
        # Colours make Polygraphy print "[W] 'colored' module is not installed" (to stdout) once.
        G_LOGGER.colors = False

    return pgtrt


# -- ONNX facts -------------------------------------------------------------------------------------
@dataclass
class OnnxFacts:
    input_name: str
    input_dtype: str
    input_shape: list[Any]
    output_name: str
    output_shape: list[Any]
    metadata: dict[str, str]
    fp16_typed: bool
    sha256: str
    output_dtype: str = ""  # the compute dtype; differs from input_dtype for uint8-input graphs


def onnx_facts(path: str | Path) -> OnnxFacts:
    import onnx

    path = Path(path)
    require_file(path, EngineError, "ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise EngineError(f"{path} is not a readable ONNX model: {exc}") from exc
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise EngineError(f"{path} must have one input and one output (a step37 vision export)")
    try:
        return _facts(path, model)
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # e.g. an element type numpy has not
        raise EngineError(f"{path} is not a step37 vision export: {exc}") from exc


def _facts(path: Path, model: Any) -> OnnxFacts:
    import onnx

    inp, out = model.graph.input[0], model.graph.output[0]

    def dims(v) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    # uint8-input graphs (normalisation folded into conv1) compute in their output's dtype.
    fp16 = onnx.TensorProto.FLOAT16 in (inp.type.tensor_type.elem_type, out.type.tensor_type.elem_type)
    # FP16-typed = FP16 input and weights: our exports say so in their metadata; for other files,
    # most weight elements FP16 (the FP32 islands' RoPE tables are a small part even in tiny models).
    sizes = {t: 0 for t in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)}
    for i in model.graph.initializer:
        if i.data_type in sizes:
            sizes[i.data_type] += _prod(i.dims)
    total = sum(sizes.values())
    fp16_weights = total > 0 and sizes[onnx.TensorProto.FLOAT16] >= 0.8 * total
    meta = {p.key.removeprefix("step37."): p.value for p in model.metadata_props}
    if "precision" in meta:
        fp16_weights = meta["precision"] == "fp16"
    return OnnxFacts(
        inp.name,
        onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name,
        dims(inp),
        out.name,
        dims(out),
        meta,
        fp16 and fp16_weights,
        _sha256_onnx(path, model),
        onnx.helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type).name,
    )


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def _sha256_file(path: Path, h: Any | None = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h


def _sha256_onnx(path: Path, model: Any) -> str:
    """Digest of the ONNX file and its external-data files (the weights are part of identity)."""
    h = _sha256_file(path)
    for data in onnx_external_files(model, path, EngineError):
        if not data.is_file():
            raise EngineError(f"{path} refers to external data {data.name} which does not exist beside it")
        _sha256_file(data, h)
    return h.hexdigest()


# -- build ----------------------------------------------------------------------------------------
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


def _current_gpu() -> dict[str, Any] | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # torch without CUDA: no GPU facts
        pass
    return None


def build_engine(
    onnx_path: str | Path, out_path: str | Path, opts: BuildOptions | None = None, progress: bool = False
) -> dict[str, Any]:
    """Build one engine + manifest; returns the manifest as a dict."""
    opts = opts or BuildOptions()
    opts.validate()
    check_build_outputs(onnx_path, out_path, opts.timing_cache)
    facts = onnx_facts(onnx_path)
    if opts.require_fp16 and not facts.fp16_typed:
        raise EngineError(
            f"{onnx_path} is an FP32-typed graph but an FP16 engine was asked for: strongly typed TensorRT "
            "(and TensorRT 11, which has no FP16 flag) builds the precision the graph has. "
            "Export with --precision fp16, or pass --allow-fp32 for an FP32 engine."
        )
    flavour = opts.flavour or detect_flavour()
    if flavour is None:
        raise BackendUnavailable(
            "no TensorRT flavour is installed: pip install '.[trt]' (GPU) or '.[rtx]' (any machine)"
        )
    trt = trt_module(flavour)
    if opts.timing_cache:
        check_timing_cache(trt, opts.timing_cache)
    gpu = _current_gpu()
    ccs = list(opts.compute_capabilities or [])
    if flavour == "tensorrt":
        if ccs:
            raise EngineError(
                "--compute-capability is for TensorRT-RTX ahead-of-time builds; tensorrt builds for the GPU it runs on"
            )
        if gpu is None:
            raise BackendUnavailable("tensorrt needs a CUDA GPU to build; use tensorrt-rtx for ahead-of-time builds")
        targets: dict[str, Any] = {"gpu": gpu["name"], "compute_capabilities": [gpu["compute_capability"]]}
    else:
        if not ccs:
            if gpu is None:
                ccs = list(DEFAULT_RTX_TARGETS)
                log.info("no GPU and no --compute-capability: building for %s", ", ".join(ccs))
            else:
                ccs = [gpu["compute_capability"]]
        for cc in ccs:
            if not hasattr(trt.ComputeCapability, "SM{}{}".format(*parse_cc(cc))):
                supported = sorted(c for c in dir(trt.ComputeCapability) if c.startswith("SM"))
                raise EngineError(
                    f"TensorRT-RTX {trt.__version__} cannot target compute capability {cc}; it supports {supported}"
                )
        targets = {"gpu": gpu["name"] if gpu else None, "compute_capabilities": ccs}

    pgtrt = _polygraphy_trt(flavour)
    from polygraphy.exception import PolygraphyException

    name = facts.input_name
    shape = [int(d) if isinstance(d, int) and d > 0 else None for d in facts.input_shape]
    if shape[0] is not None or any(d is None for d in shape[1:]):
        raise EngineError(
            f"{onnx_path}: input {name} must be [batch, 3, H, W] with only batch dynamic, got {facts.input_shape}"
        )
    mn, opt, mx = opts.batch
    profile = pgtrt.Profile().add(name, (mn, *shape[1:]), (opt, *shape[1:]), (mx, *shape[1:]))
    config_kwargs: dict[str, Any] = {"profiles": [profile]}
    if opts.workspace_gib:
        config_kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(opts.workspace_gib * (1 << 30))}
    if opts.opt_level is not None:
        config_kwargs["builder_optimization_level"] = opts.opt_level
    # The timing cache goes in and out through open files: given paths, Polygraphy would rewrite
    # the cache in place and leave NAME.lock beside it; the new cache is renamed into place instead.
    cache_in = None
    if opts.timing_cache and Path(opts.timing_cache).is_file():
        cache_in = config_kwargs["load_timing_cache"] = open(opts.timing_cache, "rb")  # noqa: SIM115
    cache_tmp = temp_sibling(opts.timing_cache) if opts.timing_cache else None
    cache_out = open(cache_tmp, "w+b") if cache_tmp is not None else None  # noqa: SIM115
    if flavour == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        config = CreateConfigRTX(compute_capabilities=[parse_cc(c) for c in ccs], **config_kwargs)
    else:
        config = pgtrt.CreateConfig(**config_kwargs)

    network = pgtrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    started = time.perf_counter()
    bar = _Spinner(f"building {Path(out_path).name}") if progress else None
    engine_bytes = None
    try:
        with _CapturedBuilderLog() as build_log:
            engine_bytes = pgtrt.EngineBytesFromNetwork(network, config, save_timing_cache=cache_out)()
    except PolygraphyException as exc:
        raise EngineError(f"TensorRT could not build {onnx_path}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
        for fh in (cache_in, cache_out):
            if fh is not None:
                fh.close()
        if cache_tmp is not None and engine_bytes is None:  # failed: no new cache either
            cache_tmp.unlink(missing_ok=True)
    if engine_bytes is None:
        raise EngineError(f"TensorRT returned no engine for {onnx_path} (see the log above)")
    data = memoryview(engine_bytes)  # no copy of a multi-GB engine
    seconds = time.perf_counter() - started

    fusion = _build_facts(onnx_path, facts, build_log, data, flavour, trt if gpu is not None else None)
    out_shape = [int(d) if isinstance(d, int) and d > 0 else "batch" for d in facts.output_shape]
    manifest = Manifest(
        flavour=flavour,
        trt_version=trt.__version__,
        targets=targets,
        profile={name: [[mn, *shape[1:]], [opt, *shape[1:]], [mx, *shape[1:]]]},
        precision=facts.metadata.get("precision", "fp16" if facts.fp16_typed else "fp32"),
        resolution=int(facts.metadata["resolution"]) if "resolution" in facts.metadata else shape[2],
        inputs={name: {"dtype": facts.input_dtype, "shape": ["batch", *shape[1:]]}},
        outputs={facts.output_name: {"dtype": facts.output_dtype, "shape": out_shape}},
        onnx_file=str(Path(onnx_path).resolve()),
        onnx_sha256=facts.sha256,
        onnx_metadata=facts.metadata,
        engine_sha256=hashlib.sha256(data).hexdigest(),
        engine_bytes=data.nbytes,
        toolkit_version=__version__,
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(seconds, 3),
        builder={
            "workspace_gib": opts.workspace_gib,
            "opt_level": opts.opt_level,
            "timing_cache": opts.timing_cache,
            "strongly_typed": True,
        },
        fusion=fusion,
        fp16_protection=_json_or_none(facts.metadata.get("fp16_protection")),
    )
    try:
        _write_atomic_pair(Path(out_path), data, asdict(manifest))
        if cache_tmp is not None and cache_tmp.stat().st_size:
            os.replace(cache_tmp, opts.timing_cache)
    finally:
        if cache_tmp is not None:
            cache_tmp.unlink(missing_ok=True)
    log.info("built %s (%.1f MB) in %.1fs for %s", out_path, data.nbytes / 1e6, seconds, targets)
    return asdict(manifest)


def check_build_outputs(onnx_path: str | Path, out_path: str | Path, timing_cache: str | None) -> None:
    """Before any work: the engine, its manifest and the timing cache are writable files, none of
    them is the ONNX input (or its external data), and an existing ``--out`` is an engine this tool
    built (its manifest beside it); anything else would be destroyed by the build."""
    out_path = Path(out_path)
    outputs = {"--out": out_path, "the manifest": manifest_path(out_path)}
    for label, path in outputs.items():
        check_output_file(path, label)
    if timing_cache:
        check_output_file(timing_cache, "--timing-cache")
        for label, path in outputs.items():
            if Path(timing_cache).resolve() == path.resolve():
                raise EngineError(f"--timing-cache {timing_cache} is the same file as {label}")
        outputs["--timing-cache"] = Path(timing_cache)
    refuse_inputs(outputs, {"--onnx": onnx_path})
    mpath = manifest_path(out_path)
    if (out_path.exists() or mpath.exists()) and not _is_step37_manifest(mpath):
        raise EngineError(
            f"--out {out_path}: {out_path.name if out_path.exists() else mpath.name} exists and is not from an engine "
            f"built by step37-deploy (no step37 manifest {mpath.name}): refusing to replace it"
        )


def _is_step37_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("step37-engine-manifest/")


def check_timing_cache(trt: Any, path: str | Path) -> None:
    """An existing ``--timing-cache`` must be a timing cache: the build rewrites it, so any other
    file given there by mistake (the ONNX, an engine, notes) would be destroyed.  TensorRT turns
    bytes it cannot read into an empty cache, so a file is a cache when it is the empty cache or
    does not read back as empty."""
    path = Path(path)
    if not path.exists():
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EngineError(f"--timing-cache {path} cannot be read: {exc.strerror}") from exc
    config = trt.Builder(trt.Logger(trt.Logger.INTERNAL_ERROR)).create_builder_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TensorRT-RTX: timing caches are no-ops
        empty = bytes(config.create_timing_cache(b"").serialize())
        read_back = bytes(config.create_timing_cache(data).serialize())
    if data != empty and read_back == empty:
        raise EngineError(f"--timing-cache {path} exists but is not a TensorRT timing cache: refusing to replace it")


class _Spinner:
    """A tqdm bar without total while TensorRT builds (it reports no progress through Polygraphy)."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}")
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _write_atomic_pair(engine_path: Path, data: bytes | memoryview, manifest: dict[str, Any]) -> None:
    """The engine renamed into place first, then its manifest; a failure while writing leaves neither."""
    try:
        with atomic_path(manifest_path(engine_path)) as tmp_manifest, atomic_path(engine_path) as tmp_engine:
            with open(tmp_engine, "wb") as fh:
                fh.write(data)
            tmp_manifest.write_text(json.dumps(manifest, indent=2))
    except OSError as exc:
        raise EngineError(f"could not write {engine_path}: {exc}") from exc


# -- manifests and inspection -----------------------------------------------------------------------
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


def check_runtime_compat(manifest: dict[str, Any], engine_path: str | Path = "engine") -> Any:
    """The TensorRT module to run this engine with, or a clear error naming both sides."""
    flavour = manifest["flavour"]
    trt = _importable(flavour)
    if trt is None:
        raise BackendUnavailable(
            f"engine {engine_path} was built with {flavour} {manifest['trt_version']}, which is not installed here"
        )
    if trt.__version__ != manifest["trt_version"]:
        raise EngineError(
            f"engine {engine_path} was built with {flavour} {manifest['trt_version']} but "
            f"{flavour} {trt.__version__} is installed: engines are not portable across versions; rebuild"
        )
    gpu = _current_gpu()
    if gpu is None:
        raise BackendUnavailable(f"engine {engine_path} needs a CUDA GPU; none is visible here")
    targets = manifest["targets"].get("compute_capabilities", [])
    if gpu["compute_capability"] not in targets:
        raise EngineError(
            f"engine {engine_path} targets compute capability {targets} "
            f"({manifest['targets'].get('gpu')}) but this GPU is {gpu['name']} "
            f"(compute capability {gpu['compute_capability']}); rebuild for this GPU"
        )
    return trt


def inspect_engine(engine_path: str | Path) -> str:
    """Manifest, plus TensorRT's engine inspector output where the engine can be deserialised here.

    A bad manifest, or an engine file that does not match it (truncated, corrupt, replaced),
    raises :class:`EngineError`: an inspection that could not vouch for the file must not pass.
    Only *where* it can run is informational: with no matching TensorRT or GPU here, the
    inspector's layer listing is skipped with a line saying why."""
    manifest = read_manifest(engine_path)
    data = verify_engine_file(engine_path, manifest)
    text = (
        json.dumps(manifest, indent=2) + f"\n\n# engine file verified: {len(data)} bytes, sha256 matches the manifest"
    )
    text += "\n\n" + fusion_summary(manifest.get("fusion") or {})
    if manifest.get("fp16_protection"):
        p = manifest["fp16_protection"]
        text += "\nFP16 protection: " + (
            "; ".join(p.get("reasons") or []) or "none needed" if p.get("calibrated") else "not calibrated"
        )
    try:
        trt = check_runtime_compat(manifest, engine_path)
    except (EngineError, BackendUnavailable) as exc:
        return text + f"\n\n# TensorRT engine inspector not run: {exc}"
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise engine {engine_path} (see its log above)")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return text + "\n\n# TensorRT engine inspector\n" + info


def engine_filename(onnx_name: str) -> str:
    return Path(onnx_name).name.removesuffix(".onnx") + ".plan"


# -- what the builder did: attention fusion, accumulators, activation memory ------------------------
#: TensorRT(-RTX) verbose lines naming the ONNX nodes it matched as self-attention.
_ATTENTION_NODE = re.compile(r"Found (\S+) to be part of self-attention pattern")
_ACTIVATION_MEMORY = re.compile(r"Total Activation Memory: (\d+) bytes")
#: TensorRT-RTX engines carry each fused attention kernel's record (``function={ name=_gemm_mha_v2
#: fqn=... layers="[ONNX Layer: ...]..." }``) and CUDA source, whose ``Kernel_traits_v2_flash_attention``
#: names the MMA traits of BMM1 (Q.K^T) then BMM2 (P.V), e.g. ``Ampere_hmma_fp32_traits`` =
#: FP16 inputs, FP32 accumulators.  Not a documented format: written against tensorrt-rtx 1.7.1.
_MHA_RECORD = re.compile(rb'function=\{ name=_gemm_mha\w* fqn=(\w+) .{0,8192}?layers="([^"]*)"', re.S)
_MHA_TRAITS = re.compile(rb"Kernel_traits_v2_flash_attention<\s*fmha::(\w+),\s*fmha::(\w+),")
_MHA_ENTRY = re.compile(rb"__global__ void (_gemm_mha\w*)\(")
_ONNX_LAYER = re.compile(rb"\[ONNX Layer: ([^\]]+)\]")


def _accumulator(traits: str) -> str:
    """``Ampere_hmma_fp32_traits`` -> ``fp32`` (the last type named in an fmha MMA traits class)."""
    found = re.findall(r"(fp32|fp16|bf16|int32|e4m3|e5m2)", traits)
    return found[-1] if found else "unknown"


class _CapturedBuilderLog:
    """Collects the builder's messages down to VERBOSE while a build runs.  Polygraphy's TensorRT
    logger forwards TensorRT VERBOSE to ``G_LOGGER.extra_verbose``; the capture raises Polygraphy's
    severity to EXTRA_VERBOSE, routes it through Python logging into a list, passes warnings and
    errors on to this module's logger, and restores everything afterwards."""

    def __enter__(self) -> list[str]:
        from polygraphy.logger import G_LOGGER

        self.lines: list[str] = []
        lines = self.lines

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                lines.append(msg)
                if record.levelno >= logging.WARNING:
                    log.log(record.levelno, "TensorRT: %s", msg)

        self._saved = (G_LOGGER.module_severity, G_LOGGER.use_python_logging_system)
        G_LOGGER.module_severity = G_LOGGER.EXTRA_VERBOSE
        G_LOGGER.use_python_logging_system = True
        self._py = G_LOGGER.python_logger
        self._py_saved = (self._py.level, self._py.propagate)
        self._handler = Handler(level=1)
        self._py.addHandler(self._handler)
        self._py.setLevel(1)
        self._py.propagate = False
        return lines

    def __exit__(self, *exc: object) -> None:
        from polygraphy.logger import G_LOGGER

        self._py.removeHandler(self._handler)
        self._py.setLevel(self._py_saved[0])
        self._py.propagate = self._py_saved[1]
        G_LOGGER.module_severity, G_LOGGER.use_python_logging_system = self._saved


def fusion_facts(
    log_lines: list[str], onnx_ops: dict[str, str], engine: bytes | memoryview | None, flavour: str, layers: int | None
) -> dict[str, Any]:
    """Attention fusion and memory facts of one build; anything not readable is ``"unknown"``.

    ``onnx_ops`` maps ONNX node names to op types (a fused attention is counted by its Softmax);
    ``engine`` is scanned for fused attention kernels only for TensorRT-RTX."""
    facts: dict[str, Any] = {"source": "builder log"}
    matched = [n for line in log_lines for n in _ATTENTION_NODE.findall(line)]
    softmaxes = sorted({n for n in matched if onnx_ops.get(n) == "Softmax"})
    facts["attention_fused"] = len(softmaxes) if log_lines else "unknown"
    facts["attention_nodes_fused"] = sorted(set(matched))
    if layers is not None:
        facts["blocks"] = layers
    mem = [int(m) for line in log_lines for m in _ACTIVATION_MEMORY.findall(line)]
    facts["activation_memory_bytes"] = {"profile 0": mem[-1]} if mem else "unknown"
    if flavour == "tensorrt_rtx" and engine is not None:
        facts["attention_kernels"] = _attention_kernels(engine)
    else:
        facts["attention_kernels"] = "unknown"
    return facts


def _attention_kernels(engine: bytes | memoryview) -> list[dict[str, Any]] | str:
    """Each fused attention kernel in a TensorRT-RTX engine: its ONNX layers and accumulator types."""
    try:
        # Sources: each kernel's traits come before its entry point (two literal-prefixed scans).
        found = [(m.start(), (m.group(1).decode(), m.group(2).decode())) for m in _MHA_TRAITS.finditer(engine)]
        found += [(m.start(), m.group(1).decode()) for m in _MHA_ENTRY.finditer(engine)]
        traits: dict[str, tuple[str, str]] = {}
        last: tuple[str, str] | None = None
        for _, item in sorted(found, key=lambda x: x[0]):
            if isinstance(item, tuple):
                last = item
            elif last is not None:
                traits.setdefault(item, last)
        kernels = []
        for m in _MHA_RECORD.finditer(engine):
            fqn = m.group(1).decode()
            qk, pv = traits.get(fqn, ("unknown", "unknown"))
            kernels.append(
                {
                    "kernel": fqn,
                    "onnx_layers": [x.decode() for x in _ONNX_LAYER.findall(m.group(2))],
                    "qk_accumulator": _accumulator(qk),
                    "pv_accumulator": _accumulator(pv),
                    "traits": [qk, pv],
                }
            )
        return kernels
    except Exception as exc:  # an undocumented layout: never fail a build over it
        log.info("could not read fused attention kernels from the engine: %s", exc)
        return "unknown"


def _inspector_layers(trt: Any, data: bytes | memoryview) -> list[dict[str, Any]] | None:
    """The engine inspector's layer list where the engine can be deserialised (GPU + its TensorRT)."""
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(bytes(data))
        if engine is None:
            return None
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        return [x if isinstance(x, dict) else {"Name": x} for x in info.get("Layers", [])]
    except Exception as exc:  # no GPU, no driver, a runtime that cannot load it: fall back to the log
        log.debug("engine inspector unavailable: %s", exc)
        return None


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _build_facts(
    onnx_path: str | Path, facts: OnnxFacts, build_log: list[str], data: memoryview, flavour: str, trt: Any | None
) -> dict[str, Any]:
    """``fusion_facts`` for a finished build; the engine inspector's layers where ``trt`` (a GPU) can
    deserialise it.  Never raises: what cannot be read is recorded as unknown."""
    try:
        import onnx

        ops = {n.name: n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        vision = _json_or_none(facts.metadata.get("vision_config")) or {}
        fusion = fusion_facts(build_log, ops, data, flavour, vision.get("layers"))
        layers = _inspector_layers(trt, data) if trt is not None else None
        if layers is not None:
            attn = [x for x in layers if re.search(r"mha|attention", json.dumps(x), re.I)]
            fusion.update(source="engine inspector", inspector_layers=len(layers), attention_fused=len(attn))
        return fusion
    except Exception as exc:  # a build never fails over its own facts
        log.info("could not record fusion facts: %s", exc)
        return {"source": "unknown", "attention_fused": "unknown", "activation_memory_bytes": "unknown"}


def fusion_summary(fusion: dict[str, Any]) -> str:
    """One paragraph for ``inspect``."""
    if not fusion:
        return "fusion facts: not recorded (engine built before they were)"
    lines = [f"fusion facts (from the {fusion.get('source', 'builder log')}):"]
    lines.append(f"  fused attention subgraphs: {fusion.get('attention_fused')} (blocks: {fusion.get('blocks', '?')})")
    kernels = fusion.get("attention_kernels")
    if isinstance(kernels, list):
        acc = sorted({(k["qk_accumulator"], k["pv_accumulator"]) for k in kernels})
        desc = ", ".join(f"Q.K^T {qk.upper()} / P.V {pv.upper()}" for qk, pv in acc) or "none found"
        lines.append(f"  fused attention kernels in the engine file: {len(kernels)}; accumulators: {desc}")
    else:
        lines.append(f"  fused attention kernels in the engine file: {kernels}")
    lines.append(f"  activation memory: {fusion.get('activation_memory_bytes')}")
    return "\n".join(lines)
