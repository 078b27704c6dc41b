"""Small image-text corpora of real photographs for the corpus-job tests and benchmark.

The photographs are the ones scikit-image ships inside its wheel (``skimage/data``: astronaut,
coffee, chelsea the cat, a rocket, motorcycles, the Hubble deep field, a retina, coins...; no
download, ``pooch`` is not involved).  Mixed sizes come from crops and resizes of them, chosen so
that some images get crops (large, or elongated) and some do not, encoded as JPEG, PNG or WebP.
"""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

#: Real photographs in scikit-image's wheel (RGB and grayscale).
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "ihc.png",
    "clock_motion.png",
)

#: (width, height) of the derived images: without crops (fits 728, aspect <= 1.5), elongated
#: (crops of the short side), and large (504 crops).
SIZES = ((320, 240), (500, 500), (240, 700), (900, 300), (1000, 760), (640, 427), (1200, 900), (160, 120))


def photo_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "data"
    return d if (d / "astronaut.png").is_file() else None


def derived_images(n: int, seed: int = 0, sizes: Sequence[tuple[int, int]] = SIZES) -> list[tuple[bytes, str]]:
    """``n`` encoded images ``(bytes, ext)``: photo ``i % len(PHOTOS)``, a crop window chosen by
    ``seed``, resized to ``sizes[i % len(sizes)]``, as JPEG/PNG/WebP in turn."""
    import random

    from PIL import Image

    root = photo_dir()
    assert root is not None, "scikit-image's bundled photos are needed (pip install scikit-image)"
    rng = random.Random(seed)
    out = []
    for i in range(n):
        with Image.open(root / PHOTOS[i % len(PHOTOS)]) as im:
            im = im.convert("RGB")
        w, h = im.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch)).resize(sizes[(i + seed) % len(sizes)], Image.BILINEAR)
        ext = ("jpg", "png", "webp")[i % 3]
        buf = io.BytesIO()
        im.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], quality=90)
        out.append((buf.getvalue(), ext))
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(folder: Path, name: str, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard ``folder/name.tar``: ``samples`` of ``(key, {ext: bytes})``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.tar"
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def image_text_corpus(folder: Path, shards: int, per_shard: int, seed: int = 0, prefix: str = "data") -> list[Path]:
    """``shards`` image-text WebDataset shards ``prefix-000000.tar`` ... of ``per_shard`` samples
    each: an image (jpg/png/webp) and a caption (``txt``) and a ``json`` per key."""
    images = derived_images(shards * per_shard, seed)
    paths = []
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            data, ext = images[s * per_shard + j]
            key = f"{s:03d}{j:05d}"
            caption = f"photo {PHOTOS[(s * per_shard + j) % len(PHOTOS)].split('.')[0]}, sample {key}"
            samples.append((key, {ext: data, "txt": caption.encode(), "json": json.dumps({"i": j}).encode()}))
        paths.append(write_wds(folder, f"{prefix}-{s:06d}", samples))
    return paths
