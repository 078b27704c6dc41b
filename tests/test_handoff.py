"""Hand-off payloads: SGLang's ``/generate`` body and Megatron-Bridge's ``ImageForInsert`` groups.

SGLang: the expanded ``input_ids`` equal those of transformers' ``Step3p7Processor`` (the reference)
for the same images.  The reference's image processor needs torchvision, which does not load beside
the CPU torch here, so it is stood in for by the crop plans transformers recorded for these sizes
(``tests/fixtures/step3p7_preprocess.json``); the expansion and the tokenization are the processor's
own code.  Megatron: group shapes and RoPE fields for 0 and several crops, and inserting the groups
through the checkpoint's projector gives the same sequence as our own fusion of ``features``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from step37_deploy.checkpoint import load_projector
from step37_deploy.config import Step37Config
from step37_deploy.errors import InputError
from step37_deploy.fusion import insert_features, project
from step37_deploy.handoff import megatron, sglang
from step37_deploy.runtime import VisionEmbedder

from .conftest import rel_l2
from .preprocess_cases import CASES, synthetic_image

transformers = pytest.importorskip("transformers", minversion="5.23")

META = json.loads((Path(__file__).parent / "fixtures" / "step3p7_preprocess.json").read_text())
#: Sizes with no crops (incl. exactly 728), crops in one row, in a grid with newlines, tall, wide, huge.
SIZES = [(500, 400), (728, 728), (700, 300), (1000, 800), (1512, 1008), (400, 2400), (3000, 500), (4000, 3000)]
WORDS = ["[UNK]", "describe", "the", "image", "and", "compare", "it", "with", "this", "one", ".", "?"]


@pytest.fixture(scope="module")
def twin(tiny_fp32, exported):
    return VisionEmbedder.from_artifacts(tiny_fp32, "onnx", [exported[("fp32", 728)], exported[("fp32", 504)]])


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_fp32, tmp_path_factory):
    """A WordLevel tokenizer with the checkpoint's six image tokens at the checkpoint's ids, saved as a
    checkpoint ships it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = Step37Config.from_checkpoint(tiny_fp32).tokens.by_token()
    vocab = {w: i for i, w in enumerate(WORDS)} | special
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", additional_special_tokens=list(special)
    )
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def reference_processor(tokenizer, plans):
    """transformers' Step3p7Processor whose image processor answers the recorded crop plans."""
    from transformers.image_processing_utils import ImageProcessingMixin

    class RecordedPlans(ImageProcessingMixin):
        size: ClassVar[dict[str, int]] = {"height": 728, "width": 728}
        patch_size, vision_patch_size, downsampler_stride = 504, 14, 4

        def __call__(self, images, **kwargs):
            return transformers.BatchFeature(
                {
                    "num_local_patches": [p["num_crops"] for p in plans],
                    "patch_newline_masks": [p["newline_mask"] for p in plans],
                }
            )

    return transformers.Step3p7Processor(image_processor=RecordedPlans(), tokenizer=tokenizer)


def _case(w, h):
    i = [(cw, ch) for cw, ch, _ in CASES].index((w, h))
    return META["cases"][i]


# -- SGLang -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_sglang_input_ids_equal_the_processors(twin, tokenizer_dir, size):
    tok = sglang.load_tokenizer(tokenizer_dir)
    (e,) = twin.embed_images([synthetic_image(*size)])
    plan = _case(*size)
    assert (e.num_crops, e.newline_mask) == (plan["num_crops"], plan["newline_mask"])
    prompt = "describe <im_patch> the image ."
    body = sglang.generate_body(prompt, [e], tok, {"max_new_tokens": 8})
    ref = reference_processor(tok, [plan])(text=prompt, images=[Image.new("RGB", size)])
    assert body["input_ids"] == list(ref["input_ids"][0])
    (item,) = body["image_data"]
    assert item["format"] == "precomputed_embedding" and body["sampling_params"] == {"max_new_tokens": 8}
    rows = np.asarray(item["feature"], np.float32)
    np.testing.assert_array_equal(rows, e.features)
    assert rows.shape[0] == body["input_ids"].count(tok.convert_tokens_to_ids("<im_patch>"))


