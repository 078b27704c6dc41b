"""What can run on a CUDA machine without TensorRT: the runtime's torch paths on the GPU, checked
against the CPU FP32 path (run on a lent GPU machine; prints one JSON line per check).

    python scripts/gpu_smoke.py --work /tmp/s37-smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from preprocess_cases import synthetic_image  # noqa: E402

from step37_deploy.backends import TorchRunner, load_torch_model  # noqa: E402
from step37_deploy.compare import compare, metrics  # noqa: E402
from step37_deploy.fusion import insert_features, insert_features_torch  # noqa: E402
from step37_deploy.runtime import VisionEmbedder  # noqa: E402
from step37_deploy.synthetic import make_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/s37-smoke")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    ck = Path(args.work) / args.preset
    if not ck.exists():
        make_checkpoint(ck, args.preset, dtype="bf16", shards=2)
    images = [synthetic_image(1000, 800), synthetic_image(300, 300), synthetic_image(2900, 700)]
    cpu = VisionEmbedder.from_artifacts(ck, "torch", dtype="fp32").embed_images(images)
    for dtype in ("fp32", "fp16", "bf16"):
        gpu = VisionEmbedder.from_artifacts(ck, "torch", device="cuda", dtype=dtype).embed_images(images)
        worst = min(
            metrics(c.features, g.features.float().cpu().numpy())["cos_min"] for c, g in zip(cpu, gpu, strict=True)
        )
        on = {str(g.features.device) for g in gpu}
        print(
            json.dumps(
                {"check": f"embed_images torch {dtype} cuda vs cpu fp32", "cos_min": worst, "device": sorted(on)}
            )
        )

    # fuse on CUDA tensors (index_copy_ path) == numpy insertion, bit for bit
    emb = VisionEmbedder.from_artifacts(ck, "torch", device="cuda", dtype="fp16")
    embs = emb.embed_images(images)
    ids = [1]
    for e in embs:
        ids += [*e.token_ids, 2]
    ids_t = torch.tensor([ids])
    text = torch.randn(len(ids), 1, embs[0].features.shape[-1], device="cuda", dtype=torch.float16)
    fused = emb.fuse(ids_t, text, embs)
    groups = []
    for e in embs:
        f = e.features.cpu().numpy()
        groups += [f[i * 81 : (i + 1) * 81] for i in range(e.num_crops)] + [f[e.num_crops * 81 :]]
    ref = insert_features(
        text.cpu().numpy(), groups, ids_t.numpy(), [emb.tokens.patch_start, emb.tokens.im_start], emb.tokens.im_patch
    )
    print(
        json.dumps(
            {
                "check": "fuse on cuda == numpy insertion",
                "equal": bool(np.array_equal(fused.cpu().numpy(), ref)),
                "device": str(fused.device),
            }
        )
    )
    g2 = insert_features_torch(
        text,
        [torch.from_numpy(g).cuda() for g in groups],
        ids_t,
        [emb.tokens.patch_start, emb.tokens.im_start],
        batch_first=False,
    )
    print(json.dumps({"check": "insert_features_torch list on cuda", "equal": bool(torch.equal(g2, fused))}))

    # the device-planned insertion == numpy insertion on random layouts; same errors
    rng = np.random.default_rng(0)
    mismatches = errors_same = 0
    for trial in range(200):
        bsz, hidden = int(rng.integers(1, 4)), 8
        seqs, lengths = [], []
        for _ in range(bsz):
            q = []
            for _ in range(int(rng.integers(0, 4))):
                n = int(rng.integers(1, 7))
                q += [1] * int(rng.integers(0, 3)) + [5] + [9] * n
                lengths.append(n)
            seqs.append(q + [1] * int(rng.integers(0, 3)))
        s = max(1, max(len(q) for q in seqs))
        ids_np = np.ones((bsz, s), np.int64)
        for i, q in enumerate(seqs):
            ids_np[i, : len(q)] = q
        feats = [rng.standard_normal((n, hidden)).astype(np.float16) for n in lengths]
        bf = bool(trial % 2)
        e = rng.standard_normal((bsz, s, hidden) if bf else (s, bsz, hidden)).astype(np.float16)
        if trial % 10 == 9 and lengths:  # a broken layout: one row too many for the last group
            feats[-1] = rng.standard_normal((lengths[-1] + 1, hidden)).astype(np.float16)
        try:
            want = insert_features(e, feats, ids_np, 5, 9, batch_first=bf)
        except Exception as exc:
            want = exc
        try:
            got = (
                insert_features_torch(
                    torch.from_numpy(e).cuda(),
                    [torch.from_numpy(f).cuda() for f in feats],
                    torch.from_numpy(ids_np),
                    5,
                    9,
                    batch_first=bf,
                )
                .cpu()
                .numpy()
            )
        except Exception as exc:
            got = exc
        if isinstance(want, Exception) or isinstance(got, Exception):
            errors_same += type(want) is type(got) and str(want) == str(got)
            mismatches += not (type(want) is type(got) and str(want) == str(got))
        else:
            mismatches += not np.array_equal(want, got)
    print(
        json.dumps(
            {
                "check": "device-planned insertion vs numpy, 200 random layouts",
                "mismatches": mismatches,
                "identical_errors": errors_same,
            }
        )
    )

    # compare() with GPU torch runners against the CPU FP32 reference
    from step37_deploy import load_projector

    w = load_projector(ck).weight.detach().numpy()
    ref_runner = TorchRunner(load_torch_model(str(ck), "fp32"), name="torch-fp32-cpu")
    runners = [TorchRunner(load_torch_model(str(ck), d, "cuda"), name=f"torch-{d}-cuda") for d in ("fp32", "fp16")]
    report = compare(ref_runner, runners, w, None, [1, 4])
    print(report.table())


if __name__ == "__main__":
    main()
