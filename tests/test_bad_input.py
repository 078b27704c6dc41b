"""Bad arguments and outputs (issue 10, "files, outputs, CLI"): nothing a user gives by mistake
destroys data, every such mistake is one line naming the argument/file with exit 2, unexpected
failures are exit 3, and no command leaves a temporary behind or writes over one of its inputs.

The CLI runs in-process (``cli.main``); each case hashes the inputs and the folder around the
outputs before and after (``run_cli``), so a changed or added file, a temporary included, fails it.
Killed runs are real subprocesses killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from step37_deploy import cli, files
from step37_deploy.cli import artifacts
from step37_deploy.errors import OutputError, ThresholdError
from tests.test_bad_input_readers import one_line_error, run_cli, tree_state

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "step37_deploy.cli"]


def usage_error(argv: list[str], capsys) -> str:
    """An argparse refusal: exit 2, exactly one line (returned)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def argparse_error(argv: list[str], capsys, *words: str) -> None:
    """An argparse refusal: exit 2, one line naming the option and the problem."""
    err = usage_error(argv, capsys)
    last = err.strip().splitlines()[-1]
    assert "error: argument" in last and "Traceback" not in err, err
    for w in words:
        assert w in last, (w, last)


def no_temporaries(*folders: Path) -> None:
    for folder in folders:
        left = [p.name for p in Path(folder).iterdir() if files.TMP_MARK in p.name or p.name.startswith(".")]
        assert not left, left


@pytest.fixture
def onnx504(exported) -> Path:
    return exported[("fp16", 504)]


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A folder of a user's own files, which no command may touch."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes\n")
    (d / "data.bin").write_bytes(os.urandom(64))
    return d


# -- numeric options: argparse types, exit 2 naming the option ------------------------------------
NUMERIC = [
    ("make-checkpoint --out X --shards 0", "--shards", ">= 1"),
    ("make-checkpoint --out X --decoy-ratio -1", "--decoy-ratio", "[0, 100]"),
    ("make-checkpoint --out X --decoy-ratio nan", "--decoy-ratio", "nan"),
    ("make-checkpoint --out X --seed -1", "--seed", ">= 0"),
    ("export --checkpoint C --opset 0", "--opset", ">= 1"),
    ("export --checkpoint C --resolution 0", "--resolution", ">= 1"),
    ("export --checkpoint C --opset x", "--opset", "expected an integer"),
    ("compare --checkpoint C --torch fp32 --batch 0", "--batch", ">= 1"),
    ("compare --checkpoint C --torch fp32 --threads 0", "--threads", ">= 1"),
    ("compare --checkpoint C --torch fp32 --seed -1", "--seed", ">= 0"),
    ("pipeline --checkpoint C --batch 0", "--batch", ">= 1"),
    ("bench --checkpoint C --batch 0", "--batch", ">= 1"),
    ("bench --checkpoint C --iters 0", "--iters", ">= 1"),
    ("bench --checkpoint C --warmup -1", "--warmup", ">= 0"),
    ("bench --checkpoint C --threads 0", "--threads", ">= 1"),
    ("embed --backend onnx --artifacts C --image i.png --out o.npy --batch 0", "--batch", ">= 1"),
    ("build --onnx a.onnx --out a.plan --batch 1:x:2", "--batch", "integers"),
    ("build --onnx a.onnx --out a.plan --batch 1:2", "--batch", "MIN:OPT:MAX"),
    ("build --onnx a.onnx --out a.plan --workspace 0", "--workspace", "(0,"),
    ("build --onnx a.onnx --out a.plan --opt-level 9", "--opt-level", "0..5"),
]


