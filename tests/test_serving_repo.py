"""``step37-deploy triton-repo``: configs through Triton's own protobuf, agreement with the engine
manifests, the provenance record, and the ONNX-tower repository served by the bundled tritonserver."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step37_deploy.cli import build_parser, main
from step37_deploy.errors import BackendUnavailable, ConfigError, InputError
from tests.conftest import rel_l2
from tests.test_bad_input import argparse_error

pytest.importorskip("tritonclient.grpc", reason="the [serve] extra (tritonclient) is not installed")
from tritonclient.grpc import model_config_pb2 as pb

from step37_deploy.serving import contract as C
from step37_deploy.serving.repository import (
    RepositoryOptions,
    TowerArtifact,
    default_preprocess_instances,
    parse_config,
    tower_config,
    verify_repository,
    write_repository,
)

MODELS = (*C.TOWER_MODELS.values(), C.EMBEDDER_MODEL)


def _configs(repo):
    return {m: parse_config(repo / m / "config.pbtxt") for m in MODELS}


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engines(rtx_engines):
    """TensorRT-RTX engines (profile 1:2:4) of the tiny FP16 exports: the session's (conftest; it
    skips without tensorrt_rtx), which test_engine checks."""
    return {res: plan for res, (plan, _, _) in rtx_engines.items()}


def test_trt_repository_configs_agree_with_engine_manifests(tiny_fp32, engines, tmp_path):
    from step37_deploy.engine import read_manifest

    out = tmp_path / "repo"
    args = ["triton-repo", "--checkpoint", str(tiny_fp32), "--backend", "trt", "--out", str(out)]
    assert main([*args, "--artifacts", str(engines[728]), str(engines[504]), "--cuda-graphs", "-q"]) == 0
    cfgs = _configs(out)
    record = verify_repository(out)  # every digest checks out
    for res, engine in engines.items():
        m = read_manifest(engine)
        cfg = cfgs[C.TOWER_MODELS[res]]
        (mn, *_), _, (mx, *_) = m["profile"][C.TOWER_INPUT]
        assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
        assert cfg.max_batch_size == mx == 4
        ((iname, ispec),) = m["inputs"].items()
        ((oname, ospec),) = m["outputs"].items()
        assert [i.name for i in cfg.input] == [iname] and [o.name for o in cfg.output] == [oname]
        assert list(cfg.input[0].dims) == ispec["shape"][1:] == [3, res, res]
        assert list(cfg.output[0].dims) == ospec["shape"][1:]
        assert ispec["dtype"] == ospec["dtype"] == "float16"
        assert cfg.input[0].data_type == cfg.output[0].data_type == pb.TYPE_FP16
        pref = list(cfg.dynamic_batching.preferred_batch_size)
        assert pref and all(mn <= b <= mx for b in pref)
        assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
        assert cfg.optimization.cuda.graphs and [g.batch_size for g in cfg.optimization.cuda.graph_spec] == pref
        assert cfg.model_warmup[0].batch_size == mx and cfg.model_warmup[0].inputs[C.TOWER_INPUT].zero_data
        plan = out / C.TOWER_MODELS[res] / "1" / "model.plan"
        assert plan.read_bytes() == engine.read_bytes()
        files = record["towers"][str(res)]["files"]
        assert files == {f"{C.TOWER_MODELS[res]}/1/model.plan": m["engine_sha256"]}
        assert record["towers"][str(res)]["weights_sha256"] == m["onnx_metadata"]["vision_weights_sha256"]
    emb = cfgs[C.EMBEDDER_MODEL]
    assert emb.backend == "python" and emb.max_batch_size == 0
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in emb.input] == [("image", "TYPE_STRING", [1])]
    assert [(o.name, pb.DataType.Name(o.data_type)) for o in emb.output] == [
        ("features", "TYPE_FP32"),
        ("token_ids", "TYPE_INT64"),
        ("num_crops", "TYPE_INT32"),
        # optional answers (computed only when named): 16-bit rows, rows before the projector
        ("features_fp16", "TYPE_FP16"),
        ("features_bf16", "TYPE_BF16"),
        ("vision_features", "TYPE_FP32"),
        ("vision_features_fp16", "TYPE_FP16"),
        ("vision_features_bf16", "TYPE_BF16"),
    ]
    assert emb.instance_group[0].count == default_preprocess_instances()


def test_max_batch_above_engine_profile_max_is_refused(tiny_fp32, engines, tmp_path, capsys):
    out = tmp_path / "repo"
    args = ["triton-repo", "--checkpoint", str(tiny_fp32), "--backend", "trt", "--out", str(out)]
    args += ["--artifacts", str(engines[728]), str(engines[504])]
    assert main([*args, "--max-batch", "8", "-q"]) == 2
    assert "above the optimisation profile MAX 4" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".repo.*"))
    assert main([*args, "--max-batch", "2", "--no-warmup", "-q"]) == 0
    cfg = parse_config(out / C.TOWER_MODELS[728] / "config.pbtxt")
    assert cfg.max_batch_size == 2 and max(cfg.dynamic_batching.preferred_batch_size) <= 2
    assert not cfg.model_warmup and not cfg.optimization.cuda.graphs


def test_tower_dtype_follows_the_artifact(tiny_fp32, exported, tmp_path):
    out = write_repository(tiny_fp32, "onnx", [exported[("fp16", 728)], exported[("fp16", 504)]], tmp_path / "r")
    for res in (728, 504):
        cfg = parse_config(out / C.TOWER_MODELS[res] / "config.pbtxt")
        assert cfg.backend == "python" and cfg.parameters["step37_backend"].string_value == "onnx"
        assert cfg.input[0].data_type == cfg.output[0].data_type == pb.TYPE_FP16
    # uint8-input artifacts (ONNX metadata step37.input_dtype / manifest dtype "uint8")
    t = TowerArtifact(728, "onnx", tmp_path / "x.onnx", "uint8", "fp16", 169, 256, None)
    cfg = tower_config(t, RepositoryOptions())
    assert cfg.input[0].data_type == pb.TYPE_UINT8 and cfg.output[0].data_type == pb.TYPE_FP16


def test_artifacts_must_fit_the_checkpoint(tiny_fp32, tiny_bf16, exported, tmp_path):
    pair = [exported[("fp32", 728)], exported[("fp32", 504)]]
    with pytest.raises(InputError, match="other vision weights"):
        write_repository(tiny_bf16, "onnx", pair, tmp_path / "a")  # another seed: other weights
    with pytest.raises(InputError, match="two files"):
        write_repository(tiny_fp32, "onnx", pair[:1], tmp_path / "b")
    with pytest.raises(InputError, match="both 728x728"):
        write_repository(tiny_fp32, "onnx", [pair[0], pair[0]], tmp_path / "c")
    with pytest.raises(InputError, match="torch serves the checkpoint"):
        write_repository(tiny_fp32, "torch", pair, tmp_path / "d")
    assert not list(tmp_path.iterdir())


def test_destination_rules_and_overwrite(tiny_fp32, exported, tmp_path):
    pair = [exported[("fp32", 728)], exported[("fp32", 504)]]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a repository step37-deploy wrote"):
        write_repository(tiny_fp32, "onnx", pair, foreign, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    out = write_repository(tiny_fp32, "onnx", pair, tmp_path / "repo")
    with pytest.raises(ConfigError, match="--overwrite"):
        write_repository(tiny_fp32, "onnx", pair, out)
    (out / "stray.txt").write_text("x")
    write_repository(tiny_fp32, "onnx", pair, out, RepositoryOptions(preprocess_instances=3), overwrite=True)
    assert not (out / "stray.txt").exists()
    assert parse_config(out / C.EMBEDDER_MODEL / "config.pbtxt").instance_group[0].count == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "repo"]  # no temporary leftovers


def _flip_last_byte(served: Path) -> bytes:
    """A served file changed after the repository was written; its new bytes.  It is a hard link to
    the export: replaced, never written through."""
    data = bytearray(served.read_bytes())
    data[-1] ^= 1
    served.unlink()
    served.write_bytes(bytes(data))
    return bytes(data)


def test_verify_detects_changed_files_and_paths_leaving_the_repository(tiny_fp32, exported, tmp_path):
    out = write_repository(tiny_fp32, "onnx", [exported[("fp32", 728)], exported[("fp32", 504)]], tmp_path / "r")
    record = verify_repository(out)
    data = _flip_last_byte(out / C.TOWER_MODELS[504] / "1" / exported[("fp32", 504)].name)
    with pytest.raises(ConfigError, match="changed after the repository was written"):
        verify_repository(out)
    bad = json.loads(json.dumps(record))
    bad["towers"]["504"]["files"] = {"../../outside.onnx": "0" * 64}
    with pytest.raises(ConfigError, match="leaves its folder"):
        verify_repository(out, bad)
    assert exported[("fp32", 504)].read_bytes() != data  # the input was never touched


def test_local_towers_are_files_of_the_embedder_checked_like_models(tiny_fp32, exported, tmp_path):
    """``--tower-calls local``: no tower models (nothing for Triton to load or a client to call);
    each tower's files in the embedder's version folder, named in the record with their digests,
    and a changed one refused like a tower model's."""
    from step37_deploy.serving.supervise import expected_stubs

    pair = [exported[("fp32", 728)], exported[("fp32", 504)]]
    opts = RepositoryOptions(tower_calls="local", preprocess_instances=2, tower_threads=3)
    out = write_repository(tiny_fp32, "onnx", pair, tmp_path / "r", opts)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [C.EMBEDDER_MODEL]
    assert expected_stubs(out) == {C.EMBEDDER_MODEL: 2}
    emb = parse_config(out / C.EMBEDDER_MODEL / "config.pbtxt")
    assert emb.parameters[C.TOWER_THREADS_PARAMETER].string_value == "3"
    record = verify_repository(out)
    assert record["tower_calls"] == "local"
    for res, tower in record["towers"].items():
        artifact = out / tower["artifact"]
        assert artifact.parent == out / C.EMBEDDER_MODEL / "1" / C.TOWER_MODELS[int(res)]
        assert artifact.read_bytes() == pair[0 if res == "728" else 1].read_bytes()
        assert list(tower["files"]) == [tower["artifact"]]
    bad = json.loads(json.dumps(record))
    bad["towers"]["728"]["artifact"] = f"{C.EMBEDDER_MODEL}/1/{C.PROJECTOR_FILE}"  # inside, but not the tower's
    with pytest.raises(ConfigError, match="is not one of its checked files"):
        verify_repository(out, bad)
    _flip_last_byte(out / record["towers"]["504"]["artifact"])
    with pytest.raises(ConfigError, match="changed after the repository was written"):
        verify_repository(out)


