"""Per-module parity with torchvision / segment-anything, so a failure names its culprit.

Each torch module is randomised with ``reference.randomize`` (every parameter, norm scales and
biases included) and copied with the converter's own rules into the JAX module's structure
(never initialised: ``tests.helpers.from_torch``), which runs jitted, as SegFace runs it.
Tolerance: max |delta| / max |reference| <= 2e-6 unless stated. A single float32 module
accumulates a few hundred roundings of ~6e-8 each; measured errors (eagerly, before the tests
were jitted) are 1e-7 to 6e-7, while the porting mistakes
these tests guard against (transposed index, swapped H/W padding, mirrored kernel, tanh GELU,
wrong epsilon, align_corners) move outputs by 1e-4 or more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom as SamPE
from segment_anything.modeling.transformer import Attention as SamAttention
from segment_anything.modeling.transformer import TwoWayTransformer as SamTwoWay
from torchvision.models.convnext import CNBlock
from torchvision.models.swin_transformer import PatchMerging as TvPatchMerging
from torchvision.models.swin_transformer import SwinTransformerBlock

from segface_jax import align
from segface_jax.convert import reference
from segface_jax.convert.rules import CONVNEXT_RULES, DECODER_RULES, SWIN_RULES, conv_transpose
from segface_jax.models import decoder, layers, swin
from segface_jax.models.convnext import ConvNeXtBlock
from segface_jax.models.layers import depthwise_conv, resize_bilinear
from tests.helpers import from_torch, rel_error, run_jitted, to_nhwc

TOL = 2e-6


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hw, shift", [
    ((14, 14), 0), ((14, 14), 3),   # exact windows
    ((10, 17), 0), ((10, 17), 3),   # non-square, padded on both axes
    ((5, 17), 3),                   # H fits one window: only the W shift survives (clipping)
    ((7, 7), 3),                    # one window: shift clipped on both axes
])
def test_swin_block(hw, shift):
    tm = reference.randomize(SwinTransformerBlock(32, 2, [7, 7], [shift, shift]), 1).eval()
    jm = from_torch(lambda rngs: swin.SwinBlock(32, 2, 7, shift, 4.0, rngs=rngs), tm, SWIN_RULES,
                    "backbone.0.1.0.", "backbone.stages.0.blocks.0.")
    x = _rand(2, *hw, 32)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert rel_error(run_jitted(jm, x.numpy()), ref) <= TOL


def test_swin_block_transposed_hw_is_detected():
    """The non-square case really distinguishes H from W: swapping them changes the output."""
    tm = reference.randomize(SwinTransformerBlock(32, 2, [7, 7], [3, 3]), 1).eval()
    jm = from_torch(lambda rngs: swin.SwinBlock(32, 2, 7, 3, 4.0, rngs=rngs), tm, SWIN_RULES,
                    "backbone.0.1.0.", "backbone.stages.0.blocks.0.")
    x = _rand(1, 10, 17, 32)
    with torch.no_grad():
        ref = tm(x).numpy()
    swapped = run_jitted(jm, x.numpy().transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert rel_error(swapped, ref) > 1e-3


def test_relative_position_index_matches_torchvision():
    tm = SwinTransformerBlock(32, 2, [7, 7], [0, 0])
    np.testing.assert_array_equal(swin.relative_position_index(7),
                                  tm.attn.relative_position_index.numpy())


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
def test_patch_merging(hw):
    tm = reference.randomize(TvPatchMerging(32), 2).eval()
    jm = from_torch(lambda rngs: swin.PatchMerging(32, rngs=rngs), tm, SWIN_RULES,
                    "backbone.0.2.", "backbone.merges.0.")
    x = _rand(2, *hw, 32)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert rel_error(run_jitted(jm, x.numpy()), ref) <= TOL


@pytest.mark.parametrize("impl", ["slices", "lax"])
def test_convnext_block(impl, monkeypatch):
    tm = reference.randomize(CNBlock(32, 1e-6, 0.0), 3).eval()
    jm = from_torch(lambda rngs: ConvNeXtBlock(32, 7, rngs=rngs), tm, CONVNEXT_RULES,
                    "backbone.0.1.0.", "backbone.stages.0.blocks.0.")
    from segface_jax.models import convnext

    monkeypatch.setattr(convnext, "depthwise_conv",
                        lambda x, k, b: depthwise_conv(x, k, b, impl=impl))
    x = _rand(2, 32, 11, 9)
    with torch.no_grad():
        ref = to_nhwc(tm(x))
    assert rel_error(run_jitted(jm, to_nhwc(x)), ref) <= TOL


@pytest.mark.parametrize("downsample", [1, 2])
def test_sam_attention(downsample):
    tm = reference.randomize(SamAttention(64, 4, downsample), 4).eval()
    jm = from_torch(lambda rngs: decoder.Attention(64, 4, downsample, rngs=rngs), tm,
                    DECODER_RULES, "face_decoder.transformer.final_attn_token_to_image.",
                    "face_decoder.transformer.final_attn_token_to_image.")
    q, k, v = _rand(2, 5, 64, seed=1), _rand(2, 30, 64, seed=2), _rand(2, 30, 64, seed=3)
    with torch.no_grad():
        ref = tm(q, k, v).numpy()
    assert rel_error(run_jitted(jm, q.numpy(), k.numpy(), v.numpy()), ref) <= TOL


def test_softmax_is_jaxs_forward_with_torchs_gradient():
    """``layers.softmax``: the forward pass bit for bit ``jax.nn.softmax``'s; the gradient
    within TOL of torch's softmax backward in float64 (float32 rounding of a sum over 19
    classes: measured 4.7e-7, as for jax.nn.softmax's autodiff; dropping the sum term gives
    2.6), on logits spread like attention logits."""
    x64 = _rand(3, 50, 19, seed=4).double() * 4
    g64 = _rand(3, 50, 19, seed=5).double()
    xt = x64.clone().requires_grad_()
    torch.softmax(xt, -1).backward(g64)
    x = jnp.asarray(x64.numpy(), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.softmax)(x)),
                                  np.asarray(jax.jit(jax.nn.softmax)(x)))
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(layers.softmax(x), jnp.asarray(g64.numpy(),
                                                                               x.dtype))))(x)
    assert rel_error(np.asarray(grad), xt.grad.numpy()) <= TOL


def test_two_way_transformer():
    tm = reference.randomize(SamTwoWay(depth=2, embedding_dim=64, num_heads=4, mlp_dim=128), 5)
    jm = from_torch(lambda rngs: decoder.TwoWayTransformer(2, 64, 4, 128, rngs=rngs), tm.eval(),
                    DECODER_RULES, "face_decoder.transformer.", "face_decoder.transformer.")
    img, pe, tok = _rand(2, 64, 6, 5, seed=1), _rand(1, 64, 6, 5, seed=2), _rand(2, 7, 64, seed=3)
    with torch.no_grad():
        q_ref, k_ref = tm(img, pe, tok)
    flat = lambda t: t.flatten(2).transpose(1, 2).numpy()  # noqa: E731
    q, k = run_jitted(jm, flat(img), flat(pe), tok.numpy())
    assert rel_error(q, q_ref.numpy()) <= TOL
    assert rel_error(k, k_ref.numpy()) <= TOL


class _TorchFusion(torch.nn.Module):
    """Upstream's fusion: project, resize to stride 4, concatenate deepest-first, 1x1 conv."""

    def __init__(self, dims):
        super().__init__()
        self.linear_c = torch.nn.ModuleList(reference._Proj(d) for d in dims)
        self.linear_fuse = torch.nn.Conv2d(4 * 256, 256, kernel_size=1, bias=False)

    def forward(self, feats):
        maps = [F.interpolate(p(f), size=feats[0].shape[-2:], mode="bilinear",
                              align_corners=False) for p, f in zip(self.linear_c, feats)]
        return self.linear_fuse(torch.cat(maps[::-1], dim=1))


