"""Activation-range calibration for the FP16 export, and the protection it decides.

Trained ViTs carry "massive activations": a few residual channels hundreds to thousands of times
the median, from an early block on, persisting through the residual stream.  The release tower
has no ``ln_post``, so that stream feeds ``vit_downsampler1`` directly; a value above 65504 is Inf
in an FP16 tensor.  Before the FP16 graph is traced, :func:`measure_ranges` runs the FP32 tower on
calibration views and records, per block, the max |x| of every tensor the FP16 graph stores in
FP16 (residual stream, attention output, MLP hidden and MLP output) and the max |x| entering each
downsampler; :func:`decide_protection` turns that into a :class:`~step37_deploy.model.PrecisionPolicy`.

The rule (``docs/fp16.md``): a tensor is *at risk* when its calibrated max |x| exceeds
``FP16_MAX / SAFETY_MARGIN`` (65504 / 8 = 8188), keeping a factor 8 (three binades) of head room
for inputs larger than the calibration set's.  At-risk residual stream -> FP32 residual for the
span of blocks from the first to the last at-risk block; at-risk downsampler input (or output) ->
exact power-of-two rescale of that convolution.  At-risk MLP hidden / attention output / MLP
output / final output cannot be protected by the export: they are logged as warnings and recorded.

Memory stays bounded like the export's: the tower is built on the meta device and each block's
weights are read from the shards just before the block runs and dropped right after; the two
downsamplers (``vit_downsampler2`` is the largest module) run in slices of output channels read
one slice at a time.  The peak is about one block plus the activations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import TensorRef, _open, iter_tensors
from .config import CALIBRATION_VIEWS, Step37Config
from .errors import InputError
from .model import PrecisionPolicy, Step37VisionModel

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
#: A tensor stored in FP16 is protected when its calibrated max |x| exceeds FP16_MAX / SAFETY_MARGIN.
SAFETY_MARGIN = 8.0
DEFAULT_VIEWS = CALIBRATION_VIEWS
DEFAULT_SEED = 1234
#: Per-block tensors the FP16 graph stores in FP16 (the residual only outside a protected span).
BLOCK_TENSORS = ("residual", "attn_out", "mlp_hidden", "mlp_out")
CALIBRATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def threshold() -> float:
    return FP16_MAX / SAFETY_MARGIN


@dataclass
class ActivationRanges:
    """Max |x| per block and at the downsamplers, from the FP32 tower on the calibration views."""

    source: str
    views: int
    resolution: int
    dtype: str = "float32"
    blocks: list[dict[str, float]] = field(default_factory=list)
    downsampler_inputs: list[float] = field(default_factory=list)
    output: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Protection:
    """What the export protects, and why (recorded as ``step37.fp16_protection``)."""

    calibrated: bool
    threshold: float
    residual_fp32_blocks: tuple[int, int] | None = None
    downsampler_scales: tuple[float, float] = (1.0, 1.0)
    reasons: list[str] = field(default_factory=list)
    unprotected: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.residual_fp32_blocks is not None or self.downsampler_scales != (1.0, 1.0)

    def apply(self, policy: PrecisionPolicy) -> PrecisionPolicy:
        """``policy`` with this protection added (a span already asked for is kept)."""
        span = policy.residual_fp32_blocks or self.residual_fp32_blocks
        return replace(policy, residual_fp32_blocks=span, downsampler_scales=self.downsampler_scales)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["residual_fp32_blocks"] = list(self.residual_fp32_blocks) if self.residual_fp32_blocks else None
        d["downsampler_scales"] = list(self.downsampler_scales)
        return d


def calibration_views(
    resolution: int, images: list[str] | None = None, views: int = DEFAULT_VIEWS, seed: int = DEFAULT_SEED
) -> tuple[np.ndarray, str]:
    """[B, 3, R, R] FP32 CLIP-normalised inputs and a description of where they came from."""
    from .compare import image_files_pixel_values, random_pixel_values

    if images:
        missing = [p for p in images if not Path(p).is_file()]
        if missing:
            raise InputError(f"--calibrate: image file(s) not found: {', '.join(map(str, missing))}")
        try:
            x = image_files_pixel_values(list(images), resolution, len(images))
        except OSError as exc:
            raise InputError(f"--calibrate: cannot read an image: {exc}") from exc
        return x, "images: " + ", ".join(Path(p).name for p in images)
    if views < 1:
        raise InputError(f"--calibration-views must be >= 1, got {views}")
    return random_pixel_values(views, resolution, seed), f"random CLIP-normalised views (seed {seed})"


def _absmax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def _streaming_hooks(refs: dict[str, TensorRef], prefix: str, dtype: torch.dtype):
    """A block's pre/post forward hooks: its weights are read from the shards just before it runs
    and dropped right after, so at most one block's weights are in memory."""

    def pre(module: torch.nn.Module, args) -> None:
        wanted = _subset(refs, lambda n: n.startswith(prefix))
        tensors = {n[len(prefix) :]: t for n, t in iter_tensors(wanted, dtype)}
        module.load_state_dict(tensors, strict=True, assign=True)

    def post(module: torch.nn.Module, args, output) -> None:
        module.to("meta")  # drop this module's weights before the next one is read
        _return_freed_memory()

    return pre, post


