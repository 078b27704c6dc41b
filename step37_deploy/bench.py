"""Latency of backends side by side, reported as ratios measured in one run.

All runners get the same input batch; each is warmed up and then timed ``iters`` times, and the
median is reported with its ratio to the first runner (the baseline).  Timings are only ever
compared within one run, on one machine, never against stored numbers.  The projector is timed
beside the tower (numpy FP32 on the host, and torch on the runner's device) so its share of the
embedding cost is visible per backend.  ``--insertion`` adds the insertion-vs-memcpy measurement.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .files import write_json

log = logging.getLogger(__name__)


@dataclass
class Timing:
    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    iters: int
    ratio_to_baseline: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    batch: int
    resolution: int
    timings: list[Timing] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"batch {self.batch}, {self.resolution}x{self.resolution}; ratios are to the first row"]
        w = max([len(t.name) for t in self.timings] + [8])
        lines.append(f"{'runner'.ljust(w)}  median ms   p10 ms   p90 ms   ratio  extra")
        for t in self.timings:
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.extra.items())
            lines.append(
                f"{t.name.ljust(w)}  {t.median_ms:9.3f}  {t.p10_ms:7.3f}  {t.p90_ms:7.3f}  "
                f"{t.ratio_to_baseline:6.3f}  {extra}"
            )
        for k, v in self.notes.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        write_json(path, asdict(self))


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock milliseconds per call (``sync`` is called inside the timed region for GPUs)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarise(name: str, samples: list[float], **extra: Any) -> Timing:
    q = sorted(samples)
    return Timing(
        name, statistics.median(q), q[max(0, len(q) // 10)], q[min(len(q) - 1, (9 * len(q)) // 10)], len(q), extra=extra
    )


def bench_runners(
    runners: list,
    x: Any | Callable[[Any], Any],
    warmup: int,
    iters: int,
    sync: Callable[[], None] | None = None,
    progress: bool = False,
) -> list[Timing]:
    timings = []
    it = runners
    if progress:
        from tqdm import tqdm

        it = tqdm(runners, desc="benchmarking", unit="runner")
    for r in it:
        r.activate()
        inp = x(r) if callable(x) else x  # per runner: its declared input dtype
        samples = time_fn(lambda r=r, inp=inp: r.infer(inp), warmup, iters, sync)
        timings.append(summarise(r.name, samples))
    base = timings[0].median_ms if timings else 1.0
    for t in timings:
        t.ratio_to_baseline = t.median_ms / base
    return timings


def run_bench(args: Any, progress: bool) -> BenchResult:
    """``step37-deploy bench``: torch / ONNX Runtime / TensorRT runners on one batch, side by side."""
    import torch

    from .backends.factory import runners_from_args
    from .checkpoint import load_projector
    from .compare import random_views, views_for
    from .fusion import project

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torch is None:
        args.torch = ["fp32"]
    runners = runners_from_args(args)
    fixed = {r.resolution for r in [r.activate() for r in runners] if r.resolution}
    if len(fixed) > 1:
        raise UsageError(f"bench: the ONNX files/engines have different resolutions {sorted(fixed)}")
    res = args.resolution or (fixed.pop() if fixed else 728)
    on_gpu = args.device.startswith("cuda") or args.provider == "cuda" or bool(args.engine)
    views = random_views(args.batch, res, 0)

    def x(runner: Any) -> Any:  # the same images, in the dtype each runner declares (uint8 or float)
        arr = views_for(runner, views)
        return torch.from_numpy(arr).to(args.device) if on_gpu else arr

    sync = torch.cuda.synchronize if on_gpu and torch.cuda.is_available() else None
    result = BenchResult(args.batch, res)
    result.timings = bench_runners(runners, x, args.warmup, args.iters, sync, progress)

    # Projector cost beside the tower cost of each runner.
    proj = load_projector(args.checkpoint, "fp32")
    feats = np.asarray(runners[0].infer(views_for(runners[0], views))).astype(np.float32)
    w = proj.weight.detach().numpy()
    b = proj.bias.detach().numpy() if proj.bias is not None else None
    p_np = statistics.median(time_fn(lambda: project(feats, w, b), args.warmup, args.iters))
    result.notes["projector numpy fp32 (host) ms"] = round(p_np, 4)
    dev = torch.device(args.device)
    pt = proj.to(dev)
    ft = torch.from_numpy(feats).to(dev)
    with torch.inference_mode():
        p_t = statistics.median(time_fn(lambda: pt(ft), args.warmup, args.iters, sync))
    result.notes[f"projector torch fp32 ({dev}) ms"] = round(p_t, 4)
    # The projector runs where the features are: on the host (numpy) for CPU runners, on the
    # device (torch) for GPU ones.
    p_used = p_t if on_gpu else p_np
    result.notes["projector share uses"] = f"torch on {dev}" if on_gpu else "numpy on the host"
    for t in result.timings:
        t.extra["projector_share"] = p_used / (p_used + t.median_ms)
    if args.insertion:
        result.notes.update(bench_insertion(warmup=args.warmup, iters=args.iters))
    return result


def bench_insertion(
    seq: int = 32768, hidden: int = 4096, group_rows: int = 1024, warmup: int = 2, iters: int = 10
) -> dict[str, float]:
    """Insertion into a [seq, 1, hidden] FP16 buffer vs a plain memcpy of the same bytes, one run.

    The buffer holds ``seq // (group_rows + 1)`` flagged groups; insertion (in place) writes all
    their rows.  The memcpy baseline copies the same number of bytes between two contiguous
    arrays.  Reported: both bandwidths (GB/s) and their ratio, for numpy and torch (CPU).
    """
    import torch

    from .fusion import insert_features, insert_features_torch

    rng = np.random.default_rng(0)
    n_groups = seq // (group_rows + 1)
    ids = np.zeros((1, seq), dtype=np.int64)
    flag, ph = 7, 9
    for g in range(n_groups):
        s = g * (group_rows + 1)
        ids[0, s] = flag
        ids[0, s + 1 : s + 1 + group_rows] = ph
    emb = rng.standard_normal((seq, 1, hidden), dtype=np.float32).astype(np.float16)
    feats = rng.standard_normal((n_groups, group_rows, hidden), dtype=np.float32).astype(np.float16)
    nbytes = feats.nbytes
    src = feats.reshape(-1).copy()
    dst = np.empty_like(src)

    def timed(fn: Callable[[], Any]) -> float:  # median seconds
        return statistics.median(time_fn(fn, warmup, iters)) / 1e3

    t_copy = timed(lambda: np.copyto(dst, src))
    t_ins = timed(lambda: insert_features(emb, feats, ids, flag, ph, inplace=True))
    emb_t, feats_t, ids_t = torch.from_numpy(emb), torch.from_numpy(feats), torch.from_numpy(ids)
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
    t_copy_t = timed(lambda: dst_t.copy_(src_t))
    t_ins_t = timed(lambda: insert_features_torch(emb_t, feats_t, ids_t, flag, ph, inplace=True))
    return {
        "insertion bytes": nbytes,
        "numpy memcpy GB/s": round(nbytes / t_copy / 1e9, 3),
        "numpy insertion GB/s": round(nbytes / t_ins / 1e9, 3),
        "numpy insertion / memcpy bandwidth": round(t_copy / t_ins, 3),
        "torch memcpy GB/s": round(nbytes / t_copy_t / 1e9, 3),
        "torch insertion GB/s": round(nbytes / t_ins_t / 1e9, 3),
        "torch insertion / memcpy bandwidth": round(t_copy_t / t_ins_t, 3),
    }