def test_fusion_equals_upstream_concatenate_then_fuse():
    """Ours sums per-scale products with the fuse kernel's blocks instead of concatenating
    (decoder.MultiScaleFusion): the same linear map, so it must be as close to torch float64
    as torch's own float32 concatenate-then-fuse (2x + 2e-7; measured 4.9e-7 vs 1.2e-6), and a
    swapped block order (deepest-first is upstream's) must fail."""
    dims = (24, 40, 112, 160)
    tm = reference.randomize(_TorchFusion(dims), 9).eval()
    jm = from_torch(lambda rngs: decoder.MultiScaleFusion(dims, rngs=rngs), tm, DECODER_RULES,
                    "", "fusion.")
    feats = [_rand(2, d, s, s + 1, seed=i) for i, (d, s) in enumerate(zip(dims, (18, 9, 5, 3)))]
    with torch.no_grad():
        ref32 = to_nhwc(tm(feats))
        ref64 = to_nhwc(tm.double()([f.double() for f in feats]))
    out = run_jitted(jm, [to_nhwc(f) for f in feats])
    ours, theirs = rel_error(out, ref64), rel_error(ref32, ref64)
    print(f"\nfusion vs float64: ours {ours:.1e}, torch float32 {theirs:.1e}")
    assert out.shape == (2, 18, 19, 256) and ours <= 2 * theirs + 2e-7
    kernel = jm.linear_fuse.kernel[...]
    jm.linear_fuse.kernel.set_value(jnp.concatenate(jnp.split(kernel, 4)[::-1]))
    assert rel_error(run_jitted(jm, [to_nhwc(f) for f in feats]), ref64) > 1e-2


