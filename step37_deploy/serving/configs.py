"""Triton model configs for the served models, written through Triton's own protobuf.

Every ``config.pbtxt`` is made as ``tritonclient``'s ``model_config_pb2.ModelConfig`` message, so a
config Triton cannot parse is never written.  Towers: dims and data types from their artifact,
``max_batch_size`` within the engine's optimisation profile (Triton's TensorRT backend refuses one
above the profile MAX, so this refuses it first), dynamic batching with a bounded, timed queue.
The embedder: the served API's tensors (``contract.py``), one CPU instance per preprocessing
process, its embedding cache size, a bounded, timed queue.  :class:`RepositoryOptions` holds the
knobs (``triton-repo``/``serve`` options) with their defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig
from . import contract as C
from .contract import (  # the defaults live in the contract, where the CLI's --help reads them
    CPU_QUEUE_DELAY_US,
    DEFAULT_CACHE_MB,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_QUEUE_DELAY_US,
    DEFAULT_QUEUE_TIMEOUT_MS,
)
from .towers import TowerArtifact


def default_preprocess_instances() -> int:
    """Embedder instances (preprocessing processes) when not given: one per usable CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: How the embedder reaches an ONNX Runtime / torch tower: ``local``, a runner inside each embedder
#: instance's own process; ``bls``, a separate Triton model called through BLS.  TensorRT towers are
#: always separate models (Triton's TensorRT backend).
TOWER_CALLS = ("local", "bls")


def resolve_tower_calls(opts: RepositoryOptions, kinds: set[str]) -> str:
    """``local`` or ``bls`` for towers of ``kinds`` (``TowerArtifact.kind``): what ``opts`` asks, else
    ``local`` where the hop buys nothing, i.e. where every embedder instance would have a tower
    instance of its own anyway (embedder instances <= tower instances: the same copies of the weights,
    without the two shared-memory copies of every view and the answer's way back, issue 21), else
    ``bls`` (separate towers batch the views of many embedder instances with fewer weight copies)."""
    if "trt" in kinds:
        if opts.tower_calls == "local":
            raise ConfigError("--tower-calls local: TensorRT towers run in Triton's TensorRT backend; use bls")
        return "bls"
    if opts.tower_calls is not None:
        return opts.tower_calls
    instances = opts.preprocess_instances or default_preprocess_instances()
    return "local" if instances <= (opts.tower_instances or 1) else "bls"


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
    tower_instances: int | None = None  # instances of each Python-backend tower (default 1; serve: threads.py)
    embedder_threads: int | None = None  # BLAS/torch threads per embedder instance (serve: threads.py)
    cache_mb: float = DEFAULT_CACHE_MB  # embedding cache of each embedder instance (0 = off)
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # requests waiting per model (towers: at least what BLS needs)
    queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS  # longest wait in a queue before UNAVAILABLE
    tower_calls: str | None = None  # "local" | "bls"; None: resolve_tower_calls decides

    def validate(self) -> None:
        if self.tower_calls is not None and self.tower_calls not in TOWER_CALLS:
            raise ConfigError(f"--tower-calls must be one of {', '.join(TOWER_CALLS)}, got {self.tower_calls!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise ConfigError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.preprocess_instances is not None and self.preprocess_instances < 1:
            raise ConfigError(f"--preprocess-instances must be >= 1, got {self.preprocess_instances}")
        if self.tower_instances is not None and self.tower_instances < 1:
            raise ConfigError(f"--tower-instances must be >= 1, got {self.tower_instances}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        if not self.cache_mb >= 0:
            raise ConfigError(f"--cache-mb must be >= 0, got {self.cache_mb}")
        if self.max_queue_size < 1:
            raise ConfigError(f"--max-queue-size must be >= 1, got {self.max_queue_size}")
        if self.queue_timeout_ms < 1:
            raise ConfigError(f"--queue-timeout-ms must be >= 1, got {self.queue_timeout_ms}")


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
        cfg.instance_group.add(count=opts.tower_instances or 1, kind=pb.ModelInstanceGroup.KIND_CPU)
        params = {"step37_backend": t.kind, "artifact": t.served_name}
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
    if opts.tower_threads:  # the intra-op threads of towers run inside the embedder (tower_calls local)
        cfg.parameters[C.TOWER_THREADS_PARAMETER].string_value = str(opts.tower_threads)
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
