"""A standalone Triton model repository for the served API (``serving/contract.py``).

``write_repository`` turns a checkpoint and its artifacts into three models::

    step37_vision_728/   config.pbtxt + 1/   the tower for global views
    step37_vision_504/   config.pbtxt + 1/   the tower for crops
    step37_embedder/     config.pbtxt + 1/   image bytes -> features, token ids, crop count

Towers are ``platform: "tensorrt_plan"`` models (``1/model.plan``) when given TensorRT engines: dims,
data types, ``max_batch_size`` and preferred batch sizes come from the engine manifest and stay
inside the engine's optimisation profile (Triton's TensorRT backend refuses a ``max_batch_size``
above the profile MAX, so this refuses it first).  Given ONNX files or ``backend="torch"``, towers
are Python-backend models (``triton_models/tower.py``) that run the ONNX Runtime or torch runner.
The embedder is always a Python-backend model (``triton_models/embedder.py``) that preprocesses,
sends its views to the towers through Triton (BLS, so Triton's dynamic batcher merges the views of
concurrent requests) and applies the projector.

The repository records what it was built from (``step37_repository.json`` in the embedder's
version folder): the checkpoint's vision-weights digest, the digest of every served file and the
weights digest each artifact was exported from.  The embedder checks them all when it loads and
refuses to start on any mismatch.  Every ``config.pbtxt`` is written through Triton's own protobuf
(``tritonclient``'s ``model_config_pb2``), so a config Triton cannot parse is never written.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, EngineError, InputError, OutputError
from ..files import apply_umask, atomic_dir, check_output_dir, ensure_dir, os_reason, read_json, replace_dir
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig
from . import contract as C

log = logging.getLogger(__name__)

FORMAT = "step37-triton-repository/1"
BACKENDS = ("trt", "onnx", "torch")
#: ``max_batch_size`` of Python-backend towers when ``--max-batch`` is not given.
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
#: ... of Python-backend (CPU) towers: batching views buys little on a CPU, and every request would
#: wait the whole delay at low load (2.3 ms per tower call measured at concurrency 1, issue 21);
#: views queued while the tower computes still run as one batch.
CPU_QUEUE_DELAY_US = 0
#: Pillow's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``, about 89 MP).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: Embedding cache of each embedder instance, MiB (``--cache-mb``; 0 = off).
DEFAULT_CACHE_MB = 256.0
#: Requests each served model may hold waiting (``--max-queue-size``); one more is refused at once
#: with UNAVAILABLE "Exceeds maximum queue size".  docs/serving.md ("Operations") has the measurement
#: behind it: at the tiny preset's capacity a full queue of 32 drains in well under the timeout.
DEFAULT_MAX_QUEUE_SIZE = 32
#: How long a request may wait in a queue before it is refused (``--queue-timeout-ms``); a client's
#: own ``timeout`` request parameter overrides it (``allow_timeout_override``).
DEFAULT_QUEUE_TIMEOUT_MS = 5000
_MODELS_DIR = Path(__file__).with_name("triton_models")
_TORCH_CKPT = "checkpoint"  # torch towers: a vision-only checkpoint in the version folder


def default_preprocess_instances() -> int:
    """Embedder instances (preprocessing processes) when not given: one per usable CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class TowerArtifact:
    """What one tower model serves, read from its artifact (manifest, ONNX metadata or config)."""

    resolution: int
    kind: str  # "trt" | "onnx" | "torch"
    path: Path | None  # engine or ONNX file; None for torch (weights come from the checkpoint)
    input_dtype: str  # numpy name of pixel_values: float32, float16 or uint8
    precision: str  # fp16 | fp32: the dtype of image_features
    num_tokens: int
    out_dim: int
    weights_sha256: str | None  # the vision weights the artifact was made from, when recorded
    profile: tuple[int, int, int] | None = None  # engines: batch MIN, OPT, MAX
    data_files: tuple[str, ...] = ()  # ONNX external-data files beside it (names relative to it)

    @property
    def model_name(self) -> str:
        return C.TOWER_MODELS[self.resolution]


@dataclass
class RepositoryOptions:
    """Serving knobs written into the configs (the CLI's ``triton-repo``/``serve`` options)."""

    max_batch: int | None = None  # default: engine profile MAX, or DEFAULT_MAX_BATCH
    max_queue_delay_us: int | None = None  # default: DEFAULT_QUEUE_DELAY_US (trt), CPU_QUEUE_DELAY_US
    preprocess_instances: int | None = None  # default: default_preprocess_instances()
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    cuda_graphs: bool = False
    warmup: bool = True
    tower_threads: int | None = None  # ONNX Runtime intra-op threads per Python-backend tower
    embedder_threads: int | None = None  # BLAS/torch threads per embedder instance (serve: threads.py)
    cache_mb: float = DEFAULT_CACHE_MB  # embedding cache of each embedder instance (0 = off)
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # requests waiting per model (towers: at least what BLS needs)
    queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS  # longest wait in a queue before UNAVAILABLE

    def validate(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise ConfigError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.preprocess_instances is not None and self.preprocess_instances < 1:
            raise ConfigError(f"--preprocess-instances must be >= 1, got {self.preprocess_instances}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        if not self.cache_mb >= 0:
            raise ConfigError(f"--cache-mb must be >= 0, got {self.cache_mb}")
        if self.max_queue_size < 1:
            raise ConfigError(f"--max-queue-size must be >= 1, got {self.max_queue_size}")
        if self.queue_timeout_ms < 1:
            raise ConfigError(f"--queue-timeout-ms must be >= 1, got {self.queue_timeout_ms}")


# -- reading artifacts -------------------------------------------------------------------------------
def describe_engine(path: str | Path) -> TowerArtifact:
    """A TensorRT engine's tower facts, from its manifest (``step37-deploy build`` writes it)."""
    from ..engine import read_manifest

    path = Path(path)
    m = read_manifest(path)
    ((iname, ispec),) = m["inputs"].items()
    ((oname, ospec),) = m["outputs"].items()
    if (iname, oname) != (C.TOWER_INPUT, C.TOWER_OUTPUT):
        raise EngineError(
            f"engine {path} has I/O {iname!r} -> {oname!r}; the served tower needs "
            f"{C.TOWER_INPUT!r} -> {C.TOWER_OUTPUT!r}"
        )
    h = ispec["shape"][2]
    if m["flavour"] != "tensorrt":
        log.warning(
            "engine %s was built with %s %s; Triton's TensorRT backend loads only engines of its own TensorRT "
            "version: rebuild with tensorrt in the container you serve with (docs/serving.md)",
            path,
            m["flavour"],
            m["trt_version"],
        )
    _, tokens, dim = ospec["shape"]
    prof = m["profile"][iname]
    return TowerArtifact(
        resolution=int(m.get("resolution") or h),
        kind="trt",
        path=path,
        input_dtype=str(ispec["dtype"]),
        precision=str(m.get("precision", "fp16")),
        num_tokens=int(tokens),
        out_dim=int(dim),
        weights_sha256=(m.get("onnx_metadata") or {}).get("vision_weights_sha256"),  # the source ONNX's
        profile=(int(prof[0][0]), int(prof[1][0]), int(prof[2][0])),
    )


def describe_onnx(path: str | Path) -> TowerArtifact:
    """An exported ONNX file's tower facts, from its graph and ``step37.*`` metadata."""
    import onnx

    from ..engine import onnx_facts

    path = Path(path)
    facts = onnx_facts(path)
    meta = facts.metadata
    model = onnx.load(str(path), load_external_data=False)
    data = sorted({e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"})
    for name in data:
        _inside(path.parent, name, f"external data of {path}")
    input_dtype = meta.get("input_dtype") or facts.input_dtype
    precision = meta.get("precision") or ("fp16" if facts.input_dtype == "float16" else "fp32")
    _, _, h, _ = facts.input_shape
    _, tokens, dim = facts.output_shape
    if (facts.input_name, facts.output_name) != (C.TOWER_INPUT, C.TOWER_OUTPUT):
        raise InputError(
            f"ONNX file {path} has I/O {facts.input_name!r} -> {facts.output_name!r}; the served "
            f"tower needs {C.TOWER_INPUT!r} -> {C.TOWER_OUTPUT!r} (export it with step37-deploy export)"
        )
    return TowerArtifact(
        resolution=int(meta.get("resolution") or h),
        kind="onnx",
        path=path,
        input_dtype=input_dtype,
        precision=precision,
        num_tokens=int(tokens),
        out_dim=int(dim),
        weights_sha256=meta.get("vision_weights_sha256"),
        data_files=tuple(data),
    )


def describe_torch(checkpoint: str | Path, resolution: int) -> TowerArtifact:
    """The eager FP32 tower from the checkpoint itself."""
    from ..config import Step37Config

    cfg = Step37Config.from_checkpoint(checkpoint)
    return TowerArtifact(
        resolution=resolution,
        kind="torch",
        path=None,
        input_dtype="float32",
        precision="fp32",
        num_tokens=cfg.vision.num_output_tokens(resolution, resolution),
        out_dim=cfg.vision.output_dim,
        weights_sha256=None,  # the repository's own copy of the checkpoint's weights
    )


def collect_towers(
    checkpoint: str | Path,
    backend: str,
    artifacts: list[str | Path] | tuple = (),
    pcfg: PreprocessConfig = DEFAULT_PREPROCESS,
) -> dict[int, TowerArtifact]:
    """One tower per served resolution (728 global views, 504 crops), told apart by their metadata."""
    want = (pcfg.image_size, pcfg.patch_size)
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        if artifacts:
            raise InputError("--backend torch serves the checkpoint itself; --artifacts is for trt and onnx")
        return {res: describe_torch(checkpoint, res) for res in want}
    if len(artifacts) != 2:
        raise InputError(f"--backend {backend} needs --artifacts FILE_728 FILE_504 (two files), got {len(artifacts)}")
    describe = describe_engine if backend == "trt" else describe_onnx
    towers: dict[int, TowerArtifact] = {}
    for f in artifacts:
        t = describe(f)
        if t.resolution in towers:
            raise InputError(f"--artifacts {towers[t.resolution].path} and {f} are both {t.resolution}x{t.resolution}")
        towers[t.resolution] = t
    if sorted(towers) != sorted(want):
        raise InputError(f"--artifacts must be one {want[0]} and one {want[1]} file, got resolutions {sorted(towers)}")
    return {res: towers[res] for res in want}


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refusing a path read from a file that leaves ``root``."""
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(base):
        raise ConfigError(f"{what}: path {rel!r} leaves its folder {base}")
    return p


# -- configs (Triton's own protobuf) -----------------------------------------------------------------
def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the [serve] extra
        raise ConfigError(
            f"writing a Triton repository needs tritonclient: pip install 'step37-deploy[serve]' ({exc})"
        ) from None
    return model_config_pb2, text_format


def tower_max_batch(t: TowerArtifact, requested: int | None) -> int:
    """``max_batch_size`` of a tower: the engine profile's MAX (never above it), else ``requested``."""
    if t.profile is None:
        return requested or DEFAULT_MAX_BATCH
    mn, _, mx = t.profile
    mb = requested or mx
    if mb > mx:
        raise ConfigError(
            f"--max-batch {mb} is above the optimisation profile MAX {mx} of engine {t.path}; "
            f"Triton's TensorRT backend would refuse it (rebuild with --batch {mn}:..:{mb})"
        )
    if mb < mn:
        raise ConfigError(f"--max-batch {mb} is below the optimisation profile MIN {mn} of engine {t.path}")
    return mb


def set_queue_policy(db: Any, max_queue_size: int, timeout_ms: int) -> None:
    """A bounded queue on a model's dynamic batcher: at most ``max_queue_size`` requests wait, each
    at most ``timeout_ms`` (or the request's own ``timeout`` parameter, which may override it); a
    request over either bound is refused with UNAVAILABLE instead of waiting for ever."""
    pb, _ = _pb()
    policy = db.default_queue_policy
    policy.max_queue_size = max_queue_size
    policy.default_timeout_microseconds = timeout_ms * 1000
    policy.timeout_action = pb.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = True


def tower_queue_size(opts: RepositoryOptions, max_batch: int, pcfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
    """A tower's queue bound: ``--max-queue-size``, but never fewer than the BLS requests every
    embedder instance can have in flight at once (a global view plus its largest image's crops in
    ``max_batch`` chunks), so the embedder's own traffic is never refused by a tower."""
    per_side = pcfg.max_image_size // pcfg.patch_size
    per_request = 1 + -(-(per_side * per_side) // max_batch)
    instances = opts.preprocess_instances or default_preprocess_instances()
    return max(opts.max_queue_size, instances * per_request)


def tower_queue_delay_us(t: TowerArtifact) -> int:
    """The default batching delay of a tower: TensorRT towers wait for views to batch, CPU towers not."""
    return DEFAULT_QUEUE_DELAY_US if t.kind == "trt" else CPU_QUEUE_DELAY_US


def tower_config(t: TowerArtifact, opts: RepositoryOptions) -> Any:
    """The tower's ``ModelConfig`` message."""
    pb, _ = _pb()
    mb = tower_max_batch(t, opts.max_batch)
    out_type = C.tower_data_type(t.precision)
    r = t.resolution
    cfg = pb.ModelConfig(name=t.model_name, max_batch_size=mb)
    cfg.input.add(name=C.TOWER_INPUT, data_type=pb.DataType.Value(C.tower_input_type(t.input_dtype)), dims=[3, r, r])
    cfg.output.add(name=C.TOWER_OUTPUT, data_type=pb.DataType.Value(out_type), dims=[t.num_tokens, t.out_dim])
    db = cfg.dynamic_batching
    delay = opts.max_queue_delay_us
    db.max_queue_delay_microseconds = delay if delay is not None else tower_queue_delay_us(t)
    set_queue_policy(db, tower_queue_size(opts, mb), opts.queue_timeout_ms)
    if t.kind == "trt":
        mn, opt, _ = t.profile
        db.preferred_batch_size.extend(sorted({b for b in (opt, mb) if mn <= b <= mb}))
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
        cfg.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_GPU)
        if opts.cuda_graphs:
            cuda = cfg.optimization.cuda
            cuda.graphs = True
            for b in db.preferred_batch_size:
                spec = cuda.graph_spec.add(batch_size=b)
                spec.input[C.TOWER_INPUT].dim.extend([3, r, r])
        if opts.warmup:
            w = cfg.model_warmup.add(name=f"zeros_batch{mb}", batch_size=mb)
            wi = w.inputs[C.TOWER_INPUT]
            wi.data_type = cfg.input[0].data_type
            wi.dims.extend([3, r, r])
            wi.zero_data = True
    else:
        cfg.backend = "python"
        cfg.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
        params = {"step37_backend": t.kind, "artifact": _served_name(t)}
        if opts.tower_threads:
            params["threads"] = str(opts.tower_threads)
        for k, v in params.items():
            cfg.parameters[k].string_value = v
    return cfg


def embedder_config(opts: RepositoryOptions) -> Any:
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=C.EMBEDDER_MODEL, backend="python", max_batch_size=0)
    for t in C.EMBEDDER_IO["inputs"]:
        cfg.input.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=list(t.dims))
    for t in C.EMBEDDER_IO["outputs"]:
        cfg.output.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=list(t.dims))
    count = opts.preprocess_instances or default_preprocess_instances()
    cfg.instance_group.add(count=count, kind=pb.ModelInstanceGroup.KIND_CPU)
    cfg.parameters[C.CACHE_MB_PARAMETER].string_value = repr(float(opts.cache_mb))
    if opts.embedder_threads:
        cfg.parameters["threads"].string_value = str(opts.embedder_threads)
    # Triton 2.51 accepts a dynamic batcher on a max_batch_size 0 model: it batches nothing but
    # gives the model a bounded, timed queue (the wire contract stays one image per request).
    set_queue_policy(cfg.dynamic_batching, opts.max_queue_size, opts.queue_timeout_ms)
    return cfg


def config_text(cfg: Any) -> str:
    _, text_format = _pb()
    return text_format.MessageToString(cfg)


def parse_config(path: str | Path) -> Any:
    """A ``config.pbtxt`` parsed with Triton's protobuf (a :class:`ConfigError` naming the file if not)."""
    pb, text_format = _pb()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ConfigError(f"{path} is not a Triton model config: {exc}") from exc


def _served_name(t: TowerArtifact) -> str:
    """The artifact's name inside the tower's version folder."""
    if t.kind == "trt":
        return "model.plan"
    if t.kind == "onnx":
        return t.path.name
    return _TORCH_CKPT


# -- writing ---------------------------------------------------------------------------------------------
def _place(src: Path, dst: Path) -> None:
    """``src`` at ``dst``: a hard link where the filesystem allows (multi-GB engines), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sha256(path: Path) -> str:
    from ..engine import _sha256_file

    return _sha256_file(path).hexdigest()


def _write_torch_checkpoint(checkpoint: Path, dst: Path) -> None:
    """A vision-only checkpoint (``config.json`` + ``model.safetensors``, the release's tensor names)."""
    from safetensors.torch import save_file

    from ..checkpoint import _open, vision_refs

    dst.mkdir(parents=True)
    shutil.copyfile(checkpoint / "config.json", dst / "config.json")
    tensors = {}
    for ref in vision_refs(checkpoint).values():
        with _open(ref.shard) as f:
            tensors[ref.key] = f.get_tensor(ref.key).contiguous()
    save_file(tensors, str(dst / "model.safetensors"))
    apply_umask(dst / "model.safetensors")  # save_file creates 0600: a serving user could not read it


def _write_tower(
    root: Path, t: TowerArtifact, checkpoint: Path, opts: RepositoryOptions, torch_weights: Path | None
) -> dict[str, str]:
    """The tower's folder; returns {path relative to the repository: sha256} of its served files."""
    model_dir = root / t.model_name
    version = model_dir / "1"
    version.mkdir(parents=True)
    files: list[Path] = []
    if t.kind == "trt":
        from ..engine import read_manifest

        _place(t.path, version / "model.plan")
        files.append(version / "model.plan")
        want = read_manifest(t.path)["engine_sha256"]
        if _sha256(version / "model.plan") != want:
            raise EngineError(f"engine {t.path} does not match its manifest's digest: corrupt or replaced")
    else:
        shutil.copyfile(_MODELS_DIR / "tower.py", version / "model.py")
        if t.kind == "onnx":
            for name in (t.path.name, *t.data_files):
                _place(t.path.parent / name, version / name)
                files.append(version / name)
        else:
            ck = version / _TORCH_CKPT
            if torch_weights is None:
                _write_torch_checkpoint(checkpoint, ck)
            else:  # the other tower's copy: link, not a second copy of the weights
                ck.mkdir()
                for f in torch_weights.iterdir():
                    _place(f, ck / f.name)
            files += sorted(ck.iterdir())
    (model_dir / "config.pbtxt").write_text(config_text(tower_config(t, opts)))
    return {str(f.relative_to(root)): _sha256(f) for f in files}


def _write_projector(checkpoint: Path, dst: Path) -> None:
    from safetensors.numpy import save_file

    from ..checkpoint import load_projector

    proj = load_projector(checkpoint, "fp32")
    tensors = {"weight": proj.weight.detach().numpy()}
    if proj.bias is not None:
        tensors["bias"] = proj.bias.detach().numpy()
    save_file(tensors, str(dst))
    apply_umask(dst)  # save_file creates 0600


def _record_path(root: Path) -> Path:
    return root / C.EMBEDDER_MODEL / "1" / C.REPOSITORY_RECORD


def _check_destination(out: Path, overwrite: bool) -> bool:
    """True when ``out`` is a repository this tool wrote that ``overwrite`` allows replacing."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return False
    if not _record_path(out).is_file():
        raise ConfigError(f"--out {out} is not empty and is not a repository step37-deploy wrote; refusing to touch it")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a model repository; pass --overwrite to replace it")
    return True


def write_repository(
    checkpoint: str | Path,
    backend: str,
    artifacts: list[str | Path] | tuple = (),
    out: str | Path = "model_repository",
    options: RepositoryOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the three-model repository at ``out`` (built in a temporary folder beside it, then renamed)."""
    from ..checkpoint import weights_digest
    from ..config import Step37Config

    opts = options or RepositoryOptions()
    opts.validate()
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_dir(out.parent, "--out", out)  # a read-only or missing parent: one line, before any work
    cfg = Step37Config.from_checkpoint(checkpoint)
    pcfg = replace(DEFAULT_PREPROCESS, max_pixels=opts.max_image_pixels)
    towers = collect_towers(checkpoint, backend, artifacts, pcfg)
    digest = weights_digest(checkpoint)
    for t in towers.values():
        want_tokens = cfg.vision.num_output_tokens(t.resolution, t.resolution)
        if (t.num_tokens, t.out_dim) != (want_tokens, cfg.vision.output_dim):
            raise InputError(
                f"{t.path}: image_features [{t.num_tokens}, {t.out_dim}] do not fit checkpoint {checkpoint} "
                f"([{want_tokens}, {cfg.vision.output_dim}] at {t.resolution})"
            )
        if t.weights_sha256 is not None and t.weights_sha256 != digest:
            raise InputError(
                f"{t.path} was made from other vision weights (sha256 {t.weights_sha256[:12]}...) than "
                f"checkpoint {checkpoint} ({digest[:12]}...)"
            )
        if t.weights_sha256 is None and t.kind != "torch":
            log.warning("%s does not record the weights it was made from; serving it on trust", t.path)
        tower_max_batch(t, opts.max_batch)  # refuse before writing anything
    replacing = _check_destination(out, overwrite)
    ensure_dir(out.parent, f"--out {out}")
    # temp_sibling (via atomic_dir): umask modes, and a killed run's leftovers swept first.
    with atomic_dir(out) as tmp:
        record: dict[str, Any] = {
            "format": FORMAT,
            "toolkit_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "source_checkpoint": str(checkpoint.resolve()),  # informational; never read back as a path
            "vision_weights_sha256": digest,
            "tokens": {k: v for k, v in asdict(cfg.tokens).items() if k != "source"},
            "preprocess": asdict(pcfg),
            "max_image_pixels": opts.max_image_pixels,
            "towers": {},
        }
        torch_weights = None
        for res, t in towers.items():
            files = _write_tower(tmp, t, checkpoint, opts, torch_weights)
            if t.kind == "torch":
                torch_weights = tmp / t.model_name / "1" / _TORCH_CKPT
            record["towers"][str(res)] = {
                "model": t.model_name,
                "kind": t.kind,
                "source": str(t.path.resolve()) if t.path else None,  # informational
                "input_dtype": t.input_dtype,
                "precision": t.precision,
                "max_batch_size": tower_max_batch(t, opts.max_batch),
                "weights_sha256": t.weights_sha256 or (digest if t.kind == "torch" else None),
                "files": files,
            }
        emb = tmp / C.EMBEDDER_MODEL
        (emb / "1").mkdir(parents=True)
        shutil.copyfile(_MODELS_DIR / "embedder.py", emb / "1" / "model.py")
        _write_projector(checkpoint, emb / "1" / C.PROJECTOR_FILE)
        record["projector"] = {"file": C.PROJECTOR_FILE, "sha256": _sha256(emb / "1" / C.PROJECTOR_FILE)}
        (emb / "config.pbtxt").write_text(config_text(embedder_config(opts)))
        _record_path(tmp).write_text(json.dumps(record, indent=2))
        if replacing:
            old = read_json(_record_path(out))
            log.info(
                "replacing the model repository at %s (written by step37-deploy %s at %s)",
                out,
                old.get("toolkit_version"),
                old.get("created_at"),
            )
        try:
            replace_dir(tmp, out)  # an old repository is moved aside until the new one is in place
        except OSError as exc:
            raise OutputError(f"--out {out}: cannot write in {out.parent}: {os_reason(exc)}") from exc
    log.info("wrote model repository %s (%s towers)", out, backend)
    return out


# -- checking (the embedder, at load) ---------------------------------------------------------------------
def read_record(root: str | Path) -> dict[str, Any]:
    path = _record_path(Path(root))
    record = read_json(path)
    if record.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} record (format {record.get('format')!r})")
    return record


def verify_repository(root: str | Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every served file against the digests the repository was built with; the record.

    Raises :class:`ConfigError` naming the first file that is missing, replaced, or made from other
    weights than the checkpoint the repository records."""
    root = Path(root)
    record = record or read_record(root)
    digest = record["vision_weights_sha256"]
    for res, tower in record["towers"].items():
        if tower["weights_sha256"] not in (None, digest):
            raise ConfigError(
                f"tower {tower['model']} was made from vision weights {tower['weights_sha256'][:12]}... "
                f"but the repository serves checkpoint weights {digest[:12]}..."
            )
        if not tower["files"] and tower["kind"] != "torch":
            raise ConfigError(f"tower {res} of {root} lists no files: nothing to check")
        for rel, sha in tower["files"].items():
            p = _inside(root, rel, "repository record")
            if not p.is_file():
                raise ConfigError(f"{p} is missing from the model repository")
            if _sha256(p) != sha:
                raise ConfigError(f"{p} was changed after the repository was written (digest mismatch)")
    proj = _inside(root / C.EMBEDDER_MODEL / "1", record["projector"]["file"], "repository record")
    if not proj.is_file() or _sha256(proj) != record["projector"]["sha256"]:
        raise ConfigError(f"{proj} is missing or was changed after the repository was written")
    return record