def _max_hook(store: dict[str, float] | list[float], key, use_input: bool = False):
    """A forward (or pre-forward, ``use_input``) hook keeping the running |max| of a module's
    output (input) in ``store[key]``."""

    def hook(module, args, output=None) -> None:
        t = args[0] if use_input else output
        store[key] = max(store[key], _absmax(t))

    return hook


def _hook_model(model, refs: dict[str, TensorRef], dtype: torch.dtype, blocks: list, ds_in: list, out: list) -> list:
    """Every hook of a calibration pass: weights streamed block by block, the downsamplers sliced,
    and the maxima recorded where the FP16 protection is decided."""
    hooks = []
    for i, block in enumerate(model.transformer.resblocks):
        pre, post = _streaming_hooks(refs, f"transformer.resblocks.{i}.", dtype)
        hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
        hooks.append(block.register_forward_hook(_max_hook(blocks[i], "residual")))
        hooks.append(block.ln_2.register_forward_pre_hook(_max_hook(blocks[i], "residual", use_input=True)))
        hooks.append(block.attn.register_forward_hook(_max_hook(blocks[i], "attn_out")))
        hooks.append(block.mlp.c_fc.register_forward_hook(_max_hook(blocks[i], "mlp_hidden")))
        hooks.append(block.mlp.register_forward_hook(_max_hook(blocks[i], "mlp_out")))
    # The downsamplers are the largest modules (vit_downsampler2: 170 M parameters in the release):
    # they run in slices of output channels, read from the shards one slice at a time.
    for k in (1, 2):
        conv = getattr(model, f"vit_downsampler{k}")
        setattr(model, f"vit_downsampler{k}", _SlicedConv(conv, refs, f"vit_downsampler{k}.", dtype))
        hooks.append(getattr(model, f"vit_downsampler{k}").register_forward_pre_hook(_max_hook(ds_in, k - 1, True)))
    hooks.append(model.vit_downsampler2.register_forward_hook(_max_hook(out, 0)))
    return hooks


def measure_ranges(
    cfg: Step37Config,
    refs: dict[str, TensorRef],
    pixel_values: np.ndarray,
    source: str = "",
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ActivationRanges:
    """Run the tower on ``pixel_values`` one module at a time, weights streamed from the shards.

    ``dtype`` FP32 by default; BF16 (FP32's exponent range, so the same maxima to within ~1%, far
    inside the safety margin) is 3.7x faster on CPUs with AMX (one full-preset block at 728: 1.3 s
    vs 4.7 s here)."""
    from tqdm import tqdm

    with torch.device("meta"):
        model = Step37VisionModel(cfg.vision)
    model.eval().requires_grad_(False).set_attention_impl("sdpa")
    stem = {n: t for n, t in iter_tensors(_subset(refs, _is_stem), dtype)}
    model.load_state_dict(stem, strict=False, assign=True)
    del stem
    blocks = [dict.fromkeys(BLOCK_TENSORS, 0.0) for _ in range(cfg.vision.layers)]
    ds_in, out = [0.0, 0.0], [0.0]
    hooks = _hook_model(model, refs, dtype, blocks, ds_in, out)
    bar = tqdm(
        total=cfg.vision.layers + 2, desc="calibrating FP16 ranges", unit="module", leave=False, disable=not progress
    )

    def tick(*_) -> None:  # a forward hook's return value would replace the module's output
        bar.update()

    for m in [*model.transformer.resblocks, model.vit_downsampler1, model.vit_downsampler2]:
        hooks.append(m.register_forward_hook(tick))
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(dtype))
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    return ActivationRanges(
        source=source,
        views=int(pixel_values.shape[0]),
        resolution=int(pixel_values.shape[-1]),
        dtype=str(dtype).removeprefix("torch."),
        blocks=[{"block": i, **b} for i, b in enumerate(blocks)],
        downsampler_inputs=ds_in,
        output=out[0],
    )


