"""Reading JSON with errors that name the file, and writing every artifact atomically and safely.

Reports, engines, manifests, feature files, ONNX files and checkpoints are written to a temporary
path in the destination folder and renamed into place, so a reader never sees a half-written file
and a failure leaves nothing behind.  Temporaries are created with the permissions the umask
gives (``tempfile`` would make them 0600, and a serving user other than the builder could not read
the renamed result) and carry this tool's mark and the writer's PID in their name
(``.NAME.step37-tmp-PID-RANDOM``): a run killed by SIGKILL cannot clean up after itself, so the
next run into the same folder removes the temporaries of writers that are gone and says so.

Outputs are checked before any work starts (:func:`check_output_file`): not a directory, a folder
that can be written, and never one of the command's own inputs (:func:`refuse_inputs`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputError
from .process import PROCESS_START as _PROCESS_START  # a module global here: tests move it
from .process import alive, current_umask

log = logging.getLogger(__name__)

#: The mark of this tool's temporaries: ``.{target}.step37-tmp-{host}-{pid}-{random}{suffix}``.
TMP_MARK = ".step37-tmp-"
#: This machine, as it appears in temporary names: a folder shared between machines (NFS) may hold
#: a live run's temporaries whose PID means nothing here; only this host's are ever removed.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_TMP_RE = re.compile(r"^\..*\.step37-tmp-([A-Za-z0-9-]+?)-(\d+)-[0-9a-f]{8}(?![0-9a-f])")


def read_json(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON file's content, or ``error`` naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, RecursionError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8, huge ints
        raise error(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise error(f"{path} must hold a JSON object, not {json.dumps(obj)[:40]}")
    return obj


# -- temporaries ------------------------------------------------------------------------------------
def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove this tool's temporaries in ``folder`` left by killed runs; returns what was removed.

    Only names carrying :data:`TMP_MARK` and this :data:`HOST` are considered, and only those
    older than this process whose writer is gone: its PID no longer runs, or runs a process that
    started after the temporary was last written (a reused PID; ``process.alive``).  A concurrent
    run's temporaries are left alone.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or m.group(1) != HOST:
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:  # gone meanwhile: its writer renamed or removed it
            continue
        if mtime >= _PROCESS_START or alive(int(m.group(2)), written_at=mtime):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("could not remove stale temporary %s: %s", entry.path, exc)
            continue
        removed.append(Path(entry.path))
        log.warning("removed %s, a temporary left by a killed run (pid %s)", entry.path, m.group(2))
    return removed


def ensure_dir(folder: Path, what: str) -> None:
    """Create ``folder`` (and parents) for ``what``, or :class:`OutputError` naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {folder} for {what}: {os_reason(exc)}") from exc


def temp_sibling(path: str | Path, suffix: str = "", directory: bool = False) -> Path:
    """Create a new, empty temporary file (or folder) beside ``path``, mode from the umask.

    Stale temporaries of killed runs in that folder are removed first."""
    path = Path(path)
    ensure_dir(path.parent, str(path))
    remove_stale_temporaries(path.parent)
    for _ in range(100):
        tmp = path.parent / f".{path.name}{TMP_MARK}{HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {path.parent}: {os_reason(exc)}") from exc
    raise OutputError(f"cannot create a temporary name beside {path}")  # pragma: no cover


def apply_umask(path: str | Path) -> None:
    """Give ``path`` the permissions a new file gets under the current umask (for libraries that
    create files 0600, such as ``safetensors``' ``save_file``)."""
    os.chmod(path, 0o666 & ~current_umask())


def os_reason(exc: OSError) -> str:
    """A short reason for an OS error, full disk spelled out."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def remove_tree(path: Path) -> None:
    """Remove a file or a folder with its content, whatever is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block succeeds, removed
    when it raises.  OS errors while writing or renaming become :class:`OutputError` naming
    ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name")
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {os_reason(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` for the caller to fill; removed (with its content)
    when the block ends, whether it renamed things out of it or not."""
    tmp = temp_sibling(path, directory=True)
    try:
        yield tmp
    finally:
        remove_tree(tmp)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``out``; an existing ``out`` (which the caller has
    checked it may replace) is moved aside first and removed only once ``tmp`` is in place."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = temp_sibling(out, directory=True)
    os.rename(out, old)  # onto the empty placeholder folder: POSIX rename replaces it
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    remove_tree(old)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


# -- output checks ----------------------------------------------------------------------------------
def check_output_file(path: str | Path, label: str) -> Path:
    """Fail fast, before any work, when ``path`` (given as ``label``) cannot become a file:
    it is a directory, its folder is a file, or the folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{label} {path} is a directory; give a file name")
    check_output_dir(path.parent, label, path)
    return path


def check_output_dir(folder: str | Path, label: str, target: str | Path | None = None) -> Path:
    """Fail fast when ``folder`` cannot be created or written (``target`` names the output)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the first folder that exists
        probe = probe.parent
    what = f"{label} {target if target is not None else folder}"
    if not probe.is_dir():
        raise OutputError(f"{what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: {probe} is not writable")
    return folder


#: Files that belong to an input file: its ONNX external data, its engine manifest.
COMPANION_SUFFIXES = (".data", ".json")


def _companions(path: Path) -> Iterator[Path]:
    """An input and the files that belong to it: a folder's files, or a file with its
    ``NAME.data`` / ``NAME.json`` beside it."""
    if path.is_dir():
        with contextlib.suppress(OSError):
            yield from (p for p in path.iterdir() if p.is_file())
        return
    yield path
    for suffix in COMPANION_SUFFIXES:
        yield path.with_name(path.name + suffix)


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def refuse_inputs(outputs: Mapping[str, str | Path], inputs: Mapping[str, Iterable[str | Path] | str | Path]) -> None:
    """Raise :class:`OutputError` when an output would write over one of the command's inputs.

    ``outputs``: label -> file path.  ``inputs``: label -> path(s); a folder counts as its files and
    a file as itself plus its companions (external data, manifest)."""
    for in_label, value in inputs.items():
        paths = [value] if isinstance(value, (str, Path)) else list(value)
        for given in paths:
            if given is None:
                continue
            for member in _companions(Path(given)):
                for out_label, out in outputs.items():
                    if out is not None and same_file(Path(out), member):
                        raise OutputError(
                            f"{out_label} {out} is {member}, an input ({in_label} {given}): "
                            "refusing to write over it; choose another output path"
                        )


def check_replaceable_json(path: str | Path, label: str, keys: set[str]) -> None:
    """An existing ``path`` may be replaced only when it is a JSON object with ``keys``: a report
    this tool wrote before, never another file given by mistake."""
    path = Path(path)
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and keys <= set(data)):
        raise OutputError(f"{label} {path} exists and is not a report of this command: refusing to replace it")
