"""The feature-shard format: a WebDataset tar per input shard, and its manifest.

``OUT/NAME.tar`` holds, for every sample of the input shard ``NAME`` that embedded, in input order:

- ``KEY.vision_features.safetensors``: one tensor ``vision_features`` [L, C], the tower's rows before
  the projector in token order (crops row-major, then the global view): Megatron-Bridge's
  ``ImageForInsert.image_features`` for its decoupled-encoder mode;
- ``KEY.features.safetensors`` (``--outputs features``): ``features`` [L, hidden], projected;
- ``KEY.layout.json``: views, rows per view, crop grid, token ids, the ``ImageForInsert`` groups
  (flag token, views, ``rope_cu_seqlens``), the image's size, member and SHA-256.

Members are WebDataset's ``KEY.EXT`` so WebDataset and Energon read the tar as it is and join it with
the image-text shard by ``__key__``.  The tar is deterministic (PAX format, members in input order,
mtime 0, no owner), so the same input and fingerprint always give the same bytes, whichever engine
or worker wrote it.  A PAX global header carries ``step37.corpus`` (the format) and
``step37.fingerprint``: a tar left without its manifest by a killed run is recognised as this tool's.

``OUT/NAME.manifest.json`` lists every input key once with its status (``ok``, or the error class and
message), counts, bytes and the run's fingerprint.  It is written last: **a shard is complete when its
manifest exists**.  Both files go through a temporary name and a rename (``files.atomic_path``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..files import atomic_path, os_reason, read_json, write_json

log = logging.getLogger(__name__)

#: The format of feature shards and manifests (bumped when either changes incompatibly).
FORMAT = "step37-corpus/1"
PAX_FORMAT_KEY = "step37.corpus"
PAX_FINGERPRINT_KEY = "step37.fingerprint"
MANIFEST_SUFFIX = ".manifest.json"
LAYOUT_EXT = "layout.json"
TENSOR_EXT = "{kind}.safetensors"
#: Storage dtypes of the tensors (``--dtype``).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def tar_path(out: Path, name: str) -> Path:
    return out / f"{name}.tar"


def manifest_path(out: Path, name: str) -> Path:
    return out / f"{name}{MANIFEST_SUFFIX}"


def fingerprint_of(run: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of what decides the tensors (checkpoint, artifacts, engine,
    preprocessing, dtype, outputs): a rerun with the same one may keep complete shards."""
    return hashlib.sha256(json.dumps(run, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- ownership ----------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` if it is one of this tool's (any fingerprint), else None."""
    try:
        data = read_json(path, OutputError)
    except OutputError:
        return None
    return data if data.get("format") == FORMAT else None


def tar_fingerprint(path: Path) -> str | None:
    """The fingerprint in a tar's PAX global header when the tar is one of this tool's, else None."""
    try:
        with tarfile.open(path, "r:") as tar:
            tar.next()
            if tar.pax_headers.get(PAX_FORMAT_KEY) == FORMAT:
                return tar.pax_headers.get(PAX_FINGERPRINT_KEY, "")
    except (OSError, tarfile.TarError, EOFError, UnicodeError):
        pass
    return None


# -- tensors ------------------------------------------------------------------------------------------
def tensor_bytes(kind: str, rows: Any, dtype: str) -> bytes:
    """``rows`` [L, C] (numpy or torch, any float dtype) as a safetensors file holding one tensor
    ``kind`` in ``dtype`` (``bf16``: round-to-nearest-even from FP32, torch's cast)."""
    import torch
    from safetensors.torch import save

    if getattr(rows, "flags", None) is not None and not rows.flags.writeable:
        rows = rows.copy()  # read-only numpy (a served answer): torch wants a writable buffer
    t = torch.as_tensor(rows).detach().to("cpu")
    t = t.to(getattr(torch, DTYPES[dtype])).contiguous()
    return save({kind: t})


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes one feature shard: members to a temporary tar beside the output, renamed into place by
    :meth:`commit`; anything else (an error, :meth:`abort`) removes the temporary.  A write error
    (a full disk) becomes :class:`OutputError` naming the shard.  Not thread-safe: one writer thread."""

    def __init__(self, out: Path, name: str, fingerprint: str) -> None:
        self.path = tar_path(out, name)
        self.bytes = 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._fh = self._stack.enter_context(open_output(self._tmp))
            headers = {PAX_FORMAT_KEY: FORMAT, PAX_FINGERPRINT_KEY: fingerprint}
            self._tar = tarfile.open(  # noqa: SIM115 - closed by commit() or abort()
                fileobj=self._fh, mode="w", format=tarfile.PAX_FORMAT, pax_headers=headers
            )
        except OSError as exc:
            self._stack.__exit__(type(exc), exc, None)
            raise OutputError(f"could not write {self.path}: {os_reason(exc)}") from exc
        except BaseException as exc:
            self._stack.__exit__(type(exc), exc, None)
            raise

    def add(self, name: str, data: bytes) -> None:
        try:
            self._tar.addfile(_info(name, len(data)), io.BytesIO(data))
        except OSError as exc:
            raise OutputError(f"could not write {self.path}: {os_reason(exc)}") from exc
        self.bytes += len(data)

    def commit(self) -> int:
        """Finish the tar, flush it to disk and rename it into place; returns its size."""
        try:
            self._tar.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            size = self._fh.tell()
        except OSError as exc:
            self.abort(exc)
            raise OutputError(f"could not write {self.path}: {os_reason(exc)}") from exc
        self._stack.close()  # closes the file, renames the temporary onto the shard
        return size

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the temporary (the output shard, if any, stays as it was)."""
        err = exc or RuntimeError("aborted")
        with contextlib.suppress(Exception):
            self._stack.__exit__(type(err), err, None)


def open_output(path: Path) -> Any:
    """Open a temporary output for writing (one place, so tests can inject a full disk here)."""
    return open(path, "wb")


def write_manifest(out: Path, name: str, manifest: dict[str, Any]) -> None:
    """The manifest, atomically, last: from here on the shard is complete."""
    write_json(manifest_path(out, name), {"format": FORMAT, **manifest})


# -- background writing -------------------------------------------------------------------------------
class BackgroundWriter:
    """Runs ``fn(item)`` for each item on one thread, at most ``depth`` items queued, so that
    serialising and writing overlap the next batch's compute; the first error is raised by
    :meth:`put` or :meth:`close`."""

    def __init__(self, fn: Any, depth: int = 2) -> None:
        import queue

        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="corpus-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as exc:  # handed to the producer thread
                    self._error = exc

    def put(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(item)

    def close(self, raise_error: bool = True) -> None:
        """Wait for the queued items; the first error is raised (unless the caller is already failing)."""
        self._q.put(_STOP)
        self._thread.join()
        if raise_error and self._error is not None:
            raise self._error


_STOP = object()


def iter_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of a feature shard, in order (regular files only)."""
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile():
                fh = tar.extractfile(m)
                yield m.name, fh.read() if fh is not None else b""