def test_a_tower_runner_must_take_the_dtype_it_is_served(exported):
    """A tower stub and an embedder running its towers itself both open the runner through
    ``open_tower_runner``: an artifact that takes another ``pixel_values`` dtype than the
    repository serves it is refused at load, never fed bytes it would misread."""
    from step37_deploy.serving.towers import open_tower_runner

    onnx = exported[("fp32", 504)]
    runner = open_tower_runner("onnx", onnx, 1, "float32")
    assert runner.input_spec().dtype == np.float32
    runner.deactivate()
    with pytest.raises(ConfigError, match=f"{onnx.name} takes pixel_values as float32, but it is served uint8"):
        open_tower_runner("onnx", onnx, 1, "uint8")
    with pytest.raises(ConfigError, match="unknown tower kind 'trt'"):
        open_tower_runner("trt", onnx, 1, "float32")


def test_onnx_repository_served_by_bundled_tritonserver(tiny_fp32, exported, tmp_path, capfd):
    """The repository ``triton-repo`` writes (the towers as models of their own), loaded by the
    tritonserver nvidia-pytriton ships."""
    pytest.importorskip("pytriton", reason="the [serve] extra (nvidia-pytriton) is not installed")
    import tritonclient.http as httpclient

    from step37_deploy.backends import OnnxrtRunner, session_from_onnx
    from step37_deploy.runtime import VisionEmbedder
    from step37_deploy.serving.server import TritonServer

    pair = [exported[("fp32", 728)], exported[("fp32", 504)]]
    out = tmp_path / "repo"
    args = ["triton-repo", "--checkpoint", str(tiny_fp32), "--backend", "onnx", "--out", str(out), "-q"]
    assert main([*args, "--artifacts", *map(str, pair), "--preprocess-instances", "1", "--tower-calls", "bls"]) == 0
    _configs(out)
    server = TritonServer(out, tmp_path / "work", host="127.0.0.1", exit_timeout_s=10).start(240)
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        raw = _png(700, 1000, 3)
        ref = VisionEmbedder.from_artifacts(tiny_fp32, "onnx", pair).embed_images([raw])[0]
        inp = httpclient.InferInput(C.EMBEDDER_INPUT, [1], "BYTES")
        inp.set_data_from_numpy(np.array([raw], dtype=np.object_))
        res = client.infer(C.EMBEDDER_MODEL, [inp])
        assert rel_l2(res.as_numpy("features"), ref.features) <= 1e-5
        assert res.as_numpy("token_ids").tolist() == ref.token_ids
        assert res.as_numpy("num_crops").tolist() == [ref.num_crops] and ref.num_crops > 0
        # The tower model alone, batch 2.
        views = np.random.default_rng(0).standard_normal((2, 3, 504, 504)).astype(np.float32)
        tin = httpclient.InferInput(C.TOWER_INPUT, list(views.shape), "FP32")
        tin.set_data_from_numpy(views)
        got = client.infer(C.TOWER_MODELS[504], [tin]).as_numpy(C.TOWER_OUTPUT)
        with OnnxrtRunner(session_from_onnx(pair[1])) as runner:
            assert rel_l2(got, runner.infer(views)) <= 1e-5
        client.close()  # Triton's HTTP server waits for open connections before it exits
    finally:
        assert server.stop() == 0
    # A repository changed after it was written: the embedder refuses to load, the server says why.
    proj = out / C.EMBEDDER_MODEL / "1" / C.PROJECTOR_FILE
    data = bytearray(proj.read_bytes())
    data[-1] ^= 1
    proj.write_bytes(bytes(data))
    capfd.readouterr()
    broken = TritonServer(out, tmp_path / "work2", host="127.0.0.1", exit_timeout_s=5)
    with pytest.raises(BackendUnavailable, match="before every model was ready"):
        broken.start(240)
    broken.stop()
    assert "was changed after the repository was written" in capfd.readouterr().err


