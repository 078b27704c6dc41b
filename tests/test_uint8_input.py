"""uint8-input artifacts: the CLIP normalisation folded into conv1, the uint8 host path, and every
consumer (runners, compare, the in-process embedder) feeding each artifact the dtype it declares."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from step37_deploy import load_projector, load_vision_model
from step37_deploy.backends import OnnxrtRunner, TorchRunner, load_torch_model, session_from_onnx
from step37_deploy.cli import main
from step37_deploy.compare import compare, random_views, views_for
from step37_deploy.errors import ExportError, InputError
from step37_deploy.export import export_onnx, read_metadata
from step37_deploy.model import fold_normalisation
from step37_deploy.preprocess import (
    CLIP_STD,
    PreprocessConfig,
    _preprocess_before_uint8,
    _shared_pass,
    normalise,
    normalise_views,
    preprocess,
)
from step37_deploy.runtime import VisionEmbedder

from .conftest import rel_l2
from .preprocess_cases import CASES, synthetic_image


def _ort(path) -> OnnxrtRunner:
    return OnnxrtRunner(session_from_onnx(path)).activate()


@pytest.mark.parametrize("res", [728, 504])
@pytest.mark.parametrize("batch", [1, 3])
def test_uint8_fp32_onnx_equals_float_onnx_and_transformers(exported, exported_uint8, hf_model, res, batch):
    u8 = random_views(batch, res, seed=100 + batch + res)
    x = normalise_views(u8)
    got = _ort(exported_uint8[("fp32", res)]).infer(u8)
    float_onnx = _ort(exported[("fp32", res)]).infer(x)
    with torch.no_grad():
        ref = hf_model.vision_model(torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == float_onnx.shape == (batch, 169 if res == 728 else 81, 256)
    assert rel_l2(got, float_onnx) <= 1e-6
    assert rel_l2(got, ref) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_takes_uint8_and_carries_the_fold(exported, exported_uint8, tiny_fp32, precision):
    path = exported_uint8[(precision, 504)]
    assert path.name == f"step37_vision_{precision}_504_uint8.onnx"
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == want
    assert read_metadata(path)["input_dtype"] == "uint8"
    assert read_metadata(exported[(precision, 504)])["input_dtype"] == ("float16" if precision == "fp16" else "float32")
    inits = {i.name: i for i in m.graph.initializer}
    assert "conv1.weight" not in inits  # replaced by the folded weight, not kept beside it
    # The fold's values come from the export's lazy WeightSource (the traced model is on the meta
    # device): they must equal the fold of the checkpoint's conv1, in FP32 under the default policy.
    weight, bias = fold_normalisation(load_vision_model(tiny_fp32, "fp32").conv1.weight)
    for name, expected in (("input_fold.weight", weight), ("input_fold.bias", bias)):
        assert inits[name].data_type == onnx.TensorProto.FLOAT
        np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), expected.numpy())


def test_fold_is_the_normalisation():
    """conv((x/255 - mean)/std, W) == conv(x, W') + b, checked in FP64 on random weights and pixels."""
    from step37_deploy.preprocess import CLIP_MEAN, CLIP_STD

    w = torch.randn(8, 3, 14, 14, dtype=torch.float64)
    x = torch.randint(0, 256, (2, 3, 28, 42), dtype=torch.uint8)
    xn = (x.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD, dtype=torch.float64
    ).view(1, 3, 1, 1)
    wf, bf = fold_normalisation(w)
    ref = torch.nn.functional.conv2d(xn, w, stride=14)
    got = torch.nn.functional.conv2d(x.double(), wf.double(), stride=14) + bf.double()[:, None, None]
    assert rel_l2(got, ref) < 1e-6  # FP32-rounded folded weights; exact up to that rounding


def test_fp16_uint8_graph_passes_compare(tiny_fp32, exported_uint8):
    ref = TorchRunner(load_torch_model(str(tiny_fp32)), name="torch-fp32")
    w = load_projector(tiny_fp32).weight.detach().numpy()
    runners = [OnnxrtRunner(session_from_onnx(exported_uint8[("fp16", r)]), name=f"u8-fp16-{r}") for r in (728, 504)]
    runners.append(OnnxrtRunner(session_from_onnx(exported_uint8[("fp32", 504)]), name="u8-fp32-504"))
    report = compare(ref, runners, w, None, [1, 3])
    assert len(report.rows) == 6 and report.passed
    for row in report.rows:
        assert row.precision == ("fp32" if row.backend == "u8-fp32-504" else "fp16")
        assert row.features["cos_min"] >= 0.9995 and row.projected["cos_min"] >= 0.9995
        if row.precision == "fp32":
            assert row.features["rel_l2"] <= 1e-5


def test_cli_compare_on_a_uint8_graph(tiny_fp32, exported_uint8, capsys):
    rc = main(["compare", "--checkpoint", str(tiny_fp32), "--onnx", str(exported_uint8[("fp16", 504)]), "-q"])
    assert rc == 0 and "PASS" in capsys.readouterr().out


def test_runners_check_the_declared_dtype(tiny_fp32, exported, exported_uint8):
    u8_runner = _ort(exported_uint8[("fp16", 504)])
    assert u8_runner.input_spec().dtype == np.uint8 and u8_runner.precision == "fp16"
    u8 = random_views(1, 504, 0)
    with pytest.raises(InputError, match="uint8 pixels"):
        u8_runner.infer(normalise_views(u8))  # normalised floats sent to a uint8 graph
    with pytest.raises(InputError, match="floating point"):
        _ort(exported[("fp32", 504)]).infer(u8)  # raw pixels sent to a float graph
    assert views_for(u8_runner, u8) is u8
    assert views_for(_ort(exported[("fp16", 504)]), u8).dtype == np.float16


def test_torch_model_with_uint8_input(tiny_fp32):
    """The eager model's switch: uint8 views in, the fold inside, same features as the float model."""
    runner = TorchRunner(load_torch_model(str(tiny_fp32), uint8_input=True)).activate()
    float_model = load_vision_model(tiny_fp32, "fp32")
    assert runner.input_spec().dtype == np.uint8 and runner.output_spec().dtype == np.float32
    u8 = random_views(2, 504, 1)
    with torch.no_grad():
        ref = float_model(torch.from_numpy(normalise_views(u8))).numpy()
    assert rel_l2(runner.infer(u8), ref) <= 3e-6  # measured 1.3e-6: FP32 rounding of two computation orders
    with pytest.raises(InputError, match="uint8"):
        runner.model(torch.from_numpy(normalise_views(u8)))
    fp16 = load_vision_model(tiny_fp32, "fp16").set_uint8_input()
    assert fp16.input_fold.weight.dtype == torch.float32  # the default policy keeps the fold in FP32


def test_export_refuses_an_unknown_input_kind(tiny_fp32, tmp_path):
    with pytest.raises(ExportError, match="--input"):
        export_onnx(tiny_fp32, tmp_path, "fp32", 504, input_kind="int8")
    assert list(tmp_path.iterdir()) == []


# -- host path -------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 7, 13, 20, 22, 31, 33], ids=lambda i: f"{CASES[i][0]}x{CASES[i][1]}")
def test_uint8_views_are_the_float_views_before_normalisation(i):
    """uint8 views == the float views before normalisation; the new float path == the old one, but
    for the global view of images that share the horizontal pass (within one level there: the
    second horizontal pass runs before the first vertical one; the recorded-fixture parity of the
    float path is tests/test_preprocess.py); FP16 is the FP32 path rounded once; two threads give
    the same bytes as one."""
    img = synthetic_image(*CASES[i][:2])
    u8 = preprocess(img, pixel_dtype="uint8")
    f32 = preprocess(img)
    f16 = preprocess(img, pixel_dtype="float16")
    before = _preprocess_before_uint8(img)
    two = preprocess(img, PreprocessConfig(threads=2), pixel_dtype="float16")
    np.testing.assert_array_equal(two.global_view, f16.global_view)
    np.testing.assert_array_equal(two.crops, f16.crops)
    shared = _shared_pass(Image.fromarray(img), u8.plan) is not None
    assert shared == (CASES[i][:2] == (3025, 1000))  # of these cases, the one large enough to share it
    level = 1 / 255 / float(CLIP_STD.min())
    assert u8.global_view.dtype == np.uint8 and u8.crops.dtype == np.uint8 and f16.crops.dtype == np.float16
    assert u8.plan == f32.plan == before.plan and u8.newline_mask == before.newline_mask
    for a, b, c, d in (
        (u8.global_view, f32.global_view, f16.global_view, before.global_view),
        (u8.crops, f32.crops, f16.crops, before.crops),
    ):
        assert a.shape == b.shape == c.shape == d.shape
        np.testing.assert_array_equal(normalise_views(a), b)
        np.testing.assert_array_equal(normalise_views(a, np.float16), c)
        np.testing.assert_array_equal(b.astype(np.float16), c)
        moved = shared and a is u8.global_view
        # same pixels (the arithmetic differs by an ulp), or at most one level apart on the moved pass
        np.testing.assert_allclose(b, d, rtol=0, atol=level + 1e-6 if moved else 1e-6)
        assert not moved or np.abs(b - d).max() > level / 2  # the case does take the moved pass
    # and the old arithmetic on the uint8 views themselves (channels last) gives the same numbers
    np.testing.assert_allclose(normalise(u8.global_view.transpose(1, 2, 0)), f32.global_view, rtol=0, atol=1e-6)


def test_preprocess_rejects_unknown_pixel_dtype():
    with pytest.raises(InputError, match="pixel_dtype"):
        preprocess(synthetic_image(30, 30), pixel_dtype="int8")
    with pytest.raises(InputError, match="uint8"):
        normalise_views(np.zeros((3, 4, 4), np.float32))


# -- in-process embedder ---------------------------------------------------------------------------


def test_embedder_sends_uint8_views_to_uint8_towers(tiny_fp32, exported, exported_uint8, monkeypatch):
    import step37_deploy.runtime as rt

    images = [synthetic_image(1000, 800), synthetic_image(300, 300)]
    u8 = VisionEmbedder.from_artifacts(tiny_fp32, "onnx", [exported_uint8[("fp32", r)] for r in (728, 504)])
    fl = VisionEmbedder.from_artifacts(tiny_fp32, "onnx", [exported[("fp32", r)] for r in (728, 504)])
    assert u8.pixel_dtype == "uint8" and fl.pixel_dtype == "float32"
    seen = []
    real = rt.preprocess
    monkeypatch.setattr(
        rt, "preprocess", lambda im, cfg, pixel_dtype: seen.append(pixel_dtype) or real(im, cfg, pixel_dtype)
    )
    a, b = u8.embed_images(images), fl.embed_images(images)
    assert seen == ["uint8", "uint8", "float32", "float32"]
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and rel_l2(x.features, y.features) <= 1e-5
    # a uint8 global tower beside a float crop tower: uint8 views, normalised for the float one
    mixed = VisionEmbedder.from_artifacts(tiny_fp32, "onnx", [exported_uint8[("fp32", 728)], exported[("fp32", 504)]])
    assert mixed.pixel_dtype == "uint8"
    for x, y in zip(mixed.embed_images(images), b, strict=True):
        assert rel_l2(x.features, y.features) <= 1e-5


def test_rtx_builds_the_fp16_uint8_graph_for_sm89(exported_uint8, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install '.[rtx]') is needed to build engines")
    from step37_deploy.engine import BuildOptions, _polygraphy_trt, build_engine, read_manifest

    onnx_path = exported_uint8[("fp16", 504)]
    plan = tmp_path / "u8.plan"
    manifest = build_engine(
        onnx_path, plan, BuildOptions(batch=(1, 2, 4), compute_capabilities=["8.9"], flavour="tensorrt_rtx")
    )
    assert read_manifest(plan) == manifest and plan.stat().st_size == manifest["engine_bytes"] > 10_000
    assert manifest["targets"]["compute_capabilities"] == ["8.9"] and manifest["precision"] == "fp16"
    assert manifest["inputs"] == {"pixel_values": {"dtype": "uint8", "shape": ["batch", 3, 504, 504]}}
    assert manifest["outputs"]["image_features"]["dtype"] == "float16"
    # the network TensorRT built from: a uint8 network input (cast inside), FP16 output
    pgtrt = _polygraphy_trt("tensorrt_rtx")
    _builder, network, _parser = pgtrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    import tensorrt_rtx as trt

    assert network.get_input(0).dtype == trt.uint8 and network.get_output(0).dtype == trt.float16
