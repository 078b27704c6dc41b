"""Host preprocessing per image, side by side in one run: the float32 path as it was before the
uint8 rework, the new float32 and float16 paths, and the uint8 path (no float conversion), with
what each step costs.

    python scripts/bench_preprocess.py --make-jpeg /tmp/photo12mp.jpg          # 4000x3000, quality 90
    python scripts/bench_preprocess.py /tmp/photo12mp.jpg [more.jpg ...] [--iters 15] [--json out.json]

Variants are timed round-robin (one call of each per round) so that load from other processes on
a shared machine falls on all of them alike; medians and ratios to the old float32 path are
printed.  Single-threaded (one image on one core, as the service's preprocessing instances run)
except the ``2 threads`` variants (``PreprocessConfig.threads=2``: one image's crops and global
view overlap; lower latency on an idle machine, never more throughput than two instances).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from step37_deploy.preprocess import (
    DEFAULT_PREPROCESS,
    PreprocessConfig,
    _global_image,
    _preprocess_before_uint8,
    _resize,
    _shared_pass,
    _tiles,
    normalise,
    normalise_views,
    plan_patches,
    preprocess,
    to_chw,
    to_rgb,
)


def make_jpeg(path: Path, width: int = 4000, height: int = 3000, seed: int = 0) -> Path:
    """A photo-like 12 MP JPEG (quality 90): smooth gradients, sensor-like noise, filled shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    img = np.stack([200 * x + 30 * y, 60 + 150 * y * (1 - x), 120 + 100 * np.sin(6 * x + 4 * y)], -1)
    img += rng.normal(0, 14, img.shape).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for i in range(60):
        x0, y0, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(40, 500))
        box = [x0, y0, x0 + r, y0 + int(r * 0.7)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=fill)
    im.save(path, quality=90)
    return path


class _Laps:
    """Seconds since the previous lap, by step name."""

    def __init__(self) -> None:
        self.t, self.laps = time.perf_counter(), {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.t = now - self.t, now


def _steps_before(path: str) -> dict[str, float]:
    """The old float32 path, step by step (same code as ``_preprocess_before_uint8``)."""
    cfg, lap = DEFAULT_PREPROCESS, _Laps()
    im = to_rgb(path)
    plan = plan_patches(im.width, im.height, cfg)
    lap("decode")
    g = _resize(im, *plan.global_size)
    lap("resize global size")
    g = _resize(g, cfg.image_size, cfg.image_size)
    lap("resize 728")
    big = _resize(im, *plan.crop_size) if plan.window else None
    lap("resize crop size")
    normalise(g)
    if big is not None:
        w = plan.window
        for top in range(0, plan.crop_size[1], w):
            for left in range(0, plan.crop_size[0], w):
                tile = big.crop((left, top, min(left + w, big.width), min(top + w, big.height)))
                normalise(_resize(tile, cfg.patch_size, cfg.patch_size))
    lap("crops + normalise fp32")
    return lap.laps


def _steps_new(path: str) -> dict[str, float]:
    """The new path, step by step (one thread)."""
    cfg, lap = DEFAULT_PREPROCESS, _Laps()
    im = to_rgb(path)
    plan = plan_patches(im.width, im.height, cfg)
    lap("decode")
    wide = _shared_pass(im, plan)
    lap("shared horizontal pass")
    gv = to_chw(_global_image(im, wide, plan, cfg))
    lap("global view + uint8 planes")
    big = _resize(im if wide is None else wide, *plan.crop_size) if plan.window else None
    lap("crop-size image")
    crops = _tiles(big, plan, cfg) if big is not None else gv[None, :, :0, :0]
    lap("crops uint8 (tiling)")
    normalise_views(gv), normalise_views(crops)
    lap("normalise fp32")
    normalise_views(gv, np.float16), normalise_views(crops, np.float16)
    lap("normalise fp16")
    return lap.laps


def _uint8_exact_global(path: str) -> object:
    """The uint8 path with the global view resized in the reference's order (horizontal, vertical,
    horizontal, vertical; the previous version of this path) and a copying ``exif_transpose``."""
    from PIL import Image, ImageOps

    cfg = DEFAULT_PREPROCESS
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    plan = plan_patches(im.width, im.height, cfg)
    wide = _shared_pass(im, plan)
    src = im if wide is None else wide
    gv = to_chw(_resize(_resize(src, *plan.global_size), cfg.image_size, cfg.image_size))
    crops = _tiles(_resize(src, *plan.crop_size), plan, cfg) if plan.window else None
    return gv, crops


def _lut_fp32(views: np.ndarray) -> np.ndarray:
    """The lookup-table alternative to ``normalise_views`` (measured, not used)."""
    lut = normalise(np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, -1))[:, 0]  # [3, 256]
    out = np.empty(views.shape, np.float32)
    for c in range(3):
        np.take(lut[c], views[:, c], out=out[:, c])
    return out