def test_conv_transpose_kernel_is_not_mirrored():
    tm = reference.randomize(torch.nn.ConvTranspose2d(16, 8, 2, 2), 6)
    x = _rand(2, 16, 5, 7)
    with torch.no_grad():
        ref = to_nhwc(tm(x))
    kernel = conv_transpose(tm.weight.detach().numpy())
    out = decoder.conv_transpose_2x2(to_nhwc(x), kernel, tm.bias.detach().numpy())
    assert rel_error(np.asarray(out), ref) <= TOL
    mirrored = decoder.conv_transpose_2x2(to_nhwc(x), kernel[::-1, ::-1], tm.bias.detach().numpy())
    assert rel_error(np.asarray(mirrored), ref) > 1e-2


def test_face_decoder_token_order_and_upscaling():
    names = ("background", "face", "hair")
    tm = reference.randomize(reference._FaceDecoder(names), 7).eval()
    jm = from_torch(lambda rngs: decoder.FaceDecoder(names, rngs=rngs), tm, DECODER_RULES,
                    "face_decoder.", "face_decoder.")
    img, pe = _rand(2, 256, 4, 6, seed=1), _rand(1, 256, 4, 6, seed=2)
    with torch.no_grad():
        ref = to_nhwc(tm(img, pe))
    out = run_jitted(jm, to_nhwc(img), to_nhwc(pe)[0])
    assert out.shape == (2, 16, 24, 3)
    assert rel_error(np.asarray(out), ref) <= TOL


def test_positional_encoding_matches_sam():
    tm = reference.randomize(SamPE(128), 8)
    jm = decoder.PositionEmbeddingRandom(rngs=nnx.Rngs(0))
    jm.positional_encoding_gaussian_matrix.set_value(
        jnp.asarray(tm.positional_encoding_gaussian_matrix.numpy()))
    ref = tm((6, 9)).permute(1, 2, 0).numpy()
    # values are sin/cos in [-1, 1]: absolute 2e-6 (arguments reach ~100 rad in float32)
    np.testing.assert_allclose(np.asarray(jm(6, 9)), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("src, dst", [((4, 6), (16, 24)), ((7, 7), (56, 56)), ((16, 16), (16, 16))])
def test_bilinear_resize_matches_torch(src, dst):
    x = _rand(2, 8, *src)
    ref = to_nhwc(F.interpolate(x, size=dst, mode="bilinear", align_corners=False))
    assert rel_error(np.asarray(resize_bilinear(to_nhwc(x), dst)), ref) <= TOL


def test_grid_sample_matches_torch():
    img = _rand(2, 3, 9, 13)
    grid = torch.rand(2, 11, 7, 2, generator=torch.Generator().manual_seed(1)) * 2.6 - 1.3
    ref = to_nhwc(F.grid_sample(img, grid, mode="bilinear", align_corners=False))
    out = align.grid_sample(jnp.asarray(to_nhwc(img)), jnp.asarray(grid.numpy()))
    # measured: 8.7e-7 relative (one of 462 values; torch's vectorised kernel rounds differently)
    assert rel_error(np.asarray(out), ref) <= TOL


def _landmarks(res: int) -> np.ndarray:
    base = (align.STANDARD_FACE_POINTS + 1) * (res - 1) / 2
    rs = np.random.RandomState(0)
    return (base[None] * 0.8 + 30 + rs.randn(2, 5, 2) * 4).astype(np.float32)


def test_similarity_matrix_matches_reference():
    """The 2x2 rotation-scale part (entries ~1.3) and the translation (~70 px) each within 2x
    (+1e-7) of torch float32's own distance from float64, relative to the part's scale: a
    float32 fit of points ~300 px from the origin loses precision to cancellation in both
    frameworks. Measured: ours 1.2e-7 and 2.8e-5 px, torch float32 1.8e-7 and 3.2e-5 px."""
    lm = _landmarks(512)
    ref = reference.face_align_matrix(torch.from_numpy(lm).double(), 512).numpy()
    torch32 = reference.face_align_matrix(torch.from_numpy(lm), 512).double().numpy()
    out = np.asarray(align.face_align_matrix(jnp.asarray(lm), 512))
    assert out.shape == ref.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[:, 2], [[0, 0, 1]] * 2)
    for part in (np.s_[:, :2, :2], np.s_[:, :2, 2]):
        scale = np.abs(ref[part]).max()
        ours, theirs = (np.abs(m[part] - ref[part]).max() / scale for m in (out, torch32))
        assert ours <= 2 * theirs + 1e-7, (part, ours, theirs)


