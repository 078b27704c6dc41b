"""Embeddings per second through the vLLM producer against plain ``embed``, side by side in one run.

    python scripts/bench_vllm_producer.py [--preset small] [--rounds 3] [--server HOST:PORT]

The same images go through ``embed`` (``VisionEmbedder.embed_images`` in process, or
``EmbedClient.embed_many`` with ``--server``) and through ``VllmProducer.produce_many`` (the same
embed call, the row check, and one atomic bf16 ``encoder_cache.safetensors`` per image), rounds
interleaved so both see the same machine.  A second pair uses images whose layout vLLM cuts
differently (728x546: the producer sends one extra strip of tiles per image), so the cost of
following vLLM's layout shows separately.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from vllm_harness import export_fp32  # noqa: E402

from step37_deploy.config import Step37Config  # noqa: E402
from step37_deploy.handoff.vllm import VllmCacheWriter, VllmProducer, image_size, vllm_layout  # noqa: E402
from step37_deploy.preprocess import encode_png  # noqa: E402
from step37_deploy.runtime import ImageEmbedding  # noqa: E402
from tests.preprocess_cases import synthetic_image  # noqa: E402

AGREE = [(1000, 800), (600, 1300), (400, 400), (1512, 1008)]  # 4, 3, 0, 6 crops; same layout in both rules
DIFFER = [(728, 546), (728, 728), (500, 1300), (1000, 400)]  # vLLM cuts these differently


def _pngs(sizes: list[tuple[int, int]], copies: int) -> list[bytes]:
    return [encode_png(synthetic_image(w, h)) for w, h in sizes * copies]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="synthetic checkpoint preset (default small)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--copies", type=int, default=3, help="copies of each of the 4 sizes per round (default 3)")
    ap.add_argument("--server", default=None, help="embed through a running service HOST:PORT (gRPC) instead")
    ap.add_argument("--checkpoint", default=None, help="an existing checkpoint (with --server: the one served)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        ck = Path(args.checkpoint) if args.checkpoint else work / "ck"
        cli = [sys.executable, "-m", "step37_deploy.cli"]
        if args.checkpoint is None:
            subprocess.run([*cli, "make-checkpoint", "--preset", args.preset, "--out", str(ck), "-q"], check=True)
        if args.server:
            from step37_deploy.serving.client import EmbedClient

            embed, what = EmbedClient(args.server).embed_many, f"EmbedClient({args.server})"
        else:
            from step37_deploy.runtime import VisionEmbedder

            onnx = export_fp32(ck, work / "onnx")
            embedder = VisionEmbedder.from_artifacts(ck, "onnx", onnx)
            embed, what = embedder.embed_images, "in-process VisionEmbedder (onnx fp32)"
        tokens = Step37Config.from_checkpoint(ck).tokens
        producer = VllmProducer(embed, VllmCacheWriter(work / "ec", dtype="bf16"), tokens)
        report: dict = {"embed": what, "preset": args.preset, "rounds": args.rounds}
        for label, sizes in (("same_layout", AGREE), ("vllm_layout", DIFFER)):
            images = _pngs(sizes, args.copies)
            ids = [f"{label}-{i}" for i in range(len(images))]
            embed(images[:2])  # warm up
            rates: dict[str, list[float]] = {"embed": [], "producer": []}
            for _ in range(args.rounds):
                t = time.perf_counter()
                embed(images)
                rates["embed"].append(len(images) / (time.perf_counter() - t))
                t = time.perf_counter()
                producer.produce_many(images, ids)
                rates["producer"].append(len(images) / (time.perf_counter() - t))
            made = producer.produce_many(images, ids)
            layouts = [vllm_layout(*image_size(im)) for im in images]
            t = time.perf_counter()
            for p, layout in zip(made, layouts, strict=True):  # the file alone: check, bf16 cast, write, rename
                producer.writer.write(p.id, p.embedding, layout)
            write_ms = 1000 * (time.perf_counter() - t) / len(made)
            med = {k: statistics.median(v) for k, v in rates.items()}
            report[label] = {
                "sizes": sizes,
                "images_per_round": len(images),
                "embed_images_per_s": round(med["embed"], 3),
                "producer_images_per_s": round(med["producer"], 3),
                "producer_over_embed": round(med["producer"] / med["embed"], 3),
                "write_ms_per_image": round(write_ms, 2),
                "rows_per_image": [p.rows for p in made],
            }
        # the file alone at the release's width: a 12-crop image (2016x1512: 1,141 rows x 4096, bf16 9.3 MB)
        big = vllm_layout(2016, 1512)
        rows = np.random.default_rng(0).standard_normal((big.rows(), 4096), dtype=np.float32)
        e = ImageEmbedding(rows, [], "", big.num_crops, list(big.newline_mask))
        times = []
        for i in range(5):
            t = time.perf_counter()
            producer.writer.write(f"release-{i}", e, big)
            times.append(1000 * (time.perf_counter() - t))
        report["release_12_crop_write_ms"] = round(statistics.median(times), 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
