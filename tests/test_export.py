from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from step37_deploy import load_vision_model
from step37_deploy.backends import OnnxrtRunner, session_from_onnx
from step37_deploy.compare import metrics, random_pixel_values
from step37_deploy.errors import CheckpointError, ExportError, InputError, OutputError
from step37_deploy.export import export_onnx, read_metadata
from step37_deploy.synthetic import make_checkpoint

from .conftest import edit_config, rel_l2

TOKENS = {728: 169, 504: 81}


@pytest.fixture(scope="module")
def reference(tiny_fp32):
    return load_vision_model(tiny_fp32, "fp32")


@pytest.mark.parametrize("res", [728, 504])
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_onnx_matches_pytorch(exported, reference, res, batch):
    runner = OnnxrtRunner(session_from_onnx(exported[("fp32", res)])).activate()
    x = random_pixel_values(batch, res, seed=batch)
    got = runner.infer(x)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, TOKENS[res], 256) and got.dtype == np.float32
    assert rel_l2(got, ref) <= 1e-5


@pytest.mark.parametrize("res", [728, 504])
@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_onnx_cosine(exported, reference, res, batch):
    runner = OnnxrtRunner(session_from_onnx(exported[("fp16", res)])).activate()
    assert runner.input_spec().dtype == np.float16 and runner.output_spec().dtype == np.float16
    x = random_pixel_values(batch, res, seed=10 + batch)
    got = runner.infer(x)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    assert metrics(ref, got)["cos_min"] >= 0.9995


def test_onnx_matches_transformers_reference(exported, hf_model):
    """The exported graph against the independent implementation, not only against our module."""
    for res in (728, 504):
        x = random_pixel_values(2, res, seed=res)
        got = OnnxrtRunner(session_from_onnx(exported[("fp32", res)])).activate().infer(x)
        with torch.no_grad():
            ref = hf_model.vision_model(torch.from_numpy(x)).last_hidden_state.numpy()
        assert rel_l2(got, ref) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("res", [728, 504])
def test_graph_io_metadata_and_form(exported, tiny_fp32, precision, res):
    path = exported[(precision, res)]
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path))
    (inp,), (out,) = m.graph.input, m.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "pixel_values" and dims(inp) == ["batch", 3, res, res]
    assert out.name == "image_features" and dims(out) == ["batch", TOKENS[res], 256]
    want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == want
    meta = read_metadata(path)
    assert meta["precision"] == precision and meta["resolution"] == str(res) and meta["num_tokens"] == str(TOKENS[res])
    assert meta["source_checkpoint"] == str(Path(tiny_fp32).resolve()) and len(meta["vision_weights_sha256"]) == 64
    assert '"width": 64' in meta["vision_config"] and meta["toolkit_version"]
    ops = Counter(n.op_type for n in m.graph.node)
    # position signals resolved for the grid: no Resize of the table, no trig at run time
    assert ops["Resize"] == 0 and ops["Sin"] == 0 and ops["Cos"] == 0
    names = {i.name for i in m.graph.initializer}
    assert "positional_embedding" not in names and {"grid_posemb", "grid_rope_cos", "grid_rope_sin"} <= names
    # attention over all heads at once: one softmax and two attention matmuls per block
    assert ops["Softmax"] == 2
    # no materialised attention mask: no initializer is N x N
    n = (res // 14) ** 2
    assert not any(list(i.dims)[-2:] == [n, n] for i in m.graph.initializer)
    if precision == "fp16":
        big = [i for i in m.graph.initializer if np.prod(i.dims) >= 4096 and not i.name.startswith("grid_rope")]
        assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)


def test_external_data_file(tiny_fp32, reference, tmp_path):
    r = export_onnx(tiny_fp32, tmp_path, "fp32", 504, external_data=True)
    assert r.data_path and r.data_path.is_file() and r.data_path.stat().st_size >= 0.99 * r.weight_bytes
    assert r.onnx_path.stat().st_size < r.weight_bytes
    x = random_pixel_values(1, 504, 0)
    got = OnnxrtRunner(session_from_onnx(r.onnx_path)).activate().infer(x)
    with torch.no_grad():
        assert rel_l2(got, reference(torch.from_numpy(x)).numpy()) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([r.onnx_path.name, r.data_path.name])


