"""Export the ``full`` preset (1.95 B parameters) from a synthetic bf16 checkpoint, FP16 and FP32,
and record wall time and peak RSS per export (each in a fresh process) in a JSON file.

    python scripts/bench_export_full.py --work /tmp/step37-full --json engines/bench_export_full.json

Also records loading the tower into fp16 (peak RSS vs loaded bytes), and, when TensorRT-RTX is
installed, the ahead-of-time engine build of the FP16 728 ONNX (wall time, peak RSS, engine size).
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

from step37_deploy.files import write_json

HERE = Path(__file__).resolve().parent


def measured(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "measure_rss.py"), *args], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"step {args[0]} failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "step37-full"))
    ap.add_argument("--json", default="engines/bench_export_full.json")
    ap.add_argument("--skip-fp32", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    ckpt = work / "checkpoint"
    results: dict = {"machine": {"cpus": os.cpu_count()}}
    if not ckpt.exists():
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "step37_deploy.cli",
                "make-checkpoint",
                "--preset",
                "full",
                "--out",
                str(ckpt),
                "--dtype",
                "bf16",
                "--shards",
                "4",
            ],
            check=True,
        )
        results["make_checkpoint_seconds"] = round(time.perf_counter() - t0, 1)
    results["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    load = measured("load", str(ckpt), "fp16")
    load["peak_rss_over_weights"] = round(load["peak_rss_bytes"] / load["weight_bytes"], 3)
    results["load_fp16"] = load
    for precision in ["fp16"] + ([] if args.skip_fp32 else ["fp32"]):
        r = measured("export", str(ckpt), str(work / "onnx"), precision, "728")
        r["peak_rss_over_weights"] = round(r["peak_rss_bytes"] / r["weight_bytes"], 3)
        results[f"export_{precision}_728"] = r
        print(json.dumps(r), flush=True)
    if not args.skip_build:
        try:
            import tensorrt_rtx  # noqa: F401

            onnx_path = work / "onnx" / "step37_vision_fp16_728.onnx"
            results["build_rtx_fp16_728"] = measured("build", str(onnx_path), str(work / "full_fp16_728.plan"), "8.9")
        except ImportError:
            results["build_rtx_fp16_728"] = "tensorrt-rtx not installed"
    write_json(args.json, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
