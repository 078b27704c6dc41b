"""A standalone Triton model repository for the served API (``serving/contract.py``).

``write_repository`` turns a checkpoint and its artifacts into three models::

    step37_vision_728/   config.pbtxt + 1/   the tower for global views
    step37_vision_504/   config.pbtxt + 1/   the tower for crops
    step37_embedder/     config.pbtxt + 1/   image bytes -> features, token ids, crop count

Towers are ``platform: "tensorrt_plan"`` models (``1/model.plan``) when given TensorRT engines: dims,
data types, ``max_batch_size`` and preferred batch sizes come from the engine manifest and stay
inside the engine's optimisation profile (Triton's TensorRT backend refuses a ``max_batch_size``
above the profile MAX, so this refuses it first).  Given ONNX files or ``backend="torch"``, towers
are Python-backend models (``triton_models/tower.py``) that run the ONNX Runtime or torch runner.
The embedder is always a Python-backend model (``triton_models/embedder.py``) that preprocesses,
sends its views to the towers through Triton (BLS, so Triton's dynamic batcher merges the views of
concurrent requests) and applies the projector.  ONNX Runtime / torch towers may instead run inside
each embedder instance (``tower_calls`` "local", :func:`configs.resolve_tower_calls`): their files
then sit in the embedder's version folder, with no config of their own, and the record says so.

The repository records what it was built from (``step37_repository.json`` in the embedder's
version folder): the checkpoint's vision-weights digest, the digest of every served file and the
weights digest each artifact was exported from.  The embedder checks them all when it loads and
refuses to start on any mismatch (:func:`verify_repository`).

This module writes and checks the repository; ``towers.py`` describes the towers from their
artifacts and ``configs.py`` makes every ``config.pbtxt`` through Triton's own protobuf (their
names are importable from here too).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, EngineError, InputError, OutputError
from ..files import apply_umask, atomic_dir, check_output_dir, ensure_dir, os_reason, read_json, replace_dir
from ..preprocess import DEFAULT_PREPROCESS
from . import contract as C
from .configs import (
    DEFAULT_CACHE_MB,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_QUEUE_DELAY_US,
    DEFAULT_QUEUE_TIMEOUT_MS,
    RepositoryOptions,
    config_text,
    default_preprocess_instances,
    embedder_config,
    parse_config,
    resolve_tower_calls,
    set_queue_policy,
    tower_config,
    tower_max_batch,
    tower_queue_size,
)
from .towers import (
    BACKENDS,
    TORCH_CHECKPOINT,
    TowerArtifact,
    collect_towers,
    describe_engine,
    describe_onnx,
    describe_torch,
)
from .towers import inside_folder as _inside  # the name triton_models/tower.py imports

#: Importable from here as before the split: the configs' and the towers' names.
__all__ = [
    "BACKENDS",
    "DEFAULT_CACHE_MB",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_QUEUE_SIZE",
    "DEFAULT_QUEUE_DELAY_US",
    "DEFAULT_QUEUE_TIMEOUT_MS",
    "FORMAT",
    "RepositoryOptions",
    "TowerArtifact",
    "collect_towers",
    "config_text",
    "default_preprocess_instances",
    "describe_engine",
    "describe_onnx",
    "describe_torch",
    "embedder_config",
    "parse_config",
    "read_record",
    "set_queue_policy",
    "tower_config",
    "tower_max_batch",
    "tower_queue_size",
    "verify_repository",
    "write_repository",
]

log = logging.getLogger(__name__)

FORMAT = "step37-triton-repository/1"
_MODELS_DIR = Path(__file__).with_name("triton_models")


# -- writing ---------------------------------------------------------------------------------------------
def _place(src: Path, dst: Path) -> None:
    """``src`` at ``dst``: a hard link where the filesystem allows (multi-GB engines), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sha256(path: Path) -> str:
    from ..engine import _sha256_file

    return _sha256_file(path).hexdigest()


def _write_torch_checkpoint(checkpoint: Path, dst: Path) -> None:
    """A vision-only checkpoint (``config.json`` + ``model.safetensors``, the release's tensor names)."""
    from safetensors.torch import save_file

    from ..checkpoint import _open, vision_refs

    dst.mkdir(parents=True)
    shutil.copyfile(checkpoint / "config.json", dst / "config.json")
    tensors = {}
    for ref in vision_refs(checkpoint).values():
        with _open(ref.shard) as f:
            tensors[ref.key] = f.get_tensor(ref.key).contiguous()
    save_file(tensors, str(dst / "model.safetensors"))
    apply_umask(dst / "model.safetensors")  # save_file creates 0600: a serving user could not read it


