import pytest
import torch

from step37_deploy.config import VisionConfig, preset
from step37_deploy.errors import InputError
from step37_deploy.model import Step37VisionModel, apply_rope_interleaved, rope_2d_angles


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Step37VisionModel(preset("tiny").vision).eval()


@pytest.mark.parametrize("size, tokens", [(728, 169), (504, 81), (518, 100), (28, 1)])
def test_output_shapes(tiny, size, tokens):
    with torch.no_grad():
        y = tiny(torch.randn(2, 3, size, size))
    assert y.shape == (2, tokens, 4 * tiny.config.width)


def test_non_square_grid(tiny):
    with torch.no_grad():
        y = tiny(torch.randn(1, 3, 728, 504))
    assert y.shape == (1, 13 * 9, 256)


def test_state_dict_names_are_the_checkpoints():
    keys = set(Step37VisionModel(preset("tiny").vision).state_dict())
    for k in [
        "conv1.weight",
        "positional_embedding",
        "ln_pre.weight",
        "ln_pre.bias",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.attn.in_proj_bias",
        "transformer.resblocks.0.attn.out_proj.weight",
        "transformer.resblocks.1.ln_1.weight",
        "transformer.resblocks.1.ln_2.bias",
        "transformer.resblocks.1.ls_1.gamma",
        "transformer.resblocks.1.ls_2.gamma",
        "transformer.resblocks.1.mlp.c_fc.weight",
        "transformer.resblocks.1.mlp.c_proj.bias",
        "vit_downsampler1.weight",
        "vit_downsampler2.bias",
    ]:
        assert k in keys
    assert "conv1.bias" not in keys and not any("ln_post" in k or "class_embedding" in k for k in keys)


@pytest.mark.parametrize(
    "x, words",
    [
        (torch.randn(3, 728, 728), "must be"),
        (torch.randn(1, 4, 728, 728), "3 channels"),
        (torch.zeros(1, 3, 728, 728, dtype=torch.int64), "floating-point"),
        (torch.randn(1, 3, 730, 728), "multiple of the patch size"),
    ],
)
def test_bad_inputs(tiny, x, words):
    with pytest.raises(InputError, match=words):
        tiny(x)


def test_posemb_trained_grid_is_the_table_and_other_grids_resample(tiny):
    g = tiny.config.posemb_grid
    assert torch.equal(tiny.sample_abs_posemb(g, g)[0], tiny.positional_embedding)
    pe = tiny.sample_abs_posemb(36, 36)
    assert pe.shape == (1, 36 * 36, tiny.config.width)
    # bilinear resampling keeps the corner regions close to the table's corners
    table = tiny.positional_embedding.reshape(g, g, -1)
    assert torch.allclose(pe[0].reshape(36, 36, -1).mean((0, 1)), table.mean((0, 1)), atol=0.05)


def test_rope_is_relative_in_both_axes():
    """q.k after 2-D RoPE depends only on the (dy, dx) offset between tokens."""
    head_dim, gh, gw = 16, 5, 6
    ang = rope_2d_angles(gh, gw, head_dim, 10000.0, cls_token=False)
    cos, sin = ang.cos(), ang.sin()
    q = torch.randn(head_dim, dtype=torch.float64)
    k = torch.randn(head_dim, dtype=torch.float64)
    n = gh * gw
    qr = apply_rope_interleaved(q.expand(1, 1, n, head_dim), cos.double(), sin.double())[0, 0]
    kr = apply_rope_interleaved(k.expand(1, 1, n, head_dim), cos.double(), sin.double())[0, 0]

    def idx(y, x):
        return y * gw + x

    a = qr[idx(1, 1)] @ kr[idx(2, 3)]
    b = qr[idx(2, 2)] @ kr[idx(3, 4)]
    c = qr[idx(1, 1)] @ kr[idx(3, 2)]  # a different offset
    assert torch.allclose(a, b) and not torch.allclose(a, c)
    # first half of the pairs follows the column index, second half the row index
    assert torch.equal(ang[idx(0, 3), : head_dim // 4], ang[idx(4, 3), : head_dim // 4])
    assert torch.equal(ang[idx(2, 0), head_dim // 4 :], ang[idx(2, 5), head_dim // 4 :])


def test_optional_cls_and_ln_post_paths():
    base = dict(width=64, layers=1, heads=4, mlp_ratio=2.0)
    torch.manual_seed(0)
    plain = Step37VisionModel(VisionConfig(**base)).eval()
    cls = Step37VisionModel(VisionConfig(**base, use_cls_token=True, use_ln_post=True)).eval()
    sd = cls.state_dict()
    assert sd["positional_embedding"].shape[0] == 52 * 52 + 1 and "class_embedding" in sd and "ln_post.weight" in sd
    x = torch.randn(1, 3, 504, 504)
    with torch.no_grad():
        assert cls(x).shape == plain(x).shape == (1, 81, 256)
    # the CLS token takes part in attention: changing it changes the patch outputs
    with torch.no_grad():
        y0 = cls(x)
        cls.class_embedding.add_(1.0)
        assert not torch.allclose(y0, cls(x))


def test_fp16_policy_runs_and_stays_close(tiny):
    x = torch.randn(1, 3, 504, 504)
    half = Step37VisionModel(tiny.config).eval()
    half.load_state_dict(tiny.state_dict())
    half = half.half().set_attention_impl("explicit")
    with torch.no_grad():
        ref, got = tiny(x), half(x.half()).float()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    assert got.dtype == torch.float32 and cos.min() > 0.999


def test_explicit_attention_equals_sdpa(tiny):
    x = torch.randn(2, 3, 504, 504)
    with torch.no_grad():
        a = tiny(x)
        b = tiny.set_attention_impl("explicit")(x)
        tiny.set_attention_impl("sdpa")
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
