"""Record transformers' Step3p7ImageProcessor / Step3p7Processor outputs for tests/preprocess_cases.py
into tests/fixtures/ (run in an environment with torchvision, which the processor needs and which
the project's CPU torch cannot load beside it):

    python3 -m venv /tmp/tv && . /tmp/tv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 'transformers>=5.23' pillow numpy
    python scripts/record_preprocess_fixtures.py

Stored per case: crop count, newline mask, the processor's replacement string (its SHA-256 and
length), and the pixel values of the global view and of the first and last crop subsampled every
8th pixel (float16), plus per-view channel means over all pixels.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Step3p7ImageProcessor, Step3p7Processor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from preprocess_cases import CASES, synthetic_image  # noqa: E402

STEP = 8


def _tokenizer():
    """A word-level tokenizer that knows the six image tokens (the processor wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<im_start>", "<im_end>", "<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def main() -> None:
    ip = Step3p7ImageProcessor()
    proc = Step3p7Processor(image_processor=ip, tokenizer=_tokenizer())
    meta, arrays = [], {}
    for i, (w, h, branch) in enumerate(CASES):
        out = ip(images=[Image.fromarray(synthetic_image(w, h))], return_tensors="pt")
        n = int(out["num_local_patches"][0])
        mask = [bool(v) for v in out.get("patch_newline_masks", [[]])[0][:n]]
        text = proc.replace_image_token(out, 0)
        gv = out["pixel_values"][0].numpy()
        arrays[f"g{i}"] = gv[:, ::STEP, ::STEP].astype(np.float16)
        entry = {
            "width": w,
            "height": h,
            "branch": branch,
            "num_crops": n,
            "newline_mask": mask,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "text_len": len(text),
            "global_mean": gv.mean((1, 2)).tolist(),
        }
        if n:
            loc = out["pixel_values_local"].numpy()
            arrays[f"c{i}_first"] = loc[0][:, ::STEP, ::STEP].astype(np.float16)
            arrays[f"c{i}_last"] = loc[n - 1][:, ::STEP, ::STEP].astype(np.float16)
            entry["crop_means"] = loc.mean((2, 3)).tolist()
        meta.append(entry)
        print(w, h, n, branch)
    fx = ROOT / "tests" / "fixtures"
    fx.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(fx / "step3p7_preprocess.npz", **arrays)
    (fx / "step3p7_preprocess.json").write_text(json.dumps({"step": STEP, "cases": meta}, indent=1))


if __name__ == "__main__":
    main()