def test_cli_options_state_their_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("triton-repo", "serve"):
        for action in sub.choices[name]._actions:
            if action.dest in ("help", "quiet", "verbose"):
                continue
            assert "default" in (action.help or "") or "required" in (action.help or ""), (name, action.dest)


def test_serve_trt_with_the_bundled_server_points_to_the_nvidia_container(tiny_fp32, engines, capsys):
    pytest.importorskip("pytriton", reason="the [serve] extra (nvidia-pytriton) is not installed")
    args = ["serve", "--checkpoint", str(tiny_fp32), "--backend", "trt", "--artifacts", *map(str, engines.values())]
    assert main([*args, "--host", "127.0.0.1", "-q"]) == 2
    assert "has no TensorRT backend" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_starting_anything(tiny_fp32, exported, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["serve", "--checkpoint", str(tiny_fp32), "--backend", "onnx", "--host", "127.0.0.1"]
        args += ["--artifacts", str(exported[("fp32", 728)]), str(exported[("fp32", 504)]), "--grpc-port", str(port)]
        assert main([*args, "-q"]) == 2
    assert f"--grpc-port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_server_environment_and_backend_folder(tmp_path):
    """The two fixes the bundled Python backend needs, and its assembled backend folder."""
    pytest.importorskip("pytriton", reason="the [serve] extra (nvidia-pytriton) is not installed")
    import sys
    import sysconfig
    from pathlib import Path

    import step37_deploy
    from step37_deploy.serving.server import assemble_backends, bundled_tritonserver, server_env

    install = bundled_tritonserver()
    env = server_env(install, {"LD_LIBRARY_PATH": "/x", "PATH": "/usr/bin", "PYTHONPATH": "/y", "PYTHONHOME": "/z"})
    assert env["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].split(":")[-1] == "/x"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)  # the stub's interpreter = ours
    assert env["PYTHONPATH"].split(":") == [str(Path(step37_deploy.__file__).resolve().parent.parent), "/y"]
    assert "PYTHONHOME" not in env
    py = assemble_backends(install, tmp_path / "backends") / "python"
    assert {p.name for p in py.iterdir()} >= {"libtriton_python.so", "triton_python_backend_stub"}
    assert (py / "triton_python_backend_stub").resolve() == install.stub.resolve()


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--http-port", "70000", "0..65535"),
        ("--grpc-port", "-1", "0..65535"),
        ("--metrics-port", "65536", "0..65535"),
        ("--exit-timeout", "-1", ">= 1"),
        ("--exit-timeout", "0", ">= 1"),
        ("--ready-timeout", "0", "> 0"),
        ("--ready-timeout", "inf", "> 0"),
        ("--ready-timeout", "nan", "> 0"),
    ],
)
def test_serve_refuses_bad_ports_and_timeouts_before_starting_anything(option, value, words, capsys):
    args = ["serve", "--checkpoint", "no-such-ckpt", "--backend", "torch", option, value, "-q"]
    argparse_error(args, capsys, f"argument {option}", words)


