"""Stage 4: trace the vision tower to ONNX (FP32 or FP16-typed), in bounded memory.

How the full 1.95 B-parameter tower fits a 24 GiB machine: the graph is traced with
``torch.export`` on a model whose parameters live on the *meta* device (no bytes at all), turned
into an ONNX IR model by ``torch.onnx.export(..., dynamo=True)``, and every initializer is then
replaced by an ``onnx_ir.LazyTensor`` that reads its one tensor from the safetensors shard,
converts it and hands it to ``onnx_ir.save``, which streams them into the external-data file one
at a time.  Peak RSS is the traced graph plus a few tensors, whatever the model size
(``scripts/bench_export_full.py`` measures it).

The graph is what TensorRT wants: input ``pixel_values`` [batch, 3, H, W], output
``image_features`` [batch, P', 4*width], batch dynamic and the spatial size fixed per file; the
resampled position embedding and the RoPE cos/sin tables are constants of the file; attention is
spelled MatMul -> Softmax -> MatMul over all heads at once (no masks, nothing unrolled per head),
the pattern TensorRT's MHA fusion matches.  The FP16 graph is FP16-typed (weights, activations,
matmuls) with FP32 islands chosen by measurement (``docs/fp16.md``), so strongly typed TensorRT 11
and TensorRT-RTX build it as-is.  Before tracing an FP16 graph, ``step37_deploy.calibrate`` measures
activation ranges block by block (weights streamed, bounded memory like the export) and protects
what would leave FP16's range; the metadata records the ranges, the decision and each block's
output tensor (``step37.block_outputs``, for ``compare --per-block``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import TensorRef, _open, require_finite, vision_refs, weights_digest, weights_fingerprint
from .config import DEFAULT_OPSET, SUPPORTED_OPSETS, Step37Config
from .errors import CheckpointError, ExportError, InputError, OutputError, Step37Error
from .files import check_output_dir, os_reason, refuse_inputs, remove_tree, temp_sibling
from .model import PrecisionPolicy, Step37VisionModel, fold_normalisation, resample_posemb, rope_tables

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
#: ``--input``: ``float`` takes CLIP-normalised views in the graph's dtype; ``uint8`` takes the raw
#: resized/padded views (0..255) and folds the normalisation into conv1.
INPUT_KINDS = ("float", "uint8")
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
#: Models over this many bytes of weights keep them in external data (protobuf's limit is 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
META_PREFIX = "step37."


@dataclass
class ExportResult:
    """What one export wrote."""

    onnx_path: Path
    data_path: Path | None
    precision: str
    resolution: int
    num_tokens: int
    output_dim: int
    weight_bytes: int
    seconds: float
    input_dtype: str = "float32"  # "float32", "float16" or "uint8" (metadata ``step37.input_dtype``)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["onnx_path"] = str(self.onnx_path)
        d["data_path"] = str(self.data_path) if self.data_path else None
        return d


def onnx_filename(precision: str, resolution: int, input_kind: str = "float") -> str:
    suffix = "_uint8" if input_kind == "uint8" else ""
    return f"step37_vision_{precision}_{resolution}{suffix}.onnx"


def validate_request(cfg: Step37Config, precision: str, resolution: int, opset: int, input_kind: str = "float") -> None:
    if input_kind not in INPUT_KINDS:
        raise ExportError(f"--input must be one of {list(INPUT_KINDS)}, got {input_kind!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; use one of {list(SUPPORTED_OPSETS)}")
    p = cfg.vision.patch_size
    if resolution % p or resolution < 2 * p or resolution > 4 * cfg.vision.image_size:
        raise ExportError(
            f"resolution {resolution} is not supported: it must be a multiple of the patch size {p} "
            f"between {2 * p} and {4 * cfg.vision.image_size} (728 global views, 504 crops)"
        )


def _cause(exc: BaseException | None, kind: type[BaseException]) -> Any:
    """The ``kind`` error behind ``exc`` (the exporter and onnx_ir wrap them), if any."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _os_error(exc: BaseException) -> OSError | None:
    return _cause(exc, OSError)


