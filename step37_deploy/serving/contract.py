"""The served API, in one place: model names, tensor names, Triton data types and dims.

Other tools are written against these exact names; the repository writer, the Triton model
files, the server launcher, the client, the load test and the tests all read them from here, so
nothing spells a tensor name twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MAX_PIXELS

#: Tower models, one per resolution (global views / crops).
TOWER_MODELS = {728: "step37_vision_728", 504: "step37_vision_504"}
#: The image -> embedding model (Python backend; BLS calls to the towers).
EMBEDDER_MODEL = "step37_embedder"

#: Tower model I/O.  ``pixel_values`` [3, R, R] per batch item (Triton adds the batch dim).
TOWER_INPUT = "pixel_values"
TOWER_OUTPUT = "image_features"

#: Embedder model I/O (``max_batch_size: 0``: dims are the full request shape).
EMBEDDER_INPUT = "image"
#: The answer every client has always asked for, unchanged: FP32 projected rows, token ids, crop count.
EMBEDDER_OUTPUTS = ("features", "token_ids", "num_crops")

#: Row kinds a request may ask for: ``features`` (after the projector, [L, hidden]) and
#: ``vision_features`` (the tower's output before the projector, [L, 6144], same row order: all
#: crops row-major, then the global view).  Megatron-Bridge's decoupled encoder takes the latter.
ROW_KINDS = ("features", "vision_features")
#: Answer dtypes of the rows: each kind is served under one output name per dtype (``features``,
#: ``features_fp16``, ``features_bf16``, ...), so every output keeps one fixed Triton data type that
#: the server checks, an old client that names ``features`` gets exactly what it always got, and a
#: new client picks 16-bit rows (half the bytes on the wire) by naming the output.
ROW_DTYPES = {"fp32": ("", "TYPE_FP32"), "fp16": ("_fp16", "TYPE_FP16"), "bf16": ("_bf16", "TYPE_BF16")}


def row_output(kind: str, dtype: str = "fp32") -> str:
    """The output name serving rows of ``kind`` (:data:`ROW_KINDS`) in ``dtype`` (:data:`ROW_DTYPES`)."""
    if kind not in ROW_KINDS:
        raise ValueError(f"row kind must be one of {ROW_KINDS}, got {kind!r}")
    if dtype not in ROW_DTYPES:
        raise ValueError(f"answer dtype must be one of {sorted(ROW_DTYPES)}, got {dtype!r}")
    return kind + ROW_DTYPES[dtype][0]


#: Every row output: name -> (kind, dtype).
ROW_OUTPUTS = {row_output(k, d): (k, d) for k in ROW_KINDS for d in ROW_DTYPES}


@dataclass(frozen=True)
class TensorContract:
    """One served tensor: its name, the ``config.pbtxt`` data type and dims (-1 = variable)."""

    name: str
    data_type: str  # "TYPE_FP32", "TYPE_STRING", ...
    dims: tuple[int, ...]


EMBEDDER_IO = {
    "inputs": (TensorContract(EMBEDDER_INPUT, "TYPE_STRING", (1,)),),
    "outputs": (
        TensorContract("features", "TYPE_FP32", (-1, -1)),  # [L, hidden], token order
        TensorContract("token_ids", "TYPE_INT64", (-1,)),  # [T], Step3p7Processor's layout
        TensorContract("num_crops", "TYPE_INT32", (1,)),
        # Optional answers (computed only when a request names them): the rows in 16 bits, and the
        # tower's rows before the projector, [L, 6144], in each dtype.
        *(TensorContract(n, ROW_DTYPES[d][1], (-1, -1)) for n, (_, d) in ROW_OUTPUTS.items() if n != "features"),
    ),
}


def tower_data_type(precision: str) -> str:
    """``config.pbtxt`` data type of a tower's float tensors: FP16 for FP16 artifacts, else FP32."""
    return "TYPE_FP16" if precision == "fp16" else "TYPE_FP32"


#: ``config.pbtxt`` data type of a tower's ``pixel_values`` per artifact input dtype (numpy name).
TOWER_INPUT_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}


def tower_input_type(input_dtype: str) -> str:
    """``config.pbtxt`` data type of a tower's ``pixel_values`` for an artifact whose input is
    ``input_dtype`` (runner ``input_spec().dtype``, ONNX ``step37.input_dtype`` or the manifest)."""
    try:
        return TOWER_INPUT_TYPES[str(input_dtype)]
    except KeyError:
        raise ValueError(f"tower input dtype must be one of {sorted(TOWER_INPUT_TYPES)}, got {input_dtype!r}") from None


