"""Every command's ``--help`` against its golden file, and ``--help`` imports nothing heavy.

The golden files (``tests/golden_help/``) were recorded from the command line before it became a
package (issue 20); a change to any option's name, text or default shows up here as a diff.  They
are rendered at a fixed width (``COLUMNS=100``) and with the Python minor version named in
``PYTHON`` (argparse's layout changes between versions; on another version the text comparison
skips with that reason, the import check still runs).  Record them again after a deliberate change:

    COLUMNS=100 python -m tests.test_cli_help --record
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import step37_deploy
from step37_deploy import cli

GOLDEN = Path(__file__).with_name("golden_help")
COLUMNS = "100"
#: Modules that ``--help`` must not import: it answers at once.
HEAVY = ("torch", "onnx", "onnxruntime", "tritonclient", "tensorrt", "tensorrt_rtx", "transformers", "numpy", "ray")


def commands(parser: argparse.ArgumentParser | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command line that has its own ``--help``: ``()`` for the top, then each (sub)command."""
    parser = parser or cli.build_parser()
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += commands(sub, (*prefix, name))
    return out


def golden_path(argv: tuple[str, ...]) -> Path:
    return GOLDEN / f"{'-'.join(argv) or 'step37-deploy'}.txt"


def help_text(argv: tuple[str, ...]) -> str:
    """What ``step37-deploy ARGV --help`` prints (in process, at the fixed width)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    assert exc.value.code == 0
    return out.getvalue()


def _recorded_python() -> str:
    return (GOLDEN / "PYTHON").read_text().strip()


def _this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


ALL = commands()


@pytest.mark.parametrize("argv", ALL, ids=[" ".join(a) or "step37-deploy" for a in ALL])
def test_help_matches_golden(argv):
    if _recorded_python() != _this_python():
        pytest.skip(
            f"golden help recorded with Python {_recorded_python()}; argparse lays it out otherwise on {_this_python()}"
        )
    path = golden_path(argv)
    assert path.is_file(), f"no golden help for {' '.join(argv)!r}: record it (see this module's docstring)"
    assert help_text(argv) == path.read_text(), f"help of {' '.join(argv) or 'step37-deploy'} differs from {path}"


def test_every_golden_file_is_a_command():
    names = {golden_path(a).name for a in ALL}
    stale = sorted(p.name for p in GOLDEN.glob("*.txt") if p.name not in names)
    assert len(names) >= 10 and not stale, stale


def test_help_imports_nothing_heavy():
    """All ``--help`` texts in one fresh interpreter; after each, none of :data:`HEAVY` is loaded."""
    code = (
        "import sys\n"
        "from step37_deploy.cli import main\n"
        f"for argv in {[list(a) for a in ALL]!r}:\n"
        "    try:\n"
        "        main([*argv, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        f"    heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "    assert not heavy, (argv, heavy)\n"
        "print('CHECKED')\n"
    )
    root = Path(step37_deploy.__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env={**os.environ}
    )
    assert run.returncode == 0 and "CHECKED" in run.stdout, run.stderr[-2000:]


def record() -> None:
    """Write every command's help into :data:`GOLDEN` (and the Python version it was laid out by)."""
    GOLDEN.mkdir(exist_ok=True)
    for argv in ALL:
        golden_path(argv).write_text(help_text(argv))
    (GOLDEN / "PYTHON").write_text(_this_python() + "\n")
    print(f"recorded {len(ALL)} help texts in {GOLDEN}")


if __name__ == "__main__" and "--record" in sys.argv:
    record()


# -- option names and defaults (issue 20) ----------------------------------------------------------
CLIENTS = [
    ["loadtest", "--images", "x.png", "--checkpoint", "c"],
    ["handoff", "sglang", "--tokenizer", "t", "--prompt", "p", "--image", "x.png", "--out", "o.json"],
]


@pytest.mark.parametrize("argv", CLIENTS, ids=lambda a: a[0])
def test_old_url_option_still_works_and_warns_once(argv, capsys):
    """``--url`` became ``--server``: the old name sets the same option, warns once per run on
    stderr, and is not shown in ``--help``; the protocol defaults to gRPC as everywhere."""
    args = cli.build_parser().parse_args([*argv, "--url", "h:1", "--url", "h:2"])
    assert args.server == "h:2" and args.protocol == "grpc"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--url is deprecated, use --server" in err[0], err
    assert cli.build_parser().parse_args([*argv, "--server", "h:3"]).server == "h:3"
    assert capsys.readouterr().err == ""
    command = tuple(argv[: argv.index(next(a for a in argv if a.startswith("-")))])
    assert "--server HOST:PORT" in help_text(command) and "--url" not in help_text(command)


def test_service_options_mean_one_thing_everywhere():
    """Every client command names the service ``--server`` with one protocol default."""
    parser = cli.build_parser()
    found = {}
    for argv in ALL:
        p = parser
        for name in argv:
            p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        acts = {s: a for a in p._actions for s in a.option_strings}
        if "--protocol" in acts:
            found[" ".join(argv)] = (acts["--server"].metavar, acts["--protocol"].default, "--url" in acts)
    assert set(found) == {"loadtest", "handoff sglang", "vllm-cache", "epd-router", "embed-corpus"}, found
    assert set(found.values()) == {("HOST:PORT", "grpc", False)}, found


