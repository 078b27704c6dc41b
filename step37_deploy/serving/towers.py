"""The towers a repository serves: one per resolution, described from its artifact.

A TensorRT engine is described from its manifest (``step37-deploy build`` writes it), an ONNX file
from its graph and ``step37.*`` metadata, the eager torch tower from the checkpoint's config.  Two
artifacts are told apart by their resolution (728 global views, 504 crops), never by their order;
the description says what the repository's configs and its record need: I/O dtypes, precision,
tokens and width, the engine profile, the weights digest the artifact was made from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, EngineError, InputError
from ..preprocess import DEFAULT_PREPROCESS, PreprocessConfig
from . import contract as C

log = logging.getLogger(__name__)

BACKENDS = ("trt", "onnx", "torch")
#: torch towers: a vision-only checkpoint in the version folder, under this name.
TORCH_CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class TowerArtifact:
    """What one tower model serves, read from its artifact (manifest, ONNX metadata or config)."""

    resolution: int
    kind: str  # "trt" | "onnx" | "torch"
    path: Path | None  # engine or ONNX file; None for torch (weights come from the checkpoint)
    input_dtype: str  # numpy name of pixel_values: float32, float16 or uint8
    precision: str  # fp16 | fp32: the dtype of image_features
    num_tokens: int
    out_dim: int
    weights_sha256: str | None  # the vision weights the artifact was made from, when recorded
    profile: tuple[int, int, int] | None = None  # engines: batch MIN, OPT, MAX
    data_files: tuple[str, ...] = ()  # ONNX external-data files beside it (names relative to it)

    @property
    def model_name(self) -> str:
        return C.TOWER_MODELS[self.resolution]

    @property
    def served_name(self) -> str:
        """The artifact's name inside the tower's version folder."""
        if self.kind == "trt":
            return "model.plan"
        if self.kind == "onnx":
            return self.path.name
        return TORCH_CHECKPOINT


def describe_engine(path: str | Path) -> TowerArtifact:
    """A TensorRT engine's tower facts, from its manifest (``step37-deploy build`` writes it)."""
    from ..engine import read_manifest

    path = Path(path)
    m = read_manifest(path)
    ((iname, ispec),) = m["inputs"].items()
    ((oname, ospec),) = m["outputs"].items()
    if (iname, oname) != (C.TOWER_INPUT, C.TOWER_OUTPUT):
        raise EngineError(
            f"engine {path} has I/O {iname!r} -> {oname!r}; the served tower needs "
            f"{C.TOWER_INPUT!r} -> {C.TOWER_OUTPUT!r}"
        )
    h = ispec["shape"][2]
    if m["flavour"] != "tensorrt":
        log.warning(
            "engine %s was built with %s %s; Triton's TensorRT backend loads only engines of its own TensorRT "
            "version: rebuild with tensorrt in the container you serve with (docs/serving.md)",
            path,
            m["flavour"],
            m["trt_version"],
        )
    _, tokens, dim = ospec["shape"]
    prof = m["profile"][iname]
    return TowerArtifact(
        resolution=int(m.get("resolution") or h),
        kind="trt",
        path=path,
        input_dtype=str(ispec["dtype"]),
        precision=str(m.get("precision", "fp16")),
        num_tokens=int(tokens),
        out_dim=int(dim),
        weights_sha256=(m.get("onnx_metadata") or {}).get("vision_weights_sha256"),  # the source ONNX's
        profile=(int(prof[0][0]), int(prof[1][0]), int(prof[2][0])),
    )


