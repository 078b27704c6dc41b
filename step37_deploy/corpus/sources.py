"""Input shards: WebDataset tars and folders of images, read as ``(key, image bytes)`` samples.

A corpus is given as paths, globs and brace ranges (``data-{000000..000099}.tar``).  Each tar is one
shard; a folder is split into stable *virtual* shards of ``shard_size`` keys (sorted by key, so a
rerun over the same files makes the same shards, and files sharing a key stay in one shard).

Keys follow WebDataset's rule (``webdataset.tariterators.base_plus_ext``, Energon's
``split_name_re``): a member ``dir/name.ext.more`` has the key ``dir/name`` (everything up to the
first dot of the file name) and the extension ``ext.more``; consecutive members with one key form a
sample.  A folder's file ``a/b/c.jpg`` has the key ``a/b/c``.  The image of a sample is its member
with an image extension (:data:`IMAGE_EXTS`, in that order of preference).

What is wrong with one sample (no image, an image too large to read, a key that is not a safe tar
member name, an unreadable file) is that sample's error, reported with its key.  What makes the
shard's keys unknowable (a tar that cannot be read, the same key twice) is a :class:`ShardError`:
the shard fails and the others go on.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, Step37Error
from ..inputs import contained_path

log = logging.getLogger(__name__)

#: Image extensions, in order of preference when a sample has several.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: WebDataset's key/extension split (the same regular expression as Energon's ``split_name_re``).
_SPLIT_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: Members WebDataset and Energon skip: ``__name__`` files and folders (their own metadata).
_META_RE = re.compile(r"__[^/]*__($|/)")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardError(Step37Error):
    """This shard cannot be read as a WebDataset shard (unreadable tar, duplicate keys): it fails,
    the other shards go on."""


@dataclass(frozen=True)
class ShardSource:
    """One input shard: a tar file, or a slice of a folder's image files (relative paths)."""

    name: str  # the output shard's basename, without ``.tar``
    kind: str  # "tar" | "folder"
    path: str  # the tar file, or the folder
    files: tuple[str, ...] = ()  # folder shards: the files, relative to ``path``, in key order

    def identity(self) -> dict[str, object]:
        """What the manifest records to tell a changed input apart on resume: a tar's size and
        modification time; a folder shard's file list with sizes and times, as a digest."""
        if self.kind == "tar":
            st = os.stat(self.path)
            return {"kind": "tar", "path": self.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        h = hashlib.sha256()
        for rel in self.files:
            try:
                st = os.stat(os.path.join(self.path, rel))
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{rel}\0missing\n".encode())
        return {"kind": "folder", "path": self.path, "files": len(self.files), "digest": h.hexdigest()}


@dataclass
class Sample:
    """One sample of a shard: its key and image bytes, or the reason it has none."""

    key: str
    data: bytes | None = None
    member: str | None = None  # the image's extension (``jpg``...)
    error: tuple[str, str] | None = None  # (error class, message)


# -- keys ---------------------------------------------------------------------------------------------
def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a tar member name by WebDataset's rule, or None (no extension)."""
    m = _SPLIT_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot name members of the output tar (None when it can): an extractor would
    write outside its folder, or a reader would split the key differently."""
    if not key or "\x00" in key or "\\" in key:
        return "is empty or holds a NUL or a backslash"
    parts = key.split("/")
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return "is not a relative path inside the shard (absolute, '..', '.' or an empty part)"
    if "." in parts[-1]:
        return "has a '.' in its file name, which WebDataset reads as the start of the extension"
    if len(key.encode()) > 4000:
        return "is longer than 4000 bytes"
    return None


# -- expanding the inputs -----------------------------------------------------------------------------
def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for one in braceexpand(spec):
        if _GLOB_CHARS.search(one):
            found = sorted(glob.glob(one))
            if not found:
                raise InputError(f"input {one!r} matches no file")
            out += found
        else:
            out.append(one)
    return out


def _tar_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in _TAR_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    raise InputError(f"input {path} is neither a folder nor a .tar shard")


def expand_inputs(
    specs: Sequence[str], shard_size: int = 1000, image_exts: Sequence[str] = IMAGE_EXTS
) -> list[ShardSource]:
    """The shards of ``specs`` (files, folders, globs, brace ranges), in the order given; each output
    basename once (two inputs of one basename would write one output: refused)."""
    sources: list[ShardSource] = []
    for spec in specs:
        for path in _expand(spec):
            try:
                is_dir = os.path.isdir(path)
                os.stat(path)
            except OSError as exc:
                raise InputError(f"input {path}: {exc.strerror or exc}") from None
            if is_dir:
                sources += folder_shards(path, shard_size, image_exts)
            else:
                sources.append(ShardSource(_tar_name(path), "tar", path))
    if not sources:
        raise InputError(f"inputs {list(specs)} hold no shard")
    seen: dict[str, ShardSource] = {}
    for s in sources:
        if s.name in seen:
            raise InputError(
                f"inputs {seen[s.name].path} and {s.path} would both write the feature shard {s.name}.tar: "
                "give inputs with distinct basenames (or run them into separate --out folders)"
            )
        seen[s.name] = s
    return sources


def folder_shards(root: str, shard_size: int, image_exts: Sequence[str] = IMAGE_EXTS) -> list[ShardSource]:
    """A folder's image files (recursively, symlinked folders not followed), sorted by key and cut
    into shards of ``shard_size`` keys named ``FOLDER-000000`` ..."""
    exts = {e.lower() for e in image_exts}
    by_key: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            _, dot, ext = fn.rpartition(".")
            if not dot or ext.lower() not in exts:
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
            by_key.setdefault(rel[: -len(ext) - 1], []).append(rel)
    keys = sorted(by_key)
    label = os.path.basename(os.path.abspath(root).rstrip("/")) or "images"
    shards = []
    for i in range(0, len(keys), shard_size):
        files = tuple(f for k in keys[i : i + shard_size] for f in by_key[k])
        shards.append(ShardSource(f"{label}-{i // shard_size:06d}", "folder", root, files))
    if not shards:
        log.warning("folder %s holds no image (%s)", root, ", ".join(sorted(exts)))
    return shards


# -- reading samples ----------------------------------------------------------------------------------
def iter_samples(
    source: ShardSource, image_exts: Sequence[str] = IMAGE_EXTS, max_bytes: int = 64 << 20
) -> Iterator[Sample]:
    """The samples of one shard, in order, reading one image at a time (memory: one image)."""
    if source.kind == "tar":
        yield from _tar_samples(source.path, image_exts, max_bytes)
    else:
        yield from _folder_samples(source, image_exts, max_bytes)


def _pick(key: str, members: dict[str, object], image_exts: Sequence[str]) -> tuple[str | None, str | None]:
    """The image member's extension, or None and the reason."""
    for ext in image_exts:
        for have in members:
            if have.lower() == ext:
                return have, None
    listed = ", ".join(sorted(members)) or "none"
    return None, f"sample {key!r} has no image member ({', '.join(image_exts)}); its members: {listed}"


def _tar_samples(path: str, image_exts: Sequence[str], max_bytes: int) -> Iterator[Sample]:
    """Members are read as they stream past (a compressed tar is never sought backwards); only image
    members' bytes are kept, one sample at a time."""
    seen: set[str] = set()
    wanted = {e.lower() for e in image_exts}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            key: str | None = None
            members: dict[str, bytes | int] = {}  # extension -> bytes (images) or size (others, too large)
            for m in tar:
                if not m.isfile() or _META_RE.match(m.name):
                    continue
                parts = split_name(m.name)
                if parts is None:
                    log.debug("%s: member %s has no extension; skipped as WebDataset does", path, m.name)
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield _tar_sample(key, members, image_exts, max_bytes)
                    if parts[0] in seen:
                        raise ShardError(f"{path}: key {parts[0]!r} appears twice (samples must be contiguous)")
                    key, members = parts[0], {}
                    seen.add(key)
                if parts[1] in members:
                    raise ShardError(f"{path}: key {key!r} has two members {m.name!r}: duplicate key")
                members[parts[1]] = (
                    _member_bytes(tar, m, path) if parts[1].lower() in wanted and m.size <= max_bytes else m.size
                )
            if key is not None:
                yield _tar_sample(key, members, image_exts, max_bytes)
    except (tarfile.TarError, EOFError, OSError, UnicodeError) as exc:
        raise ShardError(f"{path} is not a readable tar: {type(exc).__name__}: {exc}") from None


def _member_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> bytes:
    fh = tar.extractfile(m)
    data = fh.read() if fh is not None else b""
    if len(data) != m.size:
        raise ShardError(f"{path}: member {m.name} is truncated ({len(data)} of {m.size} bytes)")
    return data


def _tar_sample(key: str, members: dict[str, bytes | int], image_exts: Sequence[str], max_bytes: int) -> Sample:
    why = unsafe_key(key)
    if why:
        return Sample(key, error=("UnsafeKey", f"key {key!r} {why}"))
    ext, err = _pick(key, members, image_exts)
    if ext is None:
        return Sample(key, error=("NoImage", err or ""))
    data = members[ext]
    if isinstance(data, int):
        return Sample(key, member=ext, error=("TooLarge", f"{key}.{ext} is {data} bytes, over {max_bytes}"))
    return Sample(key, data, ext)


def _folder_samples(source: ShardSource, image_exts: Sequence[str], max_bytes: int) -> Iterator[Sample]:
    by_key: dict[str, list[str]] = {}
    for rel in source.files:
        by_key.setdefault(rel.rpartition(".")[0], []).append(rel)
    for key, rels in by_key.items():
        if len(rels) > 1:
            raise ShardError(f"{source.path}: files {rels} share the key {key!r}: duplicate key")
        rel = rels[0]
        ext = rel.rpartition(".")[2]
        why = unsafe_key(key)
        if why:
            yield Sample(key, error=("UnsafeKey", f"key {key!r} ({rel}) {why}"))
            continue
        yield _read_file(source.path, key, rel, ext, max_bytes)


def _read_file(root: str, key: str, rel: str, ext: str, max_bytes: int) -> Sample:
    try:
        path = contained_path(root, rel, InputError, f"folder {root}")
        size = path.stat().st_size
        if size > max_bytes:
            return Sample(key, member=ext, error=("TooLarge", f"{path} is {size} bytes, over {max_bytes}"))
        data = Path(path).read_bytes()
    except InputError as exc:
        return Sample(key, member=ext, error=("UnsafePath", str(exc)))
    except OSError as exc:
        return Sample(key, member=ext, error=("Unreadable", f"{root}/{rel}: {exc.strerror or exc}"))
    return Sample(key, data, ext)
