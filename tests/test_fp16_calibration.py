"""FP16 that cannot silently break: activation-range calibration at export, the stress checkpoint
with massive activations, and ``compare --per-block`` (issue 12).  All on ONNX Runtime CPU."""

import json

import numpy as np
import onnx
import pytest
import torch

from step37_deploy import checkpoint as checkpoint_mod
from step37_deploy import load_vision_model
from step37_deploy.backends import OnnxrtRunner, TorchRunner, session_from_onnx
from step37_deploy.calibrate import FP16_MAX, measure_ranges, threshold
from step37_deploy.cli import main
from step37_deploy.compare import (
    case_views,
    compare,
    first_divergent_block,
    metrics,
    per_block,
    random_pixel_values,
    random_views,
)
from step37_deploy.config import Step37Config
from step37_deploy.errors import InputError
from step37_deploy.export import export_onnx, read_metadata
from step37_deploy.model import PrecisionPolicy, Step37VisionModel
from step37_deploy.synthetic import massive_channels

RES = 504


def _features(onnx_path, x):
    return OnnxrtRunner(session_from_onnx(onnx_path)).activate().infer(x)


def test_stress_checkpoint_has_massive_channels(massive):
    ck, _, _, ref = massive
    cfg = Step37Config.from_checkpoint(ck)
    block, channels = massive_channels(cfg)
    outs = []
    hook = ref.transformer.resblocks[block].register_forward_hook(lambda m, a, y: outs.append(y))
    with torch.no_grad():
        ref(torch.from_numpy(random_pixel_values(1, RES, 0)))
    hook.remove()
    peak = outs[0].abs().amax(dim=(0, 1))  # per channel
    assert set(torch.nonzero(peak > 2 * FP16_MAX).flatten().tolist()) == set(channels)
    assert float(peak.median()) < 10  # a few channels, the rest ordinary


def test_without_calibration_fp16_overflows_in_onnxruntime(massive):
    _, plain, _, ref = massive
    x = random_pixel_values(2, RES, 7)
    got = _features(plain, x)
    with torch.no_grad():
        m = metrics(ref(torch.from_numpy(x)).numpy(), got)
    assert not np.isfinite(got).all() or m["cos_min"] < 0.9995
    assert json.loads(read_metadata(plain)["fp16_protection"])["calibrated"] is False


def test_per_block_names_the_block_where_the_channel_leaves_fp16(massive):
    ck, plain, _, ref = massive
    block, _ = massive_channels(Step37Config.from_checkpoint(ck))
    result = per_block(plain, ref, random_views(1, RES, 1))
    rows = result["per_block"]
    first_over = next(r["block"] for r in rows if r["max_abs"] > FP16_MAX)
    assert first_over == block == result["first_divergent_block"]
    # the overflow is real in the FP16 graph: Inf in the block's FP16 output, not only in theory
    assert rows[block]["finite"] is False and rows[block]["max_abs_onnx"] == float("inf")
    assert all(r["finite"] and r["rel_l2"] < 1e-2 for r in rows[:block])


def test_calibrated_export_protects_and_passes(massive):
    ck, _, calibrated, ref = massive
    meta = read_metadata(calibrated)
    protection = json.loads(meta["fp16_protection"])
    ranges = json.loads(meta["activation_ranges"])
    block, _ = massive_channels(Step37Config.from_checkpoint(ck))
    layers = len(ranges["blocks"])
    assert protection["calibrated"] and protection["residual_fp32_blocks"] == [block, layers]
    assert protection["downsampler_scales"][0] >= ranges["downsampler_inputs"][0] / threshold() > 1
    assert protection["reasons"] and protection["unprotected"] == []
    assert ranges["blocks"][block]["residual"] > FP16_MAX > ranges["blocks"][block - 1]["residual"]
    assert json.loads(meta["precision_policy"])["residual_fp32_blocks"] == [block, layers]
    runner = OnnxrtRunner(session_from_onnx(calibrated), name="calibrated")
    report = compare(TorchRunner(ref), [runner], *_projector(ck), [1, 2], [RES])
    assert report.passed and min(r.features["cos_min"] for r in report.rows) >= 0.9995
    assert per_block(calibrated, ref, random_views(1, RES, 1))["first_divergent_block"] is None


def _projector(ck):
    from step37_deploy.checkpoint import load_projector

    p = load_projector(ck, "fp32")
    return p.weight.numpy(), None if p.bias is None else p.bias.numpy()


@pytest.mark.parametrize("block", [0, 1])
def test_per_block_names_a_perturbed_block(exported, tiny_fp32, tmp_path, block):
    src = exported[("fp16", RES)]
    model = onnx.load(str(src))
    (w,) = [i for i in model.graph.initializer if i.name == f"transformer.resblocks.{block}.mlp.c_proj.weight"]
    arr = onnx.numpy_helper.to_array(w)
    w.CopyFrom(onnx.numpy_helper.from_array(-arr, w.name))  # the block's MLP branch, sign flipped
    broken = tmp_path / src.name
    onnx.save(model, str(broken))
    ref = load_vision_model(tiny_fp32, "fp32")
    x = random_views(1, RES, 2)
    assert per_block(broken, ref, x)["first_divergent_block"] == block
    before, listing = src.read_bytes(), sorted(src.parent.iterdir())
    assert per_block(src, ref, x)["first_divergent_block"] is None
    assert src.read_bytes() == before and sorted(src.parent.iterdir()) == listing  # the user's file only read


