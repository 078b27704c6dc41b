"""The corpus job: which shards to do (plan and resume) and the per-shard function every engine runs.

:func:`process_shard` is the unit of work: input shard in, feature shard and manifest out, one small
row back.  It runs the same in the local runner's processes and in Ray actors, and it is idempotent:
a shard whose manifest already carries this run's fingerprint is returned as it is (a retried Ray
task, a shard another worker finished), so every key is written exactly once however often the
function runs.  Resume is the job's own logic, not the engine's: :func:`plan` keeps the complete
shards of the same fingerprint, redoes the rest, and refuses (one line) to touch a shard written with
another fingerprint, or any file this tool did not write, unless ``--overwrite`` (this tool's files
only).

A sample's error is data (its manifest row); a shard's error (unreadable tar, duplicate keys) fails
that shard only; a write error (full disk) stops the run with one line and leaves no partial shard.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import OutputError
from ..files import remove_stale_temporaries, same_file
from .compute import EngineSpec, Outcome, make_compute
from .layout import KINDS, layout_of, sample_members
from .shard import (
    BackgroundWriter,
    ShardWriter,
    manifest_path,
    read_manifest,
    tar_fingerprint,
    tar_path,
    write_manifest,
)
from .sources import IMAGE_EXTS, ShardError, ShardSource, iter_samples

log = logging.getLogger(__name__)

#: Test hook: ``POINT`` or ``POINT@N`` SIGKILLs this process at the N-th (default first) pass of
#: :func:`kill_point` named POINT, so tests can kill a run exactly where they want.
KILL_ENV = "STEP37_CORPUS_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class JobSpec:
    """Everything a worker needs, picklable."""

    out: str
    engine: EngineSpec
    fingerprint: str
    run: dict[str, Any]  # what the fingerprint is made of, recorded in every manifest
    dims: dict[str, int]  # row width per kind
    outputs: tuple[str, ...] = ("vision_features",)
    dtype: str = "bf16"
    image_exts: tuple[str, ...] = IMAGE_EXTS
    max_image_bytes: int = 64 << 20
    engine_name: str = "local"

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self.outputs)


# -- resume -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    todo: list[ShardSource]
    done: list[ShardSource]
    replacing: list[str]


def _state(src: ShardSource, spec: JobSpec, identity: dict[str, Any]) -> str:
    """``done`` (complete, same fingerprint and input), ``todo``, ``ours`` (this tool's files, made
    otherwise: replaced only with --overwrite), or a one-line reason to refuse."""
    out = Path(spec.out)
    tar, man = tar_path(out, src.name), manifest_path(out, src.name)
    if src.kind == "tar" and (same_file(tar, Path(src.path)) or same_file(man, Path(src.path))):
        return f"refuse:{tar} is the input shard {src.path} itself: choose another --out"
    if man.exists():
        m = read_manifest(man)
        if m is None:
            return f"refuse:{man} exists and is not a manifest of this tool: refusing to replace it"
        if m.get("fingerprint") != spec.fingerprint:
            return f"ours:{man} was written by another run (fingerprint {str(m.get('fingerprint'))[:12]}...)"
        if m.get("source") != identity:
            return f"ours:{src.path} changed since {man} was written"
        if not tar.is_file() or tar.stat().st_size != m.get("bytes", {}).get("output"):
            return "todo"  # the manifest's tar is missing or not the one it describes: redo it
        return "done"
    if tar.exists() or tar.is_symlink():
        fp = tar_fingerprint(tar) if tar.is_file() and not tar.is_symlink() else None
        if fp is None:
            return f"refuse:{tar} exists and was not written by this tool: refusing to replace it"
        if fp != spec.fingerprint:
            return f"ours:{tar} was written by another run and has no manifest"
        return "todo"  # left by a killed run before its manifest: redone
    return "todo"


def plan(sources: Sequence[ShardSource], spec: JobSpec, overwrite: bool = False) -> Plan:
    """Complete shards of this fingerprint are kept; a shard of another fingerprint or of a changed
    input refuses the whole run before any work (one line naming it), or with ``overwrite`` is
    redone (logged); files this tool did not write are never replaced."""
    remove_stale_temporaries(spec.out)
    todo, done, replacing = [], [], []
    for src in sources:
        state = _state(src, spec, src.identity())
        kind, _, why = state.partition(":")
        if kind == "refuse":
            raise OutputError(why)
        if kind == "ours":
            if not overwrite:
                raise OutputError(f"{why}; rerun with --overwrite to replace this tool's shards, or use another --out")
            log.info("replacing shard %s: %s", src.name, why)
            replacing.append(src.name)
        (done if kind == "done" else todo).append(src)
    return Plan(todo, done, replacing)


# -- the per-shard function ---------------------------------------------------------------------------
def _row(src: ShardSource, status: str, **kw: Any) -> dict[str, Any]:
    return {"shard": src.name, "status": status, **kw}


def _complete(src: ShardSource, spec: JobSpec) -> dict[str, Any] | None:
    m = read_manifest(manifest_path(Path(spec.out), src.name))
    if m is None or m.get("fingerprint") != spec.fingerprint or m.get("source") != src.identity():
        return None
    return _row(src, "skipped", **m["counts"])


def process_shard(
    src: ShardSource, spec: JobSpec, compute: Any, on_images: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Embed one shard and write its feature shard and manifest.  Never raises: returns a row with
    ``status`` ``done``/``skipped``/``failed`` (``fatal`` for a write error, which stops the run)."""
    t0 = time.monotonic()
    try:
        done = _complete(src, spec)
        if done is not None:
            return done
        identity = src.identity()
        counts, nbytes, out_bytes = _write_shard(src, spec, compute, on_images)
        kill_point("before-manifest")
        manifest = {
            "shard": f"{src.name}.tar",
            "fingerprint": spec.fingerprint,
            "run": spec.run,
            "source": identity,
            "counts": counts["counts"],
            "bytes": {"input": nbytes, "output": out_bytes},
            "samples": counts["samples"],
            "written_by": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "engine": spec.engine_name,
                "step37_deploy": __version__,
            },
        }
        write_manifest(Path(spec.out), src.name, manifest)
        kill_point("after-manifest")
        return _row(src, "done", seconds=round(time.monotonic() - t0, 3), **counts["counts"])
    except ShardError as exc:
        log.error("shard %s failed: %s", src.name, exc)
        return _row(src, "failed", error=type(exc).__name__, message=str(exc))
    except OutputError as exc:
        return _row(src, "failed", error="OutputError", message=str(exc), fatal=True)
    except OSError as exc:  # reading the input failed past the shard's start (a vanished file...)
        return _row(src, "failed", error=type(exc).__name__, message=f"{src.path}: {exc}")
    except Exception as exc:  # an engine failure (a server gone): the shard fails, a rerun resumes it
        log.exception("shard %s failed", src.name)
        return _row(src, "failed", error=type(exc).__name__, message=f"{src.name}: {exc}")


