"""``bench`` runs end to end and reports ratios (no timing is asserted: performance lives in the
benchmark's output, never in test assertions)."""

import json

from step37_deploy.cli import main


def test_bench_cli_reports_ratios(tiny_fp32, exported, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        (
            f"bench --checkpoint {tiny_fp32} --onnx {exported[('fp32', 504)]} --onnx {exported[('fp16', 504)]}"
            f" --torch fp32 --batch 2 --warmup 1 --iters 2 --insertion --json {out} -q"
        ).split()
    )
    assert rc == 0
    data = json.loads(out.read_text())
    names = [t["name"] for t in data["timings"]]
    assert names[0] == "torch-fp32-cpu" and names[1].startswith("onnxrt-cpu:") and data["resolution"] == 504
    assert data["timings"][0]["ratio_to_baseline"] == 1.0
    assert all(t["median_ms"] > 0 and 0 < t["extra"]["projector_share"] < 1 for t in data["timings"])
    assert data["notes"]["numpy insertion / memcpy bandwidth"] > 0
    assert "ratios are to the first row" in capsys.readouterr().out