def header_shapes(refs: dict[str, TensorRef]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the shards' headers (no tensor data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_shard: dict[Path, list[tuple[str, TensorRef]]] = {}
    for name, ref in refs.items():
        by_shard.setdefault(ref.shard, []).append((name, ref))
    for shard, items in by_shard.items():
        with _open(shard) as f:
            for name, ref in items:
                try:
                    shapes[name] = tuple(f.get_slice(ref.key).get_shape())
                except Exception as exc:  # safetensors raises its own error type for missing keys
                    raise CheckpointError(f"shard {shard} does not hold {ref.key}: {exc}") from exc
    return shapes


def check_config_matches(model: torch.nn.Module, refs: dict[str, TensorRef]) -> None:
    """Fail before tracing when config.json and the tensors disagree (names or shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    actual = header_shapes(refs)
    problems = []
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"missing keys: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    wrong = [
        f"{k}: checkpoint {actual[k]} vs config {expected[k]}"
        for k in expected
        if k in actual and actual[k] != expected[k]
    ]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:10]))
    if problems:
        raise CheckpointError("the checkpoint's config.json disagrees with its vision tensors: " + " | ".join(problems))


class WeightSource:
    """Produces each initializer's real value on demand, one tensor at a time."""

    def __init__(
        self,
        refs: dict[str, TensorRef],
        cfg: Step37Config,
        grid: tuple[int, int],
        dtype: torch.dtype,
        policy: PrecisionPolicy,
    ) -> None:
        self.refs, self.cfg, self.grid, self.dtype, self.policy = refs, cfg, grid, dtype, policy

    def _read(self, name: str) -> torch.Tensor:
        ref = self.refs[name]
        with _open(ref.shard) as f:
            return f.get_tensor(ref.key).float()

    def value(self, name: str) -> torch.Tensor:
        """The initializer as it goes into the file, refused when it holds NaN/Inf (checked here,
        while it is in memory anyway: no extra pass over the weights)."""
        t = self._value(name)
        ref = self.refs.get(name if name != "grid_posemb" else "positional_embedding")
        require_finite(t, ref.key if ref else name, ref.shard if ref else "(computed)", f" as {self.dtype}")
        return t

    def _value(self, name: str) -> torch.Tensor:
        gh, gw = self.grid
        if name in self.refs:
            return self._read(name).to(self.dtype)
        if name in ("input_fold.weight", "input_fold.bias"):  # uint8 input: conv1 with the CLIP fold
            weight, bias = fold_normalisation(self._read("conv1.weight"))
            t = weight if name.endswith("weight") else bias
            return t if self.policy.input_fold_fp32 else t.to(self.dtype)
        if name == "grid_posemb":
            pos = self._read("positional_embedding")
            return resample_posemb(pos, self.cfg.vision, gh, gw).to(self.dtype)
        if name in ("grid_rope_cos", "grid_rope_sin"):
            cos, sin = rope_tables(self.cfg.vision, gh, gw)
            t = cos if name.endswith("cos") else sin
            return t if self.policy.rope_fp32 else t.to(self.dtype)
        raise ExportError(f"the traced graph has an initializer {name!r} that no checkpoint tensor provides")


def _trace(model: Step37VisionModel, resolution: int, opset: int):
    """torch.export on the meta model, then the dynamo ONNX exporter (no constant folding: there
    is no data to fold on the meta device; ORT and TensorRT fold at load/build time)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    shape = (2, model.config.num_channels, resolution, resolution)
    example = torch.empty(shape, device="meta", dtype=model.input_dtype)
    try:
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        program = torch.onnx.export(ep, dynamo=True, opset_version=opset, optimize=False, verbose=False)
    except Exception as exc:
        raise ExportError(f"tracing the vision tower failed: {exc}") from exc
    return program.model


def _finalise_graph(
    model, source: WeightSource, num_tokens: int, out_dim: int, on_read: Callable[[int], None] | None
) -> int:
    """Name the I/O, make batch symbolic, swap every initializer for a lazy checkpoint read,
    drop unused ones; returns the bytes of weights the file will hold."""
    import onnx_ir as ir

    graph = model.graph
    (inp,) = graph.inputs
    (out,) = graph.outputs
    inp.name = INPUT_NAME
    out.name = OUTPUT_NAME
    inp.shape = ir.Shape(["batch", *inp.shape[1:]])
    out.shape = ir.Shape(["batch", num_tokens, out_dim])

    used = {v.name for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.inputs if v is not None}
    total = 0
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if name not in used and value not in graph.outputs:
            graph.initializers.pop(name)
            continue
        shape = ir.Shape(list(value.shape))
        dtype = value.dtype

        def load(name: str = name, dtype=dtype) -> ir.Tensor:
            t = source.value(name)
            arr = t.numpy()
            expected = dtype.numpy()
            if arr.dtype != expected:
                raise ExportError(f"initializer {name}: produced {arr.dtype}, graph expects {expected}")
            if on_read is not None:
                on_read(arr.nbytes)
            return ir.Tensor(np.ascontiguousarray(arr), name=name)

        value.const_value = ir.LazyTensor(load, dtype=dtype, shape=shape, name=name)
        total += int(math.prod(shape.numpy()) * dtype.itemsize)
    return total


def _check_target(
    cfg: Step37Config, checkpoint_dir, out_dir: Path, precision: str, resolution: int, opset: int, input_kind: str
) -> str:
    """The request, and where it goes: the file name, in a usable folder, replacing only an export
    this tool wrote and never an input.  Checked before minutes of tracing."""
    validate_request(cfg, precision, resolution, opset, input_kind)
    check_output_dir(out_dir, "--out")
    name = onnx_filename(precision, resolution, input_kind)
    refuse_inputs(
        {"output": out_dir / name, "external data": out_dir / (name + ".data")}, {"--checkpoint": checkpoint_dir}
    )
    check_replaceable_exports(out_dir, [name])
    return name


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    resolution: int = 728,
    opset: int = DEFAULT_OPSET,
    policy: PrecisionPolicy | None = None,
    progress: bool = False,
    external_data: bool | None = None,
    input_kind: str = "float",
    calibrate: bool = True,
    calibration_images: list[str] | None = None,
    calibration_views: int | None = None,
    calibration_dtype: str = "fp32",
) -> ExportResult:
    """Export one ONNX file for one precision and resolution; nothing partial is left on failure.

    ``input_kind="uint8"``: ``pixel_values`` is uint8 and the CLIP normalisation is folded into
    conv1 (:class:`~step37_deploy.model.InputFold`; FP32 under the default precision policy).
    FP16 exports first calibrate activation ranges (``step37_deploy.calibrate``; ``calibrate=False``
    skips it with a warning) and protect the tensors that would leave the FP16 range."""
    started = time.perf_counter()
    cfg = Step37Config.from_checkpoint(checkpoint_dir)
    out_dir = Path(out_dir)
    name = _check_target(cfg, checkpoint_dir, out_dir, precision, resolution, opset, input_kind)
    grid = cfg.vision.grid(resolution, resolution)
    num_tokens = cfg.vision.num_output_tokens(resolution, resolution)
    refs = vision_refs(checkpoint_dir)
    calibration = (calibrate, calibration_images, calibration_views, calibration_dtype)
    model, policy, protection, ranges = _prepare_model(
        cfg, refs, precision, resolution, policy or PrecisionPolicy(), input_kind, calibration, progress
    )
    input_dtype = str(model.input_dtype).removeprefix("torch.")

    log.info("tracing %s graph for %dx%d (grid %dx%d)", precision, resolution, resolution, *grid)
    ir_model = _trace(model, resolution, opset)
    source = WeightSource(refs, cfg, grid, PRECISIONS[precision], policy)
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, desc=f"writing {name}", disable=not progress)
    try:
        weight_bytes = _finalise_graph(ir_model, source, num_tokens, cfg.vision.output_dim, bar.update)
        bar.total = weight_bytes
        ir_model.producer_name = "step37-deploy"
        ir_model.producer_version = __version__
        ir_model.metadata_props.update(
            _export_metadata(cfg, checkpoint_dir, precision, input_dtype, resolution, num_tokens, policy, opset)
        )
        ir_model.metadata_props.update(_fp16_metadata(ir_model, cfg.vision.layers, protection, ranges))
        use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
        data_name = name + ".data" if use_external else None
        final = out_dir / name
        refuse_inputs(
            {"output": final, "external data": out_dir / data_name if data_name else None},
            {"--checkpoint": checkpoint_dir},
        )
        _save_checked(ir_model, final, data_name, num_tokens, cfg.vision.output_dim)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    log.info("wrote %s (%.1f MB of weights) in %.1fs", final, weight_bytes / 1e6, seconds)
    return ExportResult(
        final,
        out_dir / data_name if data_name else None,
        precision,
        resolution,
        num_tokens,
        cfg.vision.output_dim,
        weight_bytes,
        seconds,
        input_dtype,
    )


def _prepare_model(
    cfg: Step37Config,
    refs: Any,
    precision: str,
    resolution: int,
    policy: PrecisionPolicy,
    input_kind: str,
    calibration: tuple[bool, list[str] | None, int | None, str],
    progress: bool,
) -> tuple[Step37VisionModel, PrecisionPolicy, Any, Any]:
    """The model on the meta device, switched for export; FP16 first calibrates, because the
    protection it decides (tensors kept in FP32) changes the precision policy of the trace."""
    with torch.device("meta"):
        model = Step37VisionModel(cfg.vision)
    check_config_matches(model, refs)
    model = model.to(PRECISIONS[precision]).eval().requires_grad_(False)
    protection = ranges = None
    if precision == "fp16":
        from .calibrate import DEFAULT_VIEWS, calibrate_for_export

        calibrate, images, views, calibration_dtype = calibration
        protection, ranges = calibrate_for_export(
            cfg, refs, resolution, calibrate, images, views or DEFAULT_VIEWS, progress, calibration_dtype
        )
        policy = protection.apply(policy)
    model.set_precision_policy(policy).set_attention_impl("explicit").freeze_grid(
        *cfg.vision.grid(resolution, resolution)
    )
    model.set_uint8_input(input_kind == "uint8")
    return model, policy, protection, ranges


def _export_metadata(
    cfg: Step37Config,
    checkpoint_dir: str | Path,
    precision: str,
    input_dtype: str,
    resolution: int,
    num_tokens: int,
    policy: PrecisionPolicy,
    opset: int,
) -> dict[str, str]:
    """The ``step37.*`` metadata every consumer reads (repository writer, compare, engine builds)."""
    return {
        META_PREFIX + "toolkit_version": __version__,
        META_PREFIX + "vision_config": json.dumps(cfg.vision.to_dict(), sort_keys=True),
        META_PREFIX + "precision": precision,
        META_PREFIX + "input_dtype": input_dtype,
        META_PREFIX + "resolution": str(resolution),
        META_PREFIX + "num_tokens": str(num_tokens),
        META_PREFIX + "output_dim": str(cfg.vision.output_dim),
        META_PREFIX + "source_checkpoint": str(Path(checkpoint_dir).resolve()),
        META_PREFIX + "vision_weights_sha256": weights_digest(checkpoint_dir),
        META_PREFIX + "vision_weights_fingerprint": weights_fingerprint(checkpoint_dir),
        META_PREFIX + "precision_policy": json.dumps(asdict(policy), sort_keys=True),
        META_PREFIX + "opset": str(opset),
        META_PREFIX + "torch_version": torch.__version__,
    }


def _save_checked(ir_model: Any, final: Path, data_name: str | None, num_tokens: int, out_dim: int) -> None:
    """Save into a temporary folder, check the file, then rename it (and its data) into place."""
    import onnx
    import onnx_ir as ir

    out_dir, name = final.parent, final.name
    tmp_dir = temp_sibling(final, directory=True)
    try:
        tmp_onnx = tmp_dir / name
        if data_name:
            ir.save(ir_model, tmp_onnx, external_data=data_name)
        else:
            ir.save(ir_model, tmp_onnx)
        # Validate by path (works past protobuf's 2 GB limit), then infer shapes on the graph in
        # memory (weights stay on disk: an inferred copy written to a full disk came out truncated
        # and silent, then failed to parse as "corrupt").
        onnx.checker.check_model(str(tmp_onnx))
        graph_only = onnx.load(str(tmp_onnx), load_external_data=False)
        _check_inferred_output(onnx.shape_inference.infer_shapes(graph_only), num_tokens, out_dim)
        del graph_only
        if data_name:
            os.replace(tmp_dir / data_name, out_dir / data_name)
        os.replace(tmp_onnx, final)
    except Step37Error:  # e.g. NaN weights found while writing: already says which tensor
        raise
    except Exception as exc:
        if (typed := _cause(exc, Step37Error)) is not None:  # NaN weights met while onnx_ir streams them
            raise typed from None
        if (os_exc := _os_error(exc)) is not None:
            raise OutputError(f"writing {final} failed: {os_reason(os_exc)}") from exc
        raise ExportError(f"writing {name} failed: {exc}") from exc
    finally:
        remove_tree(tmp_dir)


def block_output_names(ir_model, layers: int) -> list[str] | None:
    """The ONNX value that is each block's output, found from the exporter's module scopes (node
    metadata ``namespace``): of the values produced inside ``transformer.resblocks.i`` and used
    outside it, the last one produced (values computed once and shared, such as RoPE slices, come
    earlier).  ``None`` (and a log line) when the scopes name no such value for some block."""
    import re

    import onnx_ir as ir

    scope = re.compile(r"transformer\.resblocks\.(\d+)[.:]")
    block_of: dict[int, int] = {}  # id(node) -> block index
    nodes = list(ir.traversal.RecursiveGraphIterator(ir_model.graph))
    for node in nodes:
        m = scope.search(node.metadata_props.get("namespace", ""))
        if m:
            block_of[id(node)] = int(m.group(1))
    found: dict[int, str] = {}
    graph_outputs = {v.name for v in ir_model.graph.outputs}
    for node in nodes:  # topological order: a later hit replaces an earlier one
        i = block_of.get(id(node))
        if i is None:
            continue
        for value in node.outputs:
            if value.name in graph_outputs or any(block_of.get(id(u)) != i for u, _ in value.uses()):
                found[i] = value.name
    if sorted(found) != list(range(layers)):
        log.info("block outputs not identifiable from the exporter's scopes (found blocks %s)", sorted(found))
        return None
    return [found[i] for i in range(layers)]


def _fp16_metadata(ir_model, layers: int, protection, ranges) -> dict[str, str]:
    """``step37.block_outputs`` always; for FP16 files the calibration's ranges and decision."""
    meta = {}
    names = block_output_names(ir_model, layers)
    if names is not None:
        meta[META_PREFIX + "block_outputs"] = json.dumps(names)
    if protection is not None:
        meta[META_PREFIX + "fp16_protection"] = json.dumps(protection.to_dict(), sort_keys=True)
    if ranges is not None:
        meta[META_PREFIX + "activation_ranges"] = json.dumps(ranges.to_dict(), sort_keys=True)
    return meta


def _check_inferred_output(m: Any, num_tokens: int, out_dim: int) -> None:
    (out,) = m.graph.output
    dims = out.type.tensor_type.shape.dim
    got = [d.dim_param or d.dim_value for d in dims]
    if len(got) != 3 or got[1:] != [num_tokens, out_dim]:
        raise ExportError(f"shape inference gives {OUTPUT_NAME} {got}, expected [batch, {num_tokens}, {out_dim}]")


def check_replaceable_exports(out_dir: str | Path, names: Sequence[str]) -> None:
    """Before any work: an existing ``out_dir/NAME`` (or its ``NAME.data``) is replaced only when this
    tool wrote it, i.e. an ONNX with ``step37.*`` metadata (and the external data beside such an
    ONNX); a user's file that happens to bear an output name is refused (:class:`OutputError`)."""
    out_dir = Path(out_dir)
    for name in names:
        onnx_path, data_path = out_dir / name, out_dir / (name + ".data")
        ours = False
        if onnx_path.exists():
            try:
                ours = onnx_path.is_file() and bool(read_metadata(onnx_path))
            except Step37Error:
                ours = False
            if not ours:
                raise OutputError(
                    f"--out {onnx_path} exists and is not an ONNX this tool exported: refusing to replace it"
                )
            log.info("replacing %s (exported by this tool before)", onnx_path)
        if data_path.exists():
            if not (ours and data_path.is_file()):
                raise OutputError(
                    f"--out {data_path} exists and is not the external data of an ONNX this tool exported: "
                    "refusing to replace it"
                )
            log.info("replacing %s (its external data)", data_path)


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The ``step37.*`` metadata of an exported file (without loading its weights)."""
    import onnx

    from .inputs import onnx_external_files, require_file

    require_file(onnx_path, InputError, "ONNX file")
    try:
        m = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise InputError(f"{onnx_path} is not an ONNX model: {str(exc)[:200]}") from None
    onnx_external_files(m, onnx_path, InputError)  # whoever loads it next must not read outside its folder
    return {p.key[len(META_PREFIX) :]: p.value for p in m.metadata_props if p.key.startswith(META_PREFIX)}
