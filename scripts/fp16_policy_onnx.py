"""Which parts of the FP16 graph must stay FP32?  Exports one FP16 ONNX per precision policy and
measures it with ONNX Runtime (CPU) against the PyTorch FP32 reference, side by side in one run.

    python scripts/fp16_policy_onnx.py --preset small --resolution 504 --json engines/fp16_policy_onnx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from step37_deploy import load_vision_model
from step37_deploy.backends import OnnxrtRunner, session_from_onnx
from step37_deploy.compare import metrics, random_pixel_values
from step37_deploy.export import export_onnx
from step37_deploy.model import PRECISION_POLICIES as POLICIES
from step37_deploy.synthetic import make_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--resolution", type=int, default=504)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", default="engines/fp16_policy_onnx.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp16-policy-"))
    ck = make_checkpoint(work / "ck", args.preset, dtype="bf16", shards=2)
    ref_model = load_vision_model(ck, "fp32")
    x = random_pixel_values(args.batch, args.resolution, seed=7)
    with torch.inference_mode():
        ref = ref_model(torch.from_numpy(x)).numpy()
    fp32 = export_onnx(ck, work / "fp32", "fp32", args.resolution)
    rows = {}
    runner = OnnxrtRunner(session_from_onnx(fp32.onnx_path)).activate()
    rows["FP32 graph"] = metrics(ref, runner.infer(x))
    t32 = _time(runner, x)
    rows["FP32 graph"]["latency_ratio_to_fp32_graph"] = 1.0
    for name, policy in POLICIES.items():
        r = export_onnx(ck, work / name.replace(" ", "_").replace(":", ""), "fp16", args.resolution, policy=policy)
        runner = OnnxrtRunner(session_from_onnx(r.onnx_path)).activate()
        rows[name] = metrics(ref, runner.infer(x)) | {"policy": asdict(policy)}
        rows[name]["latency_ratio_to_fp32_graph"] = _time(runner, x) / t32
        print(name, json.dumps(rows[name]), flush=True)
    out = {
        "preset": args.preset,
        "resolution": args.resolution,
        "batch": args.batch,
        "runtime": "onnxruntime CPU",
        "results": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


def _time(runner, x, iters: int = 5) -> float:
    runner.infer(x)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.infer(x)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
