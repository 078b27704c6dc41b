"""TensorRT engines.  The build path runs for real on a CPU machine through TensorRT-RTX (ahead of
time, SM86 and SM89); execution needs a GPU with the engine's TensorRT and skips elsewhere."""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest

from step37_deploy.cli import main
from step37_deploy.engine import (
    BuildOptions,
    build_engine,
    check_runtime_compat,
    detect_flavour,
    manifest_path,
    read_manifest,
)
from step37_deploy.errors import BackendUnavailable, EngineError

rtx = pytest.importorskip(
    "tensorrt_rtx", reason="TensorRT-RTX (pip install '.[rtx]') is needed to build engines on a CPU"
)


def _gpu_with_trt() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU here"
    except ImportError:
        return "torch is missing"
    return None if detect_flavour() else "no TensorRT flavour installed"


@pytest.fixture(scope="module")
def engines(rtx_engines):
    """The session's engines (conftest: SM86 + SM89, profile 1:2:4, a timing cache)."""
    return rtx_engines


@pytest.mark.parametrize("res", [728, 504])
def test_rtx_ahead_of_time_build_and_manifest(engines, res):
    plan, manifest, onnx_path = engines[res]
    data = plan.read_bytes()
    assert len(data) > 10_000
    on_disk = read_manifest(plan)
    assert on_disk == manifest
    assert manifest["flavour"] == "tensorrt_rtx" and manifest["trt_version"] == rtx.__version__
    assert manifest["targets"]["compute_capabilities"] == ["8.6", "8.9"]
    assert manifest["profile"] == {"pixel_values": [[1, 3, res, res], [2, 3, res, res], [4, 3, res, res]]}
    assert manifest["precision"] == "fp16" and manifest["resolution"] == res
    tokens = 169 if res == 728 else 81
    assert manifest["inputs"] == {"pixel_values": {"dtype": "float16", "shape": ["batch", 3, res, res]}}
    assert manifest["outputs"] == {"image_features": {"dtype": "float16", "shape": ["batch", tokens, 256]}}
    assert manifest["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert manifest["engine_sha256"] == hashlib.sha256(data).hexdigest() and manifest["engine_bytes"] == len(data)
    assert manifest["builder"]["strongly_typed"] is True and manifest["toolkit_version"]
    assert not list(plan.parent.glob(".*"))  # no temporary files left
    # the ONNX's weights identity travels with the engine, for the serving-side checkpoint check
    from step37_deploy.checkpoint import check_artifact_source
    from step37_deploy.export import read_metadata

    assert manifest["onnx_metadata"] == read_metadata(onnx_path)
    check_artifact_source(read_metadata(onnx_path)["source_checkpoint"], plan, manifest["onnx_metadata"])


def test_timing_cache_written_and_reused(engines, tmp_path):
    plan, _, onnx_path = engines[504]
    cache = plan.parent / "tc.cache"
    assert cache.is_file() and cache.stat().st_size > 0
    m = build_engine(
        onnx_path,
        tmp_path / "again.plan",
        BuildOptions(batch=(1, 1, 2), compute_capabilities=["8.9"], timing_cache=str(cache)),
    )
    assert m["builder"]["timing_cache"] == str(cache)


def test_fp32_graph_refused_for_fp16(exported, tmp_path):
    with pytest.raises(EngineError, match="FP32-typed graph"):
        build_engine(exported[("fp32", 504)], tmp_path / "x.plan", BuildOptions(compute_capabilities=["8.9"]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch", [(4, 2, 1), (0, 1, 2), (1, 3, 2)])
def test_bad_profile(exported, tmp_path, batch):
    with pytest.raises(EngineError, match="MIN <= OPT <= MAX"):
        build_engine(exported[("fp16", 504)], tmp_path / "x.plan", BuildOptions(batch=batch))


def test_unparsable_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a model" * 10)
    with pytest.raises(EngineError, match="bad.onnx"):
        build_engine(bad, tmp_path / "x.plan", BuildOptions(compute_capabilities=["8.9"]))
    # a well-formed ONNX model that TensorRT cannot parse (an op it does not know)
    x = onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT16, ["batch", 3, 28, 28])
    y = onnx.helper.make_tensor_value_info("image_features", onnx.TensorProto.FLOAT16, ["batch", 3, 28, 28])
    node = onnx.helper.make_node("NoSuchOp", ["pixel_values"], ["image_features"], domain="com.example")
    model = onnx.helper.make_model(
        onnx.helper.make_graph([node], "g", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("com.example", 1)],
    )
    model.metadata_props.add(key="step37.precision", value="fp16")
    weird = tmp_path / "weird.onnx"
    onnx.save(model, str(weird))
    with pytest.raises(EngineError, match="could not build .*weird.onnx"):
        build_engine(weird, tmp_path / "y.plan", BuildOptions(compute_capabilities=["8.9"]))
    assert not (tmp_path / "y.plan").exists()


def test_unknown_compute_capability(exported, tmp_path):
    with pytest.raises(EngineError, match="cannot target compute capability 9.0"):
        build_engine(exported[("fp16", 504)], tmp_path / "x.plan", BuildOptions(compute_capabilities=["9.0"]))


def _copy_engine(engines, tmp_path):
    plan, _, _ = engines[504]
    dst = tmp_path / plan.name
    shutil.copy(plan, dst)
    shutil.copy(manifest_path(plan), manifest_path(dst))
    return dst


def test_runner_refuses_missing_or_wrong_manifest(engines, tmp_path):
    from step37_deploy.backends.tensorrt import TensorRTRunner

    dst = _copy_engine(engines, tmp_path)
    manifest_path(dst).unlink()
    with pytest.raises(EngineError, match="has no manifest"):
        TensorRTRunner(dst)
    manifest_path(dst).write_text("{broken")
    with pytest.raises(EngineError, match="not readable JSON"):
        TensorRTRunner(dst)
    manifest_path(dst).write_text(json.dumps({"flavour": "tensorrt_rtx"}))
    with pytest.raises(EngineError, match="lacks"):
        TensorRTRunner(dst)


def test_runner_refuses_truncated_engine(engines, tmp_path):
    from step37_deploy.backends.tensorrt import TensorRTRunner

    dst = _copy_engine(engines, tmp_path)
    dst.write_bytes(dst.read_bytes()[:1000])
    with pytest.raises(EngineError, match="truncated"):
        TensorRTRunner(dst).activate()


def test_runner_refuses_other_trt_version(engines, tmp_path):
    from step37_deploy.backends.tensorrt import TensorRTRunner

    dst = _copy_engine(engines, tmp_path)
    m = json.loads(manifest_path(dst).read_text())
    m["trt_version"] = "1.0.0.1"
    manifest_path(dst).write_text(json.dumps(m))
    with pytest.raises(EngineError, match=rf"built with tensorrt_rtx 1.0.0.1 but tensorrt_rtx {rtx.__version__}"):
        TensorRTRunner(dst).activate()
    m["flavour"] = "tensorrt"
    manifest_path(dst).write_text(json.dumps(m))
    if detect_flavour("tensorrt") != "tensorrt":
        with pytest.raises(BackendUnavailable, match="tensorrt 1.0.0.1, which is not installed"):
            TensorRTRunner(dst).activate()


def test_runner_refuses_other_gpu(engines, monkeypatch):
    import step37_deploy.engine as eng

    plan, manifest, _ = engines[504]
    monkeypatch.setattr(eng, "_current_gpu", lambda: {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    with pytest.raises(EngineError, match=r"targets compute capability \['8.6', '8.9'\].*H100.*9.0"):
        check_runtime_compat(manifest, plan)
    monkeypatch.setattr(eng, "_current_gpu", lambda: None)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        check_runtime_compat(manifest, plan)


def test_cli_build_and_inspect(exported, tmp_path, capsys):
    plan = tmp_path / "cli.plan"
    rc = main(
        (
            f"build --onnx {exported[('fp16', 728)]} --out {plan}"
            f" --batch 1:2:3 --compute-capability 8.6 --workspace 1 --opt-level 2 -q"
        ).split()
    )
    assert rc == 0 and plan.is_file()
    capsys.readouterr()
    assert main(f"inspect {plan} -q".split()) == 0
    out = capsys.readouterr().out
    assert '"flavour": "tensorrt_rtx"' in out and "engine inspector not run" in out
    assert main(f"build --onnx {exported[('fp16', 728)]} --out {plan} --batch 3:2:1 -q".split()) == 2
    assert "MIN <= OPT <= MAX" in capsys.readouterr().err


@pytest.mark.gpu
def test_tensorrt_runner_executes(engines, exported):
    """Runs only where a CUDA GPU and the engine's TensorRT exist (never on CI's CPU machines)."""
    reason = _gpu_with_trt()
    if reason:
        pytest.skip(f"TensorRT execution needs a GPU and TensorRT: {reason}")
    import torch

    from step37_deploy.backends import OnnxrtRunner, session_from_onnx
    from step37_deploy.backends.tensorrt import TensorRTRunner
    from step37_deploy.compare import metrics, random_pixel_values

    plan, _, onnx_path = engines[504]
    try:
        runner = TensorRTRunner(plan).activate()
    except (EngineError, BackendUnavailable) as exc:
        pytest.skip(f"this GPU cannot run the SM86/SM89 test engine: {exc}")
    ort = OnnxrtRunner(session_from_onnx(onnx_path)).activate()
    x = random_pixel_values(6, 504, 0)  # > profile max 4: chunked
    ref = ort.infer(x)
    got = runner.infer(torch.from_numpy(x).cuda())
    assert got.is_cuda and got.shape == (6, 81, 256)
    assert metrics(ref, got.float().cpu().numpy())["cos_min"] > 0.999
    graphed = TensorRTRunner(plan, cuda_graph_batch=2).activate()
    x2 = torch.from_numpy(x[:2]).cuda()
    assert torch.allclose(graphed.infer(x2), runner.infer(x2), atol=1e-2)
    np.testing.assert_allclose(runner.infer(x[:1]), ref[:1], atol=5e-2)
