"""Served latency of FP32 against 16-bit answers (``features`` vs ``features_fp16`` / ``features_bf16``)
for one 12-crop image at concurrency 1, side by side in one run.

The answer's size is what differs, so the checkpoint here has the release's answer width: the tiny
preset's tower (cheap on a CPU) with a release-size projector (256 -> 4096), which makes a 12-crop
answer [1141, 4096]: 18.7 MB in FP32, 9.3 MB in 16 bits, as with the release checkpoint.  The script
writes that checkpoint (``synthetic.make_checkpoint``), exports both FP32 ONNX towers, starts
``step37-deploy serve`` on loopback, then alternates blocks of ``--requests`` requests per dtype for
``--rounds`` rounds (so load changes on a shared machine hit every dtype alike) through ``EmbedClient``
and prints p50 / p90 per dtype and the ratio to FP32.  Every answer's rows are checked against the
FP32 answer cast.  ``--cache-mb`` > 0 turns on the server's embedding cache: after the first request
the server only casts and sends, so the difference is transfer alone.

    python scripts/bench_answer_dtype.py [--protocol http|grpc] [--requests 10] [--rounds 3] \
        [--cache-mb 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step37_deploy.config import ProjectorConfig, preset  # noqa: E402
from step37_deploy.files import write_json  # noqa: E402
from step37_deploy.serving.server import free_port, models_ready  # noqa: E402

DTYPES = ("fp32", "fp16", "bf16")
SIZE = (2016, 1512)  # 4 x 3 windows of 504: 12 crops


def build(work: Path) -> tuple[Path, list[Path]]:
    from step37_deploy.export import export_onnx
    from step37_deploy.synthetic import make_checkpoint

    tiny = preset("tiny")
    cfg = replace(tiny, projector=ProjectorConfig(tiny.vision.output_dim, 4096, False), text_hidden_size=4096)
    ckpt = make_checkpoint(work / "ckpt", cfg=cfg, dtype="fp32", shards=1, seed=3, decoy_ratio=0)
    onnx = [export_onnx(ckpt, work / "onnx", "fp32", r).onnx_path for r in (728, 504)]
    return ckpt, onnx


def serve(ckpt: Path, onnx: list[Path], cache_mb: float, log: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [sys.executable, "-m", "step37_deploy.cli", "serve", "--checkpoint", str(ckpt), "--backend", "onnx"]
    cmd += ["--artifacts", *map(str, onnx), "--host", "127.0.0.1", "--cache-mb", str(cache_mb), "-q"]
    cmd += [f"--{k}-port={v}" for k, v in ports.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 300
    while not models_ready(f"127.0.0.1:{ports['http']}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"serve did not become ready:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    return proc, ports


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows(e) -> np.ndarray:
    f = e.features
    return f.float().numpy() if hasattr(f, "float") else np.asarray(f, np.float32)


def measure(url: str, protocol: str, image: bytes, requests: int, rounds: int) -> dict[str, dict]:
    import torch

    from step37_deploy.serving.client import EmbedClient

    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    with EmbedClient(url, protocol, timeout=300) as client:
        ref = client.embed(image)  # FP32, also the warm-up
        want = {
            "fp32": ref.features,
            "fp16": ref.features.astype(np.float16).astype(np.float32),
            "bf16": torch.from_numpy(ref.features.copy()).to(torch.bfloat16).float().numpy(),
        }
        for d in DTYPES:
            client.embed(image, dtype=d)  # warm-up of each answer kind
        for _ in range(rounds):
            for d in DTYPES:
                for _ in range(requests):
                    t0 = time.perf_counter()
                    e = client.embed(image, dtype=d)
                    times[d].append(time.perf_counter() - t0)
                    if e.num_crops != 12 or not np.array_equal(_rows(e), want[d]):
                        raise SystemExit(f"{d} answer differs from the FP32 answer cast")
    rows, hidden = ref.features.shape
    p50_fp32 = float(np.median(times["fp32"]))
    return {
        d: {
            "requests": len(t),
            "p50_ms": 1e3 * float(np.median(t)),
            "p90_ms": 1e3 * float(np.percentile(t, 90)),
            "p50_vs_fp32": float(np.median(t)) / p50_fp32,
            "answer_mb": rows * hidden * (4 if d == "fp32" else 2) / 1e6,
        }
        for d, t in times.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http", help="client protocol (default http)")
    ap.add_argument("--requests", type=int, default=10, help="requests per dtype per round (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--cache-mb", type=float, default=0.0, help="server embedding cache, MiB (default 0 = off)")
    ap.add_argument("--json", default=None, help="write the result here, atomically (default none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from step37_deploy.preprocess import DEFAULT_PREPROCESS, encode_png
    from tests.preprocess_cases import synthetic_image

    png = encode_png(synthetic_image(*SIZE))
    with tempfile.TemporaryDirectory(prefix="bench-answer-dtype-") as tmp:
        work = Path(tmp)
        ckpt, onnx = build(work)
        proc, ports = serve(ckpt, onnx, args.cache_mb, work / "serve.log")
        try:
            url = f"127.0.0.1:{ports[args.protocol]}"
            result = measure(url, args.protocol, png, args.requests, args.rounds)
        finally:
            stop(proc)
    rows = 12 * DEFAULT_PREPROCESS.patch_tokens + DEFAULT_PREPROCESS.image_tokens
    print(
        f"served p50 at concurrency 1, one {SIZE[0]}x{SIZE[1]} image (12 crops, [{rows}, 4096] answer), "
        f"{args.protocol}, cache {args.cache_mb:g} MiB"
    )
    print(f"{'answer':8} {'MB':>6} {'p50 ms':>8} {'p90 ms':>8} {'p50/fp32':>9}")
    for d, r in result.items():
        print(f"{d:8} {r['answer_mb']:6.1f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} {r['p50_vs_fp32']:9.2f}")
    if args.json:
        write_json(args.json, {"protocol": args.protocol, "cache_mb": args.cache_mb, "image": list(SIZE), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
