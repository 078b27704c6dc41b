"""Who may talk to the service: the API key and the TLS files, read the same way everywhere.

``serve --api-key-file`` hands the key to the gateway (``gateway.py``), which checks the
:data:`API_KEY_HEADER` of every request but health and readiness; ``loadtest --api-key-file`` and
:class:`~step37_deploy.serving.client.EmbedClient` send it.  A key file is refused as ssh refuses a
private key (readable by group or others), and a key is restricted to characters nginx's config can
hold literally.  ``serve --tls-cert/--tls-key`` are checked here before anything starts.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from ..errors import ConfigError

#: The header that carries the key (HTTP header, gRPC metadata).
API_KEY_HEADER = "x-api-key"
#: What an API key may contain: nginx's config holds it literally (hex or base64 keys fit).
API_KEY_RE = re.compile(r"^[A-Za-z0-9._+/=-]{16,1024}$")


def read_api_key(path: str | Path) -> str:
    """The first line of an API key file, refused as ssh refuses a private key: unreadable, empty,
    or readable by group or others.  Keys are 16 to 1024 characters of ``[A-Za-z0-9._+/=-]``
    (``openssl rand -hex 32`` makes one)."""
    p = Path(path)
    try:
        st = p.stat()
        with p.open("rb") as fh:
            first = fh.readline(8192)
    except OSError as exc:
        raise ConfigError(f"--api-key-file {p}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"--api-key-file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"--api-key-file {p} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    key = first.decode("ascii", "replace").strip()
    if not key:
        raise ConfigError(f"--api-key-file {p}: the first line is empty")
    if not API_KEY_RE.match(key):
        raise ConfigError(
            f"--api-key-file {p}: the key must be 16 to 1024 characters of A-Z a-z 0-9 . _ + / = - "
            "(openssl rand -hex 32 makes one)"
        )
    return key


def read_optional_api_key(path: str | Path | None) -> str | None:
    """:func:`read_api_key` when a file is given, else no key."""
    return read_api_key(path) if path is not None else None


def check_tls_files(cert: str | Path | None, key: str | Path | None) -> tuple[Path, Path] | None:
    """``(cert, key)`` when TLS is asked for, both readable PEM files; None when neither is given.
    The key is refused, as ``--api-key-file`` is, when group or others may read it."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together: pass both or neither")
    out = []
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        p = Path(path).resolve()
        try:
            st = p.stat()
            with p.open("rb") as fh:
                head = fh.read(4096)
        except OSError as exc:
            raise ConfigError(f"{option} {path}: cannot read it ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{option} {path} is not a regular file")
        if option == "--tls-key" and st.st_mode & 0o077:
            raise ConfigError(
                f"--tls-key {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        if b"-----BEGIN" not in head:
            raise ConfigError(f"{option} {path} is not a PEM file")
        out.append(p)
    return out[0], out[1]
