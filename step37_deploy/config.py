"""Stage 1 of the pipeline: what the checkpoint says the vision tower looks like.

The vision config is read from the ``vision_config`` block of a ``step3p7`` ``config.json`` using the
checkpoint's own (Perception-Encoder) field names: ``width``, ``layers``, ``heads``, ``mlp_ratio``,
``ls_init_value``, ``use_ln_pre`` ... including the upstream misspelling ``ues_cls_token``, which
released configs carry instead of ``use_cls_token``.  Keeping the original names means a config we
write is byte-compatible with what the release ships and what ``transformers`` reads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import read_json
from .inputs import require_file

log = logging.getLogger(__name__)

#: The special tokens of the Step-3.7 image layout, in a stable order.
SPECIAL_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>")

#: Fallback token ids, used only when a checkpoint ships no tokenizer files.  ``<im_patch>`` is
#: ``transformers``' ``Step3p7Config.image_token_id`` default; the others follow it contiguously.
#: Real deployments always read the ids from the checkpoint's tokenizer files.
DEFAULT_TOKEN_IDS = {
    "<im_patch>": 151679,
    "<im_start>": 151680,
    "<im_end>": 151681,
    "<patch_start>": 151682,
    "<patch_end>": 151683,
    "<patch_newline>": 151684,
}

#: Total spatial stride of the two 3x3/s2 downsampler convolutions.
DOWNSAMPLE_STRIDE = 4

#: The CLIP normalisation the tower was trained with: ``(x / 255 - mean) / std`` per RGB channel.
#: Host preprocessing applies it (float-input artifacts) or the graph folds it into conv1 (uint8 input).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -- defaults of the later stages, kept in this light module: the command line's --help shows them
#    and must not import torch (the stages import them from here).

#: Largest image (width x height) decoded by default: Pillow's own decompression-bomb threshold
#: (~89.5 MP, a 0.27 GB RGB buffer).  Larger images are refused with an :class:`InputError` before
#: their pixels are decoded; ``PreprocessConfig.max_pixels`` changes it (Pillow itself refuses
#: above twice its ``PIL.Image.MAX_IMAGE_PIXELS`` whatever this says).
MAX_PIXELS = 89_478_485
#: ONNX opsets we export and test.  18 is the first the dynamo exporter emits; 17 lacks nothing we
#: need but the exporter refuses it.  TensorRT 10.x/11.x and ORT >= 1.17 parse all of these.
SUPPORTED_OPSETS = (18, 19, 20, 21)
DEFAULT_OPSET = 18
#: FP16 export: seeded random CLIP-normalised views the calibration runs when no images are given.
CALIBRATION_VIEWS = 2
#: Synthetic checkpoints: decoy language-model bytes relative to the vision tower's bytes.
DECOY_RATIO = 1.25


#: Upper bounds far above any released tower (the release: width 1536, 47 layers, 16 heads, 728 px):
#: a corrupt or hostile config.json must fail here, not build a model of a billion layers.
_SANITY_LIMITS = {
    "width": 1 << 16,
    "layers": 1024,
    "heads": 1024,
    "num_channels": 16,
    "image_size": 1 << 14,
    "patch_size": 1024,
}


@dataclass(frozen=True)
class VisionConfig:
    """The Perception-Encoder trunk + downsamplers, in the checkpoint's field names."""

    width: int = 1536
    layers: int = 47
    heads: int = 16
    num_channels: int = 3
    image_size: int = 728
    patch_size: int = 14
    mlp_ratio: float = 8960 / 1536
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_cls_token: bool = False
    use_ln_pre: bool = True
    use_ln_post: bool = False
    use_abs_posemb: bool = True
    use_rope2d: bool = True
    ls_init_value: float | None = 0.1
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def mlp_dim(self) -> int:
        """Hidden width of the MLP (8960 for the release; ``int(width * mlp_ratio)`` like upstream)."""
        return int(self.width * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def posemb_grid(self) -> int:
        """Side of the trained absolute position-embedding grid (52 for 728/14)."""
        return self.image_size // self.patch_size

    @property
    def output_dim(self) -> int:
        """Channels after both downsamplers (6144 for the release)."""
        return self.width * DOWNSAMPLE_STRIDE

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input of ``height x width`` pixels (raises for non-multiples)."""
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"spatial size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def num_output_tokens(self, height: int, width: int) -> int:
        """Rows per image after both stride-2 convolutions: ceil(Gh/4) * ceil(Gw/4)."""
        gh, gw = self.grid(height, width)
        return _down(_down(gh)) * _down(_down(gw))

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []
        for name in ("width", "layers", "heads", "num_channels", "image_size", "patch_size"):
            value = int(getattr(self, name))
            if value <= 0:
                problems.append(f"{name} must be positive, got {value}")
            elif value > _SANITY_LIMITS[name]:
                problems.append(f"{name} {value} is beyond any vision tower (at most {_SANITY_LIMITS[name]})")
        if self.mlp_ratio > 64:
            problems.append(f"mlp_ratio {self.mlp_ratio} is beyond any vision tower (at most 64)")
        if self.heads > 0 and self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        elif self.use_rope2d and self.heads > 0 and self.head_dim % 4:
            problems.append(f"2-D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.patch_size > 0 and self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (quick_gelu or gelu)")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            problems.append(f"mlp_ratio must be a positive number, got {self.mlp_ratio}")
        if not self.use_abs_posemb and not self.use_rope2d:
            problems.append("use_abs_posemb and use_rope2d are both off: the tower would have no position signal")
        if problems:
            raise ConfigError("unsupported vision config: " + "; ".join(problems))

    # -- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "vision_config") -> VisionConfig:
        """Read a ``vision_config`` block (release field names; ``transformers`` names accepted too).

        Every field is type-checked (``"1536"``, ``null`` or a list for ``width`` is a
        :class:`ConfigError` naming ``source`` and the field, not a ``TypeError`` deep in the model)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must be an object, got {_json_type(raw)}")
        data = dict(raw)
        aliases = {
            "hidden_size": "width",
            "num_hidden_layers": "layers",
            "num_attention_heads": "heads",
            "layer_scale_init_value": "ls_init_value",
        }
        for alias, name in aliases.items():
            if alias in data and name not in data:
                data[name] = data.pop(alias)
        # The release spells it ``ues_cls_token``; an explicit ``use_cls_token`` wins when both exist.
        misspelt = data.pop("ues_cls_token", None)
        if data.get("use_cls_token") is None:
            data["use_cls_token"] = bool(misspelt) if misspelt is not None else False
        rope = data.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {k: _typed(f"{source}.{k}", v, known[k]) for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Release-style dict (``ues_cls_token`` spelled as the release spells it)."""
        out = asdict(self)
        out["ues_cls_token"] = out.pop("use_cls_token")
        out["model_type"] = "perception_encoder"
        return out


def _json_type(value: Any) -> str:
    """``value`` as the JSON it was read from (``null``, ``"1536"``, ``[1, 2]``), cut at 40 characters."""
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


def _typed(name: str, value: Any, annotation: str) -> Any:
    """``value`` checked against a field's annotation (``int``, ``float``, ``bool``, ``str``,
    ``X | None``); integral floats are accepted as ints, numbers are never parsed from strings."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    kind = kinds[0]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        ok = number and (isinstance(value, int) or value.is_integer())
    elif kind == "float":
        ok = number and math.isfinite(value)
    elif kind == "bool":
        ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    else:
        ok = isinstance(value, str)
    if not ok:
        what = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"{name} must be {what}, got {_json_type(value)}")
    return {"int": int, "float": float, "bool": bool, "str": str}[kind](value)


