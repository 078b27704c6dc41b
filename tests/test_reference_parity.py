"""Parity with the independent reference: transformers' Step3p7VisionModel + multi_modal_projector,
loaded from the same synthetic files by transformers' own loader (key renaming, q/k RoPE permutation)."""

import pytest
import torch

from step37_deploy import load_projector, load_vision_model

from .conftest import rel_l2


@pytest.mark.parametrize("size", [728, 504])
def test_vision_and_projector_match_transformers(tiny_fp32, hf_model, size):
    ours = load_vision_model(tiny_fp32, dtype="fp32")
    proj = load_projector(tiny_fp32, dtype="fp32")
    torch.manual_seed(size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref_feat = hf_model.vision_model(x).last_hidden_state
        ref = hf_model.multi_modal_projector(ref_feat)
        feat = ours(x)
        got = proj(feat)
    assert feat.shape == ref_feat.shape == (2, 169 if size == 728 else 81, 256)
    assert rel_l2(feat, ref_feat) <= 1e-5
    assert rel_l2(got, ref) <= 1e-5


def test_transformers_loaded_every_vision_weight(tiny_fp32):
    transformers = pytest.importorskip("transformers", minversion="5.23")
    _, info = transformers.Step3p7Model.from_pretrained(str(tiny_fp32), output_loading_info=True)
    missing = [k for k in info["missing_keys"] if "vision_model" in k or "multi_modal_projector" in k]
    assert missing == [] and not info["mismatched_keys"]
