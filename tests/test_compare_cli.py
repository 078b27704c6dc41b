import json

import numpy as np
import pytest

from step37_deploy.backends import OnnxrtRunner, TorchRunner, load_torch_model, session_from_onnx
from step37_deploy.backends.base import Runner
from step37_deploy.cli import main
from step37_deploy.compare import Thresholds, check, compare, metrics
from step37_deploy.errors import ThresholdError


def test_metrics_arithmetic():
    ref = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    got = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    m = metrics(ref, got)
    assert m["cos_min"] == pytest.approx(1.0) and m["max_abs"] == pytest.approx(1.0)
    assert m["rel_l2"] == pytest.approx(1.0 / np.sqrt(5))
    m = metrics(ref, np.array([[[0.0, 1.0], [0.0, 2.0]]]))
    assert m["cos_min"] == pytest.approx(0.0) and m["cos_mean"] == pytest.approx(0.5)
    assert np.isnan(metrics(ref, np.full_like(ref, np.nan))["cos_min"])


class NoisyRunner(Runner):
    """Wraps a runner and adds noise: the report must catch it."""

    def __init__(self, inner, scale):
        super().__init__()
        self.inner, self.scale, self.name = inner, scale, f"noisy-{scale}"

    def _activate(self):
        self.inner.activate()

    def input_spec(self):
        return self.inner.input_spec()

    def output_spec(self):
        return self.inner.output_spec()

    def infer(self, x):
        y = self.inner.infer(x)
        return y + self.scale * np.random.default_rng(0).standard_normal(y.shape).astype(y.dtype)


def test_compare_report_and_thresholds(tiny_fp32, exported, tmp_path):
    ref = TorchRunner(load_torch_model(str(tiny_fp32)), name="torch-fp32")
    proj = load_torch_model(str(tiny_fp32))  # noqa: F841 - loader is lazy; nothing loaded
    from step37_deploy import load_projector

    w = load_projector(tiny_fp32).weight.detach().numpy()
    good = OnnxrtRunner(session_from_onnx(exported[("fp16", 504)]), name="ort-fp16")
    bad = NoisyRunner(OnnxrtRunner(session_from_onnx(exported[("fp32", 504)])), 0.5)
    report = compare(ref, [good, bad], w, None, [1, 2])
    assert [(r.backend, r.batch) for r in report.rows] == [
        ("ort-fp16", 1),
        ("ort-fp16", 2),
        ("noisy-0.5", 1),
        ("noisy-0.5", 2),
    ]
    assert all(r.passed for r in report.rows[:2]) and not any(r.passed for r in report.rows[2:])
    assert report.rows[0].thresholds == Thresholds(0.9995, 3e-2)
    assert "FAIL" in report.table() and "PASS" in report.table()
    with pytest.raises(ThresholdError, match="noisy-0.5@504x1"):
        check(report)
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["rows"][0]["projected"]["cos_min"] > 0.999


def test_cli_compare_exit_status(tiny_fp32, exported, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(
        (
            f"compare --checkpoint {tiny_fp32} --onnx {exported[('fp32', 728)]}"
            f" --onnx {exported[('fp16', 504)]} --batch 1 --json {out} --quiet"
        ).split()
    )
    assert rc == 0 and json.loads(out.read_text())["passed"] is True
    assert "onnxrt-cpu:step37_vision_fp32_728.onnx" in capsys.readouterr().out
    rc = main(
        (
            f"compare --checkpoint {tiny_fp32} --onnx {exported[('fp16', 504)]}"
            f" --batch 1 --cos-min 0.9999999999 --rel-l2 1e-9 --quiet"
        ).split()
    )
    assert rc == 1


def test_cli_pipeline_and_errors(tiny_fp32, tmp_path, capsys):
    out = tmp_path / "engines"
    rc = main(f"pipeline --checkpoint {tiny_fp32} --out {out} --batch 1 --batch 3 --quiet".split())
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    for p in ("fp32", "fp16"):
        for r in (728, 504):
            assert f"step37_vision_{p}_{r}.onnx" in names
    report = json.loads((out / "accuracy_report.json").read_text())
    assert report["passed"] and len(report["rows"]) >= 8
    assert {r["batch"] for r in report["rows"]} == {1, 3}
    capsys.readouterr()
    assert main(f"export --checkpoint {tiny_fp32} --out {tmp_path} --resolution 500 -q".split()) == 2
    assert "resolution 500 is not supported" in capsys.readouterr().err


def test_cli_make_checkpoint(tmp_path, capsys):
    assert main(f"make-checkpoint --preset tiny --out {tmp_path / 'c'} --shards 3 -q".split()) == 0
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    assert main(f"make-checkpoint --preset tiny --out {tmp_path / 'c'} -q".split()) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_export_precision_options(tiny_fp32, tmp_path):
    from step37_deploy.export import read_metadata

    out = tmp_path / "o"
    assert (
        main(f"export --checkpoint {tiny_fp32} --out {out} --resolution 504 --fp32-residual --fp16-softmax -q".split())
        == 0
    )
    policy = json.loads(read_metadata(out / "step37_vision_fp16_504.onnx")["precision_policy"])
    assert policy == {
        "layernorm_fp32": True,
        "softmax_fp32": False,
        "rope_fp32": True,
        "residual_fp32": True,
        "residual_fp32_blocks": None,
        "downsampler_scales": [1.0, 1.0],
        "input_fold_fp32": True,
    }


def test_compare_with_image_files(tiny_fp32, exported, tmp_path):
    from PIL import Image

    from step37_deploy.compare import image_files_pixel_values
    from step37_deploy.preprocess import preprocess

    from .preprocess_cases import synthetic_image

    paths = []
    for i, (w, h) in enumerate([(1000, 800), (300, 300)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(synthetic_image(w, h)).save(paths[-1])
    g = image_files_pixel_values(paths, 728, 3)
    np.testing.assert_array_equal(g[0], preprocess(paths[0]).global_view)
    np.testing.assert_array_equal(g[2], g[0])  # repeated to fill the batch
    c = image_files_pixel_values(paths, 504, 5)  # 4 crops of the first image, then a resized second
    np.testing.assert_array_equal(c[:4], preprocess(paths[0]).crops)
    assert c.shape == (5, 3, 504, 504)
    rc = main(
        [
            *f"compare --checkpoint {tiny_fp32} --onnx {exported[('fp16', 504)]} --batch 2 -q --images".split(),
            *map(str, paths),
        ]
    )
    assert rc == 0


def test_runner_precision_drives_thresholds(tiny_fp32):
    from step37_deploy import load_projector

    w = load_projector(tiny_fp32).weight.detach().numpy()
    ref = TorchRunner(load_torch_model(str(tiny_fp32)), name="ref")
    runners = [TorchRunner(load_torch_model(str(tiny_fp32), d), name=d) for d in ("fp32", "fp16", "bf16")]
    report = compare(ref, runners, w, None, [1], [504])
    assert [r.precision for r in report.rows] == ["fp32", "fp16", "bf16"]
    assert all(r.passed for r in report.rows), report.table()
