"""Shared fixtures: synthetic checkpoints and exported ONNX files, made once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from step37_deploy.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    """Tiny preset, FP32 on disk (exact parity checks), 2 shards with decoys."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp32", "tiny", dtype="fp32", shards=2, seed=1)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    """Tiny preset, bf16 on disk like the release."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", "tiny", dtype="bf16", shards=3, seed=2)


@pytest.fixture(scope="session")
def exported(tiny_fp32, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The tiny checkpoint exported at both precisions and both resolutions."""
    from step37_deploy.export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    return {(p, r): export_onnx(tiny_fp32, out, p, r).onnx_path for p in ("fp32", "fp16") for r in (728, 504)}


@pytest.fixture(scope="session")
def hf_model(tiny_fp32):
    """transformers' Step3p7Model loaded from the same files by transformers' own loader."""
    transformers = pytest.importorskip("transformers", minversion="5.23")
    model = transformers.Step3p7Model.from_pretrained(str(tiny_fp32), dtype=torch.float32)
    return model.eval()


def rel_l2(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def edit_config(ckpt: Path, **vision_changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_config"].update(vision_changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def exported_uint8(tiny_fp32, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The tiny checkpoint exported with uint8 input (normalisation folded into conv1), both
    precisions and resolutions."""
    from step37_deploy.export import export_onnx

    out = tmp_path_factory.mktemp("onnx-uint8")
    return {
        (p, r): export_onnx(tiny_fp32, out, p, r, input_kind="uint8").onnx_path
        for p in ("fp32", "fp16")
        for r in (728, 504)
    }
