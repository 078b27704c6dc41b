"""``scripts/code_facts.py``: its measures are right on a small tree, and the command line and the
hand-off modules keep to the guide's sizes (no function over 80 lines, no module over 600) with no
import cycle in the package."""

from __future__ import annotations

import textwrap
from pathlib import Path

import step37_deploy
from scripts import code_facts

PKG_DIR = Path(step37_deploy.__file__).parent


def test_function_and_module_lengths(tmp_path):
    src = textwrap.dedent(
        """\
        import os


        @staticmethod
        def top(a):
            def inner():
                return 1

            return inner


        class K:
            async def method(self):
                pass
        """
    )
    (tmp_path / "m.py").write_text(src)
    got = {f.name: f.lines for f in code_facts.functions(tmp_path / "m.py")}
    assert got == {"top": 5, "top.inner": 2, "K.method": 2}
    assert code_facts.module_lines(tmp_path / "m.py") == len(src.splitlines())
    text, cyclic = code_facts.report([tmp_path], max_function=4, max_module=600)
    assert "top (5 lines)" in text and "functions over 4 lines: 1" in text and not cyclic


def test_cli_and_handoff_keep_the_guides_sizes():
    for folder in (PKG_DIR / "cli", PKG_DIR / "handoff"):
        funcs, mods = code_facts.facts(folder)
        assert len(mods) >= 5, folder  # a check that read nothing checks nothing
        assert not [f.where() for f in funcs if f.lines > 80]
        assert not [str(p) for p, n in mods.items() if n > 600]


def test_the_package_has_no_import_cycle():
    assert code_facts.main([str(PKG_DIR / "cli")]) == 0