def test_sglang_several_images_concatenate_in_prompt_order(twin, tokenizer_dir):
    tok = sglang.load_tokenizer(tokenizer_dir)
    sizes = [(1000, 800), (500, 400), (400, 2400)]
    embs = twin.embed_images([synthetic_image(*s) for s in sizes])
    prompt = "compare <im_patch> with <im_patch> and <im_patch> ?"
    body = sglang.generate_body(prompt, embs, tok, as_json=False)
    ref = reference_processor(tok, [_case(*s) for s in sizes])(text=prompt, images=[Image.new("RGB", s) for s in sizes])
    assert body["input_ids"] == list(ref["input_ids"][0])
    (item,) = body["image_data"]
    np.testing.assert_array_equal(item["feature"], np.concatenate([e.features for e in embs]))
    # bfloat16 rows (EmbedClient.embed(dtype="bf16")): the JSON holds the floats they are
    half = [dataclasses.replace(e, features=torch.from_numpy(e.features).to(torch.bfloat16)) for e in embs]
    rows = sglang.generate_body(prompt, half, tok)["image_data"][0]["feature"]
    assert torch.equal(torch.tensor(rows), torch.cat([h.features for h in half]).float())


def test_sglang_refuses_what_would_misplace_rows(twin, tokenizer_dir, tiny_fp32):
    tok = sglang.load_tokenizer(tokenizer_dir)
    (e,) = twin.embed_images([synthetic_image(1000, 800)])
    with pytest.raises(InputError, match="2 <im_patch> placeholder"):
        sglang.generate_body("<im_patch> and <im_patch>", [e], tok)
    with pytest.raises(InputError, match="0 <im_patch> placeholder"):
        sglang.generate_body("no image here", [e], tok)
    shifted = [t + 1 for t in e.token_ids]  # a service whose checkpoint numbers the image tokens differently
    other = type(e)(e.features, shifted, e.text, e.num_crops, e.newline_mask)
    with pytest.raises(InputError, match="token ids the embedding carries"):
        sglang.generate_body("<im_patch>", [other], tok)
    vision_only = type(e)(None, e.token_ids, e.text, e.num_crops, e.newline_mask, e.features)
    with pytest.raises(InputError, match="features"):
        sglang.generate_body("<im_patch>", [vision_only], tok)
    assert "image_data" not in sglang.generate_body("describe the image .", [], tok)
    with pytest.raises(InputError, match="not a folder"):
        sglang.load_tokenizer(tiny_fp32 / "config.json")


