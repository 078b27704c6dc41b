"""A refusal storm: a closed loop of retrying clients far above capacity, with and without the
refusals' retry-after honoured, side by side in one run (issue 22 item 20).

One real ``step37-deploy serve`` (tiny synthetic checkpoint, torch towers, 2 embedder instances, no
embedding cache, default queue bound).  First its capacity: a closed loop at concurrency 4 without
retries.  Then ``--rounds`` pairs of phases of ``--seconds`` each, order swapped every round so
that a shared machine's load hits both alike: ``--concurrency`` threads (default 64), each sending
the next image as soon as the last one ended, through ``EmbedClient(retry=True)`` with a
``--deadline`` per image:

* ``before``: the client as it was (a refusal is retried after the jittered backoff alone, 0 to
  50 ms at first, and once the retry budget is spent the thread's next request goes out at once);
* ``after``: the client honours the refusal's retry-after (``EmbedClient``: the hint, then the
  jitter; the thread's next request waits it out too).

Goodput is the answers per second (every answer checked against the first one for its image).

    python scripts/retry_storm.py [--concurrency 64] [--seconds 20] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servelib import start_serve, stop_serve  # noqa: E402

from step37_deploy.errors import ServerError  # noqa: E402
from step37_deploy.serving import client as client_module  # noqa: E402
from step37_deploy.serving.client import EmbedClient  # noqa: E402


def images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        w, h = 480 + 40 * i, 640 - 30 * i
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def closed_loop(url: str, payloads: list[bytes], expect: list, threads: int, seconds: float, retry: bool,
                deadline: float) -> dict:  # fmt: skip
    """``threads`` workers for ``seconds``; answers (checked), errors by kind, retries."""
    client = EmbedClient(url, "grpc", timeout=deadline, retry=retry)
    counts = {"answered": 0, "wrong": 0, "refused": 0, "other_errors": 0}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(k: int) -> None:
        i = k
        try:
            while time.monotonic() < end:
                j = i % len(payloads)
                i += 1
                try:
                    got = client.embed(payloads[j])
                    kind = "answered" if np.allclose(got.features, expect[j], atol=1e-4) else "wrong"
                except ServerError as exc:
                    kind = "refused" if exc.status in client_module.OVERLOAD_STATUSES else "other_errors"
                with lock:
                    counts[kind] += 1
        finally:
            client.close_thread()

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - t0
    client.close()
    return {**counts, "retries": client.retries, "wall_s": round(wall, 2), "goodput": counts["answered"] / wall}


def phase(name: str, url: str, payloads: list[bytes], expect: list, args: argparse.Namespace) -> dict:
    """One storm; ``before`` runs with the refusals' retry-after ignored (the client as it was)."""
    saved = client_module.retry_after_s
    if name == "before":
        client_module.retry_after_s = lambda exc: 0.0
    try:
        return closed_loop(url, payloads, expect, args.concurrency, args.seconds, True, args.deadline)
    finally:
        client_module.retry_after_s = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=64, help="closed-loop threads of the storm (default 64)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="before/after pairs, order swapped each round (default 2)")
    ap.add_argument("--deadline", type=float, default=10.0, help="each image's deadline, retries included (default 10)")
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="retry-storm-") as tmp:
        from step37_deploy.synthetic import make_checkpoint

        checkpoint = make_checkpoint(Path(tmp) / "tiny", "tiny", dtype="fp32", shards=1, seed=1)
        proc, ports = start_serve(checkpoint, "torch", Path(tmp) / "serve.log", ["--cache-mb", "0"])
        url = f"127.0.0.1:{ports['grpc']}"
        payloads = images(8)
        results: dict = {"load_before": os.getloadavg()}
        try:
            with EmbedClient(url, "grpc", timeout=60) as first:
                expect = [np.asarray(first.embed(p).features) for p in payloads]
            cap = closed_loop(url, payloads, expect, 4, args.seconds / 2, False, args.deadline)
            results["capacity"] = cap
            print(f"capacity (closed loop c4, no retries): {cap['goodput']:.2f}/s", flush=True)
            for r in range(args.rounds):
                for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    got = phase(name, url, payloads, expect, args)
                    results.setdefault(name, []).append(got)
                    print(f"round {r} {name:6}: {json.dumps(got)}", flush=True)
                    time.sleep(3)  # the queue drains between phases
        finally:
            stop_serve(proc)
        results["load_after"] = os.getloadavg()
        for name in ("before", "after"):
            runs = results[name]
            good = sum(x["answered"] for x in runs) / sum(x["wall_s"] for x in runs)
            print(f"{name}: goodput {good:.2f}/s ({good / results['capacity']['goodput']:.0%} of capacity)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
