"""Property tests: whatever a file holds, the readers answer with their result or a typed
:class:`~step37_deploy.errors.Step37Error`, never another exception.

Random JSON goes to the config/tokenizer, index and manifest readers (fully random, and valid files
with one field replaced by a random value); random bytes to the safetensors, ONNX and engine
readers (fully random, valid files with a few bytes changed, and a valid length prefix before a
random JSON header).  Bounded: ``max_examples`` per test, no deadline, well under 40 s in all.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from step37_deploy import checkpoint as ck
from step37_deploy.config import Step37Config, read_token_ids
from step37_deploy.engine import inspect_engine, manifest_path, onnx_facts, read_manifest, verify_engine_file
from step37_deploy.errors import Step37Error

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _only_typed(fn, *args):
    try:
        return fn(*args)
    except Step37Error:
        return None


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_fp32) -> dict[str, Path]:
    """One scratch folder per reader, rewritten by every example (hypothesis and function-scoped
    tmp_path do not mix); the tiny checkpoint's real files as seeds."""
    root = tmp_path_factory.mktemp("fuzz")
    return {"root": root, "ckpt": Path(tiny_fp32)}


def _scratch(work, name: str) -> Path:
    d = work["root"] / name
    d.mkdir(exist_ok=True)
    return d


# -- JSON readers -----------------------------------------------------------------------------------------
@FUZZ
@given(doc=json_values)
def test_config_random_json(work, doc):
    d = _scratch(work, "cfg")
    (d / "config.json").write_text(json.dumps(doc))
    _only_typed(Step37Config.from_checkpoint, d)
    _only_typed(Step37Config.from_dict, doc)


@FUZZ
@given(field=st.sampled_from(["width", "layers", "heads", "patch_size", "image_size", "mlp_ratio", "hidden_act",
                              "use_ln_pre", "ls_init_value", "rope_parameters", "layer_norm_eps"]),
       value=json_values, where=st.sampled_from(["vision", "text", "top"]))  # fmt: skip
def test_config_one_field_replaced(work, field, value, where):
    cfg = json.loads((work["ckpt"] / "config.json").read_text())
    target = {"vision": cfg["vision_config"], "text": cfg["text_config"], "top": cfg}[where]
    target[field if where == "vision" else "hidden_size"] = value
    _only_typed(Step37Config.from_dict, cfg, "config.json")


@FUZZ
@given(decoder=json_values, added=json_values)
def test_tokenizer_files_random_json(work, decoder, added):
    d = _scratch(work, "tok")
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    _only_typed(read_token_ids, d)


@FUZZ
@given(doc=json_values, names=st.dictionaries(st.text(max_size=30), st.text(max_size=30) | json_values, max_size=4))
def test_index_random_json(work, doc, names):
    d = _scratch(work, "idx")
    for content in (doc, {"weight_map": names}, {"weight_map": {f"vision_model.{k}": v for k, v in names.items()}}):
        (d / ck.INDEX_FILE).write_text(json.dumps(content))
        _only_typed(ck.CheckpointIndex, d)
        _only_typed(ck.vision_refs, d)


def _manifest_seed(work) -> tuple[Path, dict]:
    d = _scratch(work, "eng")
    plan = d / "x.plan"
    payload = b"engine-bytes" * 50
    plan.write_bytes(payload)
    seed = {
        "flavour": "tensorrt_rtx", "trt_version": "0.0", "targets": {"compute_capabilities": ["8.6"]},
        "profile": {"pixel_values": [[1, 3, 504, 504]] * 3},
        "inputs": {"pixel_values": {"dtype": "float16", "shape": ["batch", 3, 504, 504]}},
        "outputs": {"image_features": {"dtype": "float16", "shape": ["batch", 81, 256]}},
        "engine_sha256": hashlib.sha256(payload).hexdigest(), "engine_bytes": len(payload),
    }  # fmt: skip
    return plan, seed


@FUZZ
@given(doc=json_values, field=st.sampled_from(["flavour", "trt_version", "targets", "profile", "inputs", "outputs",
                                               "engine_sha256", "engine_bytes"]), value=json_values)  # fmt: skip
def test_manifest_random_json(work, doc, field, value):
    plan, seed = _manifest_seed(work)
    from step37_deploy.backends.tensorrt import TensorRTRunner

    def runner_facts():  # what a runner reads from the manifest before any engine is loaded
        r = TensorRTRunner(plan)
        return r.input_spec(), r.output_spec(), r.max_batch, r.min_batch, r.resolution, r.precision

    for content in (doc, {**seed, field: value}):
        manifest_path(plan).write_text(json.dumps(content))
        _only_typed(inspect_engine, plan)
        _only_typed(runner_facts)
        m = _only_typed(read_manifest, plan)
        if m is not None:
            _only_typed(verify_engine_file, plan, m)


# -- byte readers -------------------------------------------------------------------------------------------
def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(min_value=0, max_value=2**31), st.integers(0, 255)), min_size=1, max_size=8)


