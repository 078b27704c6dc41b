"""Run one step in this process and print its wall time and peak RSS as JSON (used by the
benchmark scripts and the RSS tests, so each measurement is a fresh process).

    python scripts/measure_rss.py load CHECKPOINT fp16
    python scripts/measure_rss.py export CHECKPOINT OUT_DIR fp16 728 [uint8] [calibrate|no-calibrate|calibrate-bf16]
    python scripts/measure_rss.py build ONNX OUT.plan 8.6,8.9
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    step, *rest = sys.argv[1:]
    t0 = time.perf_counter()
    out: dict = {"step": step, "args": rest}
    if step == "load":
        import torch

        from step37_deploy import load_vision_model

        ckpt, dtype = rest
        model = load_vision_model(ckpt, dtype=dtype)
        out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["dtype"] = str(next(model.parameters()).dtype)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    elif step == "export":
        from step37_deploy.export import export_onnx

        ckpt, out_dir, precision, res, *opts = rest  # [uint8] and an FP16 calibration mode (default: calibrate)
        mode = next((o for o in opts if o != "uint8"), "calibrate")
        r = export_onnx(
            ckpt,
            out_dir,
            precision,
            int(res),
            input_kind="uint8" if "uint8" in opts else "float",
            calibrate=mode != "no-calibrate",
            calibration_dtype="bf16" if mode == "calibrate-bf16" else "fp32",
        )
        out["weight_bytes"] = r.weight_bytes
        out["onnx"] = str(r.onnx_path)
    elif step == "build":
        from step37_deploy.engine import BuildOptions, build_engine

        onnx_path, plan, ccs = rest
        m = build_engine(onnx_path, plan, BuildOptions(batch=(1, 2, 4), compute_capabilities=ccs.split(",")))
        out["engine_bytes"] = m["engine_bytes"]
        out["onnx_bytes"] = sum(p.stat().st_size for p in Path(onnx_path).parent.glob(Path(onnx_path).name + "*"))
    else:
        raise SystemExit(f"unknown step {step}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out))


def peak_rss_bytes() -> int:
    """This process's own peak RSS.  Linux's ``ru_maxrss`` survives ``exec`` and so also counts the
    parent's peak (a test process that just wrote a checkpoint); ``VmHWM`` belongs to this process's
    address space only.  ``ru_maxrss`` where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