@pytest.mark.parametrize(("argv", "option", "words"), NUMERIC, ids=[a for a, _, _ in NUMERIC])
def test_numeric_option_refused(argv, option, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argparse_error(argv.split(), capsys, option, words)
    assert list(tmp_path.iterdir()) == []  # nothing was written


USAGE = [
    ("make-checkpoint --out X --over", "step37-deploy make-checkpoint: error:", "--over"),  # no abbreviations
    ("export --checkpoint C --bogus", "step37-deploy export: error:", "--bogus"),
    ("build --onnx a.onnx --out a.plan --batch -1:1:8", "step37-deploy build: error:", ">= 1, got '-1:1:8'"),
    ("build --onnx a.onnx", "step37-deploy build: error:", "--out"),
    ("nosuch", "step37-deploy: error:", "nosuch"),
]


@pytest.mark.parametrize(("argv", "prefix", "word"), USAGE, ids=[a for a, _, _ in USAGE])
def test_usage_errors_are_one_line_naming_the_subcommand(argv, prefix, word, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = usage_error(argv.split(), capsys)
    assert line.startswith(prefix) and word in line, line
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_every_option_has_help_with_its_default():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subparsers.choices.items():
        fmt = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {action.dest}: no help")
            elif action.option_strings and not action.required and "default" not in fmt._get_help_string(action):
                missing.append(f"{name} {action.option_strings[0]}: no default")
            elif action.option_strings and action.required and "required" not in fmt._get_help_string(action):
                missing.append(f"{name} {action.option_strings[0]}: not said to be required")
        assert sub.format_help()
    assert "exit status" in parser.format_help()
    assert not missing, missing


# -- make-checkpoint --overwrite ------------------------------------------------------------------
def test_overwrite_refuses_a_users_folder(user_dir, capsys):
    code, err = run_cli(["make-checkpoint", "--out", str(user_dir), "--overwrite"], capsys, user_dir.parent)
    one_line_error(code, err, str(user_dir), "not written by step37-deploy")


def test_overwrite_refuses_own_checkpoint_with_a_users_file(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli.main(["make-checkpoint", "--out", str(out), "--shards", "1", "-q"]) == 0
    (out / "notes.txt").write_text("added by the user")
    code, err = run_cli(["make-checkpoint", "--out", str(out), "--overwrite"], capsys, tmp_path)
    one_line_error(code, err, "notes.txt", "did not write")


def test_overwrite_refuses_a_file(user_dir, capsys):
    target = user_dir / "notes.txt"
    code, err = run_cli(["make-checkpoint", "--out", str(target), "--overwrite"], capsys, user_dir)
    one_line_error(code, err, str(target), "refusing")


def test_existing_out_without_overwrite(user_dir, capsys):
    code, err = run_cli(["make-checkpoint", "--out", str(user_dir)], capsys, user_dir.parent)
    one_line_error(code, err, str(user_dir), "already exists")


def test_checkpoint_out_under_a_file(user_dir, capsys):
    code, err = run_cli(["make-checkpoint", "--out", str(user_dir / "notes.txt" / "ck")], capsys, user_dir.parent)
    one_line_error(code, err, "notes.txt", "not a directory")


def test_overwrite_replaces_own_checkpoint_and_says_so(tmp_path, user_dir, caplog):
    out = tmp_path / "ck"
    old_umask = os.umask(0o022)
    try:
        assert cli.main(["make-checkpoint", "--out", str(out), "--shards", "1", "--seed", "1", "-q"]) == 0
        first = tree_state(out)
        with caplog.at_level("WARNING", logger="step37_deploy"):
            assert cli.main(["make-checkpoint", "--out", str(out), "--shards", "2", "--overwrite", "-q"]) == 0
    finally:
        os.umask(old_umask)
    assert any("replacing" in r.message and str(out) in r.message for r in caplog.records)
    assert tree_state(out) != first and len(list(out.glob("*.safetensors"))) == 2
    marker = json.loads((out / "synthetic.json").read_text())
    assert sorted(os.listdir(out)) == marker["files"]
    # the umask decides: 0755 folder, 0644 files (tempfile would have made 0700/0600)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}
    no_temporaries(tmp_path)
    assert (user_dir / "notes.txt").read_text() == "my notes\n"


# -- build: outputs vs inputs (all refused before TensorRT is needed) ------------------------------
def test_build_out_is_the_onnx(onnx504, capsys):
    code, err = run_cli(["build", "--onnx", str(onnx504), "--out", str(onnx504)], capsys, onnx504.parent)
    one_line_error(code, err, "--out", "an input", "--onnx")


def test_build_out_is_a_users_file(onnx504, user_dir, capsys):
    target = user_dir / "notes.txt"
    code, err = run_cli(["build", "--onnx", str(onnx504), "--out", str(target)], capsys, user_dir, onnx504.parent)
    one_line_error(code, err, str(target), "not from an engine built by step37-deploy")


def test_build_out_is_a_directory(onnx504, user_dir, capsys):
    code, err = run_cli(["build", "--onnx", str(onnx504), "--out", str(user_dir)], capsys, user_dir.parent)
    one_line_error(code, err, str(user_dir), "is a directory")


def test_build_timing_cache_is_the_onnx(onnx504, tmp_path, capsys):
    argv = ["build", "--onnx", str(onnx504), "--out", str(tmp_path / "e.plan"), "--timing-cache", str(onnx504)]
    code, err = run_cli(argv, capsys, tmp_path, onnx504.parent)
    one_line_error(code, err, "--timing-cache", "an input")


def test_build_timing_cache_is_the_engine(onnx504, tmp_path, capsys):
    plan = tmp_path / "e.plan"
    code, err = run_cli(
        ["build", "--onnx", str(onnx504), "--out", str(plan), "--timing-cache", str(plan)], capsys, tmp_path
    )
    one_line_error(code, err, "--timing-cache", "same file as --out")


def test_build_timing_cache_folder_is_a_file(onnx504, user_dir, capsys):
    cache = user_dir / "notes.txt" / "tc.cache"
    argv = ["build", "--onnx", str(onnx504), "--out", str(user_dir / "e.plan"), "--timing-cache", str(cache)]
    code, err = run_cli(argv, capsys, user_dir)
    one_line_error(code, err, "--timing-cache", "not a directory")


def test_build_timing_cache_that_is_not_one(onnx504, user_dir, capsys):
    pytest.importorskip("tensorrt_rtx", reason="needs a TensorRT flavour to read a timing cache")
    notes = user_dir / "notes.txt"
    argv = ["build", "--onnx", str(onnx504), "--out", str(user_dir / "e.plan"), "--timing-cache", str(notes)]
    argv += ["--compute-capability", "8.9"]
    code, err = run_cli(argv, capsys, user_dir)
    one_line_error(code, err, str(notes), "not a TensorRT timing cache")


# -- export / pipeline ----------------------------------------------------------------------------
def test_export_opset_outside_supported(tiny_fp32, tmp_path, capsys):
    code, err = run_cli(
        ["export", "--checkpoint", str(tiny_fp32), "--out", str(tmp_path), "--opset", "5"], capsys, tmp_path, tiny_fp32
    )
    one_line_error(code, err, "opset 5 is not supported")


def test_export_out_is_a_file(tiny_fp32, user_dir, capsys):
    out = user_dir / "notes.txt"
    code, err = run_cli(["export", "--checkpoint", str(tiny_fp32), "--out", str(out)], capsys, user_dir, tiny_fp32)
    one_line_error(code, err, str(out), "not a directory")


def test_export_into_checkpoint_never_replaces_its_files(tiny_fp32, tmp_path, capsys):
    ck = Path(shutil.copytree(tiny_fp32, tmp_path / "ck"))
    (ck / "step37_vision_fp32_504.onnx").write_text("a file of the checkpoint folder")
    argv = ["export", "--checkpoint", str(ck), "--out", str(ck), "--precision", "fp32", "--resolution", "504"]
    code, err = run_cli(argv, capsys, ck)
    one_line_error(code, err, "step37_vision_fp32_504.onnx", "an input", "--checkpoint")


def test_export_full_disk_is_named(tiny_fp32, tmp_path, capsys, monkeypatch):
    import onnx_ir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_ir, "save", full)
    argv = ["export", "--checkpoint", str(tiny_fp32), "--out", str(tmp_path), "--resolution", "504"]
    code, err = run_cli(argv, capsys, tmp_path, tiny_fp32)
    one_line_error(code, err, str(tmp_path / "step37_vision_fp16_504.onnx"), "no space left on device")
    assert "Wire format" not in err


def test_export_onto_a_real_full_disk(tiny_fp32, tmp_path, capsys):
    """A 1 MiB tmpfs (root only; skipped elsewhere): the FP16 file (1.8 MB) cannot fit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        argv = ["export", "--checkpoint", str(tiny_fp32), "--out", str(mnt), "--resolution", "504"]
        code, err = run_cli(argv, capsys, tiny_fp32)
        one_line_error(code, err, "step37_vision_fp16_504.onnx", "no space left on device")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_pipeline_refuses_a_users_report_before_working(tiny_fp32, user_dir, capsys):
    (user_dir / "accuracy_report.json").write_text("my own report\n")
    code, err = run_cli(["pipeline", "--checkpoint", str(tiny_fp32), "--out", str(user_dir)], capsys, user_dir)
    one_line_error(code, err, "accuracy_report.json", "not a report of this command")


@pytest.mark.parametrize("name", ["step37_vision_fp32_504.onnx", "step37_vision_fp32_504.onnx.data"])
def test_export_refuses_a_users_file_with_an_output_name(name, tiny_fp32, user_dir, capsys):
    (user_dir / name).write_text("my own file\n")
    argv = ["export", "--checkpoint", str(tiny_fp32), "--out", str(user_dir), "--resolution", "504"]
    code, err = run_cli([*argv, "--precision", "fp32"], capsys, user_dir, tiny_fp32)
    one_line_error(code, err, str(user_dir / name), "refusing to replace")


def test_export_data_beside_a_users_onnx_is_refused(tiny_fp32, exported, user_dir, capsys):
    """A step37 ONNX makes only its own NAME.data replaceable, never another name's."""
    shutil.copy(exported[("fp32", 504)], user_dir / "step37_vision_fp32_504.onnx")
    (user_dir / "step37_vision_fp32_728.onnx.data").write_text("my own file\n")
    argv = ["export", "--checkpoint", str(tiny_fp32), "--out", str(user_dir), "--precision", "fp32"]
    code, err = run_cli(argv, capsys, user_dir, tiny_fp32)
    one_line_error(code, err, "step37_vision_fp32_728.onnx.data", "refusing to replace")


def test_export_replaces_its_own_onnx(tiny_fp32, exported, tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    shutil.copy(exported[("fp32", 504)], out / "step37_vision_fp32_504.onnx")
    before = (out / "step37_vision_fp32_504.onnx").stat().st_ino
    argv = ["export", "--checkpoint", str(tiny_fp32), "--out", str(out), "--resolution", "504", "--precision", "fp32"]
    code, err = run_cli(argv, capsys, tiny_fp32)
    assert code == 0, err
    assert (out / "step37_vision_fp32_504.onnx").stat().st_ino != before  # written anew (renamed into place)


def test_export_checkpoint_is_a_file(tiny_fp32, tmp_path, capsys):
    argv = ["export", "--checkpoint", str(tiny_fp32 / "config.json"), "--out", str(tmp_path / "x")]
    code, err = run_cli(argv, capsys, tmp_path, tiny_fp32)
    one_line_error(code, err, f"--checkpoint {tiny_fp32 / 'config.json'} is not a folder")


def test_pipeline_refuses_a_users_onnx_before_working(tiny_fp32, user_dir, capsys):
    (user_dir / "step37_vision_fp16_504.onnx").write_text("my own file\n")
    code, err = run_cli(["pipeline", "--checkpoint", str(tiny_fp32), "--out", str(user_dir)], capsys, user_dir)
    one_line_error(code, err, "step37_vision_fp16_504.onnx", "refusing to replace")


def test_pipeline_out_is_a_file(tiny_fp32, user_dir, capsys):
    out = user_dir / "notes.txt"
    code, err = run_cli(["pipeline", "--checkpoint", str(tiny_fp32), "--out", str(out)], capsys, user_dir)
    one_line_error(code, err, str(out), "not a directory")


# -- compare / bench --json -------------------------------------------------------------------------
def _compare(tiny_fp32, onnx504, *extra):
    return ["compare", "--checkpoint", str(tiny_fp32), "--onnx", str(onnx504), "--batch", "1", *extra]


def test_compare_json_is_the_onnx(tiny_fp32, onnx504, capsys):
    code, err = run_cli(_compare(tiny_fp32, onnx504, "--json", str(onnx504)), capsys, onnx504.parent, tiny_fp32)
    one_line_error(code, err, "--json", "an input", "--onnx")


def test_compare_json_is_a_checkpoint_file(tiny_fp32, onnx504, capsys):
    target = tiny_fp32 / "config.json"
    code, err = run_cli(_compare(tiny_fp32, onnx504, "--json", str(target)), capsys, tiny_fp32)
    one_line_error(code, err, str(target), "--checkpoint")


def test_compare_json_is_a_directory(tiny_fp32, onnx504, user_dir, capsys):
    code, err = run_cli(_compare(tiny_fp32, onnx504, "--json", str(user_dir)), capsys, user_dir.parent)
    one_line_error(code, err, "--json", str(user_dir), "is a directory")


def test_compare_json_is_a_users_file(tiny_fp32, onnx504, user_dir, capsys):
    target = user_dir / "notes.txt"
    code, err = run_cli(_compare(tiny_fp32, onnx504, "--json", str(target)), capsys, user_dir)
    one_line_error(code, err, str(target), "not a report of this command")


def test_compare_with_nothing_to_compare(tiny_fp32, capsys):
    code, err = run_cli(["compare", "--checkpoint", str(tiny_fp32)], capsys, tiny_fp32)
    one_line_error(code, err, "--onnx", "--torch")


def test_bench_json_is_the_index(tiny_fp32, capsys):
    target = tiny_fp32 / "model.safetensors.index.json"
    code, err = run_cli(["bench", "--checkpoint", str(tiny_fp32), "--json", str(target)], capsys, tiny_fp32)
    one_line_error(code, err, str(target), "an input")


def test_bench_json_under_a_file(tiny_fp32, user_dir, capsys):
    target = user_dir / "notes.txt" / "bench.json"
    code, err = run_cli(["bench", "--checkpoint", str(tiny_fp32), "--json", str(target)], capsys, user_dir)
    one_line_error(code, err, "--json", "not a directory")


# -- embed --out and its layout file ---------------------------------------------------------------
def _embed(tiny_fp32, exported, out, image):
    files_ = [str(exported[("fp16", 728)]), str(exported[("fp16", 504)])]
    return ["embed", "--backend", "onnx", "--artifacts", str(tiny_fp32), *files_, "--image", str(image), "--out", out]


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "img" / "a.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return path


def test_embed_out_json_would_collide_with_its_layout(tiny_fp32, exported, image, tmp_path, capsys):
    out = tmp_path / "f.json"
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), image), capsys, tmp_path, tiny_fp32)
    one_line_error(code, err, str(out), "must name a .npy file")


def test_embed_layout_would_replace_checkpoint_config(tiny_fp32, exported, image, capsys):
    out = tiny_fp32 / "config.npy"
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), image), capsys, tiny_fp32)
    one_line_error(code, err, "config.json", "an input", "--artifacts")


def test_embed_out_is_a_directory(tiny_fp32, exported, image, tmp_path, capsys):
    out = tmp_path / "feats.npy"
    out.mkdir()
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), image), capsys, tmp_path)
    one_line_error(code, err, str(out), "is a directory")


def test_embed_out_under_a_file(tiny_fp32, exported, image, user_dir, capsys):
    out = user_dir / "notes.txt" / "feats.npy"
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), image), capsys, user_dir)
    one_line_error(code, err, "--out", "not a directory")


def test_embed_out_is_a_users_file(tiny_fp32, exported, image, user_dir, capsys):
    out = user_dir / "data.npy"
    out.write_text("not an array")
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), image), capsys, user_dir)
    one_line_error(code, err, str(out), "not an embed output")


def test_embed_out_is_a_users_npy_without_layout(tiny_fp32, exported, image, user_dir, capsys):
    import numpy as np

    out = user_dir / "mydata.npy"
    np.save(out, np.arange(4))  # a real array, but no layout report beside it: not embed's
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), image), capsys, user_dir)
    one_line_error(code, err, str(out), "not an embed output", "refusing to replace")


def test_embed_replaces_its_own_pair(tiny_fp32, exported, image, tmp_path, capsys):
    out = tmp_path / "feats.npy"
    argv = _embed(tiny_fp32, exported, str(out), image)
    assert cli.main([*argv, "--quiet"]) == 0
    assert cli.main([*argv, "--quiet"]) == 0, capsys.readouterr().err  # the pair embed wrote: replaced


def test_embed_two_artifacts_for_one_resolution(tiny_fp32, exported, image, tmp_path, capsys):
    a728, a504, b504 = exported[("fp16", 728)], exported[("fp16", 504)], exported[("fp32", 504)]
    argv = ["embed", "--backend", "onnx", "--artifacts", str(tiny_fp32), str(a728), str(a504), str(b504)]
    argv += ["--image", str(image), "--out", str(tmp_path / "o.npy")]
    code, err = run_cli(argv, capsys, tmp_path, tiny_fp32)
    one_line_error(code, err, str(a504), str(b504), "resolution 504")


def test_embed_layout_is_a_users_file(tiny_fp32, exported, image, user_dir, capsys):
    (user_dir / "feats.json").write_text('{"mine": 1}')
    code, err = run_cli(_embed(tiny_fp32, exported, str(user_dir / "feats.npy"), image), capsys, user_dir)
    one_line_error(code, err, "feats.json", "refusing to replace")


def test_embed_out_is_the_image(tiny_fp32, exported, tmp_path, capsys):
    fake = tmp_path / "photo.npy"  # an image that happens to end in .npy
    from PIL import Image

    Image.new("RGB", (20, 20)).save(fake, format="PNG")
    code, err = run_cli(_embed(tiny_fp32, exported, str(fake), fake), capsys, tmp_path)
    one_line_error(code, err, str(fake), "an input", "--image")


# -- exit codes: 1 threshold, 2 user error, 3 internal error ---------------------------------------
def _raising(exc: BaseException):
    def command(args, progress):
        raise exc

    return command


def test_internal_error_is_one_line_exit_3(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(artifacts, "run_inspect", _raising(KeyError("surprise")))
    assert cli.main(["inspect", str(tmp_path / "x.plan"), "-q"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == "step37-deploy: internal error: KeyError: 'surprise' (run with --verbose for the traceback)"


def test_internal_error_traceback_under_verbose(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(artifacts, "run_inspect", _raising(ZeroDivisionError("boom")))
    assert cli.main(["inspect", str(tmp_path / "x.plan"), "--verbose"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("ZeroDivisionError: boom")


def test_threshold_exit_1_and_multiline_messages_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(artifacts, "run_inspect", _raising(ThresholdError("onnx 504\nmissed cos_min")))
    assert cli.main(["inspect", "x", "-q"]) == 1
    assert capsys.readouterr().err == "step37-deploy: onnx 504 missed cos_min\n"
    monkeypatch.setattr(artifacts, "run_inspect", _raising(OutputError("a\nb")))
    assert cli.main(["inspect", "x", "-q"]) == 2
    assert capsys.readouterr().err == "step37-deploy: error: a b\n"


# -- files: umask permissions, stale temporaries of killed runs ----------------------------------
def test_outputs_get_the_umask_permissions(tmp_path, exported):
    old = os.umask(0o027)
    try:
        files.write_json(tmp_path / "r.json", {"a": 1})
        with files.atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o640
    # the session's exports went through the temporary folder: the test's umask, not 0600
    mode = exported[("fp32", 504)].stat().st_mode & 0o777
    assert mode == 0o666 & ~old


def _kill_when(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> list[str]:
    """SIGKILL ``proc`` as soon as one of its temporaries appears in ``folder``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [n for n in os.listdir(folder) if files.TMP_MARK in n and f"-{proc.pid}-" in n]
        if found:
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before writing: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no temporary appeared")


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )


def _killed_mid_write(module: str, attr: str, argv: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    """Run the CLI in a subprocess whose ``module.attr`` writer hangs after writing; SIGKILL it
    once its temporary shows in ``folder``.  Returns the process and the temporary it left."""
    slow = _python(
        f"""
        import time
        import {module} as m
        real = m.{attr}
        def slow(*a, **k):
            real(*a, **k)
            time.sleep(120)
        m.{attr} = slow
        from step37_deploy.cli import main
        main({argv!r})
        """
    )
    left = folder / _kill_when(slow, folder)[0]
    assert left.is_dir() and any(left.iterdir())  # a written file inside
    return slow, left


def _next_run(argv: list[str]) -> str:
    """The same command again, in a fresh process (younger than the temporaries); its stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([*CLI, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stderr


def test_sigkilled_make_checkpoint_is_cleaned_by_the_next_run(tmp_path, user_dir):
    """A run killed mid-write leaves its temporary folder; the next run into the folder removes it
    (and says so) but leaves the user's files and a live writer's temporary alone."""
    argv = ["make-checkpoint", "--out", str(tmp_path / "ck"), "-q"]
    slow, left = _killed_mid_write("step37_deploy.synthetic", "save_file", argv, tmp_path)
    live = tmp_path / f".other{files.TMP_MARK}{files.HOST}-{os.getpid()}-0123abcd"  # a live writer's (ours)
    live.write_text("in progress")
    notes = tmp_path / ".notes.step37-tmp-backup"  # a user's file with a similar name
    notes.write_text("mine")
    err = _next_run(argv)
    assert f"removed {left}, a temporary left by a killed run (pid {slow.pid})" in err
    assert not left.exists() and live.read_text() == "in progress" and notes.read_text() == "mine"
    assert (tmp_path / "ck" / "synthetic.json").is_file()
    assert (user_dir / "notes.txt").read_text() == "my notes\n"


def test_sigkilled_export_is_cleaned_by_the_next_run(tiny_fp32, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    argv = ["export", "--checkpoint", str(tiny_fp32), "--out", str(out), "--resolution", "504", "-q"]
    slow, left = _killed_mid_write("onnx_ir", "save", argv, out)
    assert f"removed {left}, a temporary left by a killed run (pid {slow.pid})" in _next_run(argv)
    assert sorted(os.listdir(out)) == ["step37_vision_fp16_504.onnx"]


def test_stale_sweep_keeps_young_and_foreign_names(tmp_path, monkeypatch):
    pid = 2**31 - 2  # above any pid_max: never a running process
    stale = tmp_path / f".x.plan{files.TMP_MARK}{files.HOST}-{pid}-deadbeef"
    stale.write_bytes(b"partial engine")
    foreign = tmp_path / f"x.plan{files.TMP_MARK}{files.HOST}-{pid}-deadbeef"  # not hidden: not ours
    foreign.write_bytes(b"user")
    elsewhere = tmp_path / f".x.plan{files.TMP_MARK}other-host-{pid}-deadbeef"  # NFS: maybe a live run
    elsewhere.write_bytes(b"someone else's engine")
    # written after this process started: could be a run that started before us, kept
    assert files.remove_stale_temporaries(tmp_path) == []
    monkeypatch.setattr(files, "_PROCESS_START", time.time() + 10)
    assert files.remove_stale_temporaries(tmp_path) == [stale]
    assert foreign.exists() and elsewhere.exists() and not stale.exists()


def test_build_writes_engine_manifest_and_cache_with_umask_modes_and_nothing_else(onnx504, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX to build on a CPU")
    out, caches = tmp_path / "engines", tmp_path / "caches"  # neither folder exists yet
    argv = ["build", "--onnx", str(onnx504), "--out", str(out / "e.plan"), "--timing-cache", str(caches / "tc")]
    old = os.umask(0o022)
    try:
        assert cli.main([*argv, "--batch", "1:1:2", "--compute-capability", "8.9", "-q"]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    # no NAME.lock (Polygraphy's, when given a path), no temporary
    assert sorted(os.listdir(out)) == ["e.plan", "e.plan.json"] and os.listdir(caches) == ["tc"]
    assert {p.stat().st_mode & 0o777 for p in [*out.iterdir(), caches / "tc"]} == {0o644}


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a 1 MiB tmpfs mounted ro; root only, skipped elsewhere): even root
    cannot write there, so the refusal is the real one."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("command", ["make-checkpoint", "export", "compare", "bench", "embed", "build", "pipeline"])
def test_outputs_on_a_read_only_file_system(command, read_only_dir, tiny_fp32, exported, onnx504, capsys):
    ck, ro = str(tiny_fp32), str(read_only_dir)
    argv = {
        "make-checkpoint": ["make-checkpoint", "--out", f"{ro}/ck"],
        "export": ["export", "--checkpoint", ck, "--out", ro],
        "compare": _compare(tiny_fp32, onnx504, "--json", f"{ro}/r.json"),
        "bench": ["bench", "--checkpoint", ck, "--json", f"{ro}/b.json"],
        "embed": _embed(tiny_fp32, exported, f"{ro}/f.npy", onnx504),
        "build": ["build", "--onnx", str(onnx504), "--out", f"{ro}/e.plan"],
        "pipeline": ["pipeline", "--checkpoint", ck, "--out", f"{ro}/engines"],
    }[command]
    code, err = run_cli(argv, capsys, tiny_fp32, onnx504.parent)
    one_line_error(code, err, ro, "not writable")


# -- extreme aspect ratios under the pixel cap (issue 22, item 17) ------------------------------------
def header_only_png(width: int, height: int) -> bytes:
    """A PNG of any size that is only its header (no pixel data): refusing it with anything but
    "cannot read image" proves the refusal came from the header, before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


EXTREME = [
    ((1, 20000), "pads it to a 20000x20000 square"),  # 70 KB as a PNG, 1.2 GB once padded
    ((1, 89_000_000), "pads it to a 89000000x89000000 square"),  # was a MemoryError
    ((40, 2_000_000), "short side is 0 px"),  # was a ZeroDivisionError
    ((20000, 100), "202 crops of 15 px, over the limit of 95"),  # thinned under 32 px by the downscale
]


@pytest.mark.parametrize(("size", "words"), EXTREME, ids=[f"{w}x{h}" for (w, h), _ in EXTREME])
def test_extreme_aspect_is_refused_from_the_header_in_one_line(size, words):
    from step37_deploy.errors import InputError
    from step37_deploy.preprocess import check_image_size, preprocess

    with pytest.raises(InputError, match=words):
        check_image_size(*size, name="x.png")
    with pytest.raises(InputError) as err:
        preprocess(header_only_png(*size))  # the service's and the corpus job's entry point
    msg = str(err.value)
    assert words in msg and "<bytes>" in msg and f"{size[0]}x{size[1]}" in msg and "\n" not in msg, msg


def test_the_bounds_follow_the_crop_rule():
    from PIL import Image

    from step37_deploy.errors import InputError
    from step37_deploy.preprocess import DEFAULT_PREPROCESS, PreprocessConfig, check_image_size, preprocess

    cfg = DEFAULT_PREPROCESS
    assert cfg.max_crops == 95  # a 32 px strip 3024 long: the most crops of any image the rule does not pad
    assert check_image_size(32, 3024).num_crops == 95 and check_image_size(3024, 3024).num_crops == 36
    assert check_image_size(1, 9000).square_pad  # padded to 81 M pixels: under the 89 M pixel cap
    with pytest.raises(InputError, match="square"):
        check_image_size(1, 9000, PreprocessConfig(max_pixels=80_000_000))
    with pytest.raises(InputError, match="crop rule pads it"):  # decoded images: checked before the pad
        preprocess(Image.new("RGB", (1, 20000)))
    with pytest.raises(InputError, match="0 px"):
        check_image_size(2_000_000, 40)


def test_embed_refuses_an_extreme_aspect_in_one_line(tiny_fp32, exported, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "img" / "strip.png"
    path.parent.mkdir()
    Image.new("L", (1, 20000), 128).save(path)
    out = tmp_path / "feats.npy"
    code, err = run_cli(_embed(tiny_fp32, exported, str(out), path), capsys, tmp_path, tiny_fp32)
    one_line_error(code, err, str(path), "1x20000", "crop rule pads it")