def test_defaults_are_read_from_the_modules_that_own_them():
    from step37_deploy import calibrate, export, preprocess, synthetic
    from step37_deploy.handoff.vllm import Retention, RouterLimits
    from step37_deploy.serving import gateway, repository

    def defaults(*argv: str) -> argparse.Namespace:
        return cli.build_parser().parse_args(list(argv))

    serve = defaults("serve", "--checkpoint", "c", "--backend", "torch")
    limits, repo = gateway.GatewayOptions(), repository.RepositoryOptions()
    assert (serve.max_body_mb, serve.max_connections, serve.idle_timeout_s) == (
        limits.max_body_mb,
        limits.max_connections,
        limits.idle_timeout_s,
    )
    for name in ("max_queue_delay_us", "max_image_pixels", "cache_mb", "max_queue_size", "queue_timeout_ms"):
        assert getattr(serve, name) == getattr(repo, name), name
    router = defaults("epd-router", "--checkpoint", "c", "--dir", "d", "--server", "h:1", "--vllm-url", "http://v")
    assert int(router.max_body_mb * (1 << 20)) == RouterLimits().max_body_bytes
    assert isinstance(router.max_body_mb, float) and isinstance(serve.max_body_mb, float)
    assert (router.max_images, router.max_inflight) == (RouterLimits().max_images, RouterLimits().max_inflight)
    assert (router.max_age_s, router.max_gb * 1e9) == (Retention().max_age_s, Retention().max_bytes)
    export_args = defaults("export", "--checkpoint", "c")
    assert export_args.opset == export.DEFAULT_OPSET and export_args.calibration_views == calibrate.DEFAULT_VIEWS
    assert defaults("make-checkpoint", "--out", "o").decoy_ratio == synthetic.DECOY_RATIO
    embed = defaults("embed", "--backend", "torch", "--artifacts", "c", "--image", "x", "--out", "o.npy")
    assert embed.max_pixels == preprocess.MAX_PIXELS == repo.max_image_pixels


SERVE = ["serve", "--checkpoint", "c", "--backend", "onnx", "--artifacts", "a", "b"]


def test_serve_passes_every_gateway_option_through_and_refuses_bad_ones(monkeypatch, capsys):
    """The gateway's fields added in issue 22 round 1 are ``serve`` options: their defaults are the
    ``GatewayOptions`` defaults, given values reach ``serve()`` (and the nginx config it writes),
    and a value the gateway cannot honour is one line, exit 2, before anything starts."""
    from step37_deploy import serving
    from step37_deploy.serving import gateway, server
    from step37_deploy.serving.nginxconf import NginxConfig

    got = {}
    monkeypatch.setattr(serving, "require_serve_extra", lambda *a: None)
    monkeypatch.setattr(server, "serve", lambda *a, **kw: got.update(kw) or 0)
    defaults = cli.build_parser().parse_args(SERVE)
    default_limits = gateway.GatewayOptions()
    assert (defaults.max_client_requests, defaults.header_timeout_s, defaults.body_timeout_s) == (
        default_limits.max_client_requests,
        default_limits.header_timeout_s,
        default_limits.body_timeout_s,
    )
    assert (defaults.gateway_workers, defaults.gateway_user) == (default_limits.workers, default_limits.worker_user)
    extra = ["--max-connections", "64", "--max-client-requests", "3", "--header-timeout-s", "4"]
    extra += ["--body-timeout-s", "5", "--gateway-workers", "2", "--gateway-user", "daemon"]
    assert cli.main([*SERVE, *extra]) == 0
    limits = got["limits"]
    assert (limits.max_client_requests, limits.header_timeout_s, limits.body_timeout_s) == (3, 4.0, 5.0)
    assert (limits.workers, limits.worker_user, limits.max_connections) == (2, "daemon", 64)
    text = NginxConfig(limits, "127.0.0.1", {"http": 1, "grpc": 2, "metrics": 3}, {"http": 4, "grpc": 5, "metrics": 6})
    conf = text.text()
    for line in ("limit_conn step37_client 3;", "client_header_timeout 4s;", "client_body_timeout 5s;"):
        assert line in conf, line
    assert "worker_processes 2;" in conf
    bad = {
        ("--max-client-requests", "0"): "--max-client-requests",
        ("--max-client-requests", "2000"): "--max-client-requests must be an integer in 1..--max-connections (1024)",
        ("--header-timeout-s", "inf"): "--header-timeout-s",
        ("--body-timeout-s", "0"): "--body-timeout-s",
        ("--gateway-workers", "65"): "--gateway-workers",
        ("--gateway-user", "a b"): "--gateway-user must be a user name",
    }
    for argv, words in bad.items():
        got.clear()
        try:
            code = cli.main([*SERVE, *argv])
        except SystemExit as exc:  # argparse's own refusal of a malformed number
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        ours = words.endswith(("(1024)", "user name"))  # a GatewayOptions check, not argparse's type
        assert code == 2 and not got and words in err[-1] and (len(err) == 1 or not ours), (argv, code, err)
