"""Input files and folders: errors that say what is wrong with them, and paths read from files kept
inside their folder.

``Path.is_file()`` answers ``False`` for a file that exists but sits in a folder this user cannot
search, so "does not exist" would be the wrong diagnosis for a ``chmod 000`` checkpoint; these
helpers ``stat``/``open`` and name the real cause (missing, a folder, permission denied).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import Step37Error


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read: permission denied"
    if exc.errno == errno.ENOENT:
        return "does not exist"
    return f"cannot be read: {exc.strerror or exc}"


def require_file(path: str | Path, error: type[Step37Error], what: str, missing_ok: bool = False) -> bool:
    """``True`` when ``path`` is a readable regular file; ``False`` when it is missing and
    ``missing_ok``; else ``error`` naming the file and the cause."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        if missing_ok and exc.errno == errno.ENOENT:
            return False
        raise error(f"{what} {path} {_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} cannot be read: permission denied")
    return True


def require_dir(path: str | Path, error: type[Step37Error], what: str) -> Path:
    """``path`` when it is a folder whose entries can be listed, else ``error`` naming it."""
    path = Path(path)
    try:
        os.listdir(path)
    except NotADirectoryError:
        raise error(f"{what} {path} is a file, not a folder") from None
    except OSError as exc:
        raise error(f"{what} folder {path} {_reason(exc)}") from None
    return path


def is_hf_cache_blob(target: Path, root: Path) -> bool:
    """Hugging Face's cache keeps ``snapshots/REV/NAME`` as symlinks to ``../../blobs/SHA``: a
    target in the same repository's ``blobs`` folder is part of the checkpoint, not an escape."""
    if root.parent.name != "snapshots":
        return False
    blobs = root.parent.parent.resolve() / "blobs"
    return target.parent == blobs


def contained_path(root: str | Path, name: object, error: type[Step37Error], what: str) -> Path:
    """``root / name`` for a relative ``name`` read from a file (index, manifest, ONNX external
    data) that stays inside ``root``: no absolute path, no ``..``, no symlink leading out of it
    (Hugging Face cache blobs excepted).  Checked before anything is opened."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what}: file name {name!r} is not a valid relative path")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise error(f"{what}: file name {name!r} is an absolute path; it must name a file inside {root}")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise error(f"{what}: file name {name!r} leads out of {root} ('..' is not allowed)")
    path = root / name
    real_root = root.resolve()
    target = path.resolve()
    if not target.is_relative_to(real_root) and not is_hf_cache_blob(target, real_root):
        raise error(f"{what}: {path} is a symlink to {target}, outside {root}; refusing to read it")
    return path


def onnx_external_files(model: object, onnx_path: str | Path, error: type[Step37Error]) -> list[Path]:
    """The external-data files an ONNX model (loaded without them) refers to, each checked to stay
    in the model's folder (:func:`contained_path`) before anything reads it."""
    onnx_path = Path(onnx_path)
    locations = sorted(
        {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}  # type: ignore[attr-defined]
    )
    return [contained_path(onnx_path.parent, loc, error, f"{onnx_path}: external data") for loc in locations]
