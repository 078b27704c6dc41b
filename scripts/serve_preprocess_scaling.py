"""Images/s of host preprocessing through the served embedder, 1 vs N embedder instances, one run.

``--preprocess-instances`` is the embedder's ``instance_group`` count: each instance is its own
Python-backend process, so decode + preprocess should scale with cores.  To measure *that*, the
towers here are a trivial ONNX graph of the served shapes (mean-pool -> one MatMul), written by
this script: with the real (even the tiny preset's) tower on the same CPU, the towers would be most
of the time and the number would say nothing about preprocessing.  Everything else is the real
thing: ``write_repository`` with ``cache_mb=0``, the bundled tritonserver, and the issue-9 load
test (``serving.loadtest.run_loadtest``, gRPC, answers checked against the in-process embedder on
the same artifacts).  Per run it also prints Triton's per-model compute time per request.

    python scripts/serve_preprocess_scaling.py --checkpoint CKPT --images photo.jpg ... \
        [--instances 1 --instances 2] [--concurrency 4] [--requests 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def trivial_tower(path: Path, resolution: int, tokens: int, dim: int) -> Path:
    """An ONNX tower with the served I/O: [B, 3, R, R] -> mean over H, W -> @ [3, tokens*dim] -> [B, tokens, dim]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(resolution).standard_normal((3, tokens * dim)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["image_features"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"trivial_tower_{resolution}",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, resolution, resolution])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", tokens, dim])],
        [
            numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([-1, tokens, dim], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    helper.set_model_props(model, {"step37.resolution": str(resolution), "step37.precision": "fp32"})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint (projector, token ids, tower shapes)")
    ap.add_argument("--images", nargs="+", required=True, help="image files sent round robin")
    ap.add_argument("--instances", type=int, action="append", help="embedder instances per run (default 1 and 2)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--requests", type=int, default=24, help="requests per run (default 24)")
    ap.add_argument("--json", default=None, help="write the results here (default none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from step37_deploy.config import Step37Config
    from step37_deploy.serving.loadtest import LoadtestOptions, run_loadtest
    from step37_deploy.serving.repository import RepositoryOptions, write_repository
    from step37_deploy.serving.server import TritonServer

    cfg = Step37Config.from_checkpoint(args.checkpoint)
    results = []
    with tempfile.TemporaryDirectory(prefix="step37-scaling-") as tmp:
        tmp = Path(tmp)
        towers = [
            trivial_tower(tmp / f"trivial_{r}.onnx", r, cfg.vision.num_output_tokens(r, r), cfg.vision.output_dim)
            for r in (728, 504)
        ]
        for k, n in enumerate(args.instances or [1, 2]):
            opts = RepositoryOptions(preprocess_instances=n, cache_mb=0, max_queue_delay_us=0)
            repo = write_repository(args.checkpoint, "onnx", towers, tmp / f"repo{k}", opts)
            server = TritonServer(repo, tmp / f"work{k}", host="127.0.0.1", exit_timeout_s=10).start(300)
            try:
                report = run_loadtest(
                    LoadtestOptions(
                        url=server.grpc_url,
                        protocol="grpc",
                        images=args.images,
                        checkpoint=args.checkpoint,
                        artifacts=towers,
                        concurrency=(args.concurrency,),
                        requests=args.requests,
                        duration_s=600,
                        metrics_url=f"127.0.0.1:{server.metrics_port}",
                    ),
                    progress=False,
                )
            finally:
                server.stop()
            run = report.to_json()["runs"][0]
            # The machine's 1-minute load average after the run: other work on the same cores shows here.
            results.append({"instances": n, "ok": report.ok, "loadavg_1min": os.getloadavg()[0], **run})
            print(report.table(), flush=True)
    base = results[0]["throughput_ips"]
    print(f"\n{os.cpu_count()} CPUs; instances  images/s  ratio vs first  load average (1 min) after the run")
    for r in results:
        ips = r["throughput_ips"]
        ratio = ips / base if base else float("nan")
        print(f"{r['instances']:>9}  {ips:8.3f}  {ratio:5.2f}x  {r['loadavg_1min']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