def test_repository_files_get_the_umask_permissions(tiny_fp32, tmp_path):
    """safetensors' save_file creates 0600: the projector and the torch towers' weights must be
    readable by a serving user other than the builder."""
    import os

    old = os.umask(0o022)
    try:
        out = write_repository(tiny_fp32, "torch", [], tmp_path / "repo")
    finally:
        os.umask(old)
    written = sorted(out.rglob("*.safetensors"))
    names = {str(p.relative_to(out)) for p in written}
    assert f"{C.EMBEDDER_MODEL}/1/{C.PROJECTOR_FILE}" in names
    assert {f"{m}/1/checkpoint/model.safetensors" for m in C.TOWER_MODELS.values()} <= names
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


def test_repository_into_an_unwritable_folder_is_a_one_line_error(tiny_fp32, tmp_path, monkeypatch, capsys):
    """A read-only parent (EROFS; root passes os.access on a chmod-ed folder, so both the early
    check and the write itself are exercised) and a parent that is a file: exit 2, naming --out."""
    import errno
    import os
    from pathlib import Path

    from step37_deploy import files

    args = ["triton-repo", "--checkpoint", str(tiny_fp32), "--backend", "torch", "-q"]
    (tmp_path / "afile").write_text("x")
    assert main([*args, "--out", str(tmp_path / "afile" / "repo")]) == 2
    assert "is not a directory" in capsys.readouterr().err

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: Path(p) != tmp_path and real_access(p, m, **kw))
    assert main([*args, "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'repo'}: {tmp_path} is not writable" in err and err.count("\n") == 1, err
    monkeypatch.undo()

    real_mkdir = os.mkdir

    def read_only(path, *a, **kw):  # the temporary folder beside --out cannot be created
        if files.TMP_MARK in Path(path).name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(files.os, "mkdir", read_only)
    assert main([*args, "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write in {tmp_path}: Read-only file system" in err and "internal error" not in err, err
    assert not (tmp_path / "repo").exists()


def test_onnx_backend_with_non_onnx_artifacts_does_not_mention_tensorrt(tiny_fp32, tmp_path, capsys):
    junk = [tmp_path / "x.plan", tmp_path / "y.plan"]
    for f in junk:
        f.write_bytes(b"not an onnx model")
    args = ["triton-repo", "--checkpoint", str(tiny_fp32), "--backend", "onnx", "--out", str(tmp_path / "r")]
    assert main([*args, "--artifacts", *map(str, junk), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{junk[0]} is not a readable ONNX model" in err and "TensorRT" not in err, err