def _write_tower(
    root: Path, t: TowerArtifact, checkpoint: Path, opts: RepositoryOptions, torch_weights: Path | None, local: bool
) -> tuple[dict[str, str], Path]:
    """The tower's files: a model folder of its own, or (``local``: the embedder runs it) a folder in
    the embedder's version folder, with no config (not a Triton model).  Returns {path relative to
    the repository: sha256} of its served files, and the served artifact's path."""
    model_dir = root / C.EMBEDDER_MODEL / "1" / t.model_name if local else root / t.model_name
    version = model_dir if local else model_dir / "1"
    version.mkdir(parents=True)
    files: list[Path] = []
    if t.kind == "trt":
        from ..engine import read_manifest

        _place(t.path, version / "model.plan")
        files.append(version / "model.plan")
        want = read_manifest(t.path)["engine_sha256"]
        if _sha256(version / "model.plan") != want:
            raise EngineError(f"engine {t.path} does not match its manifest's digest: corrupt or replaced")
    elif t.kind == "onnx":
        for name in (t.path.name, *t.data_files):
            _place(t.path.parent / name, version / name)
            files.append(version / name)
    else:
        ck = version / TORCH_CHECKPOINT
        if torch_weights is None:
            _write_torch_checkpoint(checkpoint, ck)
        else:  # the other tower's copy: link, not a second copy of the weights
            ck.mkdir()
            for f in torch_weights.iterdir():
                _place(f, ck / f.name)
        files += sorted(ck.iterdir())
    if not local:
        if t.kind != "trt":
            shutil.copyfile(_MODELS_DIR / "tower.py", version / "model.py")
        (model_dir / "config.pbtxt").write_text(config_text(tower_config(t, opts)))
    return {str(f.relative_to(root)): _sha256(f) for f in files}, version / t.served_name


def _write_projector(checkpoint: Path, dst: Path) -> None:
    from safetensors.numpy import save_file

    from ..checkpoint import load_projector

    proj = load_projector(checkpoint, "fp32")
    tensors = {"weight": proj.weight.detach().numpy()}
    if proj.bias is not None:
        tensors["bias"] = proj.bias.detach().numpy()
    save_file(tensors, str(dst))
    apply_umask(dst)  # save_file creates 0600


def _record_path(root: Path) -> Path:
    return root / C.EMBEDDER_MODEL / "1" / C.REPOSITORY_RECORD


