"""Stage 3: the Step-3.7 vision tower in PyTorch (Perception-Encoder G/14 trunk + downsamplers).

Written in the style of timm's ``vision_transformer.py``: small modules, shapes at the turns, and
parameter names that *are* the checkpoint's names (``vision_model.`` prefix stripped), so a state
dict read from the safetensors shards loads with ``strict=True`` and no renaming table.

Two things differ from a textbook ViT and are easy to get wrong:

* RoPE is 2-D and *interleaved* (adjacent channel pairs rotate together, as in
  ``rotary_embedding_torch``): the first ``head_dim/2`` channels of each head rotate with the
  column (x) coordinate, the second half with the row (y) coordinate, each with ``head_dim/4``
  frequencies ``theta ** (-4i/head_dim)``.  ``transformers`` permutes q/k weights to use
  ``rotate_half`` instead; we keep the checkpoint's layout and rotate pairs.
* The absolute position embedding is trained on a 52x52 grid and is bilinearly resampled
  (``align_corners=False``) for other grids, while RoPE uses the raw grid coordinates.

The numerically fragile parts (LayerNorm statistics, softmax, RoPE trig) run in FP32 whatever the
weights' dtype, controlled by :class:`PrecisionPolicy`; with FP32 weights these casts are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIP_MEAN, CLIP_STD, ProjectorConfig, VisionConfig
from .errors import InputError


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which parts of the tower compute in FP32 when the weights are FP16/BF16.

    The defaults were chosen by measurement (``docs/fp16.md``): LayerNorm statistics, softmax and
    the RoPE rotation in FP32; the residual stream stays in the weights' dtype.  Two fields
    are set by the export's activation-range calibration (``step37_deploy.calibrate``) where
    a tensor would leave the FP16 range: ``residual_fp32_blocks`` keeps the residual stream in FP32
    for blocks ``[start, stop)`` only (the span where a massive channel lives), and
    ``downsampler_scales`` divides each downsampler's input by a power of two before its FP16
    convolution and multiplies the output back in FP32 (bias divided too: exact up to rounding).
    """

    layernorm_fp32: bool = True
    softmax_fp32: bool = True
    rope_fp32: bool = True
    residual_fp32: bool = False
    residual_fp32_blocks: tuple[int, int] | None = None
    downsampler_scales: tuple[float, float] = (1.0, 1.0)
    #: uint8-input graphs: conv1 with the folded CLIP normalisation, and its constant, in FP32.
    input_fold_fp32: bool = True


#: The variants measured in docs/fp16.md (``scripts/gpu_bench.py``, ``scripts/fp16_policy_onnx.py``).
PRECISION_POLICIES = {
    "default: LN + softmax + RoPE FP32": PrecisionPolicy(),
    "default + FP32 residual stream": PrecisionPolicy(residual_fp32=True),
    "LayerNorm FP16": PrecisionPolicy(layernorm_fp32=False),
    "softmax FP16": PrecisionPolicy(softmax_fp32=False),
    "RoPE FP16": PrecisionPolicy(rope_fp32=False),
    "all FP16": PrecisionPolicy(False, False, False, False, input_fold_fp32=False),
}


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in FP32 when asked (``weight``/``bias`` names kept)."""

    fp32: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 or x.dtype == torch.float32:
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class LayerScale(nn.Module):
    """Per-channel residual scale; the parameter is called ``gamma`` in the checkpoint."""

    def __init__(self, dim: int, init_value: float = 0.1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """``c_fc`` (width -> mlp_dim) -> QuickGELU -> ``c_proj`` (mlp_dim -> width)."""

    def __init__(self, width: int, hidden: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


def rope_2d_angles(
    grid_h: int, grid_w: int, head_dim: int, theta: float, cls_token: bool, device: torch.device | None = None
) -> torch.Tensor:
    """Rotation angle per token and channel pair, [N(+1), head_dim/2], FP32.

    Pair ``j < head_dim/4`` rotates with the column index, the rest with the row index.  With a CLS
    token every patch coordinate is shifted by one and the CLS row gets angle 0 (no rotation).
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, device=device, dtype=torch.float32) * 4.0 / head_dim))
    offset = 1.0 if cls_token else 0.0
    rows = torch.arange(grid_h, device=device, dtype=torch.float32) + offset
    cols = torch.arange(grid_w, device=device, dtype=torch.float32) + offset
    ang_x = (cols[:, None] * inv_freq)[None, :, :].expand(grid_h, grid_w, quarter)  # [Gh, Gw, D/4]
    ang_y = (rows[:, None] * inv_freq)[:, None, :].expand(grid_h, grid_w, quarter)  # [Gh, Gw, D/4]
    angles = torch.cat([ang_x, ang_y], dim=-1).reshape(grid_h * grid_w, 2 * quarter)  # [N, D/2]
    if cls_token:
        angles = torch.cat([angles.new_zeros(1, 2 * quarter), angles], dim=0)
    return angles


