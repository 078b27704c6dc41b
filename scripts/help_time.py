"""Time ``step37-deploy --help`` (or ``COMMAND --help``) for two versions of the package side by side,
in one run: the package at a git revision (``--before``, unpacked with ``git archive``) and this
working tree, each in fresh interpreters, alternating so that load on a shared machine hits both
alike.  Prints the median, the fastest run and the ratio after / before; an empty interpreter's
start-up is timed the same way, for scale.

Bytecode is cached (in a temporary ``PYTHONPYCACHEPREFIX``, written by the warm-up runs), as for an
installed package, whose ``.pyc`` files pip compiles at install; ``--no-bytecode`` times a compile of
every module's source in every run instead (``PYTHONDONTWRITEBYTECODE`` with no cache).

    python scripts/help_time.py --before b6d21e2 --runs 30
    python scripts/help_time.py --before b6d21e2 --argv serve --help
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "step37_deploy"
ENTRY = "import sys; from step37_deploy.cli import main; sys.exit(main())"


def unpack(rev: str, dest: Path) -> Path:
    """The package as it is at ``rev``, unpacked under ``dest``; returns the folder to put on the path."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, PKG], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_once(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def which_package(env: dict[str, str], cwd: Path) -> str:
    """Where ``step37_deploy`` is imported from with this environment (checks that PYTHONPATH wins
    over an installed copy)."""
    code = f"import {PKG}, os; print(os.path.dirname({PKG}.__file__))"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="HEAD", help="git revision of the 'before' package (default HEAD)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs of each, alternating (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of each first (default 2)")
    ap.add_argument("--no-bytecode", action="store_true", help="no .pyc cache: compile the sources every run")
    ap.add_argument("--argv", nargs=argparse.REMAINDER, default=["--help"], help="the command's arguments")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="help-time-") as tmp:
        cwd = Path(tmp) / "cwd"  # empty: "python -c" puts the working folder first on sys.path
        cwd.mkdir()
        before = unpack(args.before, Path(tmp) / "before")
        variants = {
            f"before ({args.before})": ([sys.executable, "-c", ENTRY, *args.argv], before),
            "after (working tree)": ([sys.executable, "-c", ENTRY, *args.argv], ROOT),
            "python -c pass": ([sys.executable, "-c", "pass"], ROOT),
        }
        base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        if args.no_bytecode:
            base["PYTHONDONTWRITEBYTECODE"] = "1"
        else:
            base["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        envs = {name: {**base, "PYTHONPATH": str(path)} for name, (_, path) in variants.items()}
        for name, (_, path) in list(variants.items())[:2]:
            got = which_package(envs[name], cwd)
            if Path(got) != path / PKG:
                print(f"{name}: imports {got}, not {path / PKG}", file=sys.stderr)
                return 2
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.warmup + args.runs):
            for name, (cmd, _) in variants.items():
                t = run_once(cmd, envs[name], cwd)
                if i >= args.warmup:
                    times[name].append(t)
    mode = "sources compiled every run" if args.no_bytecode else "bytecode cached"
    print(f"step37-deploy {' '.join(args.argv)}: {args.runs} runs each, alternating, {mode} ({sys.executable})")
    for name, ts in times.items():
        print(f"  {name:28s} median {statistics.median(ts) * 1e3:7.1f} ms   fastest {min(ts) * 1e3:7.1f} ms")
    b, a = (statistics.median(times[n]) for n in list(variants)[:2])
    print(f"  ratio after / before (medians): {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