def _write_shard(src: ShardSource, spec: JobSpec, compute: Any, on_images: Callable[[int], None] | None) -> tuple:
    writer = ShardWriter(Path(spec.out), src.name, spec.fingerprint)
    entries: list[dict[str, Any]] = []
    ok = err = nbytes = 0

    def write(batch: list[Outcome]) -> None:
        for o in batch:
            for name, data in _members(o, spec):
                writer.add(name, data)
            kill_point("member")

    bg = BackgroundWriter(write)
    try:
        for batch in compute.run(iter_samples(src, spec.image_exts, spec.max_image_bytes), spec.kinds):
            for o in batch:
                nbytes += len(o.sample.data or b"")
                if o.error is None:
                    ok += 1
                    entries.append({"key": o.sample.key, "status": "ok"})
                else:
                    err += 1
                    entries.append({"key": o.sample.key, "status": "error", "error": o.error[0], "message": o.error[1]})
            bg.put(batch)
            if on_images is not None:
                on_images(len(batch))
        bg.close()
        kill_point("before-rename")
        size = writer.commit()
    except BaseException as exc:
        bg.close(raise_error=False)  # the writer thread stops before its file goes
        writer.abort(exc)
        raise
    kill_point("after-rename")
    counts = {"samples": ok + err, "ok": ok, "error": err}
    return {"counts": counts, "samples": entries}, nbytes, size


def _members(o: Outcome, spec: JobSpec) -> list:
    if o.error is not None:
        return []
    s = o.sample
    lay = layout_of(
        o.embedding, o.size, s.member or "", o.sha256, len(s.data or b""), spec.kinds, spec.dims, spec.dtype
    )
    return sample_members(s.key, o.embedding, lay, spec.kinds, spec.dtype)


class ShardWorker:
    """One engine (built once) and the per-shard function: what a local worker process or a Ray
    actor holds."""

    def __init__(self, spec: JobSpec) -> None:
        remove_stale_temporaries(spec.out)  # a killed worker's leftovers on this host
        self.spec = spec
        self.compute = make_compute(spec.engine, spec.dtype)

    def __call__(self, src: ShardSource, on_images: Callable[[int], None] | None = None) -> dict[str, Any]:
        return process_shard(src, self.spec, self.compute, on_images)

    def close(self) -> None:
        self.compute.close()


# -- the summary --------------------------------------------------------------------------------------
@dataclass
class Summary:
    shards: int
    complete: int
    failed: list[dict[str, Any]]
    samples: int
    ok: int
    errors: int
    seconds: float
    embedded: int = 0  # images embedded by this run (not counting complete shards kept)

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0

    def line(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        failed = f", {len(self.failed)} failed ({self.failed[0]['message']})" if self.failed else ""
        return (
            f"corpus: {self.complete}/{self.shards} shards complete{failed}; {self.samples} samples: "
            f"{self.ok} ok, {self.errors} errors ({100 * self.error_rate:.2f}%); {self.embedded} embedded now, "
            f"{rate:.2f} images/s"
        )


def summarize(sources: Sequence[ShardSource], spec: JobSpec, rows: Sequence[dict[str, Any]], seconds: float) -> Summary:
    """Counts from the manifests on disk (the truth whichever worker wrote them), failures from the rows."""
    out = Path(spec.out)
    complete = samples = ok = errors = 0
    for src in sources:
        m = read_manifest(manifest_path(out, src.name))
        if m is None or m.get("fingerprint") != spec.fingerprint:
            continue
        complete += 1
        samples += m["counts"]["samples"]
        ok += m["counts"]["ok"]
        errors += m["counts"]["error"]
    failed = [r for r in rows if r.get("status") == "failed"]
    embedded = sum(int(r.get("samples", 0)) for r in rows if r.get("status") == "done")
    return Summary(len(sources), complete, failed, samples, ok, errors, seconds, embedded)
