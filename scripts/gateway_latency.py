"""The latency ``serve``'s nginx gateway adds, over gRPC and HTTP, at concurrency 1 and 8, one run.

One real ``step37-deploy serve`` (tiny synthetic checkpoint and torch towers unless ``--checkpoint``
is given) is measured two ways side by side: through its gateway (the user's ports: nginx, HTTP/1.1
and HTTP/2 ``grpc_pass`` to Triton) and on Triton's own loopback ports behind it, which is exactly
what ``--no-gateway`` exposes (same Triton flags, same restrictions).  Same server, same process,
same models, so the difference is the gateway alone.  Blocks of requests alternate between the two
(``--rounds``, order swapped each round) so that load changing on a shared machine hits both alike.

Every request sends the same image, so after the first one the embedder answers from its
embedding cache: the request costs transport, protocol handling and the cache look-up, and the
gateway's share is as large as it can be (with real compute per request it is a smaller fraction).
Every answer is checked against the first one.

    python scripts/gateway_latency.py [--checkpoint CKPT --backend torch] [--requests 400] [--rounds 4] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servelib import start_serve, stop_serve  # noqa: E402

from step37_deploy.preprocess import encode_png  # noqa: E402
from step37_deploy.serving.client import EmbedClient  # noqa: E402


def start(checkpoint: Path, backend: str, log: Path) -> tuple[subprocess.Popen, dict[str, int], dict[str, int]]:
    proc, ports = start_serve(checkpoint, backend, log)
    m = re.search(r"-> Triton on 127\.0\.0\.1 ports http (\d+), grpc (\d+), metrics (\d+)", log.read_text())
    direct = dict(zip(("http", "grpc", "metrics"), map(int, m.groups()), strict=True))
    return proc, ports, direct


def drive(url: str, protocol: str, concurrency: int, n: int, image: bytes, expect) -> list[float]:
    """``n`` requests, ``concurrency`` threads, one kept-alive connection each; latencies in s."""
    client = EmbedClient(url, protocol, timeout=60)
    latencies: list[float] = []
    lock = threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        try:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                t0 = time.perf_counter()
                got = client.embed(image)
                dt = time.perf_counter() - t0
                if got.token_ids != expect.token_ids or not np.allclose(got.features, expect.features, atol=1e-5):
                    raise AssertionError(f"{protocol}://{url}: a wrong answer")
                with lock:
                    latencies.append(dt)
        finally:
            client.close_thread()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    if len(latencies) != n:
        raise AssertionError(f"{protocol}://{url}: {n - len(latencies)} requests failed")
    return latencies


def summary(lat: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in lat)
    return {
        "n": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: a tiny synthetic one)")
    ap.add_argument("--backend", default="torch", choices=["torch"], help="towers (default torch: no artifacts)")
    ap.add_argument("--requests", type=int, default=400, help="requests per protocol, level and target (default 400)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks per measurement (default 4)")
    ap.add_argument("--concurrency", type=int, action="append", help="levels (default 1 and 8)")
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    args = ap.parse_args()
    levels = args.concurrency or [1, 8]
    with tempfile.TemporaryDirectory(prefix="gateway-latency-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from step37_deploy.synthetic import make_checkpoint

            checkpoint = make_checkpoint(Path(tmp) / "tiny", "tiny", dtype="fp32", shards=1, seed=1)
        image = encode_png(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
        proc, gateway, direct = start(checkpoint, args.backend, Path(tmp) / "serve.log")
        results = []
        try:
            for protocol in ("grpc", "http"):
                targets = {"gateway": f"127.0.0.1:{gateway[protocol]}", "direct": f"127.0.0.1:{direct[protocol]}"}
                expect = EmbedClient(targets["direct"], protocol).embed(image)  # fills the cache
                for c in levels:
                    lat: dict[str, list[float]] = {"gateway": [], "direct": []}
                    for url in targets.values():  # warm-up: connections, threads
                        drive(url, protocol, c, 4 * c, image, expect)
                    for r in range(args.rounds):
                        order = list(targets) if r % 2 == 0 else list(reversed(targets))
                        for name in order:
                            lat[name] += drive(targets[name], protocol, c, args.requests // args.rounds, image, expect)
                    g, d = summary(lat["gateway"]), summary(lat["direct"])
                    row = {"protocol": protocol, "concurrency": c, "gateway": g, "direct": d}
                    row["added_p50_ms"] = g["p50_ms"] - d["p50_ms"]
                    row["added_mean_ms"] = g["mean_ms"] - d["mean_ms"]
                    row["p50_ratio"] = g["p50_ms"] / d["p50_ms"]
                    results.append(row)
                    print(
                        f"{protocol:4} c={c}: p50 {d['p50_ms']:.2f} -> {g['p50_ms']:.2f} ms "
                        f"(+{row['added_p50_ms']:.2f} ms, x{row['p50_ratio']:.2f}), mean {d['mean_ms']:.2f} -> "
                        f"{g['mean_ms']:.2f} ms, p99 {d['p99_ms']:.2f} -> {g['p99_ms']:.2f} ms "
                        f"[direct -> gateway, {g['n']} requests each]",
                        flush=True,
                    )
        finally:
            stop_serve(proc)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
