"""vLLM hand-off: both crop rules over every fixture size, the producer's layouts, atomic files,
retention.  vLLM's rule is checked against what vLLM 0.32's own ``ImagePatcher`` computed
(``tests/fixtures/vllm_step3_layouts.json``, recorded by ``scripts/record_vllm_layouts.py``), the
reference's against ``transformers``' recorded fixtures."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from step37_deploy.checkpoint import weights_fingerprint
from step37_deploy.config import Step37Config
from step37_deploy.errors import InputError, OutputError
from step37_deploy.handoff import vllm as hv
from step37_deploy.preprocess import normalise_views, to_chw
from step37_deploy.runtime import ImageEmbedding, VisionEmbedder

from .conftest import rel_l2
from .preprocess_cases import CASES, synthetic_image

FIX = Path(__file__).parent / "fixtures"
VLLM = json.loads((FIX / "vllm_step3_layouts.json").read_text())
REF = json.loads((FIX / "step3p7_preprocess.json").read_text())["cases"]


def one_line(exc: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(exc.value)


def test_the_vllm_fixture_covers_all_sizes_and_the_edges():
    sizes = {(c["width"], c["height"]) for c in VLLM["cases"]}
    assert VLLM["vllm"] == hv.VLLM_VERSION
    assert {(w, h) for w, h, _ in CASES} <= sizes and len(CASES) == 34
    assert {(727, 727), (728, 728), (729, 729), (728, 546), (728, 485)} <= sizes


@pytest.mark.parametrize("rec", VLLM["cases"], ids=[f"{c['width']}x{c['height']}" for c in VLLM["cases"]])
def test_vllm_rule_matches_vllms_own_patcher(rec):
    lay = hv.vllm_layout(rec["width"], rec["height"])
    assert lay.size == tuple(rec["size"]) and lay.window == rec["window"]
    assert lay.num_crops == rec["num_crops"] and sum(lay.newline_mask) == rec["num_newlines"]
    assert lay.placeholder_tokens() == rec["placeholder_tokens"]
    assert lay.rows() == rec["num_crops"] * 81 + 169 == hv.vllm_rows(rec["width"], rec["height"])
    if rec["window"]:
        assert lay.crop_size == tuple(rec["crop_size"]) and lay.num_x == rec["num_x"]
        assert [list(b) for b in lay.boxes] == rec["boxes"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{w}x{h}" for w, h, _ in CASES])
def test_reference_rule_matches_transformers(i):
    w, h, _ = CASES[i]
    lay, ref = hv.reference_layout(w, h), REF[i]
    assert lay.num_crops == ref["num_crops"] and list(lay.newline_mask) == ref["newline_mask"]
    assert lay.rows() == ref["num_crops"] * 81 + 169


@pytest.mark.parametrize(
    ("size", "ref_rows", "vllm_rows"),
    [
        ((727, 727), 169, 169),
        ((728, 728), 169, 493),
        ((729, 729), 493, 493),
        ((727, 546), 169, 169),
        ((728, 546), 169, 331),
        ((729, 546), 331, 331),
        ((546, 728), 169, 331),
        ((728, 485), 331, 331),  # same count, different windows (485 against 504)
        ((728, 10), 169, 493),  # square-padded to 728x728
    ],
)
def test_edges_of_the_two_rules(size, ref_rows, vllm_rows):
    assert hv.reference_layout(*size).rows() == ref_rows and hv.vllm_rows(*size) == vllm_rows
    assert not hv.layouts_agree(*size) or ref_rows == vllm_rows


def _exact_fifth(v: hv.CropLayout) -> bool:
    """A side whose remainder is exactly 20 % of the window (vLLM's float test says "above")."""
    return any(d >= v.window and d % v.window * 5 == v.window for d in v.size)


def test_where_the_rules_disagree():
    """Exactly the long-side-728 sizes, the zero-padded narrow crops and the exact-20 % snaps."""
    disagree = []
    for rec in VLLM["cases"]:
        w, h = rec["width"], rec["height"]
        v = hv.vllm_layout(w, h)
        if not hv.layouts_agree(w, h):
            disagree.append((w, h))
            assert max(v.size) == 728 or v.padded or _exact_fifth(v), (w, h)
        else:
            assert not v.padded and hv.reference_layout(w, h).rows() == v.rows()
    assert {(728, 728), (728, 546), (728, 485), (1000, 400), (100, 720)} <= set(disagree)
    assert (727, 727) not in disagree and (729, 729) not in disagree
    assert hv.vllm_rows(100, 720) == 817 and hv.reference_layout(100, 720).rows() == 736


@pytest.mark.parametrize("n", range(1, 14))
def test_tile_strips_are_tiled_back_exactly(n):
    tiles = [Image.new("RGB", (504, 504), (i, 2 * i, 3 * i)) for i in range(1, n + 1)]
    strips = hv.tile_strips(tiles)
    assert sum(k for _, k in strips) == n
    for strip, keep in strips:
        lay = hv.reference_layout(*strip.size)
        assert lay.window == 504 and lay.crop_size == strip.size and lay.num_crops >= keep >= 1
        assert all(b[3] - b[1] == 504 and b[2] - b[0] == 504 for b in lay.boxes)


# -- the producer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder(tiny_fp32):
    return VisionEmbedder.from_artifacts(tiny_fp32, "torch")


def _png(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _vllm_tiles(arr: np.ndarray) -> np.ndarray:
    """What vLLM's ImagePatcher cuts, done directly: resize to the crop size, crop its boxes (PIL
    zero-pads past the edge), 504x504 each (the window here)."""
    im = Image.fromarray(arr)
    lay = hv.vllm_layout(im.width, im.height)
    big = im.resize(lay.crop_size, Image.BILINEAR) if lay.crop_size != im.size else im
    tiles = [big.crop(b) for b in lay.boxes]
    return np.stack([to_chw(t if t.size == (504, 504) else t.resize((504, 504), Image.BILINEAR)) for t in tiles])


@pytest.mark.parametrize("size", [(728, 546), (728, 728), (728, 485), (1000, 400), (100, 720)])
def test_producer_follows_vllms_layout(tmp_path, embedder, size):
    arr = synthetic_image(*size)
    writer = hv.VllmCacheWriter(tmp_path / "ec", dtype="fp32")
    got = hv.VllmProducer(embedder.embed_images, writer, embedder.tokens).produce(_png(arr), "img-1")
    lay = hv.vllm_layout(*size)
    assert got.layout == "vllm" and got.rows == lay.rows() and got.path == tmp_path / "ec" / "img-1" / hv.CACHE_FILE
    rows = load_file(str(got.path))[hv.CACHE_TENSOR]
    assert rows.dtype == torch.float32 and tuple(rows.shape) == (lay.rows(), embedder.weight.shape[0])
    # crop rows: the tower on vLLM's own tiles (zero padding included); global rows: the reference's
    tiles = normalise_views(_vllm_tiles(arr))
    want_crops = embedder._project(embedder.encode(tiles)).reshape(-1, rows.shape[1])
    n = lay.num_crops * 81
    assert rel_l2(rows[:n], np.array(want_crops)) < 1e-5  # FP32 batch-order noise only: the same pixels
    ref = embedder.embed_images([arr])[0].features
    assert rel_l2(rows[n:], np.array(ref[-169:])) < 1e-5
    assert got.embedding.token_ids.count(embedder.tokens.im_patch) == lay.rows()
    assert len(got.embedding.token_ids) == lay.placeholder_tokens()


def test_producer_agreeing_layouts_and_bf16(tmp_path, embedder):
    arr = synthetic_image(600, 1300)  # 1 x 3 crops in both rules
    writer = hv.VllmCacheWriter(tmp_path / "ec")  # bf16 by default, the LLM's dtype
    got = hv.VllmProducer(embedder.embed_images, writer, embedder.tokens).produce_many([arr], ["tall"])[0]
    rows = load_file(str(got.path))[hv.CACHE_TENSOR]
    ref = embedder.embed_images([arr])[0].features
    assert got.layout == "reference" and rows.dtype == torch.bfloat16 and rows.shape[0] == ref.shape[0]
    np.testing.assert_allclose(rows.float().numpy(), ref, rtol=1e-2, atol=1e-2)


def test_refuse_policy_and_bad_ids(tmp_path, embedder):
    writer = hv.VllmCacheWriter(tmp_path / "ec")
    producer = hv.VllmProducer(embedder.embed_images, writer, embedder.tokens, mismatch="refuse")
    with pytest.raises(InputError) as exc:
        producer.produce(synthetic_image(728, 546), "x")
    assert one_line(exc) and "728x546" in str(exc.value) and "refused" in str(exc.value)
    assert producer.produce(synthetic_image(400, 400), "ok").rows == 169
    for bad in ("../up", "", "a/b", ".hidden", "x" * 129):
        with pytest.raises(InputError):
            producer.produce(synthetic_image(400, 400), bad)
    assert sorted(os.listdir(tmp_path / "ec")) == ["ok"]
    with pytest.raises(InputError):
        hv.VllmProducer(embedder.embed_images, writer, embedder.tokens, mismatch="reference")


def test_a_short_embedding_is_never_written(tmp_path):
    writer = hv.VllmCacheWriter(tmp_path / "ec")
    lay = hv.vllm_layout(728, 728)
    short = ImageEmbedding(np.zeros((lay.rows() - 1, 8), np.float32), [], "", 4, list(lay.newline_mask))
    with pytest.raises(InputError) as exc:
        writer.write("short", short, lay)
    assert one_line(exc) and "492 rows" in str(exc.value) and "493" in str(exc.value)
    assert not (tmp_path / "ec" / "short").exists()


def test_write_is_atomic_and_cleans_its_temporaries(tmp_path, monkeypatch):
    writer = hv.VllmCacheWriter(tmp_path / "ec")
    lay = hv.vllm_layout(400, 400)
    e = ImageEmbedding(np.ones((169, 8), np.float32), [], "", 0, [])
    final = writer.path_of("a")
    seen = {}
    import safetensors.torch as st

    real = st.save_file

    def partial_then_fail(tensors, path, metadata=None):
        seen["final_exists_while_writing"] = final.exists()
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", partial_then_fail)
    with pytest.raises(Exception) as exc:
        writer.write("a", e, lay)
    assert "no space left" in str(exc.value).lower()
    assert seen == {"final_exists_while_writing": False}
    assert not final.exists() and os.listdir(final.parent) == []  # no temporary left behind
    monkeypatch.setattr(st, "save_file", real)
    assert writer.write("a", e, lay) == final and load_file(str(final))[hv.CACHE_TENSOR].shape == (169, 8)
    assert os.listdir(final.parent) == [hv.CACHE_FILE]


def test_retention_touches_only_what_it_wrote(tmp_path):
    root = tmp_path / "ec"
    writer = hv.VllmCacheWriter(root, retention=hv.Retention(max_age_s=100, max_bytes=None, interval_s=1e9))
    lay = hv.vllm_layout(400, 400)
    e = ImageEmbedding(np.ones((169, 8), np.float32), [], "", 0, [])
    old, new = writer.write("old", e, lay), writer.write("new", e, lay)
    foreign = root / "foreign" / hv.CACHE_FILE  # written by vLLM's own producer, say
    foreign.parent.mkdir()
    save_file({hv.CACHE_TENSOR: torch.zeros(169, 8)}, str(foreign))
    (root / "old" / "notes.txt").write_text("a user's file")
    (root / "empty-by-vllm").mkdir()  # the consumer creates DIR/ID/ on every lookup
    past = time.time() - 1000
    for p in (old, foreign):
        os.utime(p, (past, past))
    removed = writer.cleanup()
    assert removed == [old] and not old.exists() and new.exists() and foreign.exists()
    assert (root / "old" / "notes.txt").exists() and (root / "empty-by-vllm").is_dir()
    # size bound: oldest first, down to the budget
    writer.retention = hv.Retention(max_age_s=None, max_bytes=new.stat().st_size, interval_s=1e9)
    newer = writer.write("newer", e, lay)
    os.utime(new, (past, past))
    assert writer.cleanup() == [new] and newer.exists() and not (root / "new").exists()


def test_vllm_cache_cli(tmp_path, tiny_fp32, capsys):
    from step37_deploy.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(synthetic_image(728, 546)).save(img)
    args = ["vllm-cache", "--checkpoint", str(tiny_fp32), "--dir", str(tmp_path / "ec"), "--image", str(img), "-q"]
    assert main([*args, "--backend", "torch"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    hidden = Step37Config.from_checkpoint(tiny_fp32).text_hidden_size
    identity = hv.deployment_identity(weights_fingerprint(tiny_fp32), "bf16", hidden)
    assert line["id"] == hv.content_id(img.read_bytes(), identity) and line["id"].endswith("-d" + identity)
    assert line["rows"] == 331 and line["layout"] == "vllm"
    with safe_open(line["file"], "pt") as f:
        assert f.metadata()["identity"] == identity and f.get_tensor(hv.CACHE_TENSOR).shape[1] == hidden
    # another dtype is another deployment: another ID, and a hand-named file of the first is refused
    assert main([*args, "--backend", "torch", "--dtype", "fp16"]) == 0
    other = json.loads(capsys.readouterr().out.strip())
    assert other["id"] != line["id"] and Path(other["file"]).is_file()
    before = Path(line["file"]).read_bytes()
    assert main([*args, "--backend", "torch", "--dtype", "fp16", "--id", line["id"]]) == 2
    assert Path(line["file"]).read_bytes() == before
    capsys.readouterr()
    assert line["multi_modal_uuids"] == {"image": [line["id"]]} and Path(line["file"]).is_file()
    assert main([*args, "--backend", "torch", "--mismatch", "refuse"]) == 2
    assert main(args) == 2  # neither --server nor --backend
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "refused" in err[0] and "--server" in err[1]
    assert main([*args, "--backend", "torch", "--id", "../x"]) == 2


def _writer(root, dtype="bf16", weights="w1", hidden=8, **kw) -> hv.VllmCacheWriter:
    return hv.VllmCacheWriter(root, dtype, weights=weights, hidden=hidden, **kw)


def test_files_of_another_deployment_are_never_reused_or_replaced(tmp_path):
    """Issue 22 item 4: a folder shared by deployments of other weights, dtype or width."""
    root = tmp_path / "ec"
    mine = _writer(root)
    lay = hv.vllm_layout(400, 400)
    e = ImageEmbedding(np.ones((169, 8), np.float32), [], "", 0, [])
    path = mine.write("x", e, lay)
    assert mine.reusable(path, 169) and not mine.reusable(path, 170)  # rows: vLLM's count for the image
    others = [_writer(root, dtype="fp16"), _writer(root, weights="w2"), _writer(root, hidden=16)]
    data = b"same image bytes"
    for other in others:
        assert other.identity != mine.identity and other.content_id(data) != mine.content_id(data)
        assert not other.reusable(path, 169)
        before = path.read_bytes()
        with pytest.raises(OutputError) as exc:
            other.write("x", ImageEmbedding(np.ones((169, other.hidden), np.float32), [], "", 0, []), lay)
        assert one_line(exc) and "not written by this deployment" in str(exc.value) and path.read_bytes() == before
    with pytest.raises(InputError):  # rows of another width than the LLM's are never written
        mine.write("y", ImageEmbedding(np.ones((169, 16), np.float32), [], "", 0, []), lay)
    foreign = root / "foreign" / hv.CACHE_FILE  # vLLM's own producer's, or a hand-made file
    foreign.parent.mkdir()
    save_file({hv.CACHE_TENSOR: torch.ones(169, 8, dtype=torch.bfloat16)}, str(foreign))
    assert not mine.reusable(foreign, 169)
    with pytest.raises(OutputError):
        mine.write("foreign", e, lay)
    assert mine.write("x", e, lay) == path  # its own file: replaced


def test_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    from step37_deploy.handoff.vllm import cache

    writer = _writer(tmp_path / "ec")
    final = writer.path_of("a")
    synced = []
    real = cache._fsync

    def record(path, directory=False):
        synced.append((Path(path), directory, final.exists()))
        real(path, directory)

    monkeypatch.setattr(cache, "_fsync", record)
    writer.write("a", ImageEmbedding(np.ones((169, 8), np.float32), [], "", 0, []), hv.vllm_layout(400, 400))
    (tmp, d0, existed), (folder, d1, _) = synced
    assert tmp.parent == final.parent and tmp != final and not d0 and not existed  # data synced, then renamed
    assert folder == final.parent and d1


def test_retention_never_removes_a_young_file(tmp_path):
    """vLLM checks a file exists, then loads it: a file younger than min_age_s stays, whatever the limits."""
    writer = _writer(tmp_path / "ec", retention=hv.Retention(max_age_s=10, max_bytes=0, interval_s=1e9, min_age_s=50))
    lay = hv.vllm_layout(400, 400)
    e = ImageEmbedding(np.ones((169, 8), np.float32), [], "", 0, [])
    young, old = writer.write("young", e, lay), writer.write("old", e, lay)
    now = time.time()
    os.utime(young, (now - 20, now - 20))  # past max_age_s, under min_age_s
    os.utime(old, (now - 60, now - 60))
    assert writer.cleanup(now) == [old] and young.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["handoff", "sglang", "--tokenizer", "t", "--prompt", "p", "--image", "i", "--out", "o.json"],
        ["vllm-cache", "--checkpoint", "c", "--dir", "d", "--image", "i"],
        ["epd-router", "--checkpoint", "c", "--dir", "d", "--vllm-url", "http://127.0.0.1:8000"],
    ],
    ids=["sglang", "vllm-cache", "epd-router"],
)
def test_handoff_commands_reach_a_secured_service(tmp_path, monkeypatch, command):
    """Issue 22 item 10: the key and TLS of a ``serve --api-key-file --tls-cert`` service."""
    from step37_deploy.cli import build_parser
    from step37_deploy.cli import handoff as cli_handoff
    from step37_deploy.serving import client as client_mod

    key, ca = tmp_path / "key", tmp_path / "ca.pem"
    key.write_text("k" * 32 + "\n")
    key.chmod(0o600)
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    made = {}

    class Recorder:
        def __init__(self, url, protocol, **kwargs):
            made.update(url=url, protocol=protocol, **kwargs)

    monkeypatch.setattr(client_mod, "EmbedClient", Recorder)
    args = build_parser().parse_args([*command, "--server", "h:8001", "--api-key-file", str(key), "--tls-ca", str(ca)])
    cli_handoff._client(args)
    assert made["url"] == "h:8001" and made["api_key"] == "k" * 32
    assert made["tls"] is True and made["root_certificates"] == str(ca)
    made.clear()
    args = build_parser().parse_args([*command, "--server", "h:8001", "--tls"])
    cli_handoff._client(args)
    assert made["api_key"] is None and made["tls"] is True and made["root_certificates"] is None


def test_vllm_cache_sends_the_key_through_its_client(tmp_path, tiny_fp32, monkeypatch):
    from step37_deploy.cli import main
    from step37_deploy.errors import ServerError
    from step37_deploy.serving import client as client_mod

    key = tmp_path / "key"
    key.write_text("k" * 32 + "\n")
    key.chmod(0o600)
    made = {}

    class Refusing:
        def __init__(self, url, protocol, **kwargs):
            made.update(kwargs)
            raise ServerError("stop here")

    monkeypatch.setattr(client_mod, "EmbedClient", Refusing)
    img = tmp_path / "a.png"
    Image.fromarray(synthetic_image(400, 300)).save(img)
    argv = ["vllm-cache", "--checkpoint", str(tiny_fp32), "--dir", str(tmp_path / "ec"), "--image", str(img)]
    assert main([*argv, "--server", "h:8001", "--api-key-file", str(key), "--tls", "-q"]) == 2
    assert made["api_key"] == "k" * 32 and made["tls"] is True


# -- the service's input rule (issue 22, item 17) ---------------------------------------------------
@pytest.mark.parametrize("size", [(1, 20000), (40, 2_000_000), (20000, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_hand_off_refuses_what_the_service_refuses_from_the_header(tmp_path, size):
    """An image the crop rule cannot use (padded past the pixel cap, a 0 px side, too many crops)
    is refused by the producer with the service's own one-line message, from the header alone
    (a PNG without pixel data), before anything is embedded or written."""
    from step37_deploy.config import TokenIds
    from step37_deploy.preprocess import preprocess

    from .test_bad_input import header_only_png

    png = header_only_png(*size)
    with pytest.raises(InputError) as served:
        preprocess(png)  # what the service's embedder answers
    with pytest.raises(InputError) as sized:
        hv.image_size(png)
    assert str(sized.value) == str(served.value) and one_line(sized)

    def never(images):  # the refusal must come before any embedding
        raise AssertionError("embedded an image the service refuses")

    producer = hv.VllmProducer(never, hv.VllmCacheWriter(tmp_path / "ec"), TokenIds())
    with pytest.raises(InputError) as produced:
        producer.produce(png, "strip")
    assert str(produced.value) == str(served.value)
    assert not (tmp_path / "ec" / "strip").exists()
    with pytest.raises(InputError, match="crop rule pads it"):  # decoded images: the same check
        hv.image_size(Image.new("RGB", (1, 20000)))