class _SlicedConv(torch.nn.Module):
    """A convolution computed in slices of output channels whose weights are read from the shards
    slice by slice (``SLICE_BYTES`` each), so its full weight is never in memory at once."""

    SLICE_BYTES = 64 << 20

    def __init__(self, conv: torch.nn.Conv2d, refs: dict[str, TensorRef], prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.stride, self.padding, self.dtype = conv.stride, conv.padding, dtype
        self.weight_ref, self.bias_ref = refs[prefix + "weight"], refs.get(prefix + "bias")

    def _rows(self, ref: TensorRef, start: int, stop: int) -> torch.Tensor:
        with _open(ref.shard) as f:
            return f.get_slice(ref.key)[start:stop].to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import checkpoint

        with _open(self.weight_ref.shard) as f:
            shape = f.get_slice(self.weight_ref.key).get_shape()
        for ref in (self.weight_ref, self.bias_ref):
            if ref is not None and checkpoint._read_hook is not None:
                checkpoint._read_hook(ref.key)
        step = max(1, self.SLICE_BYTES // (math.prod(shape[1:]) * 4))
        outs = []
        for a in range(0, shape[0], step):
            b = min(shape[0], a + step)
            bias = self._rows(self.bias_ref, a, b) if self.bias_ref is not None else None
            outs.append(F.conv2d(x, self._rows(self.weight_ref, a, b), bias, self.stride, self.padding))
            _return_freed_memory()
        return torch.cat(outs, dim=1)  # [B, C_out, H', W']


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``).  Weights and activations of
    1-32 MB land on glibc's heap once its mmap threshold has grown, and without a trim the freed
    blocks pile up: +30 MB of RSS per full-preset block measured, 2.7 GB after 47 blocks instead of
    0.8 GB.  A no-op where there is no glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _is_stem(name: str) -> bool:
    return not name.startswith(("transformer.resblocks.", "vit_downsampler"))


def _subset(refs: dict[str, TensorRef], keep) -> dict[str, TensorRef]:
    return {n: r for n, r in refs.items() if keep(n)}


def _pow2_at_least(ratio: float) -> float:
    return float(2 ** max(0, math.ceil(math.log2(ratio)))) if ratio > 1 else 1.0


def decide_protection(ranges: ActivationRanges) -> Protection:
    """The rule in the module docstring, with the reason for every decision."""
    thr = threshold()
    p = Protection(calibrated=True, threshold=thr)
    hot = [b["block"] for b in ranges.blocks if b["residual"] > thr]
    if hot:
        first, last = min(hot), max(hot)
        p.residual_fp32_blocks = (first, last + 1)
        peak = max(ranges.blocks[i]["residual"] for i in hot)
        p.reasons.append(
            f"residual stream max |x| {peak:.4g} > {thr:.0f} (FP16 max / {SAFETY_MARGIN:g}) in blocks "
            f"{', '.join(map(str, hot))}: FP32 residual for blocks {first}..{last}"
        )
    ds1_in, ds2_in = ranges.downsampler_inputs
    scales = [1.0, 1.0]
    if max(ds1_in, ds2_in) > thr:
        # ds1's FP16 output is conv(x)/s1 = ds2's input / s1: both must fit.
        scales[0] = _pow2_at_least(max(ds1_in, ds2_in) / thr)
        p.reasons.append(
            f"vit_downsampler1 input max |x| {ds1_in:.4g}, output {ds2_in:.4g}: input divided by {scales[0]:g} "
            "before its FP16 convolution (bias too), output multiplied back in FP32"
        )
    if ds2_in > thr:
        scales[1] = _pow2_at_least(max(ds2_in, ranges.output) / thr)
        p.reasons.append(
            f"vit_downsampler2 input max |x| {ds2_in:.4g}: input divided by {scales[1]:g} before its FP16 "
            "convolution (bias too), output multiplied back in FP32"
        )
    p.downsampler_scales = (scales[0], scales[1])
    for b in ranges.blocks:
        for key in ("attn_out", "mlp_hidden", "mlp_out"):
            if b[key] > thr:
                p.unprotected.append(f"block {b['block']} {key} max |x| {b[key]:.4g}")
    if ranges.output > thr:
        p.unprotected.append(f"image_features max |x| {ranges.output:.4g} (the FP16 output itself)")
    return p


def calibrate_for_export(
    cfg: Step37Config,
    refs: dict[str, TensorRef],
    resolution: int,
    enabled: bool = True,
    images: list[str] | None = None,
    views: int = DEFAULT_VIEWS,
    progress: bool = False,
    dtype: str = "fp32",
) -> tuple[Protection, ActivationRanges | None]:
    """Measure, decide and log: what an FP16 export calls before tracing."""
    if not enabled:
        p = Protection(calibrated=False, threshold=threshold())
        log_protection(p)
        return p, None
    x, source = calibration_views(resolution, images, views)
    started = time.perf_counter()
    if dtype not in CALIBRATION_DTYPES:
        raise InputError(f"calibration dtype must be one of {sorted(CALIBRATION_DTYPES)}, got {dtype!r}")
    ranges = measure_ranges(cfg, refs, x, source, progress, CALIBRATION_DTYPES[dtype])
    log.info("calibrated FP16 ranges on %d view(s) in %.1fs", ranges.views, time.perf_counter() - started)
    p = decide_protection(ranges)
    log_protection(p)
    return p, ranges


def log_protection(p: Protection) -> None:
    if not p.calibrated:
        log.warning(
            "FP16 export without activation-range calibration (--no-calibrate): a residual channel above "
            "65504 would be Inf in this graph; check it with step37-deploy compare --per-block"
        )
        return
    for reason in p.reasons:
        log.info("FP16 protection: %s", reason)
    if not p.active:
        log.info(
            "FP16 calibration: every FP16 tensor within %.0f (FP16 max / %g): graph unchanged",
            p.threshold,
            SAFETY_MARGIN,
        )
    for what in p.unprotected:
        log.warning(
            "FP16 calibration: %s exceeds %.0f and is not protected by the FP16 graph; "
            "export FP32 or check with step37-deploy compare --per-block",
            what,
            p.threshold,
        )
