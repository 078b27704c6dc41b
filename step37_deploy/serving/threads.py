"""Thread settings of the served processes, chosen from the cores they share (issue 21).

A served request crosses several processes on one machine: tritonserver, the embedder instances
(preprocessing, projector) and the two tower stubs (ONNX Runtime or torch).  Each library in them
sizes its thread pool for the whole machine as if it were alone, and two of them keep idle threads
spinning on a core after every call, so on a CPU the stubs take cores from each other:

* ONNX Runtime's intra-op workers spin-wait after each ``run`` (``session.intra_op.allow_spinning``,
  on by default): measured here, 41 ms of CPU burnt in the 100 ms after each 85 ms run of the tiny
  728 tower (0.1 ms with spinning off), while the embedder preprocesses the next image or the other
  tower computes;
* OpenMP (torch) and OpenBLAS (numpy's projector) start one thread per core in *every* process and
  spin-wait too (``OMP_WAIT_POLICY``); with one embedder instance per core, each instance's
  projector needs one thread, and spinning idle ones only steal the towers' cores.

So ``serve`` decides (:func:`plan_threads`): each CPU tower session runs ``cores`` intra-op threads
(a request's views get the whole machine while that tower computes; on a GPU this only sizes the
CPU-side pool) with spinning off, one inter-op thread; each embedder instance ``cores //
instances`` BLAS/OpenMP/torch threads (at least 1); OpenMP threads sleep when idle (``PASSIVE``).
Where each embedder instance runs the towers itself (``tower_calls`` "local", chosen here when
there are no more embedder instances than tower instances: the same weight copies without the BLS
hop), those sessions get the towers' threads and spinning.  The settings go into the tower and
embedder configs (visible through Triton's model-config API)
and the stubs' environment, and ``serve`` states them in one start-up line.  Variables the
operator already set (``OMP_NUM_THREADS`` ...) are kept, and the line says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

#: Environment variables that size a stub's BLAS / OpenMP pools (read when the library loads, i.e.
#: before ``model.py`` runs: they must be in the server's environment).
POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: OpenMP's idle threads sleep instead of spinning (torch in the stubs uses OpenMP).
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")
#: ``config.pbtxt`` parameters the stubs read: intra-op threads of a tower session, and the
#: BLAS/torch threads of an embedder instance.
THREADS_PARAMETER = "threads"
SPINNING_PARAMETER = "spinning"
#: Instances of each CPU tower ``serve`` runs (at most one per core).  With one, a tower runs one
#: batch at a time, and ONNX Runtime's serial steps (and its workers' waits for each other) leave
#: cores idle while every embedder instance waits on it: 12 % of the CPU at concurrency 8 on 2
#: cores (issue 21).  A second instance runs another batch meanwhile (idle 2 %), for a second copy
#: of the tower's weights in memory; ``--tower-instances 1`` saves it.
DEFAULT_TOWER_INSTANCES = 2


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset): what the
    embedder's default instance count is read from, too."""
    from .repository import default_preprocess_instances

    return default_preprocess_instances()


@dataclass(frozen=True)
class ThreadPlan:
    """What ``serve`` sets; see the module docstring."""

    cores: int
    embedder_instances: int
    tower_threads: int  # intra-op threads of each CPU tower session
    embedder_threads: int  # BLAS / OpenMP / torch threads of each embedder instance
    tower_instances: int = 1  # instances (stub processes) of each CPU tower
    spinning: bool = False  # ONNX Runtime workers spin-wait between runs
    kept: tuple[str, ...] = ()  # pool variables the operator set, left as they were
    tower_calls: str = "bls"  # "local": each embedder instance runs the towers itself (configs.TOWER_CALLS)

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` plus the pool sizes and wait policy, without overriding what it already sets."""
        env = dict(base)
        for name in POOL_VARIABLES:
            env.setdefault(name, str(self.embedder_threads))
        env.setdefault(*WAIT_POLICY)
        return env

    def describe(self) -> str:
        """One line for the start-up log."""
        kept = f"; kept from the environment: {', '.join(self.kept)}" if self.kept else ""
        towers = (
            "towers run in each embedder instance"
            if self.tower_calls == "local"
            else f"towers {self.tower_instances} instance(s) each"
        )
        return (
            f"{self.cores} usable cores: embedder {self.embedder_instances} instances x {self.embedder_threads} "
            f"BLAS/OpenMP/torch thread(s); {towers} x {self.tower_threads} intra-op threads "
            f"(ONNX Runtime spinning {'on' if self.spinning else 'off'}), OMP_WAIT_POLICY=PASSIVE{kept}"
        )


def plan_threads(
    cores: int | None = None,
    embedder_instances: int | None = None,
    tower_threads: int | None = None,
    environ: Mapping[str, str] | None = None,
    tower_instances: int | None = None,
) -> ThreadPlan:
    """The settings for ``cores`` (default: :func:`usable_cores`) and ``embedder_instances``
    (default: one per core); ``tower_threads`` overrides the towers' intra-op threads
    (``--tower-threads``)."""
    cores = cores or usable_cores()
    instances = embedder_instances or cores
    environ = os.environ if environ is None else environ
    kept = tuple(n for n in (*POOL_VARIABLES, WAIT_POLICY[0]) if n in environ)
    return ThreadPlan(
        cores=cores,
        embedder_instances=instances,
        tower_threads=tower_threads or cores,
        tower_instances=tower_instances or min(DEFAULT_TOWER_INSTANCES, cores),
        embedder_threads=max(1, cores // instances),
        kept=kept,
    )


def thread_options(options: Any = None, backend: str = "onnx") -> tuple[Any, ThreadPlan]:
    """``serve``'s repository options with the plan's instances and threads written in (so Triton's
    model-config API shows them), and the plan; what the options already set is kept.  Where the
    towers run (``tower_calls``) is decided here too, from the instance counts chosen
    (:func:`configs.resolve_tower_calls`), for the towers of ``backend``."""
    from .configs import resolve_tower_calls
    from .repository import RepositoryOptions

    opts = options or RepositoryOptions()
    plan = plan_threads(
        embedder_instances=opts.preprocess_instances,
        tower_threads=opts.tower_threads,
        tower_instances=opts.tower_instances,
    )
    opts = replace(
        opts,
        preprocess_instances=plan.embedder_instances,
        tower_threads=plan.tower_threads,
        tower_instances=plan.tower_instances,
        embedder_threads=opts.embedder_threads or plan.embedder_threads,
    )
    opts = replace(opts, tower_calls=resolve_tower_calls(opts, {backend}))
    return opts, replace(plan, tower_calls=opts.tower_calls)
