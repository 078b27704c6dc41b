"""Preprocessing: an image -> the 728x728 global view, the 504x504 local crops, and the token layout.

Plans crops exactly as ``transformers``' ``Step3p7ImageProcessor`` does (``tests`` check it on 30+
sizes through recorded fixtures) with numpy and Pillow only, so a serving process needs no
torchvision:

1. *Normalise*: near-degenerate images (min side < 32 px and aspect > 4:1) are zero-padded to a
   square (original top-left); images whose long side exceeds ``max_image_size`` (3024) are scaled
   down uniformly (``int()`` truncation, like upstream).
2. *Window*: an image that fits the global view (long side <= 728) gets crops only when elongated
   (aspect > 1.5), with the short side as window; a very elongated large image (aspect > 4) uses
   ``min(short side, 504)``; every other large image uses 504.
3. *Snap*: each side snaps to a multiple of the window, up when the remainder exceeds 20 % of it.

The global view is the (padded) image resized to the normalised size and then to 728x728 (for
large images whose horizontal pass is shared with the crops, the second horizontal pass runs
before the first vertical one: within one level, see ``_global_image``); crops are tiles of the
image resized to the snapped size, row-major, each resized to 504x504.  All
resizes are bilinear with antialiasing (Pillow's BILINEAR, which torchvision's antialiased bilinear
reproduces).  Pixels are scaled to [0, 1] and normalised with the CLIP mean/std.

The token layout is ``Step3p7Processor``'s: per crop ``<patch_start>`` + 81 x ``<im_patch>`` +
``<patch_end>``, plus ``<patch_newline>`` after the last crop of every row but the last; then
``<im_start>`` + 169 x ``<im_patch>`` + ``<im_end>``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import config
from .config import DOWNSAMPLE_STRIDE, MAX_PIXELS, TokenIds
from .errors import InputError

log = logging.getLogger(__name__)

#: Version of what :func:`preprocess` makes of an image: bump it whenever the pixels it gives change,
#: so that stored features (the corpus job's fingerprint) are not reused across the change.
PREPROCESS_VERSION = 1

CLIP_MEAN = np.array(config.CLIP_MEAN, dtype=np.float32)
CLIP_STD = np.array(config.CLIP_STD, dtype=np.float32)


@dataclass(frozen=True)
class PatchPlan:
    """The crop layout of one image (``Step3p7ImageProcessor._plan_patches``'s result)."""

    global_size: tuple[int, int]  # (width, height) the global view is resized to before 728x728
    crop_size: tuple[int, int]  # (width, height) the image is resized to before tiling
    window: int  # tile side; 0 = no crops
    num_x: int
    num_y: int
    square_pad: bool

    @property
    def num_crops(self) -> int:
        return self.num_x * self.num_y if self.window else 0

    def newline_mask(self) -> list[bool]:
        """True after the last crop of each row except the final row."""
        if not self.window:
            return []
        return [c == self.num_x - 1 and r < self.num_y - 1 for r in range(self.num_y) for c in range(self.num_x)]


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 728
    patch_size: int = 504
    max_image_size: int = 3024
    vision_patch: int = 14
    max_pixels: int = MAX_PIXELS  # decompression-bomb limit for image files/bytes (width x height)
    #: Threads per image: 2 makes the crops (resize, tiling, normalisation) and the global view
    #: overlap (Pillow and numpy release the GIL), which lowers one image's latency on an idle
    #: machine but not the throughput of a loaded one (the service scales with instances, not this).
    #: 1 (or less): everything on the calling thread.
    threads: int = 1

    @property
    def image_tokens(self) -> int:
        return (self.image_size // (self.vision_patch * DOWNSAMPLE_STRIDE)) ** 2

    @property
    def patch_tokens(self) -> int:
        return (self.patch_size // (self.vision_patch * DOWNSAMPLE_STRIDE)) ** 2

    @property
    def max_crops(self) -> int:
        """The most crops the crop rule gives an image it does not pad: a ``PAD_BELOW`` px wide strip
        as long as ``max_image_size`` (95 at the defaults).  Only images that the downscale step
        thins below ``PAD_BELOW`` px (e.g. 100x20000 -> 15x3024: 202 crops of 15 px) get more;
        :func:`check_image_size` refuses those."""
        return plan_patches(PAD_BELOW, self.max_image_size, self).num_crops


#: The crop rule zero-pads an image to a square when its short side is under this (and its aspect > 4).
PAD_BELOW = 32
DEFAULT_PREPROCESS = PreprocessConfig()


def plan_patches(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> PatchPlan:
    if width <= 0 or height <= 0:
        raise InputError(f"image has zero size ({width}x{height})")
    w0, h0 = width, height
    square_pad = min(width, height) < PAD_BELOW and max(width / height, height / width) > 4
    if square_pad:
        width = height = max(width, height)
    if max(width, height) > cfg.max_image_size:
        scale = cfg.max_image_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    short, long = min(width, height), max(width, height)
    if short < 1:  # the crop rule has no view of it (upstream divides by zero here)
        raise InputError(
            f"image {w0}x{h0} has aspect ratio {max(w0, h0) / min(w0, h0):.0f}:1: scaled to a long side of "
            f"{cfg.max_image_size} its short side is 0 px, which the crop rule cannot use"
        )
    if long <= cfg.image_size:
        window = short if long / short > 1.5 else 0
    elif long / short > 4:
        window = min(short, cfg.patch_size)
    else:
        window = cfg.patch_size
    if window == 0:
        return PatchPlan((width, height), (width, height), 0, 0, 0, square_pad)

    def snap(d: int) -> int:
        return window * (d // window + (d % window > 0.2 * window)) if d >= window else d

    cw, ch = snap(width), snap(height)
    return PatchPlan((width, height), (cw, ch), window, max(1, cw // window), max(1, ch // window), square_pad)


def check_image_size(
    width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS, name: str = "image"
) -> PatchPlan:
    """The crop plan of a ``width`` x ``height`` image, or :class:`InputError` (one line naming
    ``name`` and the numbers) for an image the crop rule cannot use or whose views would take more
    memory than an image at the pixel limit.  Called with the header's size, before any pixel is
    decoded, by :func:`preprocess` (so ``embed``, the service's embedder model and corpus jobs all
    apply the same rule), and again on decoded arrays and PIL images.

    Why these bounds, from the rule (see the module docstring):

    * ``width x height <= max_pixels``: the decompression-bomb limit on the decoded image.
    * The square pad: an image under ``PAD_BELOW`` px on its short side with aspect > 4 is
      zero-padded to a ``long x long`` square *before* it is scaled down, so a 70 KB 1x20000 PNG
      becomes a 400 M pixel (1.2 GB) image.  The padded square must fit ``max_pixels`` too, so no
      image takes more memory than one at the pixel limit.
    * The downscale: a long side over ``max_image_size`` is scaled to it, truncating the short side;
      where that gives 0 px (40x2000000) there is no view to cut (:func:`plan_patches` refuses it).
    * The crop count: a thin image the downscale leaves under ``PAD_BELOW`` px is cut into tiles as
      wide as it is (100x20000 -> 202 tiles of 15 px, each resized to the patch size).  Nothing the
      rule pads gets more than :attr:`PreprocessConfig.max_crops` crops, so neither may this; with
      it the views of one image are bounded (95 crops x 3 x 504 x 504, FP32: 290 MB at most)."""
    if width <= 0 or height <= 0:
        raise InputError(f"image {name} has zero size ({width}x{height})")
    pixels = width * height
    if pixels > cfg.max_pixels:
        raise InputError(
            f"image {name} is {width}x{height} = {pixels} pixels, over the limit of {cfg.max_pixels} "
            "(a decompression bomb, or raise PreprocessConfig.max_pixels)"
        )
    side = max(width, height)
    if min(width, height) < PAD_BELOW and side > 4 * min(width, height) and side * side > cfg.max_pixels:
        raise InputError(
            f"image {name} is {width}x{height} (aspect {side / min(width, height):.0f}:1): the crop rule pads it to "
            f"a {side}x{side} square = {side * side} pixels, over the limit of {cfg.max_pixels}"
        )
    try:
        plan = plan_patches(width, height, cfg)
    except InputError as exc:
        if name == "image":
            raise
        raise InputError(f"{name}: {exc}") from None
    if plan.num_crops > cfg.max_crops:
        raise InputError(
            f"image {name} is {width}x{height} (aspect {side / min(width, height):.0f}:1): the crop rule cuts it "
            f"into {plan.num_crops} crops of {plan.window} px, over the limit of {cfg.max_crops}"
        )
    return plan


# -- image loading ------------------------------------------------------------------------------------


def to_rgb(image: Any, max_pixels: int = MAX_PIXELS, cfg: PreprocessConfig | None = None) -> Any:
    """A PIL RGB image from a path, bytes, PIL image or uint8 array, converted like the reference:
    transparency (alpha band, or a palette/LA/PA ``transparency`` entry) is composited onto white;
    grayscale, palette, CMYK and the rest go through Pillow's ``convert("RGB")``.

    Files and bytes are read like ``transformers.image_utils.load_image``: the EXIF orientation is
    applied (``ImageOps.exif_transpose``), so a portrait photo stored sideways is planned and cut
    upright.  Images over ``max_pixels`` are refused before decoding (:class:`InputError` with
    both numbers); with ``cfg`` (whose ``max_pixels`` then applies) every bound of
    :func:`check_image_size` is checked on the header.  Animated images (GIF, APNG, WebP) give
    their first frame, with a log line.

    Where this deliberately differs from the reference: 16-bit images (Pillow modes ``I;16*`` and
    ``I``, e.g. 16-bit grayscale PNGs) are scaled to 8 bits (``v * 255 / 65535``, rounded).
    ``load_image``'s ``convert("RGB")`` clips them to 0..255, so almost every pixel of a 16-bit
    image becomes white; feeding the model that is never what a caller means.  (Float images,
    mode ``F``, have no fixed range and go through ``convert("RGB")`` like the reference.)"""
    from PIL import Image

    if isinstance(image, (str, Path, bytes)):
        image = _open_image(image, max_pixels, cfg)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a path, bytes, PIL image or uint8 array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise InputError(f"image has zero size ({image.width}x{image.height})")
    if image.mode == "RGB":
        return image
    try:
        if image.mode == "I" or image.mode.startswith("I;16"):
            image = _to_8bit(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:  # e.g. "conversion from La to L not supported"
        raise InputError(f"image of mode {image.mode} cannot be converted to RGB: {exc}") from None


def _open_image(src: str | Path | bytes, max_pixels: int, cfg: PreprocessConfig | None = None) -> Any:
    """Decode a file or bytes: size checked before the pixels are decoded (with ``cfg``: every
    bound of :func:`check_image_size`), EXIF orientation applied, first frame of an animation."""
    from PIL import Image, ImageOps

    name = "<bytes>" if isinstance(src, bytes) else str(src)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if cfg is not None:
                check_image_size(im.width, im.height, cfg, name)
            elif im.width * im.height > max_pixels:
                raise InputError(
                    f"image {name} is {im.width}x{im.height} = {im.width * im.height} pixels, over the limit of "
                    f"{max_pixels} (a decompression bomb, or raise PreprocessConfig.max_pixels)"
                )
            if getattr(im, "is_animated", False):  # checks for a 2nd frame; n_frames would scan them all
                log.info("image %s is animated: using its first frame only", name)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # upright, orientation tag removed; no 12 MP copy
            return im
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's hard limit (2 x MAX_IMAGE_PIXELS) hit inside open()
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)) or max_pixels
        raise InputError(f"image {name} is {size}, over the limit of {limit} (a decompression bomb)") from None
    except Exception as exc:  # a decoder fed untrusted bytes fails in many ways (EOFError, struct.error...)
        raise InputError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from exc


def _to_8bit(image: Any) -> Any:
    """16-bit grayscale (``I;16*``, or ``I`` as older Pillow opens 16-bit PNGs) -> ``L`` by
    scaling 0..65535 to 0..255, not clipping."""
    from PIL import Image

    arr = np.asarray(image)
    scaled = np.clip(arr.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    out = Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    if image.info.get("transparency") is not None:  # a 16-bit grayscale PNG's tRNS value
        t = image.info["transparency"]
        if isinstance(t, int):
            alpha = np.where(arr == t, 0, 255).astype(np.uint8)
            out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    return out


def _array_to_pil(arr: np.ndarray) -> Any:
    from PIL import Image

    if arr.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 (H, W[, C]), got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"image has zero size ({arr.shape[1]}x{arr.shape[0]})")
    if arr.shape[-1] == 4:  # same arithmetic as the reference's numpy path
        alpha = arr[..., 3:4] / 255
        arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def encode_png(image: Any, compress_level: int = 6) -> bytes:
    """PNG bytes of a PIL image or a uint8 array: lossless, so the service or an embedder that
    decodes them sees exactly these pixels.  ``compress_level`` 0..9 is zlib's (Pillow's default
    6; 1 is several times faster on the large tiles the vLLM producer sends)."""
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


# -- the views ----------------------------------------------------------------------------------------

#: ``pixel_dtype`` values of :func:`preprocess`: the input dtype an artifact declares.
PIXEL_DTYPES = ("float32", "float16", "uint8")
#: ``(x / 255 - mean) / std`` as one multiply-add per value, per channel, from uint8.
_SCALE = (np.float32(1.0 / 255.0) / CLIP_STD).astype(np.float32).reshape(3, 1, 1)
_OFFSET = (-CLIP_MEAN / CLIP_STD).astype(np.float32).reshape(3, 1, 1)


def _resize(im: Any, width: int, height: int) -> Any:
    from PIL import Image

    return im if im.size == (width, height) else im.resize((width, height), Image.BILINEAR)


def normalise(images: Any) -> np.ndarray:
    """RGB uint8, channels last ([H, W, 3], [B, H, W, 3] or a PIL image) -> channels first
    ([3, H, W] / [B, 3, H, W]) float32, scaled to [0, 1] and CLIP-normalised."""
    x = np.asarray(images, dtype=np.float32) * (1.0 / 255.0)
    return np.ascontiguousarray(np.moveaxis((x - CLIP_MEAN) / CLIP_STD, -1, -3))


def normalise_views(views: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """uint8 views, channels first ([3, H, W] / [N, 3, H, W]) -> CLIP-normalised ``dtype``.

    Every value is ``x * (1 / (255 * std_c)) - mean_c / std_c`` computed in FP32 and rounded once
    to ``dtype``, in blocks of ~64 K values that stay in cache between the passes.  FP32 runs the
    multiply-add directly; FP16 (written directly, no FP32 copy of the views) goes through a
    256-entry lookup table per channel holding the same FP32 results rounded to FP16, because
    numpy's FP32 -> FP16 conversion costs more than the gather (``scripts/bench_preprocess.py``)."""
    views = np.asarray(views)
    if views.dtype != np.uint8 or views.ndim not in (3, 4) or views.shape[-3] != 3:
        raise InputError(f"views must be uint8 [3, H, W] or [N, 3, H, W], got {views.dtype} {views.shape}")
    dtype = np.dtype(dtype)
    out = np.empty(views.shape, dtype)
    h, w = views.shape[-2:]
    rows = max(1, min(h, (1 << 16) // max(w, 1)))
    planes_in, planes_out = views.reshape(-1, h, w), out.reshape(-1, h, w)
    lut = (np.multiply(np.arange(256, dtype=np.uint8), _SCALE.reshape(3, 1)) + _OFFSET.reshape(3, 1)).astype(dtype)
    for i in range(planes_in.shape[0]):
        c = i % 3
        for r in range(0, h, rows):
            src, dst = planes_in[i, r : r + rows], planes_out[i, r : r + rows]
            if dtype == np.float32:
                np.multiply(src, _SCALE[c, 0, 0], out=dst)
                dst += _OFFSET[c, 0, 0]
            else:
                np.take(lut[c], src, out=dst)
    return out


def host_pixel_dtype(dtypes: Any) -> str:
    """The ``pixel_dtype`` to preprocess to for towers declaring ``dtypes``: their common input
    dtype, or uint8 when they differ (each then gets :func:`as_pixel_dtype` of the same views)."""
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else "uint8"


def as_pixel_dtype(views: np.ndarray, dtype: Any) -> np.ndarray:
    """uint8 views as an artifact's declared input dtype: unchanged for uint8 inputs, else normalised."""
    return views if views.dtype == np.dtype(dtype) else normalise_views(views, dtype)


def to_chw(im: Any, out: np.ndarray | None = None) -> np.ndarray:
    """A PIL RGB image as a uint8 [3, H, W] array (into ``out`` if given): Pillow splits the bands,
    each copied as a contiguous plane, ~2x faster than transposing the interleaved array."""
    out = np.empty((3, im.height, im.width), np.uint8) if out is None else out
    for plane, band in zip(out, im.split(), strict=True):
        plane[...] = np.asarray(band)
    return out


@dataclass
class PreprocessedImage:
    """One image's model inputs and its place in the token sequence."""

    global_view: np.ndarray  # [3, 728, 728] in the pixel dtype asked for (float32 by default)
    crops: np.ndarray  # [N, 3, 504, 504] in the same dtype (N may be 0)
    plan: PatchPlan
    newline_mask: list[bool] = field(default_factory=list)

    @property
    def num_crops(self) -> int:
        return int(self.crops.shape[0])


def _pad_square(im: Any) -> Any:
    """Zero-pad to a square, image at the top left: black in uint8 space, before normalisation
    (which is what makes the uint8-input graphs' folded normalisation exact)."""
    from PIL import Image

    side = max(im.width, im.height)
    padded = Image.new("RGB", (side, side), (0, 0, 0))
    padded.paste(im, (0, 0))
    return padded


def _shared_pass(im: Any, plan: PatchPlan) -> Any:
    """The horizontal pass shared by the global view and the crops, or ``None`` where there is none.

    Pillow resamples horizontally, then vertically, through an 8-bit intermediate image.  When the
    global-size and crop-size images have the same width and both need both passes (every large
    landscape photo: 4000x3000 -> 3024x2268 and 3024x2520), the horizontal pass runs once:
    ``wide`` is the image at that width and full height, the crop-size image is its vertical pass
    (bit-identical to resizing the image directly), and :func:`_global_image` takes the global view
    from it."""
    (gw, gh), (cw, ch) = plan.global_size, plan.crop_size
    if plan.window and gw == cw and gw != im.width and im.height not in (gh, ch):
        return _resize(im, gw, im.height)
    return None


def _global_image(im: Any, wide: Any, plan: PatchPlan, cfg: PreprocessConfig) -> Any:
    """The global view as a PIL image (``image_size`` square).

    The reference resizes to the global size, then to the view: horizontal, vertical, horizontal,
    vertical.  From the shared horizontal pass (``wide``, see :func:`_shared_pass`) the second
    horizontal pass runs before the first vertical one instead (both passes are linear; only
    where the 8-bit rounding happens moves), so the first vertical pass works on ``image_size``
    columns instead of the global width's (3024): 1/4 of the work.  This changes pixels by at most
    one level (12 % of the global view's values of the 12 MP benchmark photo, mean 0.12 level)
    and stays within the recorded reference parity (``tests/test_preprocess.py``); the crops are
    unchanged."""
    (gw, gh), s = plan.global_size, cfg.image_size
    if wide is None:
        return _resize(_resize(im, gw, gh), s, s)
    return _resize(_resize(_resize(wide, s, wide.height), s, gh), s, s)


@functools.lru_cache(maxsize=4)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads of :attr:`PreprocessConfig.threads` (the caller's thread is one of them); one
    pool per process, since a forked child inherits the pool object but not its threads."""
    return ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="preprocess")


def _tiles(big: Any, plan: PatchPlan, cfg: PreprocessConfig) -> np.ndarray:
    """The crops of the crop-size image, row-major, each resized to the patch size (a no-op when the
    window is the patch size, the usual case), as uint8 [N, 3, P, P]."""
    w, p = plan.window, cfg.patch_size
    boxes = [
        (left, top, min(left + w, big.width), min(top + w, big.height))
        for top in range(0, big.height, w)
        for left in range(0, big.width, w)
    ]
    out = np.empty((len(boxes), 3, p, p), np.uint8)
    for tile, box in zip(out, boxes, strict=True):
        to_chw(_resize(big.crop(box), p, p), out=tile)
    return out


def preprocess(
    image: Any, cfg: PreprocessConfig = DEFAULT_PREPROCESS, pixel_dtype: str = "float32"
) -> PreprocessedImage:
    """Global view + crops (+ plan and newline mask) of one image.

    ``pixel_dtype`` is the input dtype of the artifact the views go to: ``"uint8"`` gives the
    resized/padded RGB views (0..255) with no float conversion at all, for uint8-input artifacts
    that normalise in the graph; ``"float32"``/``"float16"`` the CLIP-normalised views."""
    if pixel_dtype not in PIXEL_DTYPES:
        raise InputError(f"pixel_dtype must be one of {list(PIXEL_DTYPES)}, got {pixel_dtype!r}")
    im = to_rgb(image, cfg.max_pixels, cfg)  # files and bytes: the bounds checked on the header
    plan = check_image_size(im.width, im.height, cfg)  # arrays and PIL images: checked here
    im = _pad_square(im) if plan.square_pad else im
    wide = _shared_pass(im, plan)
    dtype = None if pixel_dtype == "uint8" else pixel_dtype

    def make_global() -> np.ndarray:
        view = to_chw(_global_image(im, wide, plan, cfg))
        return view if dtype is None else normalise_views(view, dtype)

    def make_crops() -> np.ndarray:
        if not plan.window:
            return np.zeros((0, 3, cfg.patch_size, cfg.patch_size), dtype or np.uint8)
        tiles = _tiles(_resize(im if wide is None else wide, *plan.crop_size), plan, cfg)
        return tiles if dtype is None else normalise_views(tiles, dtype)

    if cfg.threads > 1 and plan.window:  # Pillow and numpy release the GIL: the two halves overlap
        pending = _pool(cfg.threads, os.getpid()).submit(make_crops)
        global_view = make_global()
        return PreprocessedImage(global_view, pending.result(), plan, plan.newline_mask())
    global_view, crops = make_global(), make_crops()
    return PreprocessedImage(global_view, crops, plan, plan.newline_mask())


def _preprocess_before_uint8(image: Any, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> PreprocessedImage:
    """The float32 path as it was before the uint8 rework (three full resizes, per-crop float
    arithmetic), kept as the baseline of ``scripts/bench_preprocess.py`` and of a regression test."""
    im = to_rgb(image, cfg.max_pixels)
    plan = plan_patches(im.width, im.height, cfg)
    im = _pad_square(im) if plan.square_pad else im
    global_view = normalise(_resize(_resize(im, *plan.global_size), cfg.image_size, cfg.image_size))
    crops = []
    if plan.window:
        big = _resize(im, *plan.crop_size)
        w = plan.window
        for top in range(0, plan.crop_size[1], w):
            for left in range(0, plan.crop_size[0], w):
                tile = big.crop((left, top, min(left + w, big.width), min(top + w, big.height)))
                crops.append(normalise(_resize(tile, cfg.patch_size, cfg.patch_size)))
    arr = np.stack(crops) if crops else np.zeros((0, 3, cfg.patch_size, cfg.patch_size), np.float32)
    return PreprocessedImage(global_view, arr, plan, plan.newline_mask())


def image_layout(
    num_crops: int, newline_mask: list[bool], tokens: TokenIds, cfg: PreprocessConfig = DEFAULT_PREPROCESS
) -> tuple[str, list[int]]:
    """The processor's replacement for one image, as a string and as token ids."""
    if num_crops and len(newline_mask) < num_crops:
        raise InputError(f"newline mask has {len(newline_mask)} entries for {num_crops} crops")
    patch = "<im_patch>"
    text: list[str] = []
    ids: list[int] = []
    for i in range(num_crops):
        text.append("<patch_start>" + patch * cfg.patch_tokens + "<patch_end>")
        ids += [tokens.patch_start, *[tokens.im_patch] * cfg.patch_tokens, tokens.patch_end]
        if newline_mask[i]:
            text.append("<patch_newline>")
            ids.append(tokens.patch_newline)
    text.append("<im_start>" + patch * cfg.image_tokens + "<im_end>")
    ids += [tokens.im_start, *[tokens.im_patch] * cfg.image_tokens, tokens.im_end]
    return "".join(text), ids
