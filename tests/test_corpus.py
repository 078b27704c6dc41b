"""The corpus job (issue 23): feature shards that equal the in-process embedder's, resume, bad input
as data, write errors, sizing, and the CLI's exit statuses.

A small WebDataset image-text corpus of real photographs (scikit-image's bundled ones, cropped and
resized to mixed sizes, with and without crops) runs through the local engine in this process.
"""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from step37_deploy import cli, files
from step37_deploy.corpus import shard as shard_mod
from step37_deploy.corpus.compute import EngineSpec
from step37_deploy.corpus.reader import insert_groups, read_manifest_of, read_shard
from step37_deploy.corpus.run import CorpusOptions, run_corpus
from step37_deploy.corpus.sources import ShardError, expand_inputs, iter_samples, unsafe_key
from step37_deploy.errors import BackendUnavailable, OutputError
from step37_deploy.runtime import VisionEmbedder
from tests.conftest import rel_l2
from tests.corpus_data import derived_images, image_text_corpus, photo_dir, write_wds
from tests.test_bad_input_readers import tree_state

pytestmark = pytest.mark.skipif(photo_dir() is None, reason="scikit-image's bundled photos are not installed ([dev])")


def opts(inputs, out, ckpt, **kw) -> CorpusOptions:
    engine = EngineSpec(str(ckpt), **kw.pop("engine", {}))
    kw.setdefault("outputs", ("vision_features", "features"))
    return CorpusOptions([str(i) for i in inputs], str(out), engine, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """3 image-text shards x 4 real-photo samples of mixed sizes (with and without crops)."""
    return image_text_corpus(tmp_path_factory.mktemp("corpus"), shards=3, per_shard=4, seed=3)


@pytest.fixture(scope="module")
def fp32_run(corpus, tiny_fp32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features-fp32")
    s = run_corpus(opts(corpus, out, tiny_fp32, dtype="fp32"), progress=False)
    assert s.complete == 3 and s.ok == 12 and s.errors == 0 and not s.failed
    return out


@pytest.fixture(scope="module")
def embedder(tiny_fp32) -> VisionEmbedder:
    return VisionEmbedder.from_artifacts(tiny_fp32, "torch")


def input_images(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {
            m.name.split(".")[0]: tar.extractfile(m).read()
            for m in tar
            if m.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp")
        }


# -- sources ------------------------------------------------------------------------------------------
def test_inputs_brace_glob_and_folder_shards(corpus, tmp_path):
    folder = corpus[0].parent
    braces = expand_inputs([str(folder / "data-{000000..000002}.tar")])
    globbed = expand_inputs([str(folder / "data-*.tar")])
    assert [s.name for s in braces] == [s.name for s in globbed] == ["data-000000", "data-000001", "data-000002"]
    imgs = tmp_path / "photos"
    for i, (data, ext) in enumerate(derived_images(5, seed=1)):
        (imgs / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (imgs / f"sub{i % 2}" / f"img{i}.{ext}").write_bytes(data)
    (imgs / "notes.txt").write_text("not an image")
    shards = expand_inputs([str(imgs)], shard_size=2)
    assert [s.name for s in shards] == ["photos-000000", "photos-000001", "photos-000002"]
    keys = [x.key for s in shards for x in iter_samples(s)]
    assert keys == ["sub0/img0", "sub0/img2", "sub0/img4", "sub1/img1", "sub1/img3"]
    assert expand_inputs([str(imgs)], shard_size=2) == shards  # stable
    with pytest.raises(Exception, match="matches no file"):
        expand_inputs([str(folder / "nothing-*.tar")])
    with pytest.raises(Exception, match="both write the feature shard"):
        expand_inputs([str(corpus[0]), str(corpus[0])])


@pytest.mark.parametrize("key", ["../evil", "/abs/x", "a//b", "a/./b", "a\\b", "dir/na.me", ""], ids=lambda k: repr(k))
def test_unsafe_keys_are_refused(key):
    assert unsafe_key(key)


def test_safe_keys():
    assert unsafe_key("a/b/c_01-x") is None and unsafe_key("00001234") is None


# -- the output: equal to the in-process embedder, read back by the package's reader ------------------
def test_features_equal_the_in_process_embedder(corpus, fp32_run, tiny_fp32, tmp_path, embedder):
    bf16 = tmp_path / "bf16"
    s = run_corpus(opts(corpus, bf16, tiny_fp32, dtype="bf16"), progress=False)
    assert s.ok == 12 and not s.failed
    crops_seen = set()
    for shard in corpus:
        images = input_images(shard)
        name = shard.name
        got = list(read_shard(fp32_run / name))
        got16 = {x.key: x for x in read_shard(bf16 / name)}
        assert [x.key for x in got] == list(images)  # same keys, in the input's order
        refs = embedder.embed_images(list(images.values()), outputs=("vision_features", "features"))
        for x, ref, data in zip(got, refs, images.values(), strict=True):
            assert x.vision_features.dtype == torch.float32
            assert rel_l2(x.vision_features, ref.vision_features) <= 1e-6
            assert rel_l2(x.features, ref.features) <= 1e-6
            # bf16: exactly the cast of the FP32 rows
            assert torch.equal(got16[x.key].vision_features, x.vision_features.to(torch.bfloat16))
            assert torch.equal(got16[x.key].features, x.features.to(torch.bfloat16))
            lay = x.layout
            assert lay["token_ids"] == ref.token_ids and lay["num_crops"] == ref.num_crops
            assert lay["newline_mask"] == ref.newline_mask
            assert lay["rows"] == ref.vision_features.shape[0] == sum(lay["rows_per_view"])
            assert lay["image"]["sha256"] == __import__("hashlib").sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as im:
                assert (lay["image"]["width"], lay["image"]["height"]) == im.size
            groups = insert_groups([x])
            if ref.num_crops:
                crops_seen.add(ref.num_crops)
                assert tuple(groups[0].image_features.shape) == (ref.num_crops, 81, 256)
                assert groups[0].rope_cu_seqlens.tolist() == lay["groups"][0]["rope_cu_seqlens"]
            assert tuple(groups[-1].image_features.shape) == (1, 169, 256)
            assert groups[-1].insert_start_token == lay["groups"][-1]["insert_start_token"]
        m = read_manifest_of(fp32_run / name)
        assert [e["key"] for e in m["samples"]] == list(images) and m["counts"]["ok"] == len(images)
    assert len(crops_seen) >= 2 and any(len(input_images(s)) for s in corpus)  # with and without crops


def test_shards_are_deterministic_and_webdataset_readable(corpus, fp32_run, tiny_fp32, tmp_path):
    import webdataset as wds

    again = tmp_path / "again"
    run_corpus(opts(corpus[:1], again, tiny_fp32, dtype="fp32", engine={"batch": 3}), progress=False)
    name = corpus[0].name
    # another batch size gives other FP32 roundings; the format itself is deterministic:
    members = [n for n, _ in shard_mod.iter_members(again / name)]
    assert members == [n for n, _ in shard_mod.iter_members(fp32_run / name)]
    samples = list(wds.WebDataset(str(fp32_run / name), shardshuffle=False))
    assert [s["__key__"] for s in samples] == list(input_images(corpus[0]))
    assert set(samples[0]) >= {"__key__", "vision_features.safetensors", "features.safetensors", "layout.json"}
    assert shard_mod.tar_fingerprint(fp32_run / name) == read_manifest_of(fp32_run / name)["fingerprint"]


# -- resume -------------------------------------------------------------------------------------------
def test_resume_skips_complete_shards_and_refuses_another_fingerprint(corpus, tiny_fp32, tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "out"
    run_corpus(opts(corpus[:2], out, tiny_fp32, dtype="fp32", outputs=("vision_features",)), progress=False)
    before = tree_state(out)
    s = run_corpus(opts(corpus[:2], out, tiny_fp32, dtype="fp32", outputs=("vision_features",)), progress=False)
    assert s.embedded == 0 and s.complete == 2 and tree_state(out) == before
    with pytest.raises(OutputError, match="another run.*--overwrite"):
        run_corpus(opts(corpus[:2], out, tiny_fp32, dtype="bf16", outputs=("vision_features",)), progress=False)
    assert tree_state(out) == before
    s = run_corpus(
        opts(corpus[:2], out, tiny_fp32, dtype="bf16", outputs=("vision_features",), overwrite=True), progress=False
    )
    assert s.embedded == 8 and "replacing shard data-000000" in caplog.text
    # a file this tool did not write is never replaced, --overwrite or not
    (out / "data-000002.tar").write_bytes(b"my own tar")
    with pytest.raises(OutputError, match="not written by this tool"):
        run_corpus(opts(corpus, out, tiny_fp32, dtype="bf16", overwrite=True), progress=False)
    assert (out / "data-000002.tar").read_bytes() == b"my own tar"


def test_input_changed_since_the_shard_was_written(corpus, tiny_fp32, tmp_path):
    src = tmp_path / "in" / corpus[0].name
    src.parent.mkdir()
    src.write_bytes(corpus[0].read_bytes())
    out = tmp_path / "out"
    o = opts([src], out, tiny_fp32, outputs=("vision_features",))
    run_corpus(o, progress=False)
    os.utime(src, ns=(1, 1))
    with pytest.raises(OutputError, match="changed since"):
        run_corpus(o, progress=False)


def test_out_must_not_be_the_input_folder(corpus, tiny_fp32):
    with pytest.raises(OutputError, match="input shard"):
        run_corpus(opts(corpus[:1], corpus[0].parent, tiny_fp32), progress=False)


# -- bad input is data --------------------------------------------------------------------------------
def _png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims 900 MP (its data is a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_samples() -> tuple[list[tuple[str, dict[str, bytes]]], dict[str, str | None]]:
    """Samples of every kind of bad input, and the error class each must be recorded with (None:
    embeds as the service would)."""
    photo, _ = derived_images(1, seed=5, sizes=[(600, 400)])[0]
    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    jpeg = _encode(rgb, "JPEG")
    sixteen = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    frames = [rgb, rgb.rotate(90)]
    cases = {
        "good": ({"jpg": jpeg, "txt": b"ok"}, None),
        "corrupt": ({"jpg": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))}, "InputError"),
        "truncated": ({"jpg": jpeg[: len(jpeg) // 2]}, "InputError"),
        "empty": ({"png": b""}, "InputError"),
        "notimage": ({"png": b"this is a caption, not a picture\n" * 10}, "InputError"),
        "bomb": ({"png": _png_bomb()}, "InputError"),
        "cmyk": ({"jpg": _encode(rgb.convert("CMYK"), "JPEG")}, None),
        "sixteenbit": ({"png": _encode(sixteen, "PNG")}, None),
        "animated": ({"png": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])}, None),
        "animwebp": ({"webp": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])}, None),
        "captiononly": ({"txt": b"no image here"}, "NoImage"),
        "../escape": ({"jpg": jpeg}, "UnsafeKey"),
    }
    return [(k, m) for k, (m, _) in cases.items()], {k: e for k, (_, e) in cases.items()}


def test_bad_input_is_recorded_never_substituted(tiny_fp32, tmp_path, embedder):
    samples, expected = bad_samples()
    shard = write_wds(tmp_path / "in", "bad-000000", samples)
    before = tree_state(tmp_path / "in")
    out = tmp_path / "out"
    s = run_corpus(opts([shard], out, tiny_fp32, dtype="fp32"), progress=False)
    assert tree_state(tmp_path / "in") == before  # no input file is modified
    m = read_manifest_of(out / "bad-000000.tar")
    by_key = {e["key"]: e for e in m["samples"]}
    assert list(by_key) == [k for k, _ in samples]  # every key exactly once, in order
    for key, err in expected.items():
        entry = by_key[key]
        if err is None:
            assert entry == {"key": key, "status": "ok"}
        else:
            assert entry["status"] == "error" and entry["error"] == err, entry
            assert entry["message"]
    assert "over the limit" in by_key["bomb"]["message"] and "no image member" in by_key["captiononly"]["message"]
    got = {x.key: x for x in read_shard(out / "bad-000000.tar")}
    assert sorted(got) == sorted(k for k, e in expected.items() if e is None)  # nothing substituted
    data = dict(samples)
    for key, x in got.items():
        ref = embedder.embed_images([next(v for e, v in data[key].items() if e != "txt")], ("vision_features",))[0]
        assert rel_l2(x.vision_features, ref.vision_features) <= 1e-6, key
    assert s.errors == 7 and s.ok == 5


def test_duplicate_keys_and_unreadable_tar_fail_their_shard_only(corpus, tiny_fp32, tmp_path, capsys):
    jpeg, _ = derived_images(1, seed=2, sizes=[(200, 150)])[0]
    ins = tmp_path / "in"
    dup = write_wds(ins, "dup-000000", [("a", {"webp": jpeg}), ("b", {"webp": jpeg}), ("a", {"txt": b"again"})])
    broken = ins / "broken-000000.tar"
    broken.write_bytes(corpus[0].read_bytes()[:700] + b"\xff" * 3000)
    with pytest.raises(ShardError, match="appears twice"):
        list(iter_samples(expand_inputs([str(dup)])[0]))
    out = tmp_path / "out"
    argv = ["embed-corpus", str(dup), str(broken), str(corpus[1]), "--out", str(out), "--checkpoint", str(tiny_fp32)]
    code = cli.main([*argv, "--quiet"])
    stdout = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(stdout) == 1 and "1/3 shards complete, 2 failed" in stdout[0], stdout
    assert sorted(os.listdir(out)) == ["data-000001.manifest.json", "data-000001.tar"]  # nothing partial


def test_exit_status_follows_the_error_rate(tiny_fp32, tmp_path, capsys):
    samples, _ = bad_samples()
    shard = write_wds(tmp_path / "in", "bad-000000", samples[:3])  # 1 good, 2 bad
    base = ["embed-corpus", str(shard), "--checkpoint", str(tiny_fp32), "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 1
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--max-error-rate", "0.7"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3 samples: 1 ok, 2 errors (66.67%)" in line


# -- write errors and space ---------------------------------------------------------------------------
class _FullDisk(io.FileIO):
    """A file that takes ``room`` bytes, then fails like a full disk."""

    room = 0

    def write(self, b) -> int:
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def test_full_disk_leaves_no_partial_shard_and_a_rerun_resumes(corpus, tiny_fp32, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    written = []

    def opener(path):
        written.append(path)
        f = _FullDisk(path, "w")
        f.room = 10**9 if len(written) == 1 else 20000  # the first shard fits, the second does not
        return f

    monkeypatch.setattr(shard_mod, "open_output", opener)
    argv = ["embed-corpus", *map(str, corpus), "--out", str(out), "--checkpoint", str(tiny_fp32), "--quiet"]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no space left on device" in err[0] and "data-000001.tar" in err[0], err
    assert sorted(os.listdir(out)) == ["data-000000.manifest.json", "data-000000.tar"]  # no temporary, no partial
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert sorted(os.listdir(out)) == sorted(f"data-00000{i}.{e}" for i in range(3) for e in ("tar", "manifest.json"))


def test_a_real_small_tmpfs(corpus, tiny_fp32, tmp_path, capsys):
    """A 1 MiB tmpfs (root only; skipped elsewhere): the space check refuses with the numbers; without
    it the writer meets the full disk, names it in one line and leaves nothing partial."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        argv = ["embed-corpus", *map(str, corpus), "--out", str(mnt), "--checkpoint", str(tiny_fp32), "--quiet"]
        argv += ["--dtype", "fp32", "--outputs", "vision_features", "features"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "the features need about" in err and "free" in err and "images" in err, err
        assert os.listdir(mnt) == []
        assert cli.main([*argv, "--no-space-check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no space left on device" in err[0], err
        assert not [n for n in os.listdir(mnt) if files.TMP_MARK in n]
        assert all(n.endswith((".tar", ".manifest.json")) for n in os.listdir(mnt))
        names = os.listdir(mnt)
        assert all((n[: -len(".tar")] + ".manifest.json") in names for n in names if n.endswith(".tar"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- engines ------------------------------------------------------------------------------------------
def test_ray_missing_is_one_line(corpus, tiny_fp32, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailable):
        from step37_deploy.corpus.ray_engine import require_ray

        require_ray()
    argv = ["embed-corpus", str(corpus[0]), "--out", str(tmp_path / "o"), "--checkpoint", str(tiny_fp32)]
    code = cli.main([*argv, "--engine", "ray", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'step37-deploy[ray]'" in err[0], err


def test_local_worker_processes_give_the_same_shards(corpus, fp32_run, tiny_fp32, tmp_path):
    out = tmp_path / "two"
    s = run_corpus(opts(corpus, out, tiny_fp32, dtype="fp32", workers=2), progress=False)
    assert s.complete == 3 and s.ok == 12
    for shard in corpus:
        a = {x.key: x for x in read_shard(out / shard.name)}
        for x in read_shard(fp32_run / shard.name):
            assert rel_l2(a[x.key].vision_features, x.vision_features) <= 1e-6
            assert a[x.key].layout == x.layout


def test_through_a_serve_fleet(tiny_server, tmp_path, embedder):
    samples, _ = bad_samples()
    keep = ["good", "corrupt", "cmyk", "captiononly"]
    shard = write_wds(tmp_path / "in", "srv-000000", [s for s in samples if s[0] in keep])
    out = tmp_path / "out"
    o = opts([shard], out, tiny_server.checkpoint, dtype="fp32", outputs=("vision_features",))
    o.engine.server, o.engine.client = tiny_server.grpc_url, {"protocol": "grpc", "timeout": 120.0}
    s = run_corpus(o, progress=False)
    m = read_manifest_of(out / "srv-000000.tar")
    assert [(e["key"], e["status"]) for e in m["samples"]] == [
        ("good", "ok"),
        ("corrupt", "error"),
        ("cmyk", "ok"),
        ("captiononly", "error"),
    ]
    data = dict(samples)
    for x in read_shard(out / "srv-000000.tar"):
        ref = embedder.embed_images([data[x.key]["jpg"]], ("vision_features",))[0]
        assert rel_l2(x.vision_features, ref.vision_features) <= 1e-5
        assert x.layout["token_ids"] == ref.token_ids
    assert s.ok == 2 and s.errors == 2 and m["run"]["engine"] == {"server": True}
    assert json.dumps(m).count("ServerError") == 1


# -- a real training loader: Megatron Energon joins the feature shards with the image-text shards -----
IMAGES_LOADER = """
def sample_loader(raw):
    image = next(raw[k] for k in ("jpg", "png", "webp") if k in raw)
    return dict(__key__=raw["__key__"], image=image, caption=raw["txt"])


def part_filter(part):
    return part in ("jpg", "png", "webp", "txt")
"""
FEATURES_LOADER = """
from step37_deploy.corpus.reader import decode_sample


def sample_loader(raw):
    s = decode_sample(raw)
    return dict(__key__=raw["__key__"], vision_features=s.vision_features, layout=s.layout)


def part_filter(part):
    return part in ("vision_features.safetensors", "layout.json")
"""
JOIN = """
__module__: megatron.energon
__class__: MetadatasetV2
splits:
  train:
    join:
      - path: images
      - path: features
        nonmatch: skip
    joiner:
      __module__: tests.test_corpus
      __class__: JoinedFeatures
"""


def _energon_types():
    from megatron.energon import Sample
    from megatron.energon.edataclass import edataclass

    @edataclass
    class FeatureSample(Sample):
        vision_features: object
        layout: object

    @edataclass
    class JoinedFeatures(Sample):
        image: object
        caption: str
        vision_features: object
        layout: object

    FeatureSample.__module__ = JoinedFeatures.__module__ = __name__
    FeatureSample.__qualname__, JoinedFeatures.__qualname__ = "FeatureSample", "JoinedFeatures"
    return FeatureSample, JoinedFeatures


def __getattr__(name: str):  # the Energon sample types, made on first use (Energon imported lazily)
    if name in ("FeatureSample", "JoinedFeatures"):
        types = dict(zip(("FeatureSample", "JoinedFeatures"), _energon_types(), strict=True))
        globals().update(types)
        return types[name]
    raise AttributeError(name)


def _prepare(folder: Path, loader: str, sample_type: str) -> None:
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    tars = sorted(p.name for p in folder.glob("*.tar"))
    WebdatasetPreparator.prepare_dataset(
        EPath(folder), tars, split_parts_ratio=[("train", 1.0)], shuffle_seed=None, workers=1
    )
    (folder / ".nv-meta" / "sample_loader.py").write_text(loader)
    (folder / ".nv-meta" / "dataset.yaml").write_text(
        f"sample_type:\n  {sample_type}\nsample_loader: sample_loader.py:sample_loader\n"
        "part_filter: sample_loader.py:part_filter\n"
    )


def test_energon_joins_features_with_the_image_text_shards(corpus, fp32_run, tmp_path, embedder):
    pytest.importorskip("megatron.energon", reason="megatron-energon ([dev]) is not installed")
    import shutil

    from megatron.energon import WorkerConfig, get_loader, get_val_dataset
    from megatron.energon.epathlib import EPath
    from megatron.energon.metadataset.loader import prepare_metadataset

    images, feats = tmp_path / "images", tmp_path / "features"
    images.mkdir()
    for shard in corpus:
        shutil.copy(shard, images / shard.name)
    shutil.copytree(fp32_run, feats)
    _prepare(images, IMAGES_LOADER, "__module__: megatron.energon\n  __class__: CaptioningSample")
    _prepare(feats, FEATURES_LOADER, f"__module__: {__name__}\n  __class__: FeatureSample")
    mds = tmp_path / "joined.yaml"
    mds.write_text(JOIN)
    prepare_metadataset(EPath(mds))
    wc = WorkerConfig(rank=0, world_size=1, num_workers=0)
    got = {
        s.__key__: s
        for s in get_loader(get_val_dataset(EPath(mds), split_part="train", worker_config=wc, batch_size=None))
    }
    refs = {}
    for shard in corpus:
        images_by_key = input_images(shard)
        embs = embedder.embed_images(list(images_by_key.values()), ("vision_features",))
        refs.update(dict(zip(images_by_key, embs, strict=True)))
    assert sorted(got) == sorted(refs) and len(got) == 12  # every sample joined by key
    for key, s in got.items():
        ref = refs[key]
        assert s.caption.startswith("photo ") and s.image.ndim == 3  # the image-text side, decoded by Energon
        assert rel_l2(s.vision_features, ref.vision_features) <= 1e-6
        assert s.layout["token_ids"] == ref.token_ids and s.layout["num_crops"] == ref.num_crops
        from step37_deploy.corpus.reader import FeatureSample as Ours

        groups = insert_groups([Ours(key, s.layout, {"vision_features": s.vision_features})])
        shapes = [tuple(g.image_features.shape) for g in groups]
        assert shapes == ([(ref.num_crops, 81, 256)] if ref.num_crops else []) + [(1, 169, 256)]