def _down(n: int) -> int:
    """Output length of a 3x3, stride-2, padding-1 convolution."""
    return (n - 1) // 2 + 1


@dataclass(frozen=True)
class ProjectorConfig:
    """``vit_large_projector``: Linear(4*width -> text hidden size), no bias in the release."""

    in_features: int = 6144
    out_features: int = 4096
    bias: bool = False


@dataclass(frozen=True)
class TokenIds:
    """Ids of the six image-layout special tokens."""

    im_start: int = DEFAULT_TOKEN_IDS["<im_start>"]
    im_end: int = DEFAULT_TOKEN_IDS["<im_end>"]
    im_patch: int = DEFAULT_TOKEN_IDS["<im_patch>"]
    patch_start: int = DEFAULT_TOKEN_IDS["<patch_start>"]
    patch_end: int = DEFAULT_TOKEN_IDS["<patch_end>"]
    patch_newline: int = DEFAULT_TOKEN_IDS["<patch_newline>"]
    source: str = "defaults"

    def by_token(self) -> dict[str, int]:
        return {tok: getattr(self, _attr(tok)) for tok in SPECIAL_TOKENS}

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any], source: str) -> TokenIds:
        kwargs = {
            _attr(tok): _token_id(mapping[tok], f"{source}: id of {tok}") for tok in SPECIAL_TOKENS if tok in mapping
        }
        return cls(**kwargs, source=source)