def _read_safetensors(d: Path) -> None:
    _only_typed(ck.read_header, d / ck.SINGLE_FILE)
    refs = _only_typed(ck.vision_refs, d)
    if refs:
        _only_typed(lambda: list(ck.iter_tensors(refs, ck.parse_dtype("fp32"))))
        _only_typed(ck.weights_fingerprint, d)


@FUZZ
@given(data=st.binary(max_size=2000), header=json_values, changes=edits)
def test_safetensors_random_bytes(work, data, header, changes):
    d = _scratch(work, "st")
    (d / "config.json").write_bytes((work["ckpt"] / "config.json").read_bytes())
    blob = json.dumps(header).encode()
    real = next(work["ckpt"].glob("model-0000*.safetensors")).read_bytes()
    for content in (data, struct.pack("<Q", len(blob)) + blob + data, _mutate(real, changes)):
        (d / ck.SINGLE_FILE).write_bytes(content)
        _read_safetensors(d)


@FUZZ
@given(dtype=st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "BOOL", "F8_E4M3", "U64", "??"]),
       shape=st.lists(st.integers(0, 9), max_size=3), a=st.integers(0, 400), b=st.integers(0, 400),
       tail=st.integers(0, 400))  # fmt: skip
def test_safetensors_header_entries(work, dtype, shape, a, b, tail):
    """Valid JSON headers with random entries: offsets that overlap, run past the file, disagree
    with the shape, dtypes torch has no type for."""
    d = _scratch(work, "st2")
    (d / "config.json").write_bytes((work["ckpt"] / "config.json").read_bytes())
    header = json.dumps({"vision_model.conv1.weight": {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}})
    (d / ck.SINGLE_FILE).write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(tail))
    _read_safetensors(d)


@pytest.fixture(scope="module")
def onnx_seed(exported) -> bytes:
    return Path(exported[("fp32", 504)]).read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), changes=edits, structured=st.booleans())
def test_onnx_readers_random_bytes(work, onnx_seed, data, changes, structured):
    from step37_deploy.backends import OnnxrtRunner, session_from_onnx
    from step37_deploy.export import read_metadata
    from step37_deploy.runtime import _recorded_metadata

    d = _scratch(work, "onnx")
    path = d / "x.onnx"
    path.write_bytes(_mutate(onnx_seed, changes) if structured else data)
    meta = _only_typed(read_metadata, path)
    _only_typed(onnx_facts, path)
    _only_typed(_recorded_metadata, "onnx", path)
    if meta is not None:
        _only_typed(ck.check_artifact_source, work["ckpt"], path, meta)
    _only_typed(lambda: OnnxrtRunner(session_from_onnx(path)).activate())


@FUZZ
@given(data=st.binary(max_size=3000), match=st.booleans())
def test_engine_reader_random_bytes(work, data, match):
    plan, seed = _manifest_seed(work)
    plan.write_bytes(data)
    if match:  # a manifest that vouches for these bytes: what is left is TensorRT's part
        seed = {**seed, "engine_sha256": hashlib.sha256(data).hexdigest(), "engine_bytes": len(data)}
    manifest_path(plan).write_text(json.dumps(seed))
    _only_typed(inspect_engine, plan)
    m = _only_typed(read_manifest, plan)
    if m is not None:
        _only_typed(verify_engine_file, plan, m)


# -- images (the serving input) ---------------------------------------------------------------------------
def _image_seeds() -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    out = []
    for mode, fmt, kw in [("RGBA", "PNG", {}), ("RGB", "JPEG", {}), ("P", "GIF", {}), ("I;16", "PNG", {}),
                          ("RGB", "WEBP", {}), ("RGB", "TIFF", {})]:  # fmt: skip
        im = Image.fromarray(rgb).convert("RGBA" if mode == "RGBA" else "RGB")
        if mode == "P":
            im = im.convert("P")
            kw = {"save_all": True, "append_images": [im.rotate(90)]}
        if mode == "I;16":
            im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        if fmt == "JPEG":
            ex = Image.Exif()
            ex[0x0112] = 6
            kw = {"exif": ex}
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


_IMAGES = _image_seeds()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(_IMAGES))), changes=edits, data=st.binary(max_size=600), raw=st.booleans())
def test_image_bytes(seed, changes, data, raw):
    """Damaged PNG/JPEG/GIF/16-bit PNG/WebP/TIFF bytes: an :class:`InputError` or a preprocessed image
    (pixel limit lowered so a damaged header cannot ask for a huge decode)."""
    from step37_deploy.errors import InputError
    from step37_deploy.preprocess import PreprocessConfig, preprocess

    blob = data if raw else _mutate(_IMAGES[seed], changes)
    try:
        pre = preprocess(blob, PreprocessConfig(max_pixels=1_000_000))
    except InputError:
        return
    assert pre.global_view.shape == (3, 728, 728)
