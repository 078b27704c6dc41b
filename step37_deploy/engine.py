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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BackendUnavailable, EngineError
from .files import atomic_path, read_json

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
    if not path.is_file():
        raise EngineError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise EngineError(f"{path} is not an ONNX model TensorRT can parse: {exc}") from exc
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise EngineError(f"{path} must have one input and one output (a step37 vision export)")
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
    locations = sorted({e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"})
    for loc in locations:
        data = path.parent / loc
        if not data.is_file():
            raise EngineError(f"{path} refers to external data {loc} which does not exist beside it")
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
    if opts.timing_cache and Path(opts.timing_cache).is_file():
        config_kwargs["load_timing_cache"] = opts.timing_cache
    if flavour == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        config = CreateConfigRTX(compute_capabilities=[parse_cc(c) for c in ccs], **config_kwargs)
    else:
        config = pgtrt.CreateConfig(**config_kwargs)

    network = pgtrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    started = time.perf_counter()
    bar = _Spinner(f"building {Path(out_path).name}") if progress else None
    try:
        engine_bytes = pgtrt.EngineBytesFromNetwork(network, config, save_timing_cache=opts.timing_cache)()
    except PolygraphyException as exc:
        raise EngineError(f"TensorRT could not build {onnx_path}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    if engine_bytes is None:
        raise EngineError(f"TensorRT returned no engine for {onnx_path} (see the log above)")
    data = memoryview(engine_bytes)  # no copy of a multi-GB engine
    seconds = time.perf_counter() - started

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
    )
    _write_atomic_pair(Path(out_path), data, asdict(manifest))
    log.info("built %s (%.1f MB) in %.1fs for %s", out_path, data.nbytes / 1e6, seconds, targets)
    return asdict(manifest)


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
    if not engine_path.is_file():
        raise EngineError(f"engine {engine_path} does not exist")
    if not mpath.is_file():
        raise EngineError(f"engine {engine_path} has no manifest ({mpath.name}); rebuild it with step37-deploy build")
    manifest = read_json(mpath, EngineError)
    required = {"flavour", "trt_version", "targets", "profile", "engine_sha256", "engine_bytes", "inputs", "outputs"}
    missing = sorted(required - set(manifest))
    if missing:
        raise EngineError(f"manifest {mpath} lacks {missing}; it is not a step37 engine manifest")
    return manifest


def verify_engine_file(engine_path: str | Path, manifest: dict[str, Any]) -> bytes:
    """The engine bytes, after checking size and digest against the manifest (truncation etc.)."""
    data = Path(engine_path).read_bytes()
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
    """Manifest, plus TensorRT's engine inspector output where the engine can be deserialised here."""
    manifest = read_manifest(engine_path)
    text = json.dumps(manifest, indent=2)
    try:
        data = verify_engine_file(engine_path, manifest)
        trt = check_runtime_compat(manifest, engine_path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        text += "\n\n# TensorRT engine inspector\n" + info
    except (EngineError, BackendUnavailable) as exc:
        text += f"\n\n# TensorRT engine inspector not run: {exc}"
    return text


def engine_filename(onnx_name: str) -> str:
    return Path(onnx_name).name.removesuffix(".onnx") + ".plan"


def build_pipeline_engines(
    exports: list[Any], out_dir: Path, required: bool = False, progress: bool = False
) -> tuple[list[Path], list[Any]]:
    """Engines for the pipeline's FP16 exports when a flavour is installed; runners where they can run."""
    flavour = detect_flavour()
    if flavour is None:
        if required:
            raise BackendUnavailable("no TensorRT flavour is installed")
        log.info("no TensorRT flavour installed: skipping engine builds")
        return [], []
    paths, runners = [], []
    for e in exports:
        out = Path(out_dir) / engine_filename(e.onnx_path.name)
        build_engine(e.onnx_path, out, BuildOptions(batch=(1, 2, 8), flavour=flavour), progress=progress)
        paths.append(out)
        try:
            from .backends.tensorrt import TensorRTRunner

            check_runtime_compat(read_manifest(out), out)
            runners.append(TensorRTRunner(out, name=f"trt-{e.precision}"))
        except (EngineError, BackendUnavailable) as exc:
            log.info("engine %s built ahead of time; not run here: %s", out.name, exc)
    return paths, runners