def test_first_divergent_block_rule():
    row = lambda i, e, finite=True: {"block": i, "rel_l2": e, "finite": finite}  # noqa: E731
    creeping = [row(i, 4e-4 * 1.5**i) for i in range(8)]  # FP16 rounding accumulating: no jump
    assert first_divergent_block(creeping) is None
    assert first_divergent_block([row(0, 5e-4), row(1, 6e-4), row(2, 2e-2), row(3, 3e-2)]) == 2
    assert first_divergent_block([row(0, 5e-4), row(1, float("inf"), finite=False)]) == 1
    assert first_divergent_block([row(0, 5e-2)]) == 0  # the floor: 10x one block's FP16 rounding


def test_ordinary_checkpoint_calibrated_graph_is_todays(tiny_fp32, exported, tmp_path):
    """Calibration changes nothing on Gaussian-like weights: same nodes, same initializers."""
    plain = export_onnx(tiny_fp32, tmp_path, "fp16", RES, calibrate=False).onnx_path
    a, b = onnx.load(str(exported[("fp16", RES)])), onnx.load(str(plain))
    nodes = lambda m: [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    assert nodes(a) == nodes(b)
    inits = lambda m: {i.name: (i.data_type, list(i.dims), i.raw_data) for i in m.graph.initializer}  # noqa: E731
    assert inits(a) == inits(b)
    protection = json.loads(read_metadata(exported[("fp16", RES)])["fp16_protection"])
    assert protection["calibrated"] and protection["residual_fp32_blocks"] is None and not protection["reasons"]
    assert json.loads(read_metadata(exported[("fp16", RES)])["block_outputs"])


def test_calibration_streams_each_vision_tensor_once(massive, monkeypatch):
    ck, _, _, _ = massive
    reads = []
    monkeypatch.setattr(checkpoint_mod, "_read_hook", reads.append)
    refs = checkpoint_mod.vision_refs(ck)
    ranges = measure_ranges(Step37Config.from_checkpoint(ck), refs, random_pixel_values(1, RES, 0))
    assert sorted(reads) == sorted(r.key for r in refs.values())  # each once, nothing else
    assert len(ranges.blocks) == 2 and ranges.downsampler_inputs[0] == ranges.blocks[-1]["residual"]


def test_downsampler_rescale_is_exact():
    """scale * conv(x / scale, W, b / scale) == conv(x, W, b) for a power-of-two scale."""
    from step37_deploy.config import preset

    torch.manual_seed(0)
    model = Step37VisionModel(preset("tiny").vision).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        want = model(x)
        got = model.set_precision_policy(PrecisionPolicy(downsampler_scales=(64.0, 8.0)))(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_cli_stress_checkpoint_export_and_per_block_json(tmp_path, capsys, caplog):
    ck = tmp_path / "ck"
    assert main(f"make-checkpoint --preset tiny --massive-activations --out {ck} -q".split()) == 0
    assert json.loads((ck / "synthetic.json").read_text())["massive_activations"] is True
    assert main(f"export --checkpoint {ck} --out {tmp_path / 'o'} --resolution {RES} --no-calibrate -q".split()) == 0
    assert "without activation-range calibration" in caplog.text
    onnx_path = tmp_path / "o" / f"step37_vision_fp16_{RES}.onnx"
    report = tmp_path / "r.json"
    args = f"compare --checkpoint {ck} --onnx {onnx_path} --batch 1 --per-block --json {report} -q"
    assert main(args.split()) == 1  # the accuracy check fails ...
    out = capsys.readouterr().out
    d = json.loads(report.read_text())
    assert d["first_divergent_block"] == 1 and "first divergent block: 1" in out  # ... and says where
    assert [r["block"] for r in d["per_block"]] == [0, 1] and d["per_block"][1]["max_abs"] > FP16_MAX


def test_cli_errors(exported, tiny_fp32, tmp_path, capsys):
    two = f"--onnx {exported[('fp16', RES)]} --onnx {exported[('fp32', RES)]}"
    assert main(f"compare --checkpoint {tiny_fp32} {two} --per-block -q".split()) == 2
    assert "--per-block compares one ONNX file" in capsys.readouterr().err
    missing = tmp_path / "nope.png"
    assert main(f"export --checkpoint {tiny_fp32} --out {tmp_path} --calibrate {missing} -q".split()) == 2
    assert "nope.png" in capsys.readouterr().err and not list(tmp_path.glob("*.onnx"))


def test_per_block_refuses_file_without_block_outputs(exported, tiny_fp32, tmp_path):
    model = onnx.load(str(exported[("fp16", RES)]))
    kept = [p for p in model.metadata_props if p.key != "step37.block_outputs"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    with pytest.raises(InputError, match="does not name its block outputs"):
        per_block(old, load_vision_model(tiny_fp32, "fp32"), case_views(RES, 1, 0))
