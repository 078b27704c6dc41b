"""What the loader's safety checks cost on a real-size checkpoint (default: the full preset).

Measured side by side in one run, on the tensors as the loader streams them (one at a time):

* the NaN/Inf check as the loader does it (``checkpoint.all_finite``: one ``aminmax`` pass) vs the
  naive ``torch.isfinite(t).all()`` and an FP32-accumulated sum, against the time to read + convert
  the same tensors;
* the full vision-weights digest (``weights_digest``, recorded at export) vs the sampled
  fingerprint (``weights_fingerprint``, checked at every ``embed``/server start).

Usage: ``python scripts/measure_reader_checks.py [/work/ckpt/full] [--dtype fp32]``
"""

from __future__ import annotations

import argparse
import time

import torch

from step37_deploy import checkpoint as ck


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "checkpoint", nargs="?", default="/work/ckpt/full", help="checkpoint folder (default /work/ckpt/full)"
    )
    ap.add_argument("--dtype", default="fp32", help="dtype the loader converts to (default fp32, the reference's)")
    args = ap.parse_args()

    refs = {**ck.vision_refs(args.checkpoint), **ck._refs(args.checkpoint, ck.PROJECTOR_PREFIXES, "projector")}
    dtype = ck.parse_dtype(args.dtype)
    nbytes = 0
    t_read = t_check = t_naive = t_sum = 0.0
    n = 0
    ck.check_storage(refs, "vision")  # as the loader does, once
    original = ck.all_finite
    ck.all_finite = lambda t: True  # time the read/convert alone; the checks are timed below
    try:
        started = time.perf_counter()
        for _name, t in ck.iter_tensors(refs, dtype):
            t_read += time.perf_counter() - started
            a = time.perf_counter()
            ok = original(t)
            b = time.perf_counter()
            naive = bool(torch.isfinite(t).all())
            c = time.perf_counter()
            summed = bool(torch.isfinite(t.sum(dtype=torch.float32)))
            d = time.perf_counter()
            assert ok and naive and summed
            t_check += b - a
            t_naive += c - b
            t_sum += d - c
            nbytes += t.numel() * t.element_size()
            n += 1
            started = time.perf_counter()
    finally:
        ck.all_finite = original
    print(f"tensors {n}, {nbytes / 1e9:.2f} GB as {dtype}")
    print(f"read+convert          {t_read:7.2f} s")
    print(f"all_finite (aminmax)  {t_check:7.2f} s  = {t_check / t_read:.3f} x read+convert")
    print(f"isfinite().all()      {t_naive:7.2f} s  = {t_naive / t_read:.3f} x read+convert")
    print(f"sum(dtype=float32)    {t_sum:7.2f} s  = {t_sum / t_read:.3f} x read+convert")

    a = time.perf_counter()
    fp = ck.weights_fingerprint(args.checkpoint)
    b = time.perf_counter()
    digest = ck.weights_digest(args.checkpoint)
    c = time.perf_counter()
    print(f"weights_fingerprint   {b - a:7.3f} s  ({fp[:24]}...)")
    print(
        f"weights_digest (full) {c - b:7.3f} s  ({digest[:16]}...)  ratio digest/fingerprint {(c - b) / (b - a):.0f}x"
    )


if __name__ == "__main__":
    main()