def rope_tables(
    cfg: VisionConfig, grid_h: int, grid_w: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of :func:`rope_2d_angles` for a config's head_dim, theta and CLS setting."""
    angles = rope_2d_angles(grid_h, grid_w, cfg.head_dim, cfg.rope_theta, cfg.use_cls_token, device)
    return angles.cos(), angles.sin()


def resample_posemb(pos: torch.Tensor, cfg: VisionConfig, grid_h: int, grid_w: int) -> torch.Tensor:
    """The trained [G*G(+1), C] table for another grid, [1, N(+1), C], in ``pos``' dtype.

    Used as is for the trained grid, else resampled bilinearly (``align_corners=False``, the
    upstream choice; SigLIP uses bicubic) in FP32; a CLS row is kept out of the resampling.
    """
    g = cfg.posemb_grid
    if grid_h == g and grid_w == g:
        return pos[None]
    cls_pos = None
    if cfg.use_cls_token:
        cls_pos, pos = pos[:1], pos[1:]
    table = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, C, G, G]
    table = F.interpolate(table.float(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    out = table.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # [N, C]
    if cls_pos is not None:
        out = torch.cat([cls_pos, out], dim=0)
    return out[None]


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, H, N, D] by angles whose cos/sin are [N, D/2]."""
    x1 = x[..., 0::2]  # [B, H, N, D/2]
    x2 = x[..., 1::2]
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    return torch.stack([out1, out2], dim=-1).flatten(-2)  # [B, H, N, D]


def fold_normalisation(conv_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1's weight and a per-output-channel constant for uint8 pixels, in FP32 (folded in FP64).

    conv1 is linear and has no bias, so ``conv1((x / 255 - mean) / std)`` equals
    ``conv(x, W / (255 * std_c)) + b`` with ``b_o = -sum_{c,i,j} W[o, c, i, j] * mean_c / std_c``.
    The square padding is black in uint8 space, before normalisation, so the fold is exact.
    """
    w = conv_weight.detach().double()  # [C, 3, p, p]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64, device=w.device).view(1, -1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64, device=w.device).view(1, -1, 1, 1)
    return (w / (255.0 * std)).float(), -(w * (mean / std)).sum((1, 2, 3)).float()


class InputFold(nn.Module):
    """uint8 pixels [B, 3, H, W] -> patch embeddings [B, C, Gh, Gw]: conv1 with the CLIP
    normalisation folded in (:func:`fold_normalisation`), so the host sends raw pixels.

    ``weight``/``bias`` are buffers outside the state dict (the checkpoint holds conv1's weight);
    with ``fp32`` they stay FP32 and the convolution and constant run in FP32 whatever the tower's
    dtype (the unfolded sum is not centred: FP16 would lose the cancellation against the constant).
    """

    def __init__(self, conv1: nn.Conv2d, fp32: bool = True) -> None:
        super().__init__()
        self.stride = conv1.stride
        dtype = torch.float32 if fp32 else conv1.weight.dtype
        if conv1.weight.is_meta:  # export: the values come from the checkpoint, one tensor at a time
            weight = torch.empty(conv1.weight.shape, dtype=dtype, device="meta")
            bias = torch.empty(conv1.weight.shape[0], dtype=dtype, device="meta")
        else:
            weight, bias = fold_normalisation(conv1.weight)
        self.register_buffer("weight", weight.to(dtype), persistent=False)
        self.register_buffer("bias", bias.to(dtype), persistent=False)

    def forward(self, pixel_values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x = F.conv2d(pixel_values.to(self.weight.dtype), self.weight, stride=self.stride)  # [B, C, Gh, Gw]
        return (x + self.bias[:, None, None]).to(out_dtype)


class Attention(nn.Module):
    """Fused-qkv self-attention (``in_proj_weight``/``in_proj_bias``, ``out_proj``) with 2-D RoPE."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        #: "sdpa" uses the fused kernel (eager serving); "explicit" spells out MatMul-Softmax-MatMul,
        #: the pattern TensorRT's MHA fusion matches, and lets the softmax run in FP32.
        self.impl = "sdpa"
        self.policy = PrecisionPolicy()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3C]
        qkv = qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            cos, sin = rope
            if self.policy.rope_fp32:
                q = apply_rope_interleaved(q.float(), cos, sin).to(v.dtype)
                k = apply_rope_interleaved(k.float(), cos, sin).to(v.dtype)
            else:
                q = apply_rope_interleaved(q, cos.to(q.dtype), sin.to(q.dtype))
                k = apply_rope_interleaved(k, cos.to(k.dtype), sin.to(k.dtype))
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]
        else:
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2))  # [B, H, N, N]
            if self.policy.softmax_fp32:
                probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            else:
                probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(probs, v)  # [B, H, N, D]
        out = out.transpose(1, 2).reshape(b, n, c)  # [B, N, C]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x)))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls_1 = LayerScale(cfg.width, cfg.ls_init_value) if cfg.ls_init_value is not None else nn.Identity()
        self.ln_2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.hidden_act)
        self.ls_2 = LayerScale(cfg.width, cfg.ls_init_value) if cfg.ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        compute = self.attn.out_proj.weight.dtype
        x = x + _scaled_branch(self.ls_1, self.attn(self.ln_1(x).to(compute), rope), x.dtype)
        x = x + _scaled_branch(self.ls_2, self.mlp(self.ln_2(x).to(compute)), x.dtype)
        return x


def _scaled_branch(ls: nn.Module, branch: torch.Tensor, residual_dtype: torch.dtype) -> torch.Tensor:
    """LayerScale of a branch in the residual stream's dtype when that is FP32: a large LayerScale
    gamma is how a massive channel enters the stream, and gamma * branch can leave FP16's range."""
    if residual_dtype == torch.float32 and branch.dtype != torch.float32:
        return ls(branch.float())
    return ls(branch).to(residual_dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])
        #: Blocks [start, stop) whose residual stream is FP32 (``PrecisionPolicy.residual_fp32_blocks``).
        self.residual_fp32_blocks: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        span, dtype = self.residual_fp32_blocks, x.dtype
        for i, block in enumerate(self.resblocks):
            if span is not None and i == span[0]:
                x = x.float()  # [B, N, C] FP32 through the span
            x = block(x, rope)
            if span is not None and i == span[1] - 1 and span[1] < len(self.resblocks):
                x = x.to(dtype)  # back to the stream's dtype after the span (kept FP32 if it runs to the end)
        return x


class Step37VisionModel(nn.Module):
    """pixel_values [B, 3, H, W] -> image features [B, ceil(Gh/4)*ceil(Gw/4), 4*width].

    728x728 -> [B, 169, 6144]; 504x504 -> [B, 81, 6144] for the release config.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.num_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w**-0.5
        if cfg.use_cls_token:
            self.class_embedding = nn.Parameter(scale * torch.randn(w))
        if cfg.use_abs_posemb:
            n_pos = cfg.posemb_grid**2 + int(cfg.use_cls_token)
            self.positional_embedding = nn.Parameter(scale * torch.randn(n_pos, w))
        self.ln_pre = LayerNorm(w, eps=cfg.layer_norm_eps) if cfg.use_ln_pre else nn.Identity()
        self.transformer = Transformer(cfg)
        self.ln_post = LayerNorm(w, eps=cfg.layer_norm_eps) if cfg.use_ln_post else nn.Identity()
        self.vit_downsampler1 = nn.Conv2d(w, 2 * w, kernel_size=3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * w, 4 * w, kernel_size=3, stride=2, padding=1)
        self._policy = PrecisionPolicy()
        self.input_fold: InputFold | None = None

    # -- configuration of numerics / export form ------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def set_precision_policy(self, policy: PrecisionPolicy) -> Step37VisionModel:
        self._policy = policy
        for m in self.modules():
            if isinstance(m, LayerNorm):
                m.fp32 = policy.layernorm_fp32
            elif isinstance(m, Attention):
                m.policy = policy
            elif isinstance(m, Transformer):
                m.residual_fp32_blocks = tuple(policy.residual_fp32_blocks) if policy.residual_fp32_blocks else None
        return self

    @property
    def input_dtype(self) -> torch.dtype:
        """What ``pixel_values`` must be: uint8 pixels with :meth:`set_uint8_input`, else floats."""
        return torch.uint8 if self.input_fold is not None else self.dtype

    def set_uint8_input(self, enabled: bool = True) -> Step37VisionModel:
        """Take raw uint8 pixels (0..255, RGB, resized/padded views before normalisation) and apply
        the CLIP normalisation inside the model, folded into conv1 (:class:`InputFold`).  Call it
        after the dtype and precision policy are set."""
        self.input_fold = InputFold(self.conv1, self._policy.input_fold_fp32) if enabled else None
        return self

    def set_attention_impl(self, impl: str) -> Step37VisionModel:
        if impl not in ("sdpa", "explicit"):
            raise ValueError(f"attention impl must be 'sdpa' or 'explicit', got {impl!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = impl
        return self

    # -- position signals -----------------------------------------------------------------------
    def sample_abs_posemb(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Absolute position embedding for a ``grid_h x grid_w`` grid, [1, N(+1), width]."""
        return resample_posemb(self.positional_embedding, self.config, grid_h, grid_w)

    def rope_tables(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N(+1), head_dim/2] in FP32 for the grid (raw grid coordinates)."""
        return rope_tables(self.config, grid_h, grid_w, device)

    def freeze_grid(self, grid_h: int, grid_w: int) -> Step37VisionModel:
        """Resolve the position signals of one grid into buffers ``grid_posemb``,
        ``grid_rope_cos`` and ``grid_rope_sin``.

        Used for export, where each ONNX file has one spatial size: the graph then carries the
        resampled table and the RoPE tables as constants instead of a Resize and trig ops.
        """
        cfg = self.config
        device = self.conv1.weight.device
        if cfg.use_abs_posemb:
            self.register_buffer(
                "grid_posemb", self.sample_abs_posemb(grid_h, grid_w).detach().to(self.dtype), persistent=False
            )
        if cfg.use_rope2d:
            cos, sin = self.rope_tables(grid_h, grid_w, device)
            dt = torch.float32 if self._policy.rope_fp32 else self.dtype
            self.register_buffer("grid_rope_cos", cos.to(dt), persistent=False)
            self.register_buffer("grid_rope_sin", sin.to(dt), persistent=False)
        self._frozen_grid = (grid_h, grid_w)
        return self

    # -- forward --------------------------------------------------------------------------------
    def check_input(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Validate ``pixel_values`` and return the patch grid; raises :class:`InputError`."""
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise InputError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise InputError(
                f"pixel_values must be [B, {cfg.num_channels}, H, W], got shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != cfg.num_channels:
            raise InputError(
                f"pixel_values must have {cfg.num_channels} channels, got {pixel_values.shape[1]} "
                f"(shape {tuple(pixel_values.shape)})"
            )
        if self.input_fold is not None:
            if pixel_values.dtype != torch.uint8:
                raise InputError(f"this model takes uint8 pixels (0..255), got {pixel_values.dtype}")
        elif not pixel_values.is_floating_point():
            raise InputError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        h, w = int(pixel_values.shape[2]), int(pixel_values.shape[3])
        if h % cfg.patch_size or w % cfg.patch_size or h == 0 or w == 0:
            raise InputError(f"spatial size {h}x{w} is not a positive multiple of the patch size {cfg.patch_size}")
        return h // cfg.patch_size, w // cfg.patch_size

    def forward_trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patchify + position + blocks (+ ln_post); returns patch tokens [B, Gh*Gw, width]."""
        cfg = self.config
        grid_h, grid_w = self.check_input(pixel_values)
        if self.input_fold is not None:
            x = self.input_fold(pixel_values, self.dtype)  # [B, C, Gh, Gw]
        else:
            x = self.conv1(pixel_values.to(self.dtype))  # [B, C, Gh, Gw]
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        if cfg.use_cls_token:
            cls = self.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # [B, 1+N, C]
        frozen = getattr(self, "_frozen_grid", None) == (grid_h, grid_w)
        if cfg.use_abs_posemb:
            pos = self.grid_posemb if frozen else self.sample_abs_posemb(grid_h, grid_w)
            x = x + pos.to(x.dtype)
        x = self.ln_pre(x)
        if self._policy.residual_fp32:
            x = x.float()
        rope = None
        if cfg.use_rope2d:
            rope = (self.grid_rope_cos, self.grid_rope_sin) if frozen else self.rope_tables(grid_h, grid_w, x.device)
        x = self.transformer(x, rope)
        x = self.ln_post(x)
        if self._policy.downsampler_scales[0] == 1.0:
            x = x.to(self.dtype)  # (a rescaled downsampler takes the FP32 stream as is)
        if cfg.use_cls_token:
            x = x[:, 1:]
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = self.check_input(pixel_values)
        x = self.forward_trunk(pixel_values)  # [B, Gh*Gw, C]
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, grid_h, grid_w)  # [B, C, Gh, Gw]
        s1, s2 = self._policy.downsampler_scales
        x = self._downsample(self.vit_downsampler1, x, s1)  # [B, 2C, ceil(Gh/2), ceil(Gw/2)]
        if s2 == 1.0:
            x = x.to(self.dtype)
        x = self._downsample(self.vit_downsampler2, x, s2)  # [B, 4C, ceil(Gh/4), ceil(Gw/4)]
        return x.flatten(2).transpose(1, 2).to(self.dtype)  # [B, P', 4C]

    def _downsample(self, conv: nn.Conv2d, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``conv(x)``; with ``scale != 1`` computed as ``scale * conv(x / scale, W, b / scale)``: the
        FP16 convolution sees an input (and produces an output) ``scale`` times smaller, and the
        result is restored in FP32.  Exact in real arithmetic (a convolution is linear) and, with
        ``scale`` a power of two, exact in floating point too unless a value underflows."""
        if scale == 1.0:
            return conv(x)
        bias = (conv.bias.float() / scale).to(self.dtype) if conv.bias is not None else None
        y = F.conv2d((x.float() / scale).to(self.dtype), conv.weight, bias, conv.stride, conv.padding)
        return y.float() * scale


class Step37Projector(nn.Linear):
    """``vit_large_projector``: [*, 4*width] -> [*, text hidden]; a plain Linear (no bias in the release)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__(cfg.in_features, cfg.out_features, bias=cfg.bias)
        self.config = cfg
