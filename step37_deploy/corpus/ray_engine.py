"""The Ray engine (``--engine ray``, the ``[ray]`` extra): the same per-shard function on a Ray cluster.

Ray Data runs :func:`~step37_deploy.corpus.job.process_shard` in an actor pool
(``map_batches(..., compute=ActorPoolStrategy(size=N))``): each actor builds one engine (one per GPU,
or per CPU slot), spread over the nodes.  A shard goes in as one small row (its source), and the
actor decodes, embeds and writes the feature shard itself, so the 2-14 MB tensors of an image never
enter Ray's object store; only the shard's row (status and counts) comes back.

Ray retries the task of an actor that died with its node (``max_restarts`` / ``max_task_retries``,
Ray Data's defaults) on another actor.  That is at-least-once; exactly-once is the job's: a rerun
of a shard whose manifest exists with this fingerprint returns it untouched, and a shard is renamed
into place whole, so every key is written once.  The temporaries of a worker killed with its node
are removed by the next actor that starts on that host.

Without ``--ray-address`` the job starts a Ray runtime on this machine for its own use, on
127.0.0.1 only, with token authentication and a token file of mode 0600 (Ray's own
``ray get-auth-token --generate`` writes one readable by every local user), and shuts it down.
With a loopback ``--ray-address`` (a cluster of nodes on this machine) the driver keeps to loopback
too: Ray 2.60 otherwise rewrites 127.0.0.1 into the machine's outward address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any

from ..errors import BackendUnavailable, OutputError
from .job import JobSpec, ShardWorker
from .sources import ShardSource

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'step37-deploy[ray]'"


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BackendUnavailable(f"--engine ray needs Ray Data: {RAY_INSTALL}") from None
    return ray


#: Ray 2.60 rewrites 127.0.0.1 into the machine's outward address (``services.resolve_ip_for_localhost``)
#: unless multi-node support is off for the process, as on macOS: then every node address is loopback.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TOKEN_ENVS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def is_loopback(address: str | None) -> bool:
    host = (address or "127.0.0.1").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _refresh_ray_config(loopback: bool) -> None:
    """Make an already imported Ray see the environment set since (Ray reads it at import)."""
    if sys.modules.get("ray") is None:  # not imported yet (it will read the environment), or not installed
        return
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    if loopback:
        ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def private_environment(loopback: bool, token: bool) -> Iterator[None]:
    """For a runtime this job starts or joins on this machine: node addresses on loopback only, and
    token authentication with the token in a 0600 file of a 0700 folder (removed at the end); a
    token the user configured (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``) is
    used as it is."""
    saved = {k: os.environ.get(k) for k in (_LOOPBACK_ENV, *_TOKEN_ENVS)}
    folder = None
    if loopback:
        os.environ[_LOOPBACK_ENV] = "0"
    if token and not any(k in os.environ for k in _TOKEN_ENVS):
        folder = tempfile.mkdtemp(prefix="step37-ray-")  # 0700
        path = os.path.join(folder, "auth_token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    _refresh_ray_config(loopback)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def ray_runtime(address: str | None, num_cpus: int | None, num_gpus: int | None) -> Iterator[Any]:
    """Ray, connected: an already initialised runtime as it is, the cluster at ``address``, or a
    runtime on this machine for the job (loopback only, private token), shut down afterwards."""
    if "ray" in sys.modules and sys.modules["ray"] is not None and sys.modules["ray"].is_initialized():
        yield require_ray()
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    with private_environment(loopback=is_loopback(address), token=not address):
        ray = require_ray()
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=256 << 20, **quiet)
        try:
            yield ray
        finally:
            ray.shutdown()


class _ShardActor:
    """A Ray Data actor: one :class:`ShardWorker`, rows of shard sources in, rows of results out."""

    def __init__(self, spec: JobSpec) -> None:
        self.worker = ShardWorker(spec)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = [self.worker(ShardSource(**_source(s))) for s in batch["source"]]
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _spread() -> dict[str, Any]:
    """The actors' placement: spread over the nodes (one engine per GPU across the cluster)."""
    return {"scheduling_strategy": "SPREAD"}


def _source(text: str) -> dict[str, Any]:
    d = json.loads(text)
    d["files"] = tuple(d["files"])
    return d


class RayRunner:
    """``run(todo, on_row, on_images)`` on Ray Data; ``workers`` actors of ``cpus`` CPUs (and
    ``gpus`` GPUs) each, spread over the cluster's nodes."""

    def __init__(
        self,
        spec: JobSpec,
        workers: int = 1,
        address: str | None = None,
        cpus: float = 1,
        gpus: float = 0,
        progress: bool = True,
    ) -> None:
        self.spec = replace(spec, engine_name="ray", engine=replace(spec.engine, threads=max(1, int(cpus))))
        self.workers, self.address, self.cpus, self.gpus, self.progress = workers, address, cpus, gpus, progress

    def run(
        self,
        todo: Sequence[ShardSource],
        on_row: Callable[[dict[str, Any]], None],
        on_images: Callable[[int], None] | None = None,
    ) -> None:
        if not todo:
            return
        total_cpus = None if self.address else int(self.workers * self.cpus) + 1
        total_gpus = None if self.address or not self.gpus else int(self.workers * self.gpus)
        with ray_runtime(self.address, total_cpus, total_gpus) as ray:
            if not self.progress:  # --quiet: Ray Data's progress and INFO lines too
                logging.getLogger("ray.data").setLevel(logging.ERROR)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = self.progress
            ctx.enable_operator_progress_bars = self.progress
            items = [{"source": json.dumps(asdict(s))} for s in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            out = ds.map_batches(
                _ShardActor,
                fn_constructor_kwargs={"spec": self.spec},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=self.workers),
                num_cpus=self.cpus,
                num_gpus=self.gpus or None,
                ray_remote_args_fn=_spread,
            )
            for rec in out.iter_rows():
                row = json.loads(rec["row"])
                on_row(row)
                if on_images is not None and row.get("status") == "done":
                    on_images(int(row.get("samples", 0)))
                if row.get("fatal"):
                    raise OutputError(row["message"])
