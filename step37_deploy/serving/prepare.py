"""What ``serve`` settles before it starts anything: which ``tritonserver`` to run, its arguments
checked and resolved into a :class:`ServePlan`, and its private work folder.

The ``tritonserver`` is the one ``nvidia-pytriton`` ships (``pytriton/tritonserver/bin/tritonserver``,
with the Python backend and one backend stub per Python version) unless the user names their own
(:func:`find_tritonserver`).  Every user-caused problem (no TensorRT backend for engines, TLS files,
nginx missing or too old, a key file, a port in use) is found here, in one line, before the work
folder exists; ``serve``'s ``limits`` are never changed: the gateway's options are a new value
(:func:`gateway_options`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError
from ..process import umask
from .auth import check_tls_files, read_optional_api_key
from .gateway import GatewayOptions, require_nginx
from .net import check_port_free
from .nginxconf import user_line
from .supervise import sweep_dead_runs


@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary and the backend folder to give it (``None``: the server's default)."""

    binary: Path
    python_backend: Path | None  # folder with libtriton_python.so (+ triton_python_backend_utils.py)
    stub: Path | None  # triton_python_backend_stub for this Python, when kept apart (PyTriton)
    libs: Path | None  # extra shared libraries the binary needs (PyTriton's nvidia_pytriton.libs)


def bundled_tritonserver() -> TritonInstall:
    """The ``tritonserver`` inside the installed ``nvidia-pytriton`` package."""
    try:
        import pytriton
    except ImportError as exc:
        raise BackendUnavailable(
            f"nvidia-pytriton is not installed (pip install 'step37-deploy[serve]'), or pass --tritonserver ({exc})"
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    inst = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs",
    )
    for what, p in (
        ("tritonserver", inst.binary),
        ("Python backend", inst.python_backend),
        ("backend stub", inst.stub),
    ):
        if not p.exists():
            raise BackendUnavailable(f"nvidia-pytriton has no {what} for Python {version} at {p}")
    return inst


def find_tritonserver(path: str | Path | None = None) -> TritonInstall:
    """The user's ``tritonserver`` (its default backend folder) or the bundled one."""
    if path is None:
        return bundled_tritonserver()
    p = Path(path)
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise ConfigError(f"--tritonserver {p} is not an executable file")
    return TritonInstall(p, None, None, None)


@dataclass(frozen=True)
class ServePlan:
    """What ``serve`` runs, resolved and checked from its arguments before anything starts."""

    install: TritonInstall
    host: str
    ports: dict[str, int | None]  # the user's http, grpc and metrics ports (None: a free one)
    exit_timeout_s: int
    log_verbose: int
    allow_shared_memory: bool
    tls: tuple[Path, Path] | None
    gateway: GatewayOptions | None  # None: --no-gateway, Triton listens on the user's host itself
    nginx: Path | None


def gateway_options(
    limits: GatewayOptions | None,
    api_key: str | None,
    tls: tuple[Path, Path] | None,
    allow_shared_memory: bool,
    exit_timeout_s: int,
) -> GatewayOptions:
    """The gateway's options: ``limits`` (body, connections, idle time) with the access rules and the
    shutdown timeout ``serve`` was given, as a new value (``limits`` itself is left as it is).  The
    key and TLS come only from ``serve``'s own arguments: ``limits`` carrying either is refused
    rather than silently overridden."""
    limits = limits or GatewayOptions()
    if limits.api_key is not None or limits.tls is not None:
        raise ConfigError(
            "serve: pass the API key and TLS files as api_key_file, tls_cert and tls_key, not inside limits"
        )
    return replace(
        limits, api_key=api_key, tls=tls, allow_shared_memory=allow_shared_memory, shutdown_timeout_s=exit_timeout_s
    )


def plan_serve(
    *,
    backend: str,
    tritonserver: str | Path | None,
    host: str,
    ports: dict[str, int | None],
    gateway: bool,
    limits: GatewayOptions | None,
    api_key_file: str | Path | None,
    tls_cert: str | Path | None,
    tls_key: str | Path | None,
    allow_shared_memory: bool,
    exit_timeout_s: int,
    log_verbose: int,
) -> ServePlan:
    """``serve``'s arguments (same names; ``ports`` by protocol: ``http``, ``grpc``, ``metrics``)
    checked (the server, its TensorRT backend, TLS files, nginx, the key file, the ports) and
    resolved into a :class:`ServePlan`; one line naming what is wrong if not."""
    install = find_tritonserver(tritonserver)
    if (
        backend == "trt"
        and install.python_backend is not None
        and not (install.python_backend.parent / "tensorrt").is_dir()
    ):
        raise BackendUnavailable(
            "the tritonserver nvidia-pytriton ships has no TensorRT backend: serve engines in NVIDIA's container "
            "(step37-deploy triton-repo, then docker run ... nvcr.io/nvidia/tritonserver:<ver>-py3; see "
            "docs/serving.md) or pass --tritonserver, a tritonserver with a TensorRT backend"
        )
    tls = check_tls_files(tls_cert, tls_key)
    nginx = options = None
    if gateway:
        nginx = require_nginx()
        key = read_optional_api_key(api_key_file)
        options = gateway_options(limits, key, tls, allow_shared_memory, exit_timeout_s)
        user_line(options.worker_user)  # as root: the workers' user exists and is not root, before Triton starts
    elif api_key_file is not None:
        raise ConfigError(
            "--api-key-file needs the gateway: under --no-gateway the key would have to go on tritonserver's "
            "command line, which every local user can read in ps"
        )
    ports = {name: ports.get(name) for name in ("http", "grpc", "metrics")}
    for name, port in ports.items():
        if port:
            check_port_free(host, port, f"--{name}-port")
    return ServePlan(install, host, ports, exit_timeout_s, log_verbose, allow_shared_memory, tls, options, nginx)


@contextlib.contextmanager
def private_work_folder() -> Iterator[Path]:
    """``serve``'s work folder: 0700, under umask 077 while it is in use (the repository and its
    copies of the weights are the server user's only), named with this host and PID
    (``files.temp_sibling``) so that the next run removes it if this one is killed; what a killed
    ``serve`` left (its folder, shared memory, stubs) is swept first.  Removed at the end."""
    import tempfile

    from ..files import remove_tree, temp_sibling

    sweep_dead_runs()
    with umask(0o077):
        workdir = temp_sibling(Path(tempfile.gettempdir()) / "step37-serve", directory=True)
        os.chmod(workdir, 0o700)
        try:
            yield workdir
        finally:
            remove_tree(workdir)