def test_invert_similarity_is_the_matrix_inverse():
    m = align.face_align_matrix(jnp.asarray(_landmarks(512)), 512)
    # float32 closed form vs float64 LU inverse: entries are O(1) (linear part) and O(100)
    # (translation); 1e-5 relative is ~100 float32 ulps, a sign or transpose error is O(1).
    np.testing.assert_allclose(np.asarray(align.invert_similarity(m)),
                               np.linalg.inv(np.asarray(m, np.float64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["warp", "inverse"])
def test_warp_grids_match_float64_reference(which):
    """The grids against the float64 reference, in pixels.

    torch's own float32 grids are up to 1.3e-3 px off the float64 ones (arctanh near the
    border multiplies rounding by ~100); ours must be no further (measured 1.0e-3 / 1.2e-4 px).
    A wrong half-pixel convention or warp factor moves them by >= 0.05 px.
    """
    res = 128
    lm = _landmarks(res)
    jfn = align.warp_grid if which == "warp" else align.inverse_warp_grid
    tfn = reference.warp_grid if which == "warp" else reference.inverse_warp_grid
    m64 = reference.face_align_matrix(torch.from_numpy(lm).double(), res)
    ref = tfn(m64, (res, res), (res, res)).numpy()
    ours = np.asarray(jfn(align.face_align_matrix(jnp.asarray(lm), res), (res, res), (res, res)))
    t32 = tfn(reference.face_align_matrix(torch.from_numpy(lm), res), (res, res), (res, res))
    px = res / 2
    torch_err = np.abs(t32.numpy() - ref).max() * px
    our_err = np.abs(ours - ref).max() * px
    assert our_err <= max(2 * torch_err, 1e-4), (our_err, torch_err)


def test_align_and_unalign_match_torch_on_smooth_input():
    """Warp a smooth image and map it back like the model does, against torch in float32."""
    res = 96
    yy, xx = np.meshgrid(np.linspace(-1, 1, res), np.linspace(-1, 1, res), indexing="ij")
    img = np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy], -1)[None].astype(np.float32)
    img = np.repeat(img, 2, 0)
    lm = _landmarks(res)
    m = reference.face_align_matrix(torch.from_numpy(lm), res)
    x = torch.from_numpy(img).permute(0, 3, 1, 2)
    warped = F.grid_sample(x, reference.warp_grid(m, (res, res), (res, res)), align_corners=False)
    back = F.grid_sample(warped, reference.inverse_warp_grid(m, (res, res), (res, res)),
                         align_corners=False)
    jw, jm = align.align_faces(jnp.asarray(img), jnp.asarray(lm))
    jb = align.unalign_logits(jw, jm, (res, res))
    # smooth input (|gradient| <= 0.1 / px): grid noise of ~1e-3 px moves values by ~1e-4
    np.testing.assert_allclose(np.asarray(jw), to_nhwc(warped), rtol=0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(jb), to_nhwc(back), rtol=0, atol=2e-4)


def test_depthwise_impls_agree():
    x = jax.random.normal(jax.random.key(0), (1, 20, 24, 16))
    k = jax.random.normal(jax.random.key(1), (7, 7, 16))
    a = depthwise_conv(x, k, None, impl="slices")
    b = depthwise_conv(x, k, None, impl="lax")
    assert rel_error(np.asarray(a), np.asarray(b)) <= TOL