def bench_image(path: str, iters: int) -> dict:
    two_threads = PreprocessConfig(threads=2)
    variants: dict[str, Callable[[], object]] = {
        "float32 before (baseline)": lambda: _preprocess_before_uint8(path),
        "float32 new": lambda: preprocess(path),
        "float16 new": lambda: preprocess(path, pixel_dtype="float16"),
        "uint8": lambda: preprocess(path, pixel_dtype="uint8"),
        "uint8 (previous: exact global order)": lambda: _uint8_exact_global(path),
        "float32 new, 2 threads": lambda: preprocess(path, two_threads),
        "uint8, 2 threads": lambda: preprocess(path, two_threads, pixel_dtype="uint8"),
    }
    crops = preprocess(path, pixel_dtype="uint8").crops
    variants["(normalise crops: multiply-add)"] = lambda: normalise_views(crops)
    variants["(normalise crops: LUT np.take)"] = lambda: _lut_fp32(crops)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    steps_before: list[dict[str, float]] = []
    steps_new: list[dict[str, float]] = []
    for f in variants.values():  # warm-up
        f()
    for _ in range(iters):
        for name, f in variants.items():
            t0 = time.perf_counter()
            f()
            samples[name].append(time.perf_counter() - t0)
        steps_before.append(_steps_before(path))
        steps_new.append(_steps_new(path))
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    base = med["float32 before (baseline)"]
    pre = preprocess(path)
    return {
        "image": path,
        "num_crops": pre.num_crops,
        "plan": str(pre.plan),
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "speedup_vs_before": {k: round(base / v, 2) for k, v in med.items() if not k.startswith("(")},
        "steps_before_ms": {k: round(statistics.median(s[k] for s in steps_before) * 1e3, 2) for k in steps_before[0]},
        "steps_new_ms": {k: round(statistics.median(s[k] for s in steps_new) * 1e3, 2) for k in steps_new[0]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*", help="image files to preprocess (default: none; see --make-jpeg)")
    ap.add_argument("--make-jpeg", type=Path, default=None, help="write the 12 MP test JPEG here first (default: no)")
    ap.add_argument("--iters", type=int, default=15, help="timed rounds per image (default 15)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (default: no)")
    args = ap.parse_args()
    images = list(args.images)
    if args.make_jpeg:
        images.append(str(make_jpeg(args.make_jpeg)))
        print(f"wrote {args.make_jpeg} ({args.make_jpeg.stat().st_size / 1e6:.1f} MB)")
    if not images:
        ap.error("give image files and/or --make-jpeg PATH")
    results = [bench_image(p, args.iters) for p in images]
    for r in results:
        print(f"\n{r['image']}: {r['num_crops']} crops + global view; {r['plan']}")
        for k, v in r["median_ms"].items():
            ratio = r["speedup_vs_before"].get(k)
            print(f"  {k:34s} {v:8.1f} ms" + (f"   {ratio:5.2f}x vs before" if ratio else ""))
        print("  steps before:", ", ".join(f"{k} {v:.1f}" for k, v in r["steps_before_ms"].items()))
        print("  steps new:   ", ", ".join(f"{k} {v:.1f}" for k, v in r["steps_new_ms"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
