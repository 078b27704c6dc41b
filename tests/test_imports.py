"""The package's own import graph has no cycle, and ``--help`` does not import torch.

The graph is read from the source with ``ast`` (no module is imported): every ``import`` and
``from ... import`` of a ``step37_deploy`` module, relative or absolute, at the top of a file or
inside a function, is an edge.  ``from . import name`` is an edge to the submodule ``name`` when
there is one, else to the package's ``__init__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import step37_deploy

PKG_DIR = Path(step37_deploy.__file__).parent
PKG = "step37_deploy"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                # the deepest package module that the dotted name starts with
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t.startswith(PKG) and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


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
