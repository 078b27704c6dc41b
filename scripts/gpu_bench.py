"""GPU measurements on the ``full`` preset (run on a CUDA machine; writes one JSON file).

1. FP16 precision policy study: which parts must stay FP32 in the FP16 graph.  Each policy runs the
   export form of the tower (explicit MatMul-Softmax-MatMul attention, the graph's casts) in FP16
   and is compared with the FP32 reference (TF32 off) on the same images.
2. Latency, side by side in one run: eager PyTorch FP32 / FP16 / BF16 (SDPA), the export form in
   FP16, ONNX Runtime CUDA when its provider is available, and the projector's cost beside the
   tower's.
3. Feature insertion into a [32768, 1, 4096] FP16 buffer vs a device memcpy of the same bytes.

    python scripts/gpu_bench.py --work /tmp/s37 --json $OUT/gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from step37_deploy import load_projector, load_vision_model
from step37_deploy.compare import metrics, random_pixel_values
from step37_deploy.fusion import insert_features_torch
from step37_deploy.model import PRECISION_POLICIES as POLICIES
from step37_deploy.synthetic import make_checkpoint


def cuda_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def policy_study(ck: Path, ref: torch.nn.Module) -> dict:
    """Each precision policy in the export form (explicit attention) vs the FP32 reference."""
    study: dict = {}
    half = load_vision_model(ck, "fp16").cuda().set_attention_impl("explicit")
    for res in (728, 504):
        x = torch.from_numpy(random_pixel_values(4, res, seed=res)).cuda()
        with torch.inference_mode():
            r = ref(x).float().cpu().numpy()
        for name, pol in POLICIES.items():
            half.set_precision_policy(pol)
            with torch.inference_mode():
                g = half(x.half()).float().cpu().numpy()
            study.setdefault(name, {})[str(res)] = metrics(r, g) | {"policy": asdict(pol)}
        print(json.dumps({k: v.get(str(res)) for k, v in study.items()}), flush=True)
    del half
    torch.cuda.empty_cache()
    return study


def latency(ck: Path, ref: torch.nn.Module) -> dict:
    """Eager latencies at 728, batch 1 and 8, as ratios to torch FP32 (TF32 off) in the same run."""
    lat = {}
    proj = load_projector(ck, "fp16").cuda()
    for batch in (1, 8):
        x = torch.from_numpy(random_pixel_values(batch, 728, seed=1)).cuda()
        row = {}
        with torch.inference_mode():
            row["torch fp32 sdpa"] = cuda_ms(lambda x=x: ref(x))
            for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
                m = load_vision_model(ck, name).cuda()
                xd = x.to(dt)
                row[f"torch {name} sdpa"] = cuda_ms(lambda m=m, xd=xd: m(xd))
                if name == "fp16":
                    m.set_attention_impl("explicit")
                    row["torch fp16 export-form (explicit attention, FP32 islands)"] = cuda_ms(lambda m=m, xd=xd: m(xd))
                    feats = m.set_attention_impl("sdpa")(xd)
                    row["projector fp16 (torch, GPU)"] = cuda_ms(lambda f=feats: proj(f))
                del m
                torch.cuda.empty_cache()
        base = row["torch fp32 sdpa"]
        lat[str(batch)] = {k: {"ms": round(v, 3), "ratio_to_torch_fp32": round(v / base, 4)} for k, v in row.items()}
        print(json.dumps(lat[str(batch)]), flush=True)
    return lat


def insertion_vs_memcpy() -> dict:
    """Feature insertion into a [32768, 1, 4096] FP16 CUDA buffer vs a device copy of the same bytes."""
    seq, hidden, rows = 32768, 4096, 1024
    n_groups = seq // (rows + 1)
    ids = torch.zeros(1, seq, dtype=torch.long)
    for g in range(n_groups):
        ids[0, g * (rows + 1)] = 7
        ids[0, g * (rows + 1) + 1 : (g + 1) * (rows + 1)] = 9
    emb = torch.randn(seq, 1, hidden, device="cuda", dtype=torch.float16)
    feats = torch.randn(n_groups, rows, hidden, device="cuda", dtype=torch.float16)
    src = feats.reshape(-1).clone()
    dst = torch.empty_like(src)
    t_copy = cuda_ms(lambda: dst.copy_(src))
    t_ins = cuda_ms(lambda: insert_features_torch(emb, feats, ids, 7, 9, inplace=True))
    nbytes = feats.numel() * 2
    # where the time goes: host-side planning, and the device copy alone (index precomputed)
    from step37_deploy.fusion import plan_insertion

    ids_np = ids.numpy()
    t_plan = cuda_ms(lambda: plan_insertion(ids_np, 7, [rows] * n_groups, 9))
    plan = plan_insertion(ids_np, 7, [rows] * n_groups, 9)
    index = torch.from_numpy(np.concatenate([np.arange(s, s + n) for _, s, n in plan])).cuda()
    flat, src2 = emb.view(-1, hidden), feats.reshape(-1, hidden)
    t_index_copy = cuda_ms(lambda: flat.index_copy_(0, index, src2))
    flat64, src64 = flat.view(torch.int64), src2.view(torch.int64)
    t_index_copy64 = cuda_ms(lambda: flat64.index_copy_(0, index, src64))
    t_loop = cuda_ms(lambda: [flat[s : s + n].copy_(feats[g]) for g, (_, s, n) in enumerate(plan)])
    return {
        "bytes": nbytes,
        "memcpy_GBps": round(nbytes / t_copy / 1e6, 1),
        "insertion_GBps": round(nbytes / t_ins / 1e6, 1),
        "insertion_over_memcpy_bandwidth": round(t_copy / t_ins, 3),
        "plan_ms_host": round(t_plan, 4),
        "index_copy_only_over_memcpy": round(t_copy / t_index_copy, 3),
        "index_copy_int64_view_only_over_memcpy": round(t_copy / t_index_copy64, 3),
        "per_group_copy_only_over_memcpy": round(t_copy / t_loop, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/s37")
    ap.add_argument("--json", required=True)
    ap.add_argument("--parts", default="policy,latency,insertion", help="comma-separated subset to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    ck = Path(args.work) / "full"
    if parts & {"policy", "latency"}:
        t0 = time.perf_counter()
        if not ck.exists():
            make_checkpoint(ck, "full", dtype="bf16", shards=4)
        out["make_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        ref = load_vision_model(ck, "fp32").cuda()
    if "policy" in parts:
        out["fp16_policy_study"] = policy_study(ck, ref)
    if "latency" in parts:
        out["latency_728"] = latency(ck, ref)

    try:
        import onnxruntime as ort

        out["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        out["onnxruntime"] = "not installed"

    if "insertion" in parts:
        out["insertion_gpu"] = insertion_vs_memcpy()
        print(json.dumps(out["insertion_gpu"]), flush=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
