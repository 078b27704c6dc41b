"""Running the corpus job: fingerprint, plan, sizing, an engine, progress, and the summary.

:func:`run_corpus` is what ``step37-deploy embed-corpus`` calls, and what a Python user calls: it
expands the inputs, fingerprints the run, keeps the complete shards (:func:`~.job.plan`), checks the
free space against the estimate from the image headers, runs the shards to do on the chosen engine
(:class:`~.local.LocalRunner` or :class:`~.ray_engine.RayRunner`), and counts every key from the
manifests on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import check_output_dir, ensure_dir, refuse_inputs, remove_stale_temporaries
from ..preprocess import PREPROCESS_VERSION, PreprocessConfig
from .compute import EngineSpec
from .job import JobSpec, Summary, kill_point, plan, summarize
from .shard import DTYPES, FORMAT, fingerprint_of
from .sources import IMAGE_EXTS, expand_inputs

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass
class CorpusOptions:
    inputs: Sequence[str]
    out: str
    engine: EngineSpec
    outputs: tuple[str, ...] = ("vision_features",)
    dtype: str = "bf16"
    runner: str = "local"  # local | ray
    workers: int = 1
    devices: tuple[str, ...] = ()
    ray_address: str | None = None
    ray_cpus: float = 1.0
    ray_gpus: float = 0.0
    shard_size: int = 1000
    image_exts: tuple[str, ...] = IMAGE_EXTS
    max_image_mb: float = 64.0
    overwrite: bool = False
    space_check: bool = True
    log_every_s: float = 30.0


def describe_run(opts: CorpusOptions) -> tuple[dict[str, Any], dict[str, int]]:
    """What decides the tensors (the fingerprint's content), and the row width of each kind."""
    from ..checkpoint import weights_fingerprint
    from ..config import Step37Config

    eng = opts.engine
    cfg = Step37Config.from_checkpoint(eng.checkpoint)
    dims = {"vision_features": cfg.projector.in_features, "features": cfg.projector.out_features}
    run: dict[str, Any] = {
        "format": FORMAT,
        "vision_weights": weights_fingerprint(eng.checkpoint),
        "projector": dataclasses.asdict(cfg.projector),
        "tokens": {k: v for k, v in dataclasses.asdict(cfg.tokens).items() if k != "source"},
        "preprocess": {"version": PREPROCESS_VERSION, "max_pixels": eng.max_pixels},
        "dtype": opts.dtype,
        "outputs": sorted(opts.outputs),
        "image_exts": list(opts.image_exts),
    }
    if "features" in opts.outputs:
        run["projector_sha256"] = _projector_digest(eng.checkpoint)
    if eng.server:
        run["engine"] = {"server": True}  # what the fleet runs is its own; the checkpoint names it
    else:
        run["engine"] = {"backend": eng.backend, "artifacts": [_artifact_id(eng.backend, a) for a in eng.artifacts]}
    return run, dims


def _projector_digest(checkpoint: str) -> str:
    import hashlib

    from ..checkpoint import load_projector

    h = hashlib.sha256()
    for name, t in sorted(load_projector(checkpoint, "fp32").state_dict().items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _artifact_id(backend: str, path: str) -> dict[str, Any]:
    """An ONNX file's or engine's identity: its recorded metadata (precision, resolution, input
    dtype, weights fingerprint), not its path or time, so a copied artifact keeps its shards."""
    from ..runtime import _recorded_metadata

    meta = _recorded_metadata(backend, path)
    return {"name": Path(path).name, "metadata": dict(sorted(meta.items()))}


class _Progress:
    """A tqdm bar (images, images/s, ETA) on a terminal, a log line every ``every_s`` otherwise."""

    def __init__(self, total: int | None, enabled: bool, every_s: float) -> None:
        self.total, self.every_s, self.done = total, every_s, 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        self.log_lines = enabled and not sys.stderr.isatty()
        if enabled and not self.log_lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="embed-corpus", dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log_lines and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.t0, 1e-9)
            eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.total and rate > 0 else ""
            log.info("embed-corpus: %d/%s images, %.2f images/s%s", self.done, self.total or "?", rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_inputs(opts: CorpusOptions, sources: Sequence[Any]) -> None:
    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {opts.dtype!r}")
    if not opts.outputs or any(k not in ("vision_features", "features") for k in opts.outputs):
        raise InputError(f"--outputs must be vision_features and/or features, got {list(opts.outputs)}")
    if opts.runner not in ENGINES:
        raise InputError(f"--engine must be one of {ENGINES}, got {opts.runner!r}")
    out = Path(opts.out)
    check_output_dir(out, "--out")
    refuse_inputs({"--out": out}, {"--checkpoint": [opts.engine.checkpoint]})
    for s in sources:
        if s.kind == "folder" and Path(s.path).resolve() == out.resolve():
            raise InputError(f"--out {out} is the input folder {s.path}: choose another --out")


def make_spec(opts: CorpusOptions) -> JobSpec:
    run, dims = describe_run(opts)
    return JobSpec(
        out=str(Path(opts.out)),
        engine=opts.engine,
        fingerprint=fingerprint_of(run),
        run=run,
        dims=dims,
        outputs=tuple(opts.outputs),
        dtype=opts.dtype,
        image_exts=tuple(opts.image_exts),
        max_image_bytes=int(opts.max_image_mb * (1 << 20)),
        engine_name=opts.runner,
    )


def run_corpus(opts: CorpusOptions, progress: bool = True) -> Summary:
    """Run the job; returns the summary (its :meth:`~.job.Summary.line` is the closing line)."""
    t0 = time.monotonic()
    sources = expand_inputs(opts.inputs, opts.shard_size, opts.image_exts)
    _check_inputs(opts, sources)
    spec = make_spec(opts)
    ensure_dir(Path(opts.out), "--out")
    kill_point("start")
    p = plan(sources, spec, opts.overwrite)
    log.info("%d shards: %d complete, %d to do", len(sources), len(p.done), len(p.todo))
    total = None
    if p.todo and opts.space_check:
        from .sizing import check_space, estimate

        widths = {k: spec.dims[k] for k in spec.kinds}
        est = estimate(p.todo, widths, opts.dtype, opts.image_exts, PreprocessConfig(max_pixels=opts.engine.max_pixels))
        check_space(Path(opts.out), est)
        total = est.images
    rows: list[dict[str, Any]] = []
    bar = _Progress(total, progress and opts.runner == "local", opts.log_every_s)
    try:
        _runner(opts, spec, progress).run(p.todo, rows.append, bar)
    finally:
        bar.close()
    kill_point("ran")
    remove_stale_temporaries(opts.out)
    return summarize(sources, spec, rows, time.monotonic() - t0)


def _runner(opts: CorpusOptions, spec: JobSpec, progress: bool) -> Any:
    if opts.runner == "ray":
        from .ray_engine import RayRunner

        return RayRunner(spec, opts.workers, opts.ray_address, opts.ray_cpus, opts.ray_gpus, progress)
    from .local import LocalRunner

    return LocalRunner(spec, opts.workers, opts.devices)