#: What a repository was built from (digests, tower facts, token ids); in the embedder's version folder.
REPOSITORY_RECORD = "step37_repository.json"
#: Projector weights (``weight`` [hidden, D], optional ``bias``) in the embedder's version folder.
PROJECTOR_FILE = "projector.safetensors"


#: Prometheus counters the embedder model exports on Triton's metrics endpoint (custom metrics,
#: labels ``model`` and ``version``): lookups of its embedding cache that hit / missed.
CACHE_HITS_METRIC = "step37_embedder_cache_hits"
CACHE_MISSES_METRIC = "step37_embedder_cache_misses"
#: ``config.pbtxt`` parameter of the embedder model: its embedding cache budget in MiB (0 = off).
CACHE_MB_PARAMETER = "cache_mb"
#: ``config.pbtxt`` parameter of the embedder model: intra-op threads of the ONNX Runtime / torch
#: towers it runs itself (``--tower-calls local``; the repository record says which towers).
TOWER_THREADS_PARAMETER = "tower_threads"


# -- defaults of the service: the repository writer, the gateway, the client and the command line
#    (whose --help shows them) all read them here; this module imports nothing heavy.

#: Triton's two protocols; clients use gRPC, the production path, unless told otherwise.
PROTOCOLS = ("grpc", "http")
DEFAULT_PROTOCOL = "grpc"

#: ``max_batch_size`` of Python-backend towers when ``--max-batch`` is not given.
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
#: ... of Python-backend (CPU) towers: batching views buys little on a CPU, and every request would
#: wait the whole delay at low load (2.3 ms per tower call measured at concurrency 1, issue 21);
#: views queued while the tower computes still run as one batch.
CPU_QUEUE_DELAY_US = 0
#: Pillow's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``, about 89 MP).
DEFAULT_MAX_IMAGE_PIXELS = MAX_PIXELS
#: Embedding cache of each embedder instance, MiB (``--cache-mb``; 0 = off).
DEFAULT_CACHE_MB = 256.0
#: Requests each served model may hold waiting (``--max-queue-size``); one more is refused at once
#: with UNAVAILABLE "Exceeds maximum queue size".  docs/serving.md ("Operations") has the measurement
#: behind it: at the tiny preset's capacity a full queue of 32 drains in well under the timeout.
DEFAULT_MAX_QUEUE_SIZE = 32
#: How long a request may wait in a queue before it is refused (``--queue-timeout-ms``); a client's
#: own ``timeout`` request parameter overrides it (``allow_timeout_override``).
DEFAULT_QUEUE_TIMEOUT_MS = 5000

#: Seconds a refused client should wait before it sends again (retried or new request): the
#: gateway's 503 says it (``Retry-After`` and "retry after N s" in its message), the embedder's
#: refusal for a busy tower says it, and ``EmbedClient`` assumes it for Triton's own queue refusals,
#: which cannot carry a hint.  About what one queued request takes at the tiny preset on a CPU;
#: a refused request's slot frees as fast as the service answers.
RETRY_AFTER_S = 1

#: Gateway: default body limit.  A 12 MP photo is 6 MiB as JPEG, 26 MiB as PNG, and 12 MP of noise
#: (the worst case) 13 MiB as JPEG, 34 MiB as PNG, measured with Pillow; 64 MiB leaves room for those.
#: An image at --max-image-pixels (89 MP) can weigh up to 256 MiB as PNG: raise it for those.
DEFAULT_MAX_BODY_MB = 64.0
#: Gateway: default bound on requests in flight per port (and, times two, on open connections).
DEFAULT_MAX_CONNECTIONS = 1024
#: Gateway: default idle timeout, nginx's own default for client header/body reads.
DEFAULT_IDLE_TIMEOUT_S = 60.0
#: On SIGINT/SIGTERM, how long requests in flight get to finish (``--exit-timeout``).  A request
#: waits at most ``DEFAULT_QUEUE_TIMEOUT_MS`` in a queue, then computes; 10 s leaves the whole stop
#: under Kubernetes' default 30 s grace period (``server.stop_bound_s``: 22.2 s with it).
DEFAULT_EXIT_TIMEOUT_S = 10
#: Gateway: a request's whole header must arrive within this many seconds of the connection's
#: accept (nginx's client_header_timeout is a deadline), and a body may pause at most this long
#: between two reads; each at most the idle timeout.
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 10.0
#: Gateway: who nginx's workers (what parses client bytes) run as when ``serve`` runs as root.
DEFAULT_GATEWAY_USER = "nobody"
#: Gateway: at most this many nginx workers when their count is not given (one per usable CPU), and
#: at most ``MAX_GATEWAY_WORKERS`` when it is (each worker holds its own connection budget).
MAX_AUTO_GATEWAY_WORKERS = 8
MAX_GATEWAY_WORKERS = 64
