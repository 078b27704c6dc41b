"""Per-client fairness of ``serve``'s gateway: a second client's latency alone and while one other
client holds 900 slow connections and bodies, side by side in one run.

One real ``step37-deploy serve`` (default gateway limits: 1,024 requests in flight per port, 128
per client address; tiny synthetic checkpoint and torch towers unless ``--checkpoint``).  The
attacker connects from 127.0.0.2 (Linux routes 127/8 to loopback) and holds, by default, 300
connections trickling a request line (HTTP and metrics ports), 300 HTTP inference bodies
trickling one byte a second, and 300 gRPC inference streams stalled after their first bytes (3
HTTP/2 connections), each reopened when the gateway closes it.  The second client, from
127.0.0.1, sends ``--requests`` embeddings, each on a new connection and tried once, alternating
gRPC and HTTP.  Phases alternate (alone, attack; then attack, alone; ...) for ``--rounds`` rounds
so that a shared machine's load changes hit both alike; every answer is checked.

    python scripts/gateway_fairness.py [--slow 900] [--requests 20] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import socket
import statistics
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

from step37_deploy.serving import contract as C  # noqa: E402
from step37_deploy.serving.client import EmbedClient  # noqa: E402
from tests.rawh2 import H2, grpc_message  # noqa: E402  (the tests' minimal HTTP/2 client)

ATTACKER = "127.0.0.2"


def connect(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ATTACKER, 0))
    s.settimeout(2)
    s.connect(("127.0.0.1", port))
    return s


class Attacker:
    """``n`` slow connections from 127.0.0.2: a third trickling a request line, a third trickling
    an inference body, a third stalled gRPC streams; ``stats`` counts what it (re)opened."""

    def __init__(self, ports: dict[str, int], n: int) -> None:
        self.ports, self.n = ports, n
        self.stop = threading.Event()
        self.stats = {"opened": 0, "closed by the gateway": 0}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.body_head = (
            f"POST /v2/models/{C.EMBEDDER_MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: 0\r\n"
            f"Content-Length: {2**20}\r\n\r\n"
        ).encode()

    def _open(self, i: int) -> socket.socket:
        header = i < self.n // 3  # a request line (HTTP and metrics ports), else an inference body
        s = connect(self.ports["metrics"] if header and i % 2 else self.ports["http"])
        s.sendall(b"G" if header else self.body_head)
        self.stats["opened"] += 1
        return s

    def _run(self) -> None:
        sockets: list[socket.socket | None] = [None] * (2 * self.n // 3)
        streams = []
        try:
            for _ in range(0, self.n - len(sockets), 100):
                h = H2(self.ports["grpc"], ATTACKER)
                streams.append(h)
                for _ in range(100):
                    h.send(h.request("/inference.GRPCInferenceService/ModelInfer"), grpc_message(bytes(2**20))[:15])
            while not self.stop.is_set():
                for i, s in enumerate(sockets):
                    try:
                        if s is None:
                            sockets[i] = s = self._open(i)
                        s.sendall(b"x")
                    except OSError:
                        self.stats["closed by the gateway"] += 1
                        with contextlib.suppress(OSError, AttributeError):
                            s.close()
                        sockets[i] = None
                for h in streams:
                    h.pump(0)
                self.stop.wait(1.0)
        finally:
            for s in [*sockets, *streams]:
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def __enter__(self) -> Attacker:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def second_client(ports: dict[str, int], n: int, image: bytes, expect) -> tuple[list[float], int]:
    """Latencies of the answers that were right, and how many were."""
    lat = []
    for i in range(n):
        protocol = ("grpc", "http")[i % 2]
        t0 = time.perf_counter()
        try:
            with EmbedClient(f"127.0.0.1:{ports[protocol]}", protocol, timeout=20, retry=False) as client:
                got = client.embed(image)
        except Exception as exc:  # counted as a failure
            print(f"  {protocol} request failed: {exc}", flush=True)
            continue
        if got.token_ids == expect.token_ids and np.allclose(got.features, expect.features, atol=1e-5):
            lat.append(time.perf_counter() - t0)
    return lat, len(lat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: a tiny synthetic one)")
    ap.add_argument("--backend", default="torch", choices=["torch"], help="towers (default torch: no artifacts)")
    ap.add_argument("--slow", type=int, default=900, help="the attacker's slow connections and bodies (default 900)")
    ap.add_argument("--requests", type=int, default=20, help="the second client's requests per phase (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="alone/attack pairs, order swapped each round (default 3)")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="attack time before the second client (default 3)")
    ap.add_argument("--serve-arg", action="append", default=[], help="an extra serve option (repeatable)")
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-fairness-") as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from step37_deploy.synthetic import make_checkpoint

            checkpoint = make_checkpoint(Path(tmp) / "tiny", "tiny", dtype="fp32", shards=1, seed=1)
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, "PNG")
        image = buf.getvalue()
        log = Path(tmp) / "serve.log"
        proc, ports = start_serve(checkpoint, args.backend, log, args.serve_arg)
        lat: dict[str, list[float]] = {"alone": [], "attack": []}
        answered = {"alone": 0, "attack": 0}
        stats = []
        try:
            expect = EmbedClient(f"127.0.0.1:{ports['grpc']}", "grpc").embed(image)  # fills the cache
            second_client(ports, 4, image, expect)  # warm-up
            for r in range(args.rounds):
                for phase in ("alone", "attack") if r % 2 == 0 else ("attack", "alone"):
                    if phase == "alone":
                        got, ok = second_client(ports, args.requests, image, expect)
                    else:
                        with Attacker(ports, args.slow) as attacker:
                            time.sleep(args.warmup_s)
                            got, ok = second_client(ports, args.requests, image, expect)
                        stats.append(dict(attacker.stats))
                        time.sleep(5)  # what the attack held is released
                    lat[phase] += got
                    answered[phase] += ok
                    p50 = statistics.median(got) * 1000 if got else float("nan")
                    print(f"round {r} {phase:6}: {ok}/{args.requests} answered, p50 {p50:.1f} ms", flush=True)
        finally:
            stop_serve(proc)
        text = log.read_text(errors="replace")
        gateway_lines = len(re.findall(r"nginx: ", text))
        p50 = {k: statistics.median(v) * 1000 for k, v in lat.items() if v}
        result = {
            "slow": args.slow,
            "requests_per_phase": args.requests,
            "rounds": args.rounds,
            "answered": answered,
            "p50_ms": p50,
            "p50_ratio": p50["attack"] / p50["alone"] if len(p50) == 2 else None,
            "attacker": stats,
            "gateway_log_lines": gateway_lines,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