def test_bf16_checkpoint_exports(tiny_bf16, tmp_path):
    r = export_onnx(tiny_bf16, tmp_path, "fp16", 504)
    ref = load_vision_model(tiny_bf16, "fp32")
    x = random_pixel_values(2, 504, 3)
    got = OnnxrtRunner(session_from_onnx(r.onnx_path)).activate().infer(x)
    with torch.no_grad():
        assert metrics(ref(torch.from_numpy(x)).numpy(), got)["cos_min"] >= 0.9995


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"opset": 11}, "opset 11 is not supported"),
        ({"resolution": 500}, "resolution 500 is not supported"),
        ({"resolution": 14}, "resolution 14 is not supported"),
        ({"precision": "int8"}, "precision must be one of"),
    ],
)
def test_bad_requests(tiny_fp32, tmp_path, kwargs, words):
    args = {"precision": "fp32", "resolution": 504, **kwargs}
    with pytest.raises(ExportError, match=words):
        export_onnx(tiny_fp32, tmp_path, **args)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tiny_fp32, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"{blocker} is not a directory"):
        export_onnx(tiny_fp32, blocker / "sub", "fp32", 504)


def test_config_disagrees_with_tensors(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", "tiny", dtype="fp32")
    edit_config(ck, width=128, layers=3)
    with pytest.raises(CheckpointError, match="disagrees") as err:
        export_onnx(ck, tmp_path / "out", "fp32", 504)
    msg = str(err.value)
    assert "resblocks.2" in msg and "conv1.weight" in msg
    assert not any(p.suffix in (".onnx", ".data") for p in (tmp_path / "out").rglob("*"))


def test_failure_midway_leaves_nothing(tiny_fp32, tmp_path, monkeypatch):
    import step37_deploy.export as ex

    calls = {"n": 0}
    real = ex.WeightSource.value

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk went away")
        return real(self, name)

    monkeypatch.setattr(ex.WeightSource, "value", flaky)
    with pytest.raises(ExportError, match="disk went away"):
        export_onnx(tiny_fp32, tmp_path, "fp32", 504, external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_runner_rejects_bad_input(exported):
    runner = OnnxrtRunner(session_from_onnx(exported[("fp32", 504)])).activate()
    with pytest.raises(InputError, match="504"):
        runner.infer(np.zeros((1, 3, 728, 728), np.float32))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        runner.infer(np.zeros((3, 504, 504), np.float32))
    with pytest.raises(InputError, match="floating point"):
        runner.infer(np.zeros((1, 3, 504, 504), np.int32))
    with pytest.raises(InputError, match="does not exist"):
        OnnxrtRunner(session_from_onnx("/nonexistent.onnx")).activate()


def test_cls_and_ln_post_config_exports(tmp_path):
    """The optional paths survive export: CLS row kept out of the resampled table, RoPE offset."""
    from step37_deploy.config import ProjectorConfig, Step37Config, VisionConfig

    cfg = Step37Config(
        vision=VisionConfig(width=64, layers=2, heads=4, mlp_ratio=2.0, use_cls_token=True, use_ln_post=True),
        projector=ProjectorConfig(256, 32, True),
        text_hidden_size=32,
    )
    ck = make_checkpoint(tmp_path / "cls", cfg=cfg, dtype="fp32")
    ref = load_vision_model(ck, "fp32")
    assert ref.config.use_cls_token and ref.config.use_ln_post
    for res in (728, 504):
        r = export_onnx(ck, tmp_path / "out", "fp32", res)
        x = random_pixel_values(2, res, seed=1)
        got = OnnxrtRunner(session_from_onnx(r.onnx_path)).activate().infer(x)
        with torch.no_grad():
            assert rel_l2(got, ref(torch.from_numpy(x)).numpy()) <= 1e-5
