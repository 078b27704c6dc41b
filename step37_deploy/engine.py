"""Stage 5: build FP16 TensorRT engines from the FP16-typed ONNX, and say what each was built from.

Builds go through Polygraphy's loaders (network from ONNX -> config with one optimisation profile
-> engine bytes).  Networks are *strongly typed*: the FP16-typed graph decides every tensor's
precision, which is the only way TensorRT 11 builds FP16 (it has no FP16 builder flag) and is
equally right on TensorRT 10.x.  Two flavours are supported:

* ``tensorrt`` (10.x / 11.x) on a GPU machine: the engine targets the GPU it is built on.
* ``tensorrt_rtx`` ahead of time on any machine, CPU-only included, for the compute capabilities
  asked for (SM75..SM121; Polygraphy drives it with ``POLYGRAPHY_USE_TENSORRT_RTX=1``).

Every engine gets a JSON manifest beside it (``NAME.plan.json``, ``engine_manifest.py``) with the
flavour and version, targets, profile, precision, resolution, I/O, the ONNX digest and the engine's
own digest, and what the builder did (``engine_facts.py``), so that the runner can refuse an engine
that does not fit the installed TensorRT or the GPU (:func:`check_runtime_compat`) with a clear
error instead of a segfault.  Engine and manifest are written to temporary files and renamed.

This module builds, and says where an engine runs; the manifest's and the facts' names are
importable from here too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .engine_facts import CapturedBuilderLog, build_facts, fusion_facts, fusion_summary, json_or_none
from .engine_manifest import (
    MANIFEST_SUFFIX,
    Manifest,
    is_step37_manifest,
    manifest_path,
    read_manifest,
    verify_engine_file,
)
from .errors import BackendUnavailable, EngineError
from .files import atomic_path, check_output_file, refuse_inputs, temp_sibling
from .inputs import onnx_external_files, require_file

#: Importable from here as before the split: the manifest's and the build facts' names.
__all__ = [
    "DEFAULT_RTX_TARGETS",
    "MANIFEST_SUFFIX",
    "BuildOptions",
    "Manifest",
    "OnnxFacts",
    "build_engine",
    "check_build_outputs",
    "check_runtime_compat",
    "check_timing_cache",
    "detect_flavour",
    "engine_filename",
    "fusion_facts",
    "fusion_summary",
    "inspect_engine",
    "manifest_path",
    "onnx_facts",
    "parse_cc",
    "read_manifest",
    "trt_module",
    "verify_engine_file",
]

log = logging.getLogger(__name__)

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


def _current_gpu() -> dict[str, Any] | None:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # torch without CUDA: no GPU facts
        pass
    return None


@dataclass
class _Target:
    """Which TensorRT builds the engine, and for which GPUs."""

    flavour: str
    trt: Any  # the flavour's module
    gpu: dict[str, Any] | None  # this machine's GPU, if any
    targets: dict[str, Any]  # the manifest's targets
    ccs: list[str]  # compute capabilities (TensorRT-RTX ahead of time)


def _require_precision(onnx_path: str | Path, facts: OnnxFacts, opts: BuildOptions) -> None:
    if opts.require_fp16 and not facts.fp16_typed:
        raise EngineError(
            f"{onnx_path} is an FP32-typed graph but an FP16 engine was asked for: strongly typed TensorRT "
            "(and TensorRT 11, which has no FP16 flag) builds the precision the graph has. "
            "Export with --precision fp16, or pass --allow-fp32 for an FP32 engine."
        )


def _choose_target(opts: BuildOptions) -> _Target:
    """The installed flavour (``opts.flavour`` first) and what it builds for: ``tensorrt`` the GPU it
    runs on, ``tensorrt_rtx`` the compute capabilities asked for (this GPU's, or the defaults)."""
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
        return _Target(flavour, trt, gpu, {"gpu": gpu["name"], "compute_capabilities": [gpu["compute_capability"]]}, [])
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
    return _Target(flavour, trt, gpu, {"gpu": gpu["name"] if gpu else None, "compute_capabilities": ccs}, ccs)


def _input_shape(onnx_path: str | Path, facts: OnnxFacts) -> list[int | None]:
    """``[None, 3, H, W]``: only the batch may be dynamic."""
    shape = [int(d) if isinstance(d, int) and d > 0 else None for d in facts.input_shape]
    if shape[0] is not None or any(d is None for d in shape[1:]):
        raise EngineError(
            f"{onnx_path}: input {facts.input_name} must be [batch, 3, H, W] with only batch dynamic, "
            f"got {facts.input_shape}"
        )
    return shape


def _builder_config(pgtrt: Any, target: _Target, opts: BuildOptions, name: str, shape: list, cache_in: Any) -> Any:
    """Polygraphy's builder config: one optimisation profile, the workspace and optimisation level
    asked for, the timing cache to start from."""
    mn, opt, mx = opts.batch
    profile = pgtrt.Profile().add(name, (mn, *shape[1:]), (opt, *shape[1:]), (mx, *shape[1:]))
    config_kwargs: dict[str, Any] = {"profiles": [profile]}
    if opts.workspace_gib:
        config_kwargs["memory_pool_limits"] = {target.trt.MemoryPoolType.WORKSPACE: int(opts.workspace_gib * (1 << 30))}
    if opts.opt_level is not None:
        config_kwargs["builder_optimization_level"] = opts.opt_level
    if cache_in is not None:
        config_kwargs["load_timing_cache"] = cache_in
    if target.flavour == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        return CreateConfigRTX(compute_capabilities=[parse_cc(c) for c in target.ccs], **config_kwargs)
    return pgtrt.CreateConfig(**config_kwargs)


def _engine_bytes(
    onnx_path: str | Path,
    out_path: str | Path,
    opts: BuildOptions,
    target: _Target,
    facts: OnnxFacts,
    shape: list,
    cache_tmp: Path | None,
    progress: bool,
) -> tuple[memoryview, list[str], float]:
    """Build: the engine (no copy of a multi-GB engine), the builder's log, the seconds it took.
    The new timing cache goes to ``cache_tmp``."""
    pgtrt = _polygraphy_trt(target.flavour)
    from polygraphy.exception import PolygraphyException

    # The timing cache goes in and out through open files: given paths, Polygraphy would rewrite
    # the cache in place and leave NAME.lock beside it; the new cache is renamed into place instead.
    cache_in = None
    if opts.timing_cache and Path(opts.timing_cache).is_file():
        cache_in = open(opts.timing_cache, "rb")  # noqa: SIM115
    cache_out = open(cache_tmp, "w+b") if cache_tmp is not None else None  # noqa: SIM115
    bar = None
    try:
        config = _builder_config(pgtrt, target, opts, facts.input_name, shape, cache_in)
        network = pgtrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        started = time.perf_counter()
        bar = _Spinner(f"building {Path(out_path).name}") if progress else None
        with CapturedBuilderLog() as build_log:
            engine_bytes = pgtrt.EngineBytesFromNetwork(network, config, save_timing_cache=cache_out)()
    except PolygraphyException as exc:
        raise EngineError(f"TensorRT could not build {onnx_path}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
        for fh in (cache_in, cache_out):
            if fh is not None:
                fh.close()
    if engine_bytes is None:
        raise EngineError(f"TensorRT returned no engine for {onnx_path} (see the log above)")
    return memoryview(engine_bytes), build_log, time.perf_counter() - started


def _manifest(
    onnx_path: str | Path,
    opts: BuildOptions,
    target: _Target,
    facts: OnnxFacts,
    shape: list,
    data: memoryview,
    build_log: list[str],
    seconds: float,
) -> Manifest:
    """The manifest of a finished build."""
    trt = target.trt
    fusion = build_facts(onnx_path, facts.metadata, build_log, data, target.flavour, trt if target.gpu else None)
    out_shape = [int(d) if isinstance(d, int) and d > 0 else "batch" for d in facts.output_shape]
    name, (mn, opt, mx) = facts.input_name, opts.batch
    return Manifest(
        flavour=target.flavour,
        trt_version=trt.__version__,
        targets=target.targets,
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
        fp16_protection=json_or_none(facts.metadata.get("fp16_protection")),
    )


def build_engine(
    onnx_path: str | Path, out_path: str | Path, opts: BuildOptions | None = None, progress: bool = False
) -> dict[str, Any]:
    """Build one engine + manifest; returns the manifest as a dict.  Every check comes before the
    build: outputs, the graph's precision, the flavour and its targets, the input shape."""
    opts = opts or BuildOptions()
    opts.validate()
    check_build_outputs(onnx_path, out_path, opts.timing_cache)
    facts = onnx_facts(onnx_path)
    _require_precision(onnx_path, facts, opts)
    target = _choose_target(opts)
    shape = _input_shape(onnx_path, facts)
    cache_tmp = temp_sibling(opts.timing_cache) if opts.timing_cache else None
    try:
        data, build_log, seconds = _engine_bytes(onnx_path, out_path, opts, target, facts, shape, cache_tmp, progress)
        manifest = asdict(_manifest(onnx_path, opts, target, facts, shape, data, build_log, seconds))
        _write_atomic_pair(Path(out_path), data, manifest)
        if cache_tmp is not None and cache_tmp.stat().st_size:
            os.replace(cache_tmp, opts.timing_cache)
    finally:
        if cache_tmp is not None:  # written into place, or no new cache
            cache_tmp.unlink(missing_ok=True)
    log.info("built %s (%.1f MB) in %.1fs for %s", out_path, data.nbytes / 1e6, seconds, target.targets)
    return manifest


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
    if (out_path.exists() or mpath.exists()) and not is_step37_manifest(mpath):
        raise EngineError(
            f"--out {out_path}: {out_path.name if out_path.exists() else mpath.name} exists and is not from an engine "
            f"built by step37-deploy (no step37 manifest {mpath.name}): refusing to replace it"
        )


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


# -- where an engine runs, and inspecting one -----------------------------------------------------
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
