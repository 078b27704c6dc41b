"""Projector and insertion: numpy == torch == transformers' placeholder scatter."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from step37_deploy.config import TokenIds
from step37_deploy.errors import PlaceholderError
from step37_deploy.fusion import insert_features, insert_features_torch, project, project_torch
from step37_deploy.preprocess import image_layout

FLAG, PH, OTHER = 5, 9, 1
TOK = TokenIds()


def test_project_numpy_torch_agree():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 48)).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    x = rng.standard_normal((3, 7, 48)).astype(np.float32)
    ref = x @ w.T + b
    np.testing.assert_allclose(project(x, w, b), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        project_torch(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy(), ref, rtol=1e-5, atol=1e-5
    )
    h = project(x.astype(np.float16), w, None)
    assert h.dtype == np.float16
    np.testing.assert_allclose(h, x.astype(np.float16).astype(np.float32) @ w.T, rtol=1e-2, atol=1e-2)
    out = project_torch(torch.from_numpy(x).half(), torch.from_numpy(w), None, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    with pytest.raises(PlaceholderError, match="expects 48"):
        project(x[..., :40], w)


@st.composite
def layouts(draw):
    """Random batches of sequences with flagged placeholder groups of random lengths."""
    batch = draw(st.integers(1, 3))
    hidden = draw(st.sampled_from([4, 8, 16]))
    seqs, groups = [], []
    for _ in range(batch):
        seq = []
        for _ in range(draw(st.integers(0, 3))):
            seq += [OTHER] * draw(st.integers(0, 4))
            n = draw(st.integers(1, 6))
            seq += [FLAG] + [PH] * n
            groups.append(n)
        seq += [OTHER] * draw(st.integers(0, 3))
        seqs.append(seq)
    s = max(1, max(len(q) for q in seqs))
    ids = np.full((batch, s), OTHER, np.int64)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = q
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    return ids, groups, hidden, dtype, draw(st.booleans())


def scatter_reference(ids, emb_bsh, feats):
    """transformers' way: masked_scatter of all features over the placeholder positions."""
    t = torch.from_numpy(emb_bsh)
    mask = torch.from_numpy(ids == PH).unsqueeze(-1).expand_as(t)
    return t.masked_scatter(mask, torch.from_numpy(np.concatenate(feats) if feats else emb_bsh[:0, 0])).numpy()


@settings(max_examples=150, deadline=None)
@given(layouts(), st.integers(0, 2**31))
def test_insertion_numpy_torch_scatter_agree(layout, seed):
    ids, lengths, hidden, dtype, batch_first = layout
    rng = np.random.default_rng(seed)
    b, s = ids.shape
    emb_bsh = rng.standard_normal((b, s, hidden)).astype(dtype)
    feats = [rng.standard_normal((n, hidden)).astype(dtype) for n in lengths]
    ref = scatter_reference(ids, emb_bsh, feats)
    emb = emb_bsh if batch_first else np.ascontiguousarray(emb_bsh.transpose(1, 0, 2))
    before = emb.copy()
    got = insert_features(emb, feats, ids, FLAG, PH, batch_first=batch_first)
    assert np.array_equal(emb, before)  # not modified unless inplace
    got_t = insert_features_torch(
        torch.from_numpy(emb),
        [torch.from_numpy(f) for f in feats],
        torch.from_numpy(ids),
        FLAG,
        PH,
        batch_first=batch_first,
    ).numpy()
    if not batch_first:
        got, got_t = got.transpose(1, 0, 2), got_t.transpose(1, 0, 2)
    assert np.array_equal(got, ref) and np.array_equal(got_t, ref)


def test_inplace_and_stacked_features():
    ids = np.array([[FLAG, PH, PH, FLAG, PH, PH, OTHER]])
    emb = np.zeros((7, 1, 3), np.float32)
    feats = np.arange(12, dtype=np.float32).reshape(2, 2, 3)  # [G, L, H]
    out = insert_features(emb, feats, ids, FLAG, PH, inplace=True)
    assert out is emb and np.array_equal(emb[[1, 2, 4, 5], 0], feats.reshape(4, 3))
    assert np.all(emb[[0, 3, 6]] == 0)


FX = json.loads((Path(__file__).parent / "fixtures" / "step3p7_preprocess.json").read_text())


@pytest.mark.parametrize("cases", [[5, 20], [13, 28, 11], [29]])
def test_equals_transformers_placeholder_scatter(hf_model, cases):
    """Layouts from Step3p7Processor (recorded crop counts and newline masks): inserting after each
    <patch_start>/<im_start> equals transformers' own get_placeholder_mask + masked_scatter."""
    hidden, rng = 96, np.random.default_rng(0)
    ids, groups = [OTHER, OTHER], []
    for i in cases:
        c = FX["cases"][i]
        _, layout = image_layout(c["num_crops"], c["newline_mask"], TOK)
        ids += [*layout, OTHER]
        groups += [rng.standard_normal((81, hidden)).astype(np.float32) for _ in range(c["num_crops"])]
        groups.append(rng.standard_normal((169, hidden)).astype(np.float32))
    ids_t = torch.tensor([ids])
    emb = torch.randn(1, len(ids), hidden)
    feats = torch.from_numpy(np.concatenate(groups))
    assert hf_model.config.image_token_id == TOK.im_patch
    mask = hf_model.get_placeholder_mask(ids_t, emb, feats)
    ref = emb.masked_scatter(mask, feats)
    got = insert_features(
        emb.numpy(), groups, ids_t.numpy(), [TOK.patch_start, TOK.im_start], TOK.im_patch, batch_first=True
    )
    got_t = insert_features_torch(
        emb,
        [torch.from_numpy(g) for g in groups],
        ids_t,
        [TOK.patch_start, TOK.im_start],
        TOK.im_patch,
        batch_first=True,
    )
    assert torch.equal(torch.from_numpy(got), ref) and torch.equal(got_t, ref)


def test_insertion_errors():
    ids = np.array([[OTHER, FLAG, PH, PH, OTHER, FLAG, PH]])
    emb = np.zeros((7, 1, 4), np.float32)
    two = [np.ones((2, 4), np.float32), np.ones((1, 4), np.float32)]
    with pytest.raises(PlaceholderError, match="2 flag token.*but 1 feature group.*first flags at"):
        insert_features(emb, two[:1], ids, FLAG, PH)
    with pytest.raises(PlaceholderError, match="2 flag token.*but 3 feature group"):
        insert_features(emb, [*two, two[1]], ids, FLAG, PH)
    with pytest.raises(PlaceholderError, match="runs past the sequence end"):
        insert_features(emb, [two[0], np.ones((3, 4), np.float32)], ids, FLAG, PH)
    with pytest.raises(PlaceholderError, match="would overwrite token 1 at pos 4"):
        insert_features(emb, [np.ones((3, 4), np.float32), two[1]], ids, FLAG, PH)
    with pytest.raises(PlaceholderError, match="hidden size"):
        insert_features(emb, [np.ones((2, 5), np.float32), two[1]], ids, FLAG, PH)
    with pytest.raises(PlaceholderError, match="float16 but embeddings are float32"):
        insert_features(emb, [two[0].astype(np.float16), two[1]], ids, FLAG, PH)
    with pytest.raises(PlaceholderError, match="does not match embeddings"):
        insert_features(emb, two, ids[:, :6], FLAG, PH)
    with pytest.raises(PlaceholderError, match="hidden size"):
        insert_features_torch(torch.zeros(7, 1, 4), [torch.ones(2, 3), torch.ones(1, 3)], torch.from_numpy(ids), FLAG)
