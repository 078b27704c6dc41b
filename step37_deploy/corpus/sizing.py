"""Sizing before running: the output's bytes from the images' headers, against the free space.

Features are large.  Per image the rows are ``81 x crops + 169``, each ``C`` wide (6144 for the
release's ``vision_features``, 4096 for projected ``features``), so in bf16 a global view is
169 x 6144 x 2 B = 2.1 MB and each crop 1.0 MB: a 12-crop image is 14 MB.  The crop count follows from
the image's size alone (:func:`~step37_deploy.preprocess.plan_patches`), and the size is in the
image's header: Pillow's ``open`` reads it without decoding the pixels, and the EXIF orientation
tag says whether width and height swap.  Tars are read member by member (headers, and the first
bytes of each image); nothing is decoded in full.

For a corpus of many shards the estimate reads at most ``max_shards`` of the shards to do (spread
evenly) and scales by the shard count; with fewer shards it is exact.
"""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig, plan_patches
from .sources import ShardSource
from .sources import split_name as _split

log = logging.getLogger(__name__)

#: Bytes per element of each storage dtype.
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Tar headers, layout JSON and safetensors header per sample (measured: ~3.5 KB with 12 crops).
OVERHEAD_PER_SAMPLE = 4096
#: EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPED = {5, 6, 7, 8}


def image_size(data: bytes | object) -> tuple[int, int] | None:
    """``(width, height)`` as the model sees it (EXIF orientation applied) from the header only, or
    None for what is not a readable image header."""
    from PIL import Image

    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        with Image.open(src) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # anything Pillow cannot identify: the job reports it as the sample's error
        return None
    return (h, w) if orientation in _SWAPPED else (w, h)


def rows_for(width: int, height: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> int:
    """Rows of one image: 81 per crop + 169."""
    return plan_patches(width, height, cfg).num_crops * cfg.patch_tokens + cfg.image_tokens


@dataclass
class Estimate:
    images: int  # images seen with a readable header (scaled to all shards)
    rows: int
    bytes: int
    shards_read: int
    shards: int

    @property
    def exact(self) -> bool:
        return self.shards_read == self.shards


def _shard_rows(src: ShardSource, image_exts: Sequence[str], cfg: PreprocessConfig) -> tuple[int, int, int]:
    """(images, rows, samples) of one shard from its headers."""
    images = rows = samples = 0
    sizes = _tar_sizes(src.path, image_exts) if src.kind == "tar" else _folder_sizes(src, image_exts)
    for size in sizes:
        samples += 1
        if size is not None and min(size) > 0:
            images += 1
            rows += rows_for(*size, cfg)
    return images, rows, samples


def _tar_sizes(path: str, image_exts: Sequence[str]) -> list[tuple[int, int] | None]:
    """Per sample, its image's size; reads only headers (Pillow seeks within the member)."""
    exts = {e.lower() for e in image_exts}
    out: dict[str, tuple[int, int] | None] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                parts = _split(m.name) if m.isfile() else None
                if parts is None:
                    continue
                out.setdefault(parts[0], None)
                if parts[1].lower() in exts and out[parts[0]] is None:
                    fh = tar.extractfile(m)
                    out[parts[0]] = image_size(fh) if fh is not None else None
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("sizing: %s is not a readable tar (%s); its shard will fail", path, exc)
    return list(out.values())


def _folder_sizes(src: ShardSource, image_exts: Sequence[str]) -> list[tuple[int, int] | None]:
    """Per file, its image's size from the header (Pillow reads the first bytes only)."""
    out: list[tuple[int, int] | None] = []
    for rel in src.files:
        try:
            with open(Path(src.path) / rel, "rb") as fh:
                out.append(image_size(fh))
        except OSError:
            out.append(None)
    return out


def estimate(
    todo: Sequence[ShardSource],
    widths: dict[str, int],
    dtype: str,
    image_exts: Sequence[str],
    cfg: PreprocessConfig = DEFAULT_PREPROCESS,
    max_shards: int = 64,
) -> Estimate:
    """Output bytes of ``todo`` for rows ``widths`` wide per kind (``{"vision_features": 6144}``)."""
    n = len(todo)
    picked = todo if n <= max_shards else [todo[i * n // max_shards] for i in range(max_shards)]
    images = rows = samples = 0
    for src in picked:
        i, r, s = _shard_rows(src, image_exts, cfg)
        images, rows, samples = images + i, rows + r, samples + s
    scale = n / len(picked) if picked else 0.0
    per_row = sum(widths.values()) * ITEMSIZE[dtype]
    total = int((rows * per_row + images * OVERHEAD_PER_SAMPLE) * scale)
    return Estimate(int(images * scale), int(rows * scale), total, len(picked), n)


def check_space(out: Path, est: Estimate, margin: float = 0.05) -> None:
    """Refuse, with the numbers, when the output file system has less free space than the estimate
    plus ``margin``."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(est.bytes * (1 + margin))
    how = "" if est.exact else f" (extrapolated from {est.shards_read} of {est.shards} shards)"
    log.info("sizing: %d images, %s to write%s; %s free in %s", est.images, human(est.bytes), how, human(free), probe)
    if need > free:
        raise OutputError(
            f"--out {out}: the features need about {human(est.bytes)} ({est.images} images, {est.rows} rows{how}) "
            f"and {probe} has {human(free)} free: free space, choose another --out, or --no-space-check"
        )


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover
