"""Bad inputs to the readers and checks (issue 10, "inputs and checks"): every one is a typed error
naming the file/field (exit 2 through the CLI), nothing it read or sat beside is changed, and no
temporary file is left behind.

Through the CLI in-process (``cli.main``) where a command reaches the reader cheaply; else the
reader itself, asserting the typed error.  Checkpoints are per-test copies of the tiny session
checkpoint (a few MB), mutated in the way each case needs.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from step37_deploy import checkpoint as ck
from step37_deploy import cli, inputs
from step37_deploy.config import Step37Config, read_token_ids
from step37_deploy.engine import Manifest, inspect_engine, manifest_path, read_manifest
from step37_deploy.errors import (
    CheckpointError,
    ConfigError,
    EngineError,
    InputError,
    Step37Error,
    UsageError,
)
from step37_deploy.preprocess import PreprocessConfig, plan_patches, preprocess, to_rgb

INDEX = "model.safetensors.index.json"
VISION_KEY = "vision_model.transformer.resblocks.0.attn.in_proj_weight"
PROJ_KEY = "vit_large_projector.weight"


# -- helpers ------------------------------------------------------------------------------------------
def tree_state(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``roots`` (temporaries included: any new name shows)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_symlink():
                out[str(p)] = "symlink->" + os.readlink(p)
    return out


def run_cli(argv: list[str], capsys, *watched: Path) -> tuple[int, str]:
    """``cli.main(argv)``; asserts that nothing under ``watched`` changed and nothing was added."""
    before = tree_state(*watched)
    code = cli.main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert tree_state(*watched) == before, "an input or unrelated file changed, or a temporary was left"
    return code, err


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def ckpt(tiny_fp32, tmp_path) -> Path:
    """A private copy of the tiny FP32 checkpoint, free to mutate."""
    return Path(shutil.copytree(tiny_fp32, tmp_path / "ckpt"))


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img" / "cat.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def embed_torch(ckpt: Path, image: Path, tmp_path: Path) -> list[str]:
    return ["embed", "--backend", "torch", "--artifacts", str(ckpt), "--image", str(image), "--out",
            str(tmp_path / "out" / "f.npy")]  # fmt: skip


def edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def rewrite_tensor(ckpt: Path, key: str, fn) -> Path:
    """Replace one tensor of a shard (same key), keeping the shard's other tensors and metadata."""
    shard = ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][key]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
        meta = f.metadata()
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(shard), metadata=meta)
    return shard


# -- config.json and tokenizer files -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda c: {**c, "vision_config": None}, ["vision_config must be an object", "null"]),
        (lambda c: {**c, "vision_config": [1, 2]}, ["vision_config must be an object, got [1, 2]"]),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "width": "wide"}}, ["vision_config.width", "integer"]),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "layers": 2.5}}, ["vision_config.layers", "integer"]),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "mlp_ratio": "x"}}, ["vision_config.mlp_ratio"]),
        (
            lambda c: {**c, "vision_config": {**c["vision_config"], "use_ln_pre": "yes"}},
            ["use_ln_pre", "true or false"],
        ),
        (lambda c: {**c, "text_config": {"hidden_size": "big"}}, ["text_config.hidden_size", "integer"]),
        (lambda c: {**c, "text_config": [1]}, ["text_config must be an object"]),
        (lambda c: 5, ["must hold a JSON object, not 5"]),
        (lambda c: None, ["must hold a JSON object, not null"]),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "layers": 10**9}}, ["layers 1000000000 is beyond"]),
    ],
    ids=[
        "vc-null",
        "vc-list",
        "width-str",
        "layers-float",
        "mlp-ratio-str",
        "bool-str",
        "hidden-str",
        "text-list",
        "config-5",
        "config-null",
        "layers-huge",
    ],
)
def test_bad_config_values_exit_2_naming_file_and_field(ckpt, image, tmp_path, capsys, change, words):
    edit_json(ckpt / "config.json", change)
    code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, ckpt, image.parent)
    one_line_error(code, err, str(ckpt / "config.json"), *words)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_config_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(ConfigError, match=r"config\.json is not readable JSON"):
        Step37Config.from_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("fname", "change", "words"),
    [
        ("tokenizer_config.json", lambda t: {**t, "added_tokens_decoder": {"abc": {"content": "<im_start>"}}},
         ["tokenizer_config.json", "<im_start>", "non-negative integer", "abc"]),
        ("tokenizer_config.json", lambda t: {**t, "added_tokens_decoder": [1, 2]},
         ["tokenizer_config.json", "added_tokens_decoder must be an object"]),
        ("tokenizer.json", lambda t: {"added_tokens": [{"content": "<im_start>", "id": "x"}]},
         ["tokenizer.json", "id of <im_start>", "non-negative integer"]),
        ("tokenizer.json", lambda t: {"added_tokens": {"a": 1}}, ["tokenizer.json", "added_tokens must be a list"]),
    ],
    ids=["decoder-key-str", "decoder-list", "tokjson-id-str", "tokjson-not-list"],
)  # fmt: skip
def test_bad_token_ids(ckpt, image, tmp_path, capsys, fname, change, words):
    if fname == "tokenizer.json":
        (ckpt / "tokenizer_config.json").unlink()
        (ckpt / fname).write_text("{}")
    edit_json(ckpt / fname, change)
    code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, ckpt, image.parent)
    one_line_error(code, err, *words)


# -- unreadable files and folders ------------------------------------------------------------------------
def _deny(monkeypatch, denied: Path) -> None:
    """Simulate ``chmod 000`` for root (who reads anyway): listing/access of ``denied`` fails."""
    real_listdir, real_access = os.listdir, os.access

    def listdir(p="."):
        if Path(p) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_listdir(p)

    def access(p, mode, **kw):
        return False if Path(p) == denied else real_access(p, mode, **kw)

    monkeypatch.setattr(inputs.os, "listdir", listdir)
    monkeypatch.setattr(inputs.os, "access", access)


def test_unreadable_checkpoint_dir_is_permission_not_missing(ckpt, monkeypatch):
    _deny(monkeypatch, ckpt)
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*ckpt cannot be read: permission denied"):
        ck.vision_refs(ckpt)


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not deny root; simulated above")
def test_unreadable_checkpoint_dir_chmod(ckpt, image, tmp_path, capsys):
    ckpt.chmod(0)
    try:
        code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, image.parent)
    finally:
        ckpt.chmod(0o755)
    one_line_error(code, err, str(ckpt), "permission denied")


def test_unreadable_shard_is_not_reported_missing(ckpt, image, tmp_path, capsys, monkeypatch):
    shard = ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][VISION_KEY]
    _deny(monkeypatch, shard)
    code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, ckpt)
    one_line_error(code, err, str(shard), "permission denied")
    assert "No such file" not in err and "does not exist" not in err


def test_unreadable_config(ckpt, monkeypatch):
    _deny(monkeypatch, ckpt / "config.json")
    with pytest.raises(ConfigError, match=r"config\.json cannot be read: permission denied"):
        Step37Config.from_checkpoint(ckpt)


def test_unreadable_tokenizer_config(ckpt, monkeypatch):
    _deny(monkeypatch, ckpt / "tokenizer_config.json")
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json cannot be read"):
        read_token_ids(ckpt)


# -- tensors: storage dtypes and non-finite values ----------------------------------------------------------
@pytest.mark.parametrize(
    ("cast", "name"),
    [
        (lambda t: t.to(torch.int8), "I8"),
        (lambda t: t > 0, "BOOL"),
        (lambda t: t.to(torch.float8_e4m3fn), "F8_E4M3"),
        (lambda t: t.to(torch.int32), "I32"),
    ],
    ids=["int8", "bool", "float8", "int32"],
)
def test_non_float_vision_storage_refused_by_name(ckpt, image, tmp_path, capsys, cast, name):
    rewrite_tensor(ckpt, VISION_KEY, cast)
    code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, ckpt, image.parent)
    one_line_error(code, err, VISION_KEY, name, "floating point")


def test_non_float_storage_refused_before_export(ckpt, tmp_path):
    from step37_deploy.export import export_onnx

    rewrite_tensor(ckpt, VISION_KEY, lambda t: t.to(torch.int8))
    with pytest.raises(CheckpointError, match=rf"{VISION_KEY} is I8"):
        export_onnx(ckpt, tmp_path / "out", "fp32", 504)
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize(
    ("key", "bad"), [(VISION_KEY, float("nan")), (PROJ_KEY, float("inf"))], ids=["nan-vision", "inf-proj"]
)
def test_non_finite_weights_refused_naming_tensor(ckpt, image, tmp_path, capsys, key, bad):
    def poison(t):
        t = t.clone()
        t.view(-1)[7] = bad
        return t

    shard = rewrite_tensor(ckpt, key, poison)
    code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, ckpt, image.parent)
    one_line_error(code, err, key, shard.name, "1 NaN/Inf")


def test_nan_weight_refused_by_export_nothing_left(ckpt, tmp_path, capsys):
    rewrite_tensor(ckpt, VISION_KEY, lambda t: torch.full_like(t, float("nan")))
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "unrelated.txt").write_text("keep me")
    code, err = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(out), "--resolution", "504"],
                        capsys, ckpt, out)  # fmt: skip
    one_line_error(code, err, VISION_KEY, "NaN/Inf")


def test_fp32_weight_overflowing_fp16_refused(ckpt):
    rewrite_tensor(ckpt, VISION_KEY, lambda t: torch.full_like(t, 1e6))
    with pytest.raises(CheckpointError, match=rf"{VISION_KEY} .* after conversion to torch.float16"):
        ck.load_vision_model(ckpt, "fp16")
    ck.load_vision_model(ckpt, "fp32")  # finite in the stored precision: fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_every_non_finite(dtype):
    """The one-pass check (aminmax) sees a NaN/Inf at the start, middle and vectorised tail."""
    for n in (1, 33, 100_003):
        assert ck.all_finite(torch.randn(n).to(dtype))
        for pos in (0, n // 2, n - 1):
            for bad in (float("nan"), float("inf"), float("-inf")):
                t = torch.randn(n).to(dtype)
                t[pos] = bad
                assert not ck.all_finite(t), (n, pos, bad)
    assert ck.all_finite(torch.full((3, 4), 6e4, dtype=dtype))  # large but finite: no overflow in the check


# -- index entries leading out of the folder -----------------------------------------------------------------
def _point_key_at(ckpt: Path, name: str) -> None:
    edit_json(ckpt / INDEX, lambda i: {**i, "weight_map": {**i["weight_map"], VISION_KEY: name}})


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../../../../etc/passwd", ["'..' is not allowed"]),
        ("/etc/passwd", ["absolute path"]),
        ("sub/../../x.safetensors", ["'..' is not allowed"]),
        ("", ["not a valid relative path"]),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "empty"],
)
def test_index_path_escape_refused_before_opening(ckpt, image, tmp_path, capsys, monkeypatch, name, words):
    _point_key_at(ckpt, name)
    opened = []
    monkeypatch.setattr(ck, "safe_open", lambda *a, **k: opened.append(a))
    code, err = run_cli(embed_torch(ckpt, image, tmp_path), capsys, ckpt, image.parent)
    one_line_error(code, err, INDEX, *words)
    assert not opened


def test_index_symlink_escape_refused(ckpt, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shard = ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][VISION_KEY]
    shutil.copy(shard, outside)
    (ckpt / "link.safetensors").symlink_to(outside)
    _point_key_at(ckpt, "link.safetensors")
    with pytest.raises(CheckpointError, match=r"symlink to .*outside\.safetensors, outside"):
        ck.vision_refs(ckpt)


def test_hf_cache_symlinks_into_blobs_are_accepted(tiny_fp32, tmp_path):
    """Hugging Face's cache layout (snapshots/REV/NAME -> ../../blobs/SHA) is a checkpoint, not an escape."""
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in Path(tiny_fp32).iterdir():
        blob = blobs / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(Path("../../blobs") / blob.name)
    assert ck.weights_fingerprint(snap) == ck.weights_fingerprint(tiny_fp32)


@pytest.mark.parametrize("content", ["5", "null", "[1, 2]", '{"weight_map": [1]}', '{"weight_map": {"a": 5}}'])
def test_bad_index_json(ckpt, content):
    (ckpt / INDEX).write_text(content)
    with pytest.raises(CheckpointError, match=INDEX):
        ck.vision_refs(ckpt)


# -- engine manifests and inspect ------------------------------------------------------------------------------
def _fake_engine(tmp_path: Path, payload: bytes = b"\x7fENGINE" * 1000) -> Path:
    """An engine file + a manifest that matches it (no TensorRT needed to read or verify either)."""
    plan = tmp_path / "e" / "x.plan"
    plan.parent.mkdir(exist_ok=True)
    plan.write_bytes(payload)
    m = Manifest(
        flavour="tensorrt_rtx", trt_version="0.0", targets={"gpu": None, "compute_capabilities": ["8.6"]},
        profile={"pixel_values": [[1, 3, 504, 504], [1, 3, 504, 504], [2, 3, 504, 504]]}, precision="fp16",
        resolution=504, inputs={"pixel_values": {"dtype": "float16", "shape": ["batch", 3, 504, 504]}},
        outputs={"image_features": {"dtype": "float16", "shape": ["batch", 81, 256]}}, onnx_file="x.onnx",
        onnx_sha256="0" * 64, engine_sha256=hashlib.sha256(payload).hexdigest(), engine_bytes=len(payload),
        toolkit_version="t", built_at="now", build_seconds=0.0,
    )  # fmt: skip
    manifest_path(plan).write_text(json.dumps(m.__dict__))
    return plan


def test_inspect_verified_engine_exits_0(tmp_path, capsys):
    plan = _fake_engine(tmp_path)
    code, err = run_cli(["inspect", str(plan)], capsys, plan.parent)
    assert code == 0, err


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_inspect_corrupt_engine_exits_2(tmp_path, capsys, damage):
    plan = _fake_engine(tmp_path)
    data = plan.read_bytes()
    if damage == "truncate":
        plan.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        plan.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        plan.write_bytes(b"")
    code, err = run_cli(["inspect", str(plan)], capsys, plan.parent)
    one_line_error(code, err, str(plan))
    assert ("truncated" in err) or ("digest" in err)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("5", ["must hold a JSON object, not 5"]),
        ("null", ["must hold a JSON object, not null"]),
        ("[]", ["must hold a JSON object, not []"]),
        ('{"flavour": "tensorrt"}', ["lacks", "engine_sha256"]),
    ],
    ids=["five", "null", "list", "missing-fields"],
)
def test_bad_manifest_inspect_exits_2(tmp_path, capsys, content, words):
    plan = _fake_engine(tmp_path)
    manifest_path(plan).write_text(content)
    code, err = run_cli(["inspect", str(plan)], capsys, plan.parent)
    one_line_error(code, err, manifest_path(plan).name, *words)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("engine_bytes", "12", "engine_bytes"),
        ("inputs", {"a": {"dtype": "float16", "shape": [1]}, "b": {"dtype": "float16", "shape": [1]}}, "inputs"),
        ("outputs", {"y": {"dtype": "int4", "shape": ["batch"]}}, "dtype"),
        ("profile", {"pixel_values": [[1, 3]]}, "profile"),
        ("inputs", {"pixel_values": {"dtype": "float16", "shape": ["batch"]}}, "4 sizes"),
    ],
)
def test_manifest_field_types_checked(tmp_path, field, value, words):
    plan = _fake_engine(tmp_path)
    edit_json(manifest_path(plan), lambda m: {**m, field: value})
    with pytest.raises(EngineError, match=words):
        read_manifest(plan)
    with pytest.raises(EngineError):
        inspect_engine(plan)


# -- compare: zero cases and thresholds ------------------------------------------------------------------------
def test_compare_zero_cases_is_an_error_not_a_pass(tiny_fp32, exported, tmp_path, capsys):
    report = tmp_path / "r" / "report.json"
    report.parent.mkdir()
    onnx = exported[("fp32", 504)]
    code, err = run_cli(["compare", "--checkpoint", str(tiny_fp32), "--onnx", str(onnx), "--resolution", "728",
                         "--json", str(report)], capsys, tiny_fp32, onnx.parent, report.parent)  # fmt: skip
    one_line_error(code, err, "zero cases", "728", "504")
    assert not report.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--cos-min", "2"), ("--cos-min", "nan"), ("--cos-min", "-1"), ("--rel-l2", "-1"), ("--rel-l2", "nan"),
     ("--rel-l2", "inf")],
)  # fmt: skip
def test_compare_thresholds_validated(tiny_fp32, exported, tmp_path, capsys, monkeypatch, option, value):
    from step37_deploy.backends import factory

    monkeypatch.setattr(factory, "runners_from_args", lambda *a, **k: pytest.fail("loaded runners first"))
    onnx = exported[("fp32", 504)]
    code, err = run_cli(["compare", "--checkpoint", str(tiny_fp32), "--onnx", str(onnx), option, value],
                        capsys, tiny_fp32, onnx.parent)  # fmt: skip
    one_line_error(code, err, option)


def test_compare_library_refuses_zero_cases():
    from step37_deploy.compare import Thresholds, compare

    with pytest.raises(UsageError, match="no runner"):
        compare(None, [], np.zeros((2, 2)), None, [1])
    with pytest.raises(UsageError):
        Thresholds(0.5, float("nan"))
    assert Thresholds(1, 0).cos_min == 1


# -- artifacts vs the checkpoint whose projector is used -----------------------------------------------------------
def _embed_onnx(ckpt: Path, exported, tmp_path: Path) -> list[str]:
    return ["embed", "--backend", "onnx", "--artifacts", str(ckpt), str(exported[("fp32", 728)]),
            str(exported[("fp32", 504)]), "--out", str(tmp_path / "out" / "f.npy")]  # fmt: skip


def test_embed_onnx_from_another_checkpoint_refused(tiny_bf16, exported, image, tmp_path, capsys):
    argv = [*_embed_onnx(tiny_bf16, exported, tmp_path), "--image", str(image)]
    code, err = run_cli(argv, capsys, tiny_bf16, exported[("fp32", 728)].parent, image.parent)
    one_line_error(code, err, str(tiny_bf16), "step37_vision_fp32_728.onnx", "tiny-fp32")


def test_embed_onnx_from_its_checkpoint_works(tiny_fp32, exported, image, tmp_path, capsys):
    argv = [*_embed_onnx(tiny_fp32, exported, tmp_path), "--image", str(image)]
    code, err = run_cli(argv, capsys, tiny_fp32, exported[("fp32", 728)].parent, image.parent)
    assert code == 0, err
    assert np.load(tmp_path / "out" / "f.npy").shape[-1] == Step37Config.from_checkpoint(tiny_fp32).text_hidden_size


def test_engine_manifest_carries_onnx_digest_and_is_checked(tiny_fp32, tiny_bf16, exported, tmp_path):
    from step37_deploy.export import read_metadata

    plan = _fake_engine(tmp_path)
    meta = read_metadata(exported[("fp16", 504)])
    edit_json(manifest_path(plan), lambda m: {**m, "onnx_metadata": meta})
    recorded = read_manifest(plan)["onnx_metadata"]
    ck.check_artifact_source(tiny_fp32, plan, recorded)
    with pytest.raises(
        CheckpointError, match=rf"{plan.name} holds the vision weights of .*tiny-fp32.*{tiny_bf16.name}"
    ):
        ck.check_artifact_source(tiny_bf16, plan, recorded)


def test_older_artifact_with_only_full_digest_checked(tiny_fp32, tiny_bf16, exported):
    from step37_deploy.export import read_metadata

    meta = read_metadata(exported[("fp32", 504)])
    meta.pop("vision_weights_fingerprint")
    ck.check_artifact_source(tiny_fp32, "old.onnx", meta)
    with pytest.raises(CheckpointError, match="sha256"):
        ck.check_artifact_source(tiny_bf16, "old.onnx", meta)


def test_fingerprint_tracks_weights_not_sharding(tiny_fp32, ckpt, tmp_path):
    from step37_deploy.synthetic import make_checkpoint

    resharded = make_checkpoint(tmp_path / "r", "tiny", dtype="fp32", shards=3, seed=1)
    assert ck.weights_fingerprint(resharded) == ck.weights_fingerprint(tiny_fp32)
    rewrite_tensor(ckpt, VISION_KEY, lambda t: t + 1e-3)  # a fine-tune: every value changes
    assert ck.weights_fingerprint(ckpt) != ck.weights_fingerprint(tiny_fp32)


def test_garbage_onnx_to_embed(tiny_fp32, tmp_path, image, capsys):
    bad = tmp_path / "bad" / "x_728.onnx"
    bad.parent.mkdir()
    bad.write_bytes(os.urandom(3000))
    argv = ["embed", "--backend", "onnx", "--artifacts", str(tiny_fp32), str(bad), str(bad), "--image", str(image),
            "--out", str(tmp_path / "out" / "f.npy")]  # fmt: skip
    code, err = run_cli(argv, capsys, tiny_fp32, bad.parent, image.parent)
    one_line_error(code, err, str(bad))


@pytest.mark.parametrize("location", ["../../../../etc/passwd", "/etc/passwd"])
def test_onnx_external_data_outside_its_folder_refused(tiny_fp32, exported, tmp_path, image, capsys, location):
    import onnx

    from step37_deploy.engine import onnx_facts
    from step37_deploy.export import read_metadata

    model = onnx.load(str(exported[("fp32", 728)]))
    init = max(model.graph.initializer, key=lambda i: len(i.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value=location)
    bad = tmp_path / "o" / "step37_vision_fp32_728.onnx"
    bad.parent.mkdir()
    onnx.save(model, str(bad))
    with pytest.raises(InputError, match="external data"):
        read_metadata(bad)
    with pytest.raises(EngineError, match="external data"):
        onnx_facts(bad)
    argv = ["embed", "--backend", "onnx", "--artifacts", str(tiny_fp32), str(bad), str(exported[("fp32", 504)]),
            "--image", str(image), "--out", str(tmp_path / "out" / "f.npy")]  # fmt: skip
    code, err = run_cli(argv, capsys, tiny_fp32, bad.parent, image.parent)
    one_line_error(code, err, str(bad), location)


# -- images -----------------------------------------------------------------------------------------------------------
def _jpeg_with_orientation(w: int, h: int, orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "JPEG", exif=ex)
    return buf.getvalue()


def test_exif_orientation_applied_like_load_image(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = _jpeg_with_orientation(1400, 700, 6)  # stored landscape, shown portrait
    path = tmp_path / "o6.jpg"
    path.write_bytes(data)
    assert to_rgb(path).size == transformers.image_utils.load_image(str(path)).size == (700, 1400)
    plan = preprocess(data).plan
    assert (plan.num_x, plan.num_y) == (
        plan_patches(700, 1400).num_x,
        plan_patches(700, 1400).num_y,
    ) and plan.num_y > plan.num_x


def test_16bit_png_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    got = np.asarray(to_rgb(path))[..., 0].astype(int)
    np.testing.assert_allclose(got, np.round(ramp / 257.0), atol=1)
    assert (got == 255).mean() < 0.01  # the reference's convert("RGB") makes ~99.6 % of them 255


def test_decompression_bomb_typed_with_count_and_limit(tmp_path, image, capsys, tiny_fp32):
    bomb = tmp_path / "bomb" / "b.png"
    bomb.parent.mkdir()
    Image.new("1", (20000, 20000)).save(bomb)
    with pytest.raises(InputError, match=r"400000000 pixels, over the limit of \d+"):
        to_rgb(bomb)
    with pytest.raises(InputError, match=r"60x40 = 2400 pixels, over the limit of 1000"):
        preprocess(image, PreprocessConfig(max_pixels=1000))
    code, err = run_cli(embed_torch(tiny_fp32, bomb, tmp_path), capsys, bomb.parent, tiny_fp32)
    one_line_error(code, err, str(bomb), "400000000 pixels")
    code, err = run_cli([*embed_torch(tiny_fp32, image, tmp_path), "--max-pixels", "1000"], capsys, image.parent)
    one_line_error(code, err, str(image), "2400 pixels, over the limit of 1000")


def test_animated_gif_first_frame_logged(tmp_path, caplog):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with caplog.at_level(logging.INFO, logger="step37_deploy.preprocess"):
        im = to_rgb(path)
    assert im.getpixel((5, 5))[0] > 200 and im.getpixel((5, 5))[1] < 50
    assert any("animated" in r.message and "first frame" in r.message for r in caplog.records)


def test_every_reader_error_is_typed():
    """The classes used above are all Step37Errors (the CLI's exit-2 path)."""
    for cls in (CheckpointError, ConfigError, EngineError, InputError, UsageError):
        assert issubclass(cls, Step37Error)