def _token_id(value: Any, what: str) -> int:
    """A non-negative integer token id (JSON int, or the decimal string keys of
    ``added_tokens_decoder``), else :class:`ConfigError` naming ``what``."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {_json_type(value)}")
    return value


def _attr(token: str) -> str:
    return token.strip("<>")


@dataclass(frozen=True)
class Step37Config:
    """Everything downstream stages need: vision tower, projector and token ids."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    text_hidden_size: int = 4096

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Step37Config:
        """``source`` (the file's path) names the file in every error."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must hold a JSON object, got {_json_type(raw)}")
        if "vision_config" not in raw:
            raise ConfigError(f"{source} has no 'vision_config' block; is this a step3p7 checkpoint?")
        vision = VisionConfig.from_dict(raw["vision_config"], f"{source}: vision_config")
        text = raw.get("text_config") or {}
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: text_config must be an object, got {_json_type(text)}")
        hidden_key = "text_config.hidden_size" if "hidden_size" in text else "hidden_size"
        hidden = _typed(f"{source}: {hidden_key}", text.get("hidden_size", raw.get("hidden_size", 4096)), "int")
        if hidden <= 0:
            raise ConfigError(f"{source}: {hidden_key} must be positive, got {hidden}")
        bias = _typed(f"{source}: projector_bias", raw.get("projector_bias", False), "bool")
        projector = ProjectorConfig(vision.output_dim, hidden, bias)
        return cls(vision=vision, projector=projector, text_hidden_size=hidden)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> Step37Config:
        """Read ``config.json`` and the tokenizer's special-token ids from a checkpoint folder."""
        root = Path(checkpoint_dir)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--checkpoint {root} is not a folder (give the checkpoint folder)")
        path = root / "config.json"
        require_file(path, ConfigError, "config")
        cfg = cls.from_dict(read_json(path), str(path))
        return replace(cfg, tokens=read_token_ids(root))

    def to_dict(self) -> dict[str, Any]:
        """A release-layout ``config.json`` (vision block + the fields the projector needs)."""
        return {
            "model_type": "step3p7",
            "architectures": ["Step3p7ForConditionalGeneration"],
            "vision_config": self.vision.to_dict(),
            "text_config": synthetic_text_config(self.text_hidden_size),
            "projector_bias": self.projector.bias,
            "image_token_id": self.tokens.im_patch,
        }


