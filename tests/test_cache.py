"""The embedding cache: LRU by size, off at 0, and a cached answer identical to a fresh one."""

import io

import numpy as np
import pytest
from PIL import Image

from step37_deploy.errors import InputError
from step37_deploy.runtime import EmbeddingCache, VisionEmbedder, image_key

from .preprocess_cases import synthetic_image


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [_png(synthetic_image(1000, 800)), _png(synthetic_image(300, 300)), _png(synthetic_image(700, 300))]


def test_lru_evicts_least_recently_used_by_size():
    cache = EmbeddingCache(1000 / 2**20)  # a 1000-byte budget
    for k in "abc":
        cache.put(k, k.upper(), 300)
    assert len(cache) == 3 and cache.used_bytes == 900
    assert cache.get("a") == "A"  # "a" is now the most recently used: "b" is the oldest
    cache.put("d", "D", 300)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C" and cache.get("d") == "D"
    cache.put("e", "E", 650)  # needs two evictions: the oldest are now "a" and "c"
    assert [k for k in "acde" if cache.get(k) is not None] == ["d", "e"]
    assert cache.used_bytes == 950 and cache.evictions == 3
    cache.put("big", "X", 1001)  # larger than the whole budget: not stored, nothing evicted
    assert cache.get("big") is None and len(cache) == 2
    st = cache.stats()
    assert st["entries"] == 2 and st["bytes"] == 950 and st["max_bytes"] == 1000
    assert st["hits"] == cache.hits > 0 and st["misses"] == cache.misses > 0


def test_replacing_a_key_keeps_the_size_right():
    cache = EmbeddingCache(1000 / 2**20)
    cache.put("a", 1, 400)
    cache.put("a", 2, 500)
    assert cache.used_bytes == 500 and len(cache) == 1 and cache.get("a") == 2


def test_off_at_zero_and_bad_size():
    cache = EmbeddingCache(0)
    cache.put("a", "A", 1)
    assert not cache.enabled and cache.get("a") is None and len(cache) == 0
    assert cache.hits == cache.misses == 0  # off: nothing is looked up, nothing counted
    for bad in (-1, float("nan")):
        with pytest.raises(InputError, match="cache size"):
            EmbeddingCache(bad)


def test_image_key_is_sha256_of_the_bytes(tmp_path):
    import hashlib

    f = tmp_path / "a.png"
    f.write_bytes(IMAGES[0])
    assert image_key(f) == image_key(str(f)) == image_key(IMAGES[0]) == hashlib.sha256(IMAGES[0]).hexdigest()
    assert image_key(IMAGES[1]) != image_key(IMAGES[0])
    arr = synthetic_image(50, 40)
    assert image_key(arr) == image_key(arr.copy()) != image_key(arr[:, :-1])
    assert image_key(Image.fromarray(arr)) is None  # no bytes to hash: computed, not cached
    assert image_key(tmp_path / "missing.png") is None  # preprocess reports it


@pytest.fixture(scope="module")
def embedders(tiny_fp32):
    fresh = VisionEmbedder.from_artifacts(tiny_fp32, "torch", batch_size=4)
    cached = VisionEmbedder(
        fresh.global_runner, fresh.crop_runner, fresh.weight, fresh.bias, fresh.tokens, 4, cache_mb=64
    )
    return fresh, cached


def _same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.num_crops == b.num_crops and a.newline_mask == b.newline_mask
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))


def test_cached_answer_is_identical_to_a_fresh_one(embedders):
    fresh, cached = embedders
    assert fresh.cache.enabled is False
    want = fresh.embed_images(IMAGES)
    first = cached.embed_images(IMAGES)
    assert (cached.cache.hits, cached.cache.misses) == (0, 3) and len(cached.cache) == 3
    again = cached.embed_images(list(reversed(IMAGES)))  # all hits, in the order asked
    assert (cached.cache.hits, cached.cache.misses) == (3, 3)
    for w, f, a in zip(want, first, reversed(again), strict=True):
        _same(f, w)
        _same(a, w)
    # A caller editing its result changes neither the cache nor the next answer.
    again[0].features[:] = 0
    again[0].token_ids.clear()
    _same(cached.embed_images([IMAGES[-1]])[0], want[-1])


def test_repeats_in_one_call_are_computed_once(embedders):
    fresh, _ = embedders
    cached = VisionEmbedder(
        fresh.global_runner, fresh.crop_runner, fresh.weight, fresh.bias, fresh.tokens, 4, cache_mb=64
    )
    calls = []
    real = cached._embed_uncached
    cached._embed_uncached = lambda ims, *kinds: calls.append(len(ims)) or real(ims, *kinds)
    out = cached.embed_images([IMAGES[1], IMAGES[1], Image.open(io.BytesIO(IMAGES[1])), IMAGES[1]])
    assert calls == [2]  # the bytes once, the PIL image (no key) once
    for e in out[1:]:
        _same(e, out[0])
    assert out[0].features is not out[1].features  # private copies


def test_cache_evicts_embeddings_by_their_size(embedders):
    fresh, _ = embedders
    one = fresh.embed_images([IMAGES[1]])[0]  # 169 rows, no crops
    size = one.features.nbytes
    small = VisionEmbedder(
        fresh.global_runner, fresh.crop_runner, fresh.weight, fresh.bias, fresh.tokens, 4, cache_mb=1.5 * size / 2**20
    )
    small.embed_images([IMAGES[1]])
    small.embed_images([IMAGES[2]])  # 3 crops: larger than the budget, not stored
    assert len(small.cache) == 1
    small.embed_images([_png(synthetic_image(310, 300))])  # another crop-free image evicts the first
    assert len(small.cache) == 1 and small.cache.evictions == 1
    small.embed_images([IMAGES[1]])
    assert small.cache.hits == 0 and small.cache.misses == 4