def test_sglang_cli_against_the_service(tiny_server, tokenizer_dir, twin, tmp_path):
    img = tmp_path / "tall.png"
    Image.fromarray(synthetic_image(400, 2400)).save(img)
    out = tmp_path / "body.json"
    cmd = [sys.executable, "-m", "step37_deploy.cli", "handoff", "sglang", "--server", tiny_server.grpc_url]
    cmd += ["--tokenizer", str(tokenizer_dir), "--image", str(img), "--out", str(out), "-q"]
    run = subprocess.run([*cmd, "--prompt", "describe <im_patch> ."], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    body = json.loads(out.read_text())
    (e,) = twin.embed_images([img])
    want = sglang.generate_body("describe <im_patch> .", [e], sglang.load_tokenizer(tokenizer_dir))
    assert body["input_ids"] == want["input_ids"] and body["sampling_params"]["max_new_tokens"] == 128
    assert rel_l2(np.asarray(body["image_data"][0]["feature"]), e.features) <= 1e-5
    # bf16 rows: the served FP32 rows rounded as a bf16 LLM rounds them
    run = subprocess.run(
        [*cmd, "--prompt", "describe <im_patch> .", "--dtype", "bf16"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    got = torch.tensor(json.loads(out.read_text())["image_data"][0]["feature"])
    assert torch.equal(got, got.to(torch.bfloat16).float()) and rel_l2(got, e.features) <= 1e-2
    # one line, exit 2: a prompt without a placeholder; an --out that is not such a body
    run = subprocess.run([*cmd, "--prompt", "no image"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "placeholder" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    cmd[cmd.index(str(out))] = str(other)
    run = subprocess.run([*cmd, "--prompt", "<im_patch>"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "refusing" in run.stderr and json.loads(other.read_text()) == {"mine": 1}


# -- Megatron-Bridge -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "crops"), [((500, 400), 0), ((700, 300), 3), ((1000, 800), 4), ((1512, 1008), 6)])
def test_megatron_group_shapes(twin, size, crops):
    (e,) = twin.embed_images([synthetic_image(*size)], outputs=("vision_features",))
    assert e.num_crops == crops
    groups = megatron.image_groups(e)
    c = e.vision_features.shape[-1]
    glob = groups[-1]
    assert glob.insert_start_token == e.token_ids[-171] and glob.images is None
    assert tuple(glob.image_features.shape) == (1, 169, c)
    assert glob.rope_cu_seqlens.dtype == torch.int32 and glob.rope_cu_seqlens.tolist() == [0, 52 * 52]
    assert glob.rope_max_seq_len == 2704 and isinstance(glob.rope_max_seq_len, int)
    if crops == 0:
        assert len(groups) == 1  # as Megatron's data pipeline: no group for a kind without views
        return
    crop = groups[0]
    assert len(groups) == 2 and crop.insert_start_token == e.token_ids[0] != glob.insert_start_token
    assert tuple(crop.image_features.shape) == (crops, 81, c)
    assert crop.rope_cu_seqlens.tolist() == [36 * 36 * k for k in range(crops + 1)] and crop.rope_max_seq_len == 1296
    np.testing.assert_array_equal(crop.image_features.reshape(-1, c).numpy(), e.vision_features[: crops * 81])
    assert list(crop.as_kwargs()) == [
        "insert_start_token",
        "images",
        "image_features",
        "rope_cu_seqlens",
        "rope_max_seq_len",
    ]


def test_megatron_groups_insert_like_our_fusion(twin, tiny_fp32):
    """Projecting each group with the checkpoint's projector and inserting its k-th view at the k-th
    flag (Megatron's insert_features) gives the sequence our fusion of ``features`` gives."""
    sizes = [(1000, 800), (500, 400), (700, 300)]
    embs = twin.embed_images([synthetic_image(*s) for s in sizes], outputs=("features", "vision_features"))
    groups = megatron.sequence_groups(embs, dtype=torch.float32)
    assert [tuple(g.image_features.shape[:2]) for g in groups] == [(7, 81), (3, 169)]
    p = load_projector(tiny_fp32, "fp32")
    w, b = p.weight.detach().numpy(), (p.bias.detach().numpy() if p.bias is not None else None)
    ids = np.asarray([[7, *(t for e in embs for t in [*e.token_ids, 8])]])
    hidden = w.shape[0]
    text = np.random.default_rng(0).standard_normal((ids.shape[1], 1, hidden)).astype(np.float32)
    ours = twin.fuse(ids, text, embs)
    theirs = text
    for g in groups:
        views = [project(v.numpy(), w, b) for v in g.image_features]
        theirs = insert_features(theirs, views, ids, g.insert_start_token)
    assert rel_l2(theirs, ours) <= 1e-6
    with pytest.raises(InputError, match="vision_features"):
        megatron.image_groups(twin.embed_images([synthetic_image(300, 300)])[0])
    assert megatron.sequence_groups([]) == []
    assert megatron.image_groups(embs[0], dtype=torch.bfloat16)[0].image_features.dtype == torch.bfloat16