def synthetic_text_config(hidden: int) -> dict[str, Any]:
    """A one-layer stand-in language-model config: only ``hidden_size`` matters to this toolkit (the
    projector's output width); the rest keeps ``transformers`` able to instantiate the full
    ``Step3p7Model`` from a synthetic checkpoint cheaply, for reference checks."""
    return {
        "model_type": "step3p5",
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "vocab_size": max(1024, 8 * hidden),
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": max(2, hidden // 2),
        "intermediate_size": max(hidden, int(2.75 * hidden)),
        "moe_intermediate_size": 32,
        "n_routed_experts": 2,
        "num_experts_per_tok": 1,
        "share_expert_dim": 32,
        "mlp_layer_types": ["dense"],
    }


def read_token_ids(checkpoint_dir: str | Path) -> TokenIds:
    """Special-token ids from ``tokenizer_config.json`` (``added_tokens_decoder``) or
    ``tokenizer.json`` (``added_tokens``); documented defaults when neither file exists."""
    root = Path(checkpoint_dir)
    found: dict[str, int] = {}
    source = None
    tc = root / "tokenizer_config.json"
    if require_file(tc, ConfigError, "tokenizer config", missing_ok=True):
        decoder = read_json(tc).get("added_tokens_decoder", {}) or {}
        if not isinstance(decoder, dict):
            raise ConfigError(f"{tc}: added_tokens_decoder must be an object, got {_json_type(decoder)}")
        for idx, entry in decoder.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if isinstance(content, str) and content in SPECIAL_TOKENS:
                found[content] = _token_id(idx, f"{tc}: added_tokens_decoder key of {content}")
        source = str(tc)
    tj = root / "tokenizer.json"
    if len(found) < len(SPECIAL_TOKENS) and require_file(tj, ConfigError, "tokenizer", missing_ok=True):
        added = read_json(tj).get("added_tokens", []) or []
        if not isinstance(added, list):
            raise ConfigError(f"{tj}: added_tokens must be a list, got {_json_type(added)}")
        for entry in added:
            content = entry.get("content") if isinstance(entry, dict) else None
            if isinstance(content, str) and content in SPECIAL_TOKENS:
                found.setdefault(content, _token_id(entry.get("id"), f"{tj}: id of {content}"))
        source = str(tj)
    if not found:
        log.info("no tokenizer files with image tokens in %s; using default token ids", root)
        return TokenIds()
    missing = [t for t in SPECIAL_TOKENS if t not in found]
    if missing:
        raise ConfigError(f"{source} defines some image tokens but not {missing}")
    if len(set(found.values())) != len(found):
        raise ConfigError(f"{source} maps two image tokens to the same id: {found}")
    return TokenIds.from_mapping(found, source=source or "defaults")


#: Presets.  ``full`` is the release; ``small`` keeps the release's head_dim and the 52x52 grid with
#: fewer, narrower layers; ``tiny`` runs in seconds on a CPU (still 14-px patches and 52x52 grid so
#: the 728 and 504 code paths are the release's).
PRESETS: dict[str, Step37Config] = {
    "full": Step37Config(),
    "small": Step37Config(
        vision=VisionConfig(width=384, layers=4, heads=4, mlp_ratio=8960 / 1536),
        projector=ProjectorConfig(1536, 512, False),
        text_hidden_size=512,
    ),
    "tiny": Step37Config(
        vision=VisionConfig(width=64, layers=2, heads=4, mlp_ratio=8960 / 1536),
        projector=ProjectorConfig(256, 96, False),
        text_hidden_size=96,
    ),
    # ``tiny`` sized for ``make-checkpoint --with-language-model`` and vLLM's CPU build: its attention
    # kernel needs head_dim 32 (``tiny`` has 16), and the language model's hidden size is 64.
    "tiny-lm": Step37Config(
        vision=VisionConfig(width=64, layers=2, heads=2, mlp_ratio=8960 / 1536),
        projector=ProjectorConfig(256, 64, False),
        text_hidden_size=64,
    ),
}


def preset(name: str) -> Step37Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
