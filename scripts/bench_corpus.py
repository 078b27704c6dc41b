"""Benchmark of ``embed-corpus`` (issue 23), side by side in one run, as ratios.

(a) the job's images/s (local engine, one worker in this process) over the pure compute rate: the
    towers on the same images' views, already preprocessed in memory, same batch: 1.0 means that
    decoding, preprocessing and writing are entirely hidden behind compute;
(b) the Ray engine's images/s over the local engine's, the same number of workers and threads
    (the Ray runtime is started before the clock, as a cluster would be running already; the actors
    start inside it, as the local engine's worker processes do);
(c) the job's peak RSS (``step37-deploy embed-corpus`` with one worker, in its own process) for a 1x
    corpus and a 10x one made of ten copies of it (same images, same shard size): flat when memory is
    bounded by the batch and prefetch settings.

The corpus: real photographs from scikit-image's wheel, each cropped at random and resized to one of
eight sizes (with and without crops), as JPEG/PNG/WebP, in WebDataset shards (``tests/corpus_data.py``).
So the ``--images`` photos are 16 distinct scenes in many crops and sizes, not 200 different scenes.

    python scripts/bench_corpus.py                      # small preset, 216 images, 2 workers
    python scripts/bench_corpus.py --preset tiny --images 32 --per-shard 8 --rss-images 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

WRAP = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def corpus(folder: Path, images: int, per_shard: int, seed: int) -> list[Path]:
    from corpus_data import image_text_corpus

    return image_text_corpus(folder, shards=max(1, images // per_shard), per_shard=per_shard, seed=seed)


def copies(shards: list[Path], folder: Path, times: int) -> list[Path]:
    """``times`` copies of ``shards`` under new names: the same images and shard sizes, a bigger corpus."""
    import shutil

    folder.mkdir(parents=True)
    return [shutil.copy(s, folder / f"copy{k:02d}-{s.name}") for k in range(times) for s in shards]


def pure_compute(ckpt: Path, shards: list[Path], batch: int, threads: int) -> float:
    """Images/s of the towers alone on preprocessed views in memory (same batch, same engine)."""
    import tarfile

    from step37_deploy.preprocess import PreprocessConfig, preprocess
    from step37_deploy.runtime import VisionEmbedder

    emb = VisionEmbedder.from_artifacts(ckpt, "torch", batch_size=batch)
    pcfg = PreprocessConfig()
    pre = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp"):
                    pre.append(preprocess(tar.extractfile(m).read(), pcfg, pixel_dtype=emb.pixel_dtype))
    emb.embed_preprocessed(pre[:batch], ("vision_features",))  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(pre), batch):
        emb.embed_preprocessed(pre[i : i + batch], ("vision_features",))
    return len(pre) / (time.perf_counter() - t0)


def job_rate(ckpt: Path, shards: list[Path], out: Path, **kw) -> float:
    from step37_deploy.corpus.compute import EngineSpec
    from step37_deploy.corpus.run import CorpusOptions, run_corpus

    engine = EngineSpec(str(ckpt), batch=kw.pop("batch"), threads=kw.pop("threads", None))
    opts = CorpusOptions(list(map(str, shards)), str(out), engine, space_check=False, **kw)
    t0 = time.perf_counter()
    s = run_corpus(opts, progress=False)
    seconds = time.perf_counter() - t0
    assert s.complete == s.shards and not s.failed, s.line()
    return s.embedded / seconds


def peak_rss_mb(ckpt: Path, shards: list[Path], out: Path, batch: int) -> float:
    cmd = [sys.executable, "-m", "step37_deploy.cli", "embed-corpus", *map(str, shards), "--out", str(out)]
    cmd += ["--checkpoint", str(ckpt), "--batch", str(batch), "--quiet", "--no-space-check"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", WRAP, *cmd], env=env, capture_output=True, text=True, check=True)
    code, kb = res.stdout.split()
    assert code == "0", res
    return int(kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="synthetic checkpoint preset (default small)")
    ap.add_argument("--images", type=int, default=216, help="images for (a) and (b) (default 216)")
    ap.add_argument("--per-shard", type=int, default=24, help="images per shard (default 24: every size thrice)")
    ap.add_argument("--rss-images", type=int, default=48, help="the 1x corpus of (c) (default 48); 10x: ten copies")
    ap.add_argument("--batch", type=int, default=8, help="images per tower batch (default 8)")
    ap.add_argument("--workers", type=int, default=2, help="workers for (b) (default 2)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    import torch

    from step37_deploy.corpus.ray_engine import ray_runtime
    from step37_deploy.synthetic import make_checkpoint

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        root = Path(tmp)
        ckpt = make_checkpoint(root / "ckpt", args.preset, dtype="fp32", shards=1, seed=0)
        shards = corpus(root / "in", args.images, args.per_shard, seed=1)
        n = sum(1 for _ in shards) * args.per_shard
        compute = pure_compute(ckpt, shards, args.batch, threads)
        job = job_rate(ckpt, shards, root / "a", batch=args.batch)
        per = max(1, threads // args.workers)
        local = job_rate(ckpt, shards, root / "local", batch=args.batch, threads=per, workers=args.workers)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        with ray_runtime(None, args.workers * per + 1, None):
            on_ray = job_rate(
                ckpt, shards, root / "ray", batch=args.batch, runner="ray", workers=args.workers, ray_cpus=per
            )
        small = corpus(root / "rss1", args.rss_images, args.per_shard, seed=2)
        big = copies(small, root / "rss10", 10)
        rss1 = peak_rss_mb(ckpt, small, root / "o1", args.batch)
        rss10 = peak_rss_mb(ckpt, big, root / "o10", args.batch)
    result = {
        "preset": args.preset,
        "images": n,
        "batch": args.batch,
        "threads": threads,
        "a_pure_compute_img_s": round(compute, 3),
        "a_job_img_s": round(job, 3),
        "a_ratio": round(job / compute, 3),
        "b_workers": args.workers,
        "b_local_img_s": round(local, 3),
        "b_ray_img_s": round(on_ray, 3),
        "b_ratio": round(on_ray / local, 3),
        "c_images_1x": len(small) * args.per_shard,
        "c_peak_rss_mb_1x": round(rss1, 1),
        "c_images_10x": len(big) * args.per_shard,
        "machine": f"{os.cpu_count()} cores (shared with other jobs: noisy)",
        "c_peak_rss_mb_10x": round(rss10, 1),
        "c_ratio": round(rss10 / rss1, 3),
    }
    print(json.dumps(result, indent=2))
    print(
        f"(a) job / pure compute = {result['a_ratio']:.2f} (goal >= 0.9); "
        f"(b) ray / local = {result['b_ratio']:.2f} (goal >= 0.9); "
        f"(c) peak RSS 10x / 1x = {result['c_ratio']:.2f} (flat: ~1)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
