import json

import pytest

from step37_deploy.config import DEFAULT_TOKEN_IDS, PRESETS, Step37Config, VisionConfig, preset, read_token_ids
from step37_deploy.errors import ConfigError


def test_full_preset_is_the_release():
    v = PRESETS["full"].vision
    assert (v.width, v.layers, v.heads, v.mlp_dim, v.image_size, v.patch_size) == (1536, 47, 16, 8960, 728, 14)
    assert v.ls_init_value == 0.1 and v.hidden_act == "quick_gelu"
    assert not v.use_cls_token and v.use_ln_pre and not v.use_ln_post and v.use_abs_posemb and v.use_rope2d
    assert v.output_dim == 6144 and PRESETS["full"].projector.in_features == 6144
    assert PRESETS["full"].projector.out_features == 4096 and not PRESETS["full"].projector.bias
    assert v.num_output_tokens(728, 728) == 169 and v.num_output_tokens(504, 504) == 81


def test_release_field_names_and_misspelt_cls_alias():
    raw = {"width": 64, "layers": 2, "heads": 4, "ues_cls_token": True, "use_ln_post": True}
    v = VisionConfig.from_dict(raw)
    assert v.use_cls_token and v.use_ln_post and v.width == 64
    # an explicit use_cls_token wins over the misspelling
    assert not VisionConfig.from_dict({**raw, "use_cls_token": False}).use_cls_token
    # written back in the release spelling
    assert v.to_dict()["ues_cls_token"] is True and "use_cls_token" not in v.to_dict()


def test_transformers_field_names_accepted():
    v = VisionConfig.from_dict(
        {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "layer_scale_init_value": 0.2}
    )
    assert (v.width, v.layers, v.heads, v.ls_init_value) == (128, 3, 4, 0.2)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"width": 100, "heads": 16}, "not divisible"),
        ({"width": 48, "heads": 8}, "head_dim divisible by 4"),
        ({"image_size": 730}, "multiple of patch_size"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"use_abs_posemb": False, "use_rope2d": False}, "no position signal"),
        ({"layers": 0}, "layers must be positive"),
    ],
)
def test_unsupported_combinations(bad, words):
    with pytest.raises(ConfigError, match=words):
        VisionConfig.from_dict(bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_config_json_round_trip(tmp_path):
    cfg = PRESETS["small"]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    back = Step37Config.from_checkpoint(tmp_path)
    assert back.vision == cfg.vision and back.projector == cfg.projector
    assert back.tokens.source == "defaults" and back.tokens.im_patch == DEFAULT_TOKEN_IDS["<im_patch>"]


def test_missing_or_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Step37Config.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        Step37Config.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="vision_config"):
        Step37Config.from_checkpoint(tmp_path)


def test_token_ids_from_tokenizer_config(tmp_path):
    ids = {
        "<im_start>": 10,
        "<im_end>": 11,
        "<im_patch>": 12,
        "<patch_start>": 13,
        "<patch_end>": 14,
        "<patch_newline>": 15,
    }
    decoder = {str(i): {"content": t, "special": True} for t, i in ids.items()}
    decoder["3"] = {"content": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    tok = read_token_ids(tmp_path)
    assert tok.by_token() == ids and tok.source.endswith("tokenizer_config.json")


def test_token_ids_from_tokenizer_json(tmp_path):
    ids = {"<im_start>": 1, "<im_end>": 2, "<im_patch>": 3, "<patch_start>": 4, "<patch_end>": 5, "<patch_newline>": 6}
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"id": i, "content": t} for t, i in ids.items()]})
    )
    assert read_token_ids(tmp_path).by_token() == ids


def test_token_ids_incomplete_or_clashing(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 1, "content": "<im_start>"}]}))
    with pytest.raises(ConfigError, match="not"):
        read_token_ids(tmp_path)
    toks = ["<im_start>", "<im_end>", "<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 1, "content": t} for t in toks]}))
    with pytest.raises(ConfigError, match="same id"):
        read_token_ids(tmp_path)
