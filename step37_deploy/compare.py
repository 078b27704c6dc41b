"""Accuracy report: every backend against the PyTorch FP32 reference, before and after the projector.

For each resolution and batch size asked for, the same inputs go through the reference and each
runner; the report gives per-token cosine similarity (min and mean), max abs error and relative L2
error of the image features, and the same numbers after ``vit_large_projector`` (applied in FP32 to
both sides, so the projector itself adds no error).  A threshold per precision decides pass/fail.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backends.base import Runner
from .errors import InputError, ThresholdError, UsageError
from .files import write_json
from .fusion import project
from .preprocess import PreprocessConfig, as_pixel_dtype, normalise_views, preprocess, to_chw, to_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria for one precision (features and projected features alike).

    Validated on construction: a NaN threshold would make every comparison fail (or, written the
    other way round, pass), ``cos_min`` above 1 can never be met and at -1 or below always is,
    and a negative ``rel_l2`` can never be met."""

    cos_min: float
    rel_l2: float

    def __post_init__(self) -> None:
        if not (isinstance(self.cos_min, (int, float)) and math.isfinite(self.cos_min) and -1 < self.cos_min <= 1):
            raise UsageError(f"--cos-min (cos_min) must be a finite number in (-1, 1], got {self.cos_min!r}")
        if not (isinstance(self.rel_l2, (int, float)) and math.isfinite(self.rel_l2) and self.rel_l2 >= 0):
            raise UsageError(f"--rel-l2 (rel_l2) must be a finite number >= 0, got {self.rel_l2!r}")


#: Defaults per precision.  FP32 graphs differ from eager PyTorch only by kernel order; FP16 ones
#: by FP16 rounding through 47 blocks (see docs/fp16.md for the measured numbers).
DEFAULT_THRESHOLDS = {
    "fp32": Thresholds(cos_min=0.99999, rel_l2=1e-4),
    "fp16": Thresholds(cos_min=0.9995, rel_l2=3e-2),
    "bf16": Thresholds(cos_min=0.995, rel_l2=1e-1),
}


def metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Per-token cosine (min/mean), max abs error and relative L2 error, computed in FP64."""
    if ref.shape != got.shape:
        raise InputError(f"output shapes differ: reference {ref.shape} vs backend {got.shape}")
    r = ref.astype(np.float64).reshape(-1, ref.shape[-1])
    g = got.astype(np.float64).reshape(-1, got.shape[-1])
    denom = np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1)
    cos = np.where(denom > 0, (r * g).sum(-1) / np.maximum(denom, 1e-300), 1.0)
    finite = bool(np.isfinite(g).all())
    return {
        "cos_min": float(cos.min()) if finite else float("nan"),
        "cos_mean": float(cos.mean()) if finite else float("nan"),
        "max_abs": float(np.abs(r - g).max()) if finite else float("inf"),
        "rel_l2": float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-300)) if finite else float("inf"),
    }


def random_views(batch: int, resolution: int, seed: int) -> np.ndarray:
    """Random uint8 images as views [B, 3, R, R] uint8 (what uint8-input artifacts take)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(batch, resolution, resolution, 3), dtype=np.uint8)
    return np.ascontiguousarray(img.transpose(0, 3, 1, 2))


def random_pixel_values(batch: int, resolution: int, seed: int) -> np.ndarray:
    """:func:`random_views` normalised with CLIP mean/std, [B, 3, R, R] FP32 (realistic range)."""
    return normalise_views(random_views(batch, resolution, seed))


