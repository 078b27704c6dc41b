"""What the TensorRT-RTX build did, checked from its own evidence: the verbose log's self-attention
matches and the fused attention kernels' accumulator traits carried in the engine file (SM89, built
ahead of time on this CPU).  The engine file's layout is not a documented format: these tests were
written against the TensorRT-RTX versions in ``TESTED_RTX`` (pinned in the ``dev`` extra) and skip
with that reason on others."""

import json

import pytest

from step37_deploy.cli import main
from step37_deploy.engine import BuildOptions, build_engine, fusion_facts
from step37_deploy.export import export_onnx
from step37_deploy.model import PrecisionPolicy

rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install '.[rtx]') builds the engines")
TESTED_RTX = ("1.7.1.116",)
if rtx.__version__ not in TESTED_RTX:
    pytest.skip(
        f"the fused-kernel records read here were checked on tensorrt-rtx {TESTED_RTX}, {rtx.__version__} is installed",
        allow_module_level=True,
    )

RES = 504
SM89 = BuildOptions(batch=(1, 1, 2), compute_capabilities=["8.9"], flavour="tensorrt_rtx")


@pytest.fixture(scope="module")
def fp16_softmax_onnx(tiny_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("softmax16")
    return export_onnx(tiny_fp32, out, "fp16", RES, policy=PrecisionPolicy(softmax_fp32=False)).onnx_path


def _kernels(manifest):
    fusion = manifest["fusion"]
    assert fusion["blocks"] == 2 and fusion["attention_fused"] == 2  # one fused attention per block
    kernels = fusion["attention_kernels"]
    assert len(kernels) == 2
    softmaxes = sorted(n for k in kernels for n in k["onnx_layers"] if "softmax" in n)
    assert softmaxes == ["node_softmax", "node_softmax_1"]  # each kernel holds one block's attention
    return kernels


def test_fp16_engine_fuses_attention_with_fp32_qk(exported, tmp_path, capsys):
    plan = tmp_path / "tiny.plan"
    manifest = build_engine(exported[("fp16", RES)], plan, SM89)
    kernels = _kernels(manifest)
    assert {(k["qk_accumulator"], k["pv_accumulator"]) for k in kernels} == {("fp32", "fp16")}
    assert isinstance(manifest["fusion"]["activation_memory_bytes"]["profile 0"], int)
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "fused attention subgraphs: 2" in out and "Q.K^T FP32 / P.V FP16" in out


def test_fp16_softmax_engine_accumulates_qk_in_fp16(fp16_softmax_onnx, tmp_path):
    kernels = _kernels(build_engine(fp16_softmax_onnx, tmp_path / "sm16.plan", SM89))
    assert {(k["qk_accumulator"], k["pv_accumulator"]) for k in kernels} == {("fp16", "fp16")}


def test_manifest_records_fp16_protection(massive, tmp_path):
    onnx_path = massive[2]  # the stress checkpoint's calibrated FP16 graph (conftest), at RES
    manifest = build_engine(onnx_path, tmp_path / "m.plan", SM89)
    assert manifest["fp16_protection"]["residual_fp32_blocks"] == [1, 2]
    on_disk = json.loads((tmp_path / "m.plan.json").read_text())
    assert on_disk["fp16_protection"] == manifest["fp16_protection"]


def test_unreadable_facts_are_unknown():
    facts = fusion_facts([], {}, b"not an engine", "tensorrt", 2)
    assert facts["attention_fused"] == "unknown" and facts["activation_memory_bytes"] == "unknown"
    assert facts["attention_kernels"] == "unknown"
    assert fusion_facts(["Total Activation Memory: 123 bytes"], {}, b"", "tensorrt_rtx", 2)["attention_kernels"] == []
