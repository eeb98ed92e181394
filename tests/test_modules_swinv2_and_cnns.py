"""Per-block parity of the SwinV2, MobileNetV3, EfficientNetV2 and ResNet encoders.

Same method and bar as tests/test_modules.py (torch module randomised, copied with the
converter's own rules into a module that is never initialised, run jitted as SegFace runs it;
max |delta| / max |reference| <= 2e-6; measured eagerly 1e-7 to 1e-6).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models import efficientnet, mobilenetv3, resnet
from torchvision.models import swin_transformer as tv_swin
from torchvision.ops import SqueezeExcitation as TvSE

from segface_jax.convert import reference
from segface_jax.convert.rules import FEATURES_RULES, RESNET_RULES, SWINV2_RULES
from segface_jax.models import efficientnet_v2, layers, mobilenet_v3, swin
from segface_jax.models import resnet as jresnet
from tests.helpers import from_torch, rel_error, run_jitted, to_nhwc

TOL = 2e-6


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hw, shift", [((16, 16), 0), ((16, 16), 4), ((10, 19), 4), ((6, 19), 4)])
def test_swin_v2_block(hw, shift):
    """Cosine attention, clamped logit scale, CPB bias, zeroed k bias, post-norm, padding.

    One head sits at the clamp (scale exp(log 100) = 100), which multiplies the rounding of the
    cosine similarities by 100: torch float32 itself is then 1.9e-6 to 4.0e-6 off its float64
    run. Ours, jitted as SegFace runs it: 2.8e-6 to 5.0e-6 (the largest 2.08x torch's 2.4e-6 at
    16x16, unshifted) on an AVX2 CPU; eagerly it was 3.0e-6 to 3.5e-6 on an AVX-512 one, whose
    vector widths round XLA's sums and exponentials differently. Bound: 2e-6 plus twice the
    reference's own measured noise, and ours no further from float64 than 2x torch float32's
    distance (+1e-6), the bar of the gradient tests.
    """
    tm = reference.randomize(tv_swin.SwinTransformerBlockV2(32, 2, [8, 8], [shift, shift]), 1)
    with torch.no_grad():
        tm.attn.logit_scale[0] = 5.0  # above the log(100) clamp
    jm = from_torch(lambda rngs: swin.SwinBlock(32, 2, 8, shift, 4.0, 2, rngs=rngs), tm.eval(),
                    SWINV2_RULES, "backbone.0.1.0.", "backbone.stages.0.blocks.0.")
    assert float(tm.attn.qkv.bias[32:64].detach().abs().max()) > 0  # a k bias to be ignored
    x = _rand(2, *hw, 32)
    with torch.no_grad():
        ref = tm(x).numpy()
        ref64 = copy.deepcopy(tm).double()(x.double()).numpy()
    ours = run_jitted(jm, x.numpy())
    noise = rel_error(ref, ref64)
    assert rel_error(ours, ref) <= TOL + 2 * noise
    assert rel_error(ours, ref64) <= 2 * noise + 1e-6


def test_swin_v2_position_bias_and_table():
    tm = reference.randomize(tv_swin.ShiftedWindowAttentionV2(32, [8, 8], [0, 0], 2), 2)
    np.testing.assert_allclose(swin.relative_coords_table(8),
                               tm.relative_coords_table.reshape(-1, 2).numpy(), rtol=1e-6)
    jm = from_torch(lambda rngs: swin.WindowAttention(32, 2, 8, 2, rngs=rngs), tm, SWINV2_RULES,
                    "backbone.0.1.0.attn.", "backbone.stages.0.blocks.0.attn.")
    with torch.no_grad():
        ref = tm.get_relative_position_bias()[0].numpy()
    assert rel_error(np.asarray(jm.position_bias()), ref) <= TOL


@pytest.mark.parametrize("hw", [(8, 8), (7, 10)])
def test_patch_merging_v2(hw):
    tm = reference.randomize(tv_swin.PatchMergingV2(32), 3).eval()
    jm = from_torch(lambda rngs: swin.PatchMerging(32, 2, rngs=rngs), tm, SWINV2_RULES,
                    "backbone.0.2.", "backbone.merges.0.")
    x = _rand(2, *hw, 32)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert rel_error(run_jitted(jm, x.numpy()), ref) <= TOL


def _check_nchw(tm, jm, shape):
    x = _rand(*shape)
    with torch.no_grad():
        ref = to_nhwc(tm(x))
    assert rel_error(run_jitted(jm, to_nhwc(x)), ref) <= TOL


@pytest.mark.parametrize("cfg", [
    (16, 3, 16, 16, False, "relu", 1),       # no expansion conv
    (24, 5, 72, 40, True, "relu", 2),        # 5x5 stride-2 depthwise with SE (hardsigmoid)
    (112, 3, 672, 112, True, "hardswish", 1),  # residual
])
def test_mobilenet_inverted_residual(cfg):
    cin, k, exp, cout, se, act, stride = cfg
    tv_act = "HS" if act == "hardswish" else "RE"
    tv_cfg = mobilenetv3.InvertedResidualConfig(cin, k, exp, cout, se, tv_act, stride, 1, 1.0)
    norm = functools.partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.01)
    se_layer = functools.partial(TvSE, scale_activation=torch.nn.Hardsigmoid)
    tm = reference.randomize(mobilenetv3.InvertedResidual(tv_cfg, norm, se_layer), 4).eval()
    jm = from_torch(lambda rngs: mobilenet_v3.InvertedResidual(*cfg, rngs=rngs), tm,
                    FEATURES_RULES, "backbone.4.", "backbone.features.4.")
    _check_nchw(tm, jm, (2, cin, 13, 11))


@pytest.mark.parametrize("fused, expand, stride, cin, cout", [
    (True, 1, 1, 24, 24),    # FusedMBConv without expansion, residual
    (True, 4, 2, 24, 48),    # FusedMBConv with expansion, strided
    (False, 4, 2, 80, 160),  # MBConv strided
    (False, 6, 1, 176, 176),  # MBConv residual
])
def test_efficientnet_blocks(fused, expand, stride, cin, cout):
    norm = functools.partial(torch.nn.BatchNorm2d, eps=1e-3)
    if fused:
        cfg = efficientnet.FusedMBConvConfig(expand, 3, stride, cin, cout, 1)
        tm = efficientnet.FusedMBConv(cfg, 0.0, norm)
    else:
        cfg = efficientnet.MBConvConfig(expand, 3, stride, cin, cout, 1)
        tm = efficientnet.MBConv(cfg, 0.0, norm)
    tm = reference.randomize(tm, 5).eval()
    jm = from_torch(lambda rngs: efficientnet_v2.MBConv(fused, expand, 3, stride, cin, cout,
                                                        rngs=rngs), tm, FEATURES_RULES,
                    "backbone.3.0.", "backbone.features.3.0.")
    _check_nchw(tm, jm, (2, cin, 12, 9))


@pytest.mark.parametrize("cin, width, stride", [(64, 64, 1), (256, 128, 2), (1024, 256, 1)])
def test_resnet_bottleneck(cin, width, stride):
    down = None
    if stride != 1 or cin != 4 * width:
        down = torch.nn.Sequential(torch.nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
                                   torch.nn.BatchNorm2d(4 * width))
    tm = reference.randomize(resnet.Bottleneck(cin, width, stride, down), 6).eval()
    jm = from_torch(lambda rngs: jresnet.Bottleneck(cin, width, stride, 4, rngs=rngs), tm,
                    RESNET_RULES, "backbone.5.0.", "backbone.layers.1.0.")
    _check_nchw(tm, jm, (2, cin, 11, 9))


def test_resnet_max_pool_matches_torch():
    x = _rand(2, 8, 11, 10) - 3.0  # mostly negative: zero padding would win the max
    ref = to_nhwc(torch.nn.MaxPool2d(3, 2, 1)(x))
    np.testing.assert_array_equal(np.asarray(jresnet.max_pool_3x3_s2(to_nhwc(x))), ref)


@pytest.mark.parametrize("eps, momentum", [(1e-3, 0.01), (1e-5, 0.1)])
def test_batch_norm_inference_and_training_update(eps, momentum):
    tm = reference.randomize(torch.nn.BatchNorm2d(16, eps=eps, momentum=momentum), 7)
    jm = layers.BatchNorm(16, eps, momentum)
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
        getattr(jm, ours).set_value(getattr(tm, theirs).detach().numpy().copy())
    x = _rand(4, 16, 5, 6) * 2 + 1
    with torch.no_grad():
        ref = to_nhwc(tm.eval()(x))
    assert rel_error(np.asarray(jm(to_nhwc(x))), ref) <= TOL
    # training: batch statistics, and running statistics updated like torch (unbiased var)
    with torch.no_grad():
        ref_train = to_nhwc(tm.train()(x))
    jm.train_mode = True
    out = jm(to_nhwc(x))
    assert rel_error(np.asarray(out), ref_train) <= TOL
    np.testing.assert_allclose(np.asarray(jm.mean[...]), tm.running_mean.numpy(), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(jm.var[...]), tm.running_var.numpy(), rtol=1e-6)


def test_batch_norm_training_backward_is_torchs():
    """The closed-form training backward (``layers.batch_norm_train``) against torch's autograd
    of ``BatchNorm2d`` + ReLU in float64: the input, scale and bias gradients of ours in float32
    within the file's bar (float32 rounding of sums over 2 x 9 x 11 pixels; measured 1.3e-7 to
    2.5e-7). The cotangents of the returned batch statistics, which torch's buffers do not
    take, against autodiff of their definition in float64 (1e-12: float64 rounding only)."""
    x64 = _rand(2, 16, 9, 11, seed=3).double() * 2 + 1
    g64 = _rand(2, 16, 9, 11, seed=4).double()
    tm = reference.randomize(torch.nn.BatchNorm2d(16), 9).double().train()
    xt = x64.clone().requires_grad_()
    torch.relu(tm(xt)).backward(g64)
    want = (to_nhwc(xt.grad), tm.weight.grad.numpy(), tm.bias.grad.numpy())
    scale, bias = tm.weight.detach().numpy(), tm.bias.detach().numpy()

    def ours(x, s, b):
        y, _, _ = layers.batch_norm_train(x, s, b, 1e-5, x.dtype)
        return jnp.vdot(jax.nn.relu(y), jnp.asarray(to_nhwc(g64), x.dtype))

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(
        *(jnp.asarray(a, jnp.float32) for a in (to_nhwc(x64), scale, bias)))
    errors = [rel_error(np.asarray(a), ref) for a, ref in zip(got, want, strict=True)]
    print(f"\nBatchNorm + ReLU gradients (x, scale, bias) from torch float64: {errors}")
    assert max(errors) <= TOL

    rng = np.random.default_rng(5)
    g_mean, g_var = rng.normal(size=16), rng.normal(size=16)

    def statistics(f):
        def loss(x):
            _, mean, var = f(x)
            return jnp.vdot(mean, g_mean) + jnp.vdot(var, g_var)
        return jax.grad(loss)

    with jax.enable_x64(True):
        x = jnp.asarray(to_nhwc(x64))
        got = statistics(lambda x: layers.batch_norm_train(x, scale, bias, 1e-5, x.dtype))(x)
        ref = statistics(lambda x: (None, x.mean((0, 1, 2)), x.var((0, 1, 2))))(x)
        assert rel_error(np.asarray(got), np.asarray(ref)) <= 1e-12


def test_squeeze_excitation_gates():
    for gate, act, tv_gate, tv_act in (("hardsigmoid", "relu", torch.nn.Hardsigmoid,
                                        torch.nn.ReLU),
                                       ("sigmoid", "silu", torch.nn.Sigmoid, torch.nn.SiLU)):
        tm = reference.randomize(TvSE(32, 8, activation=tv_act, scale_activation=tv_gate), 8)
        jm = from_torch(lambda rngs: layers.SqueezeExcitation(32, 8, act, gate, rngs=rngs),  # noqa: B023
                        tm, FEATURES_RULES, "backbone.4.block.2.", "backbone.features.4.block.2.")
        _check_nchw(tm, jm, (2, 32, 7, 5))