def describe_onnx(path: str | Path) -> TowerArtifact:
    """An exported ONNX file's tower facts, from its graph and ``step37.*`` metadata."""
    import onnx

    from ..engine import onnx_facts

    path = Path(path)
    facts = onnx_facts(path)
    meta = facts.metadata
    model = onnx.load(str(path), load_external_data=False)
    data = sorted({e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"})
    for name in data:
        inside_folder(path.parent, name, f"external data of {path}")
    input_dtype = meta.get("input_dtype") or facts.input_dtype
    precision = meta.get("precision") or ("fp16" if facts.input_dtype == "float16" else "fp32")
    _, _, h, _ = facts.input_shape
    _, tokens, dim = facts.output_shape
    if (facts.input_name, facts.output_name) != (C.TOWER_INPUT, C.TOWER_OUTPUT):
        raise InputError(
            f"ONNX file {path} has I/O {facts.input_name!r} -> {facts.output_name!r}; the served "
            f"tower needs {C.TOWER_INPUT!r} -> {C.TOWER_OUTPUT!r} (export it with step37-deploy export)"
        )
    return TowerArtifact(
        resolution=int(meta.get("resolution") or h),
        kind="onnx",
        path=path,
        input_dtype=input_dtype,
        precision=precision,
        num_tokens=int(tokens),
        out_dim=int(dim),
        weights_sha256=meta.get("vision_weights_sha256"),
        data_files=tuple(data),
    )


def describe_torch(checkpoint: str | Path, resolution: int) -> TowerArtifact:
    """The eager FP32 tower from the checkpoint itself."""
    from ..config import Step37Config

    cfg = Step37Config.from_checkpoint(checkpoint)
    return TowerArtifact(
        resolution=resolution,
        kind="torch",
        path=None,
        input_dtype="float32",
        precision="fp32",
        num_tokens=cfg.vision.num_output_tokens(resolution, resolution),
        out_dim=cfg.vision.output_dim,
        weights_sha256=None,  # the repository's own copy of the checkpoint's weights
    )


def collect_towers(
    checkpoint: str | Path,
    backend: str,
    artifacts: list[str | Path] | tuple = (),
    pcfg: PreprocessConfig = DEFAULT_PREPROCESS,
) -> dict[int, TowerArtifact]:
    """One tower per served resolution (728 global views, 504 crops), told apart by their metadata."""
    want = (pcfg.image_size, pcfg.patch_size)
    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        if artifacts:
            raise InputError("--backend torch serves the checkpoint itself; --artifacts is for trt and onnx")
        return {res: describe_torch(checkpoint, res) for res in want}
    if len(artifacts) != 2:
        raise InputError(f"--backend {backend} needs --artifacts FILE_728 FILE_504 (two files), got {len(artifacts)}")
    describe = describe_engine if backend == "trt" else describe_onnx
    towers: dict[int, TowerArtifact] = {}
    for f in artifacts:
        t = describe(f)
        if t.resolution in towers:
            raise InputError(f"--artifacts {towers[t.resolution].path} and {f} are both {t.resolution}x{t.resolution}")
        towers[t.resolution] = t
    if sorted(towers) != sorted(want):
        raise InputError(f"--artifacts must be one {want[0]} and one {want[1]} file, got resolutions {sorted(towers)}")
    return {res: towers[res] for res in want}


def inside_folder(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refusing a path read from a file that leaves ``root``."""
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(base):
        raise ConfigError(f"{what}: path {rel!r} leaves its folder {base}")
    return p


def open_tower_runner(
    kind: str, artifact: Path, threads: int, input_dtype: str, spinning: bool = False, device: str = "cpu"
):
    """The activated runner of an ONNX Runtime or torch tower, for the process that runs it: a tower
    stub, or an embedder instance that runs its towers itself (``--tower-calls local``).  It must take
    the ``input_dtype`` the repository serves it (``ConfigError`` if not).  torch is imported only for a
    torch tower: an ONNX tower's process never pays for it.  ``device``: "cpu" or "cuda:N"."""
    if kind == "onnx":
        from ..backends import OnnxrtRunner, session_from_onnx

        provider, device_id = ("cuda", int(device.split(":")[1])) if device.startswith("cuda") else ("cpu", 0)
        loader = session_from_onnx(artifact, provider, threads, device_id, spinning=spinning)
        runner = OnnxrtRunner(loader, provider=provider).activate()
    elif kind == "torch":
        import torch

        from ..backends.torch_runner import TorchRunner, load_torch_model

        torch.set_num_threads(threads)
        runner = TorchRunner(load_torch_model(str(artifact), "fp32", device)).activate()
    else:
        raise ConfigError(f"{artifact}: unknown tower kind {kind!r}")
    takes = runner.input_spec().dtype
    if takes != np.dtype(input_dtype):
        runner.deactivate()
        raise ConfigError(f"{artifact.name} takes {C.TOWER_INPUT} as {takes}, but it is served {np.dtype(input_dtype)}")
    return runner