def _check_destination(out: Path, overwrite: bool) -> bool:
    """True when ``out`` is a repository this tool wrote that ``overwrite`` allows replacing."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return False
    if not _record_path(out).is_file():
        raise ConfigError(f"--out {out} is not empty and is not a repository step37-deploy wrote; refusing to touch it")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a model repository; pass --overwrite to replace it")
    return True


def _check_towers(
    checkpoint: Path, towers: dict[int, TowerArtifact], cfg: Any, digest: str, opts: RepositoryOptions
) -> None:
    """Refuse, before writing anything, a tower that does not fit the checkpoint (tokens, width),
    was made from other weights, or whose ``--max-batch`` its engine profile cannot take."""
    for t in towers.values():
        want_tokens = cfg.vision.num_output_tokens(t.resolution, t.resolution)
        if (t.num_tokens, t.out_dim) != (want_tokens, cfg.vision.output_dim):
            raise InputError(
                f"{t.path}: image_features [{t.num_tokens}, {t.out_dim}] do not fit checkpoint {checkpoint} "
                f"([{want_tokens}, {cfg.vision.output_dim}] at {t.resolution})"
            )
        if t.weights_sha256 is not None and t.weights_sha256 != digest:
            raise InputError(
                f"{t.path} was made from other vision weights (sha256 {t.weights_sha256[:12]}...) than "
                f"checkpoint {checkpoint} ({digest[:12]}...)"
            )
        if t.weights_sha256 is None and t.kind != "torch":
            log.warning("%s does not record the weights it was made from; serving it on trust", t.path)
        tower_max_batch(t, opts.max_batch)  # refuse before writing anything


def _write_models(
    tmp: Path, checkpoint: Path, towers: dict[int, TowerArtifact], opts: RepositoryOptions, record: dict[str, Any]
) -> None:
    """The towers' and the embedder's folders in ``tmp``, and what they serve in ``record``."""
    digest = record["vision_weights_sha256"]
    torch_weights = None
    calls = record["tower_calls"] = resolve_tower_calls(opts, {t.kind for t in towers.values()})
    for res, t in towers.items():
        files, artifact = _write_tower(tmp, t, checkpoint, opts, torch_weights, local=calls == "local")
        if t.kind == "torch":
            torch_weights = artifact
        record["towers"][str(res)] = {
            "model": t.model_name,
            "kind": t.kind,
            # where the embedder runs it itself: its artifact, relative to the repository
            "artifact": str(artifact.relative_to(tmp)) if calls == "local" else None,
            "source": str(t.path.resolve()) if t.path else None,  # informational
            "input_dtype": t.input_dtype,
            "precision": t.precision,
            "max_batch_size": tower_max_batch(t, opts.max_batch),
            "weights_sha256": t.weights_sha256 or (digest if t.kind == "torch" else None),
            "files": files,
        }
    emb = tmp / C.EMBEDDER_MODEL
    (emb / "1").mkdir(parents=True, exist_ok=True)  # the files of local towers may be in it already
    shutil.copyfile(_MODELS_DIR / "embedder.py", emb / "1" / "model.py")
    _write_projector(checkpoint, emb / "1" / C.PROJECTOR_FILE)
    record["projector"] = {"file": C.PROJECTOR_FILE, "sha256": _sha256(emb / "1" / C.PROJECTOR_FILE)}
    (emb / "config.pbtxt").write_text(config_text(embedder_config(opts)))
    _record_path(tmp).write_text(json.dumps(record, indent=2))


def write_repository(
    checkpoint: str | Path,
    backend: str,
    artifacts: list[str | Path] | tuple = (),
    out: str | Path = "model_repository",
    options: RepositoryOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the three-model repository at ``out`` (built in a temporary folder beside it, then renamed)."""
    from ..checkpoint import weights_digest
    from ..config import Step37Config

    opts = options or RepositoryOptions()
    opts.validate()
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_dir(out.parent, "--out", out)  # a read-only or missing parent: one line, before any work
    cfg = Step37Config.from_checkpoint(checkpoint)
    pcfg = replace(DEFAULT_PREPROCESS, max_pixels=opts.max_image_pixels)
    towers = collect_towers(checkpoint, backend, artifacts, pcfg)
    digest = weights_digest(checkpoint)
    _check_towers(checkpoint, towers, cfg, digest, opts)
    replacing = _check_destination(out, overwrite)
    ensure_dir(out.parent, f"--out {out}")
    # temp_sibling (via atomic_dir): umask modes, and a killed run's leftovers swept first.
    with atomic_dir(out) as tmp:
        record: dict[str, Any] = {
            "format": FORMAT,
            "toolkit_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "source_checkpoint": str(checkpoint.resolve()),  # informational; never read back as a path
            "vision_weights_sha256": digest,
            "tokens": {k: v for k, v in asdict(cfg.tokens).items() if k != "source"},
            "preprocess": asdict(pcfg),
            "max_image_pixels": opts.max_image_pixels,
            "towers": {},
        }
        _write_models(tmp, checkpoint, towers, opts, record)
        if replacing:
            old = read_json(_record_path(out))
            log.info(
                "replacing the model repository at %s (written by step37-deploy %s at %s)",
                out,
                old.get("toolkit_version"),
                old.get("created_at"),
            )
        try:
            replace_dir(tmp, out)  # an old repository is moved aside until the new one is in place
        except OSError as exc:
            raise OutputError(f"--out {out}: cannot write in {out.parent}: {os_reason(exc)}") from exc
    log.info("wrote model repository %s (%s towers)", out, backend)
    return out


# -- checking (the embedder, at load) ---------------------------------------------------------------------
def read_record(root: str | Path) -> dict[str, Any]:
    path = _record_path(Path(root))
    record = read_json(path)
    if record.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} record (format {record.get('format')!r})")
    return record


def _among_files(artifact: str | None, files: dict[str, str]) -> bool:
    """``artifact`` is one of ``files`` (an ONNX file) or the folder holding them (a torch checkpoint)."""
    return artifact is not None and any(r == artifact or str(Path(r).parent) == artifact for r in files)


def verify_repository(root: str | Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every served file against the digests the repository was built with; the record.

    Raises :class:`ConfigError` naming the first file that is missing, replaced, or made from other
    weights than the checkpoint the repository records."""
    root = Path(root)
    record = record or read_record(root)
    digest = record["vision_weights_sha256"]
    for res, tower in record["towers"].items():
        if tower["weights_sha256"] not in (None, digest):
            raise ConfigError(
                f"tower {tower['model']} was made from vision weights {tower['weights_sha256'][:12]}... "
                f"but the repository serves checkpoint weights {digest[:12]}..."
            )
        if not tower["files"] and tower["kind"] != "torch":
            raise ConfigError(f"tower {res} of {root} lists no files: nothing to check")
        art = tower.get("artifact")  # local towers: what the embedder loads must be what is checked here
        if record.get("tower_calls") == "local" and not _among_files(art, tower["files"]):
            raise ConfigError(f"tower {res} of {root}: its artifact {art!r} is not one of its checked files")
        for rel, sha in tower["files"].items():
            p = _inside(root, rel, "repository record")
            if not p.is_file():
                raise ConfigError(f"{p} is missing from the model repository")
            if _sha256(p) != sha:
                raise ConfigError(f"{p} was changed after the repository was written (digest mismatch)")
    proj = _inside(root / C.EMBEDDER_MODEL / "1", record["projector"]["file"], "repository record")
    if not proj.is_file() or _sha256(proj) != record["projector"]["sha256"]:
        raise ConfigError(f"{proj} is missing or was changed after the repository was written")
    return record
