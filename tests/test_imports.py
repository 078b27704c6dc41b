"""The package's own import graph has no cycle, and ``--help`` does not import torch.

The graph is read from the source with ``ast`` by ``scripts/code_facts.py`` (no module is
imported; its docstring says what is an edge).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import step37_deploy
from scripts import code_facts
from scripts.code_facts import find_cycle

PKG_DIR = Path(step37_deploy.__file__).parent


def import_graph() -> dict[str, set[str]]:
    return code_facts.import_graph(PKG_DIR)


def test_graph_reader_sees_the_package():
    graph = import_graph()
    assert len(graph) >= 20
    # imports inside functions and relative imports count
    assert "step37_deploy.backends.tensorrt" in graph["step37_deploy.pipeline"]
    assert "step37_deploy.engine" in graph["step37_deploy.backends.tensorrt"]
    assert "step37_deploy.backends.factory" in graph["step37_deploy.bench"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("argv", [["--help"], ["build", "--help"], ["embed", "--help"], ["compare", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\n"
        "from step37_deploy.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt_rtx', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PKG_DIR.parent, check=True
    ).stdout
    assert "usage:" in out and "HEAVY []" in out, out


def test_the_onnx_tower_stubs_do_not_import_torch(tmp_path):
    """Every tower stub of ``serve`` imported torch through ``step37_deploy.backends`` (about 2 s of
    CPU each at every start); an ONNX tower never uses it.  (The embedder still imports torch when
    it starts: a stub that first imports it in the middle of a request dies in oneMKL's loader,
    "Cannot load libtorch_cpu.so", and 16-bit answers or a GPU projector need it.)  Imported with a
    stand-in for Triton's ``triton_python_backend_utils``."""
    (tmp_path / "triton_python_backend_utils.py").write_text("")
    code = (
        "import sys\n"
        "import step37_deploy.serving.triton_models.tower\n"
        "print('TORCH', 'torch' in sys.modules)\n"
        "from step37_deploy.backends import TorchRunner\n"
        "print('LAZY', TorchRunner.__name__, 'torch' in sys.modules)\n"
    )
    env = {"PYTHONPATH": f"{PKG_DIR.parent}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PKG_DIR.parent, env=env
    )
    assert out.returncode == 0 and "TORCH False" in out.stdout, out.stdout + out.stderr
    assert "LAZY TorchRunner True" in out.stdout, out.stdout
