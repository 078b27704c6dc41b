"""Serving the embedder on Triton Inference Server.

``contract`` is the served API (model, tensor names, dtypes, dims) that everything else imports;
``repository`` writes a Triton model repository from artifacts (``towers`` describes them,
``configs`` makes the model configs), ``triton_models`` holds the ``model.py`` files it ships,
``server`` launches ``tritonserver`` on it (``prepare`` settles what to run first) behind the
``gateway`` and ``supervise`` watches its processes; ``client`` and ``loadtest`` (with ``drivers``
and ``loadreport``) talk to it.  ``auth`` reads the API key and TLS files, ``net`` gives probe
addresses and free ports; the process helpers they share are ``step37_deploy.process``.
"""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailable

#: What the ``[serve]`` extra installs, by the module each command imports from it.
SERVE_EXTRA_MODULES = {
    "tritonclient.grpc": "tritonclient[grpc]",
    "tritonclient.http": "tritonclient[http]",
    "prometheus_client": "prometheus-client",
    "pytriton": "nvidia-pytriton",
}


def require_serve_extra(command: str, *modules: str) -> None:
    """Refuse ``command`` in one line (exit 2) when a module of the ``[serve]`` extra it needs is
    missing, instead of an internal error from deep inside it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise BackendUnavailable(
                f"{command} needs {SERVE_EXTRA_MODULES.get(module, module)} (module {module} is not installed): "
                "pip install 'step37-deploy[serve]'"
            ) from None
