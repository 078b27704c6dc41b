"""Size facts of the package and its import graph, read from the source with ``ast`` (nothing is
imported): per folder the longest function and module, every function over ``--max-function``
lines and module over ``--max-module`` lines, and any import cycle between ``step37_deploy``
modules (exit 1 when there is one).

    python scripts/code_facts.py                       # cli/, handoff/, serving/ and the whole package
    python scripts/code_facts.py step37_deploy/cli     # one folder

A function's length is its ``def`` line to its last line (decorators excluded, nested functions
counted inside their parent and on their own); a module's is its line count, as ``wc -l`` gives.

The import graph: every ``import`` and ``from ... import`` of a ``step37_deploy`` module, relative
or absolute, at the top of a file or inside a function, is an edge.  ``from . import name`` is an
edge to the submodule ``name`` when there is one, else to the package's ``__init__``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "step37_deploy"
PKG_DIR = ROOT / PKG
DEFAULT_FOLDERS = (PKG_DIR / "cli", PKG_DIR / "handoff", PKG_DIR / "serving", PKG_DIR)


@dataclass(frozen=True)
class Function:
    path: Path
    name: str  # qualified: Class.method, outer.inner
    first: int
    last: int

    @property
    def lines(self) -> int:
        return self.last - self.first + 1

    def where(self, root: Path = ROOT) -> str:
        return f"{_rel(self.path, root)}:{self.first} {self.name} ({self.lines} lines)"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def functions(path: Path) -> list[Function]:
    """Every ``def`` / ``async def`` in a file, methods and nested ones included."""
    out: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append(Function(path, name, child.lineno, child.end_lineno or child.lineno))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
    return out


def module_lines(path: Path) -> int:
    """Lines of a file, as ``wc -l`` counts them (newline characters)."""
    return path.read_bytes().count(b"\n")


# -- the import graph -------------------------------------------------------------------------------
def modules(pkg_dir: Path = PKG_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` as the package)."""
    mods = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
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


def import_graph(pkg_dir: Path = PKG_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what is an edge)."""
    mods = modules(pkg_dir)
    pkg = pkg_dir.name
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
                while t and t not in mods:  # the deepest package module the dotted name starts with
                    t = t.rpartition(".")[0]
                if t.startswith(pkg) and t != name:
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


# -- the report -------------------------------------------------------------------------------------
def facts(folder: Path) -> tuple[list[Function], dict[Path, int]]:
    """Every function and every module's line count under ``folder``."""
    files = sorted(folder.rglob("*.py"))
    return [f for p in files for f in functions(p)], {p: module_lines(p) for p in files}


def report(folders: list[Path], max_function: int, max_module: int) -> tuple[str, bool]:
    """The text, and whether the package has an import cycle."""
    lines = []
    over_f: dict[Function, None] = {}
    over_m: dict[Path, int] = {}
    for folder in folders:
        funcs, mods = facts(folder)
        if not mods:
            lines.append(f"{_rel(folder, ROOT)}/: no Python files")
            continue
        longest = max(funcs, key=lambda f: f.lines)
        big = max(mods, key=lambda p: mods[p])
        lines += [
            f"{_rel(folder, ROOT)}/: {len(mods)} modules, {sum(mods.values())} lines, {len(funcs)} functions",
            f"  longest function: {longest.where()}",
            f"  longest module:   {_rel(big, ROOT)} ({mods[big]} lines)",
        ]
        over_f.update(dict.fromkeys(f for f in funcs if f.lines > max_function))
        over_m.update({p: n for p, n in mods.items() if n > max_module})
    lines.append(f"functions over {max_function} lines: {len(over_f) or 'none'}")
    lines += [f"  {f.where()}" for f in sorted(over_f, key=lambda f: -f.lines)]
    lines.append(f"modules over {max_module} lines: {len(over_m) or 'none'}")
    lines += [f"  {_rel(p, ROOT)} ({n} lines)" for p, n in sorted(over_m.items(), key=lambda x: -x[1])]
    graph = import_graph()
    cycle = find_cycle(graph)
    edges = sum(len(v) for v in graph.values())
    lines.append(f"import cycles ({len(graph)} modules, {edges} edges): " + (" -> ".join(cycle) if cycle else "none"))
    return "\n".join(lines), cycle is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", type=Path, help="folders to measure (default: cli/, handoff/, serving/, all)")
    ap.add_argument("--max-function", type=int, default=80, help="list functions longer than this (default 80)")
    ap.add_argument("--max-module", type=int, default=600, help="list modules longer than this (default 600)")
    args = ap.parse_args(argv)
    text, cyclic = report(args.folders or list(DEFAULT_FOLDERS), args.max_function, args.max_module)
    print(text)
    return 1 if cyclic else 0


if __name__ == "__main__":
    sys.exit(main())
