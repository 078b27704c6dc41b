"""What the builder did: attention fusion, accumulator types, activation memory, inspector layers.

Recorded in every engine's manifest (``fusion``) and shown by ``inspect``.  The facts come from the
builder's own log (captured down to VERBOSE while a build runs), from the engine file (TensorRT-RTX
engines carry each fused attention kernel's record and source), and, where the engine can be
deserialised here (a GPU with its TensorRT), from TensorRT's engine inspector.  A build never fails
over its facts: what cannot be read is recorded as ``"unknown"``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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


class CapturedBuilderLog:
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


def inspector_layers(trt: Any, data: bytes | memoryview) -> list[dict[str, Any]] | None:
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


def json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def build_facts(
    onnx_path: str | Path,
    metadata: dict[str, str],
    build_log: list[str],
    data: memoryview,
    flavour: str,
    trt: Any | None,
) -> dict[str, Any]:
    """``fusion_facts`` for a finished build; the engine inspector's layers where ``trt`` (a GPU) can
    deserialise it.  Never raises: what cannot be read is recorded as unknown."""
    try:
        import onnx

        ops = {n.name: n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        vision = json_or_none(metadata.get("vision_config")) or {}
        fusion = fusion_facts(build_log, ops, data, flavour, vision.get("layers"))
        layers = inspector_layers(trt, data) if trt is not None else None
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