def image_files_views(paths: list[str], resolution: int, batch: int) -> np.ndarray:
    """Real model inputs from image files as uint8 views, as the runtime makes them: the 728x728
    global views for a 728 runner, the 504x504 crops for a 504 runner (an image with no crops
    contributes its global view resized to 504); repeated to fill ``batch``."""
    from PIL import Image

    pcfg = PreprocessConfig()
    views = []
    for p in paths:
        im = to_rgb(p)  # read once, converted like the reference
        pre = preprocess(im, pcfg, pixel_dtype="uint8")
        if resolution == pcfg.image_size:
            views.append(pre.global_view[None])
        elif resolution == pcfg.patch_size and pre.num_crops:
            views.append(pre.crops)
        else:
            views.append(to_chw(im.resize((resolution, resolution), Image.BILINEAR))[None])
    x = np.concatenate(views)
    return np.ascontiguousarray(np.concatenate([x] * -(-batch // len(x)))[:batch])


def case_views(resolution: int, batch: int, seed: int, images: list[str] | None = None) -> np.ndarray:
    """The uint8 views of one compare case: the image files', else seeded random images."""
    if images:
        return image_files_views(images, resolution, batch)
    return random_views(batch, resolution, seed + batch * 7919 + resolution)


def image_files_pixel_values(paths: list[str], resolution: int, batch: int) -> np.ndarray:
    """:func:`image_files_views`, CLIP-normalised FP32."""
    return normalise_views(image_files_views(paths, resolution, batch))


def views_for(runner: Runner, views: np.ndarray) -> np.ndarray:
    """uint8 views [B, 3, R, R] as the input dtype ``runner`` declares: as they are for
    uint8-input artifacts, CLIP-normalised FP32/FP16 for float ones."""
    return as_pixel_dtype(views, runner.input_spec().dtype)


@dataclass
class Row:
    backend: str
    precision: str
    resolution: int
    batch: int
    features: dict[str, float]
    projected: dict[str, float]
    thresholds: Thresholds
    passed: bool


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    #: ``compare --per-block``: the result of :func:`per_block` (its keys join the JSON report).
    per_block: dict | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        d = {"passed": self.passed, "rows": [asdict(r) for r in self.rows]}
        if self.per_block is not None:
            d.update(self.per_block)
        return d

    def table(self) -> str:
        head = (
            "backend",
            "res",
            "batch",
            "cos min",
            "cos mean",
            "max abs",
            "rel L2",
            "proj cos min",
            "proj rel L2",
            "status",
        )
        lines = [head]
        for r in self.rows:
            f, p = r.features, r.projected
            lines.append(
                (
                    r.backend,
                    str(r.resolution),
                    str(r.batch),
                    f"{f['cos_min']:.7f}",
                    f"{f['cos_mean']:.7f}",
                    f"{f['max_abs']:.3e}",
                    f"{f['rel_l2']:.3e}",
                    f"{p['cos_min']:.7f}",
                    f"{p['rel_l2']:.3e}",
                    "PASS" if r.passed else "FAIL",
                )
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out)

    def write_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


def compare(
    reference: Runner,
    runners: list[Runner],
    projector_weight: np.ndarray,
    projector_bias: np.ndarray | None,
    batches: list[int],
    resolutions: list[int] | None = None,
    seed: int = 0,
    images: list[str] | None = None,
    thresholds: dict[str, Thresholds] | None = None,
    progress: bool = False,
) -> Report:
    """Compare ``runners`` with ``reference`` at each resolution a runner supports and each batch.

    A comparison with zero cases (no runner, no batch, or no runner serving any asked resolution)
    is a :class:`UsageError`: a report that checked nothing must never read as a pass."""
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if not runners:
        raise UsageError("compare: no runner to compare with the reference")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise UsageError(f"compare: --batch sizes must be positive integers, got {batches}")
    report = Report()
    reference.activate()
    jobs = []
    for runner in runners:
        runner.activate()
        res_list = [runner.resolution] if runner.resolution else (resolutions or [728, 504])
        if resolutions:
            res_list = [r for r in res_list if r in resolutions]
        for res in res_list:
            for b in batches:
                jobs.append((runner, res, b))
    if not jobs:
        served = ", ".join(f"{r.name}: {r.resolution or 'any'}" for r in runners)
        raise UsageError(
            f"compare: zero cases: no runner serves the asked resolution(s) {resolutions} ({served}); "
            "ask for a resolution a runner was exported for, or leave --resolution out"
        )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="comparing", unit="case")
    # The same images for every runner, each in the input dtype it declares (uint8 views, or
    # normalised FP32/FP16 ones).
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for runner, res, b in jobs:
        key = (res, b)
        if key not in cache:
            u8 = case_views(res, b, seed, images)
            ref = reference.infer(views_for(reference, u8)).astype(np.float32)
            cache[key] = (u8, ref, _project(ref, projector_weight, projector_bias))
        u8, ref, ref_proj = cache[key]
        got = np.asarray(runner.infer(views_for(runner, u8))).astype(np.float32)
        feat = metrics(ref, got)
        proj = metrics(ref_proj, _project(got, projector_weight, projector_bias))
        prec = runner.precision
        th = thresholds[prec]
        ok = all(m["cos_min"] >= th.cos_min and m["rel_l2"] <= th.rel_l2 for m in (feat, proj))
        report.rows.append(Row(runner.name, prec, res, b, feat, proj, th, ok))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return report


def _project(features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    return project(features, weight, bias, out_dtype=np.float32)


def check(report: Report) -> None:
    if not report.passed:
        failed = [f"{r.backend}@{r.resolution}x{r.batch}" for r in report.rows if not r.passed]
        raise ThresholdError(f"accuracy thresholds missed by: {', '.join(failed)}")


# -- per-block divergence (compare --per-block) ----------------------------------------------------
#: A block is the first divergent one when its output is not finite, or its relative L2 error
#: exceeds DIVERGENCE_JUMP x the largest error of the blocks before it (at least DIVERGENCE_FLOOR,
#: the FP16 rounding level of one block): FP16 rounding makes the error creep up slowly from block
#: to block, a real problem (an overflow, a wrong weight) makes it jump by orders of magnitude.
DIVERGENCE_JUMP = 10.0
DIVERGENCE_FLOOR = 1e-3


def first_divergent_block(rows: list[dict]) -> int | None:
    """The first block whose error jumps (rule above), or ``None``."""
    worst = DIVERGENCE_FLOOR
    for row in rows:
        if not row["finite"] or row["rel_l2"] > DIVERGENCE_JUMP * worst:
            return row["block"]
        worst = max(worst, row["rel_l2"])
    return None


def _onnx_with_block_outputs(onnx_path: Path, tmp_dir: Path) -> tuple[Path, list[str]]:
    """A copy of ``onnx_path`` in ``tmp_dir`` whose graph also outputs every block's output (named
    in the export's ``step37.block_outputs`` metadata).  External data is symlinked, not copied;
    the user's file is only read."""
    import json

    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "step37.block_outputs" not in meta:
        raise InputError(
            f"{onnx_path} does not name its block outputs (metadata step37.block_outputs): "
            "re-export it with this version of step37-deploy to use --per-block"
        )
    names = json.loads(meta["step37.block_outputs"])
    known = {o for n in model.graph.node for o in n.output}
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"{onnx_path}: block outputs {missing} named in its metadata are not in its graph")
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    for loc in locations:
        src = (onnx_path.parent / loc).resolve()
        if not src.is_relative_to(onnx_path.parent.resolve()) or not src.is_file():
            raise InputError(f"{onnx_path}: external data {loc} is missing or outside the file's folder")
        (tmp_dir / loc).symlink_to(src)
    out = tmp_dir / onnx_path.name
    onnx.save(model, str(out))
    return out, names


def reference_block_outputs(model, pixel_values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The FP32 PyTorch tower's features and every block's output (forward hooks)."""
    import torch

    outs: list[np.ndarray] = []
    hooks = [
        b.register_forward_hook(lambda _m, _a, y: outs.append(y.float().numpy())) for b in model.transformer.resblocks
    ]
    try:
        with torch.inference_mode():
            feats = model(torch.from_numpy(pixel_values).float()).float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return feats, outs


def per_block(
    onnx_path: str | Path,
    reference_model,
    views: np.ndarray,
    provider: str = "cpu",
    threads: int | None = None,
) -> dict:
    """Every block's output of an ONNX file against the FP32 reference's, on uint8 ``views``
    [B, 3, R, R] (fed to the file in the dtype its input declares, uint8 included).

    Returns ``{"onnx", "batch", "per_block": [{"block", "cos_min", "rel_l2", "max_abs",
    "max_abs_onnx", "finite"}], "first_divergent_block"}``; ``max_abs`` is the reference's (FP32)
    max |activation| of the block output, ``max_abs_onnx`` the file's (inf where it overflowed)."""
    import tempfile

    from .backends.onnxrt import session_from_onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX file {onnx_path} does not exist")
    with tempfile.TemporaryDirectory(prefix="step37-per-block-") as tmp:
        path, names = _onnx_with_block_outputs(onnx_path, Path(tmp))
        session = session_from_onnx(path, provider, threads)()
        inp = session.get_inputs()[0]
        want = {"tensor(float16)": np.float16, "tensor(uint8)": np.uint8}.get(inp.type, np.float32)
        got = session.run(names, {inp.name: np.ascontiguousarray(as_pixel_dtype(views, want))})
        del session
    _, ref = reference_block_outputs(reference_model, normalise_views(views))
    if len(ref) != len(got):
        raise InputError(f"{onnx_path} has {len(got)} blocks but the checkpoint's tower has {len(ref)}")
    rows = []
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        with np.errstate(over="ignore", invalid="ignore"):
            m = metrics(r, np.asarray(g, dtype=np.float32))
            g_abs = np.abs(np.asarray(g, dtype=np.float64))
        rows.append(
            {
                "block": i,
                "cos_min": m["cos_min"],
                "rel_l2": m["rel_l2"],
                "max_abs": float(np.abs(r).max()),
                "max_abs_onnx": float(np.nanmax(g_abs)) if not np.isnan(g_abs).all() else float("nan"),
                "finite": bool(np.isfinite(g).all()),
            }
        )
    return {
        "onnx": str(onnx_path),
        "batch": int(views.shape[0]),
        "per_block": rows,
        "first_divergent_block": first_divergent_block(rows),
    }


def per_block_table(result: dict) -> str:
    """The per-block report as text, the first divergent block marked."""
    first = result["first_divergent_block"]
    lines = [f"per-block: {Path(result['onnx']).name} vs PyTorch FP32 (batch {result['batch']})"]
    lines.append(f"{'block':>5}  {'cos min':>10}  {'rel L2':>9}  {'max |x| ref':>11}  {'max |x| onnx':>12}")
    for r in result["per_block"]:
        mark = "  <- first divergent" if r["block"] == first else ""
        lines.append(
            f"{r['block']:>5}  {r['cos_min']:>10.7f}  {r['rel_l2']:>9.3e}  {r['max_abs']:>11.4g}  "
            f"{r['max_abs_onnx']:>12.4g}{mark}"
        )
    lines.append(f"first divergent block: {first if first is not None else 'none'}")
    return "\n".join(lines)
