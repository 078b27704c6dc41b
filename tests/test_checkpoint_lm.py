"""``make-checkpoint --with-language-model``: a full tiny Step3p7 that ``transformers`` loads with every
tensor accounted for, with a tokenizer holding the image tokens and a remote-code config class in
the release's field names (what vLLM reads); the vision readers still read only vision tensors.
(vLLM itself loads it in ``scripts/vllm_handoff_e2e.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from step37_deploy import checkpoint as ckpt_mod
from step37_deploy.checkpoint import load_projector, load_vision_model
from step37_deploy.config import Step37Config
from step37_deploy.synthetic import LM_TOKENS, REMOTE_CONFIG_FILE, make_checkpoint


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "tiny-lm"
    return make_checkpoint(out, "tiny-lm", dtype="bf16", shards=2, with_language_model=True)


def test_vision_readers_never_read_the_language_model(full, monkeypatch):
    seen = []
    monkeypatch.setattr(ckpt_mod, "_read_hook", seen.append)
    load_vision_model(full, dtype="fp32")
    load_projector(full, dtype="fp32")
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    lm = {k for k in index if not k.startswith(("vision_model.", "vit_large_projector."))}
    assert "model.layers.1.moe.gate_proj.weight" in lm and "lm_head.weight" in lm
    assert set(seen) == set(index) - lm
    assert all({k in lm for k, s in index.items() if s == shard} == {True, False} for shard in set(index.values()))
    cfg = Step37Config.from_checkpoint(full)
    assert cfg.tokens.im_patch == LM_TOKENS.im_patch == 500 and cfg.projector.out_features == 64
    assert cfg.vision.head_dim == 32  # vLLM's CPU attention kernel rejects 16


def test_transformers_loads_every_tensor(full):
    transformers = pytest.importorskip("transformers", minversion="5.23")
    model, info = transformers.Step3p7ForConditionalGeneration.from_pretrained(
        str(full), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    text = model.config.text_config
    assert text.mlp_layer_types == ["dense", "sparse"] and text.n_routed_experts == 4 and text.head_dim == 32
    tok = transformers.AutoTokenizer.from_pretrained(str(full))
    assert tok("w5 w7 <im_patch> <im_start>").input_ids == [5, 7, 500, 501]
    ids = tok("w5 <im_patch> w9", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # the language model runs (text only)
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_remote_config_keeps_the_release_names(full):
    pytest.importorskip("transformers")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(full), trust_remote_code=True)
    assert type(cfg).__module__.endswith(REMOTE_CONFIG_FILE[:-3])
    v, t = cfg.vision_config, cfg.text_config
    assert (v.width, v.layers, v.heads, v.use_cls_token, v.use_rope2d) == (64, 2, 2, False, True)
    assert (t.moe_num_experts, t.moe_router_activation, t.num_attention_groups, t.moe_layers_enum) == (
        4,
        "softmax",
        2,
        "1",
    )
    assert cfg.image_token_id == 500
