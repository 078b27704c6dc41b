"""Preprocessing parity with transformers' Step3p7ImageProcessor / Step3p7Processor.

The reference needs torchvision, which cannot load beside the CPU torch here, so its outputs for the
cases in ``preprocess_cases.py`` are recorded by ``scripts/record_preprocess_fixtures.py``.
Tolerance on pixel values: 1.2 uint8 levels in normalised units (the two bilinear implementations
round some pixels differently by one level; float16 storage adds < 0.001); mean abs error at most a third of that."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step37_deploy.config import TokenIds
from step37_deploy.errors import InputError
from step37_deploy.preprocess import CLIP_STD, image_layout, plan_patches, preprocess, to_rgb

from .preprocess_cases import CASES, synthetic_image

FIX = Path(__file__).parent / "fixtures"
META = json.loads((FIX / "step3p7_preprocess.json").read_text())
ARR = np.load(FIX / "step3p7_preprocess.npz")
STEP = META["step"]
TOL = 1.2 / 255 / float(CLIP_STD.min())


def test_fixtures_cover_the_plan():
    assert len(CASES) >= 30 and len(META["cases"]) == len(CASES)
    plans = [plan_patches(w, h) for w, h, _ in CASES]
    assert any(p.square_pad for p in plans) and any(p.window == 0 for p in plans)
    assert any(0 < p.window < 504 for p in plans) and any(p.window == 504 for p in plans)
    assert any(max(w, h) > 3024 for w, h, _ in CASES)
    assert any(p.num_y > 1 and p.num_x > 1 for p in plans)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{w}x{h}" for w, h, _ in CASES])
def test_matches_transformers(i):
    w, h, _ = CASES[i]
    ref = META["cases"][i]
    assert (ref["width"], ref["height"]) == (w, h)
    p = preprocess(synthetic_image(w, h))
    assert p.num_crops == ref["num_crops"] and p.newline_mask == ref["newline_mask"]
    text, ids = image_layout(p.num_crops, p.newline_mask, TokenIds())
    assert hashlib.sha256(text.encode()).hexdigest() == ref["text_sha256"] and len(text) == ref["text_len"]
    assert len(ids) == p.num_crops * 83 + sum(p.newline_mask) + 171
    assert p.global_view.shape == (3, 728, 728) and p.crops.shape == (p.num_crops, 3, 504, 504)
    diff = np.abs(p.global_view[:, ::STEP, ::STEP] - ARR[f"g{i}"].astype(np.float32))
    assert diff.max() <= TOL and diff.mean() < TOL / 3
    np.testing.assert_allclose(p.global_view.mean((1, 2)), ref["global_mean"], atol=1e-3)
    if p.num_crops:
        for j, key in ((0, "first"), (-1, "last")):
            d = np.abs(p.crops[j][:, ::STEP, ::STEP] - ARR[f"c{i}_{key}"].astype(np.float32))
            assert d.max() <= TOL and d.mean() < TOL / 3
        np.testing.assert_allclose(p.crops.mean((2, 3)), ref["crop_means"], atol=1e-3)


def test_layout_ids_use_the_checkpoint_tokens():
    tok = TokenIds(im_start=1, im_end=2, im_patch=3, patch_start=4, patch_end=5, patch_newline=6)
    text, ids = image_layout(4, [False, True, False, False], tok)
    assert ids[:2] == [4, 3] and ids[82] == 5 and ids[83] == 4 and ids[165] == 5 and ids[166] == 6 and ids[167] == 4
    assert ids[-171] == 1 and ids[-1] == 2 and ids.count(3) == 4 * 81 + 169
    assert text.count("<patch_newline>") == 1 and text.endswith("<im_end>")


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_modes_converted_like_the_reference():
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent -> white
    assert np.all(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))) == 255)
    assert np.all(np.asarray(to_rgb(rgba)) == 255)  # numpy path: same compositing
    half = rgba.copy()
    half[..., 3] = 128
    np.testing.assert_array_equal(
        np.asarray(to_rgb(half))[0, 0], np.round(128 / 255 * np.array([200, 0, 0]) + (1 - 128 / 255) * 255)
    )
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 0, 0))
    assert to_rgb(cmyk).mode == "RGB" and to_rgb(cmyk).getpixel((0, 0)) == cmyk.convert("RGB").getpixel((0, 0))
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(pal).getpixel((0, 0)) == (10, 20, 30)
    pal.info["transparency"] = 1
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.full((30, 30), 40000, np.uint16))
    # 16-bit: scaled to 8 bits (40000 * 255 / 65535 -> 156), where the reference's convert("RGB") clips to 255
    assert to_rgb(i16).getpixel((0, 0)) == (156, 156, 156) and i16.convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    gray = np.full((50, 70), 77, np.uint8)
    assert preprocess(gray).global_view.shape == (3, 728, 728)
    assert to_rgb(_png(Image.fromarray(rgba, "RGBA"))).getpixel((0, 0)) == (255, 255, 255)


def test_bad_images(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="bad.jpg"):
        preprocess(tmp_path / "bad.jpg")
    with pytest.raises(InputError, match="cannot read"):
        preprocess(tmp_path / "missing.png")
    with pytest.raises(InputError, match="zero size"):
        preprocess(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InputError, match="zero size"):
        plan_patches(0, 10)
    with pytest.raises(InputError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError, match=r"\(H, W\)"):
        preprocess(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(InputError, match="PIL"):
        preprocess(42)
