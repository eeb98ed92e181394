"""CPU-only kernels (``depthwise_conv``'s shifted slices, ``apply_conv``'s 1x1 matmul) are
chosen per platform at lowering, so one multi-platform export runs lax convolutions on CUDA and
TPU and the fast kernels on CPU, and gradients flow through the choice."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segface_jax.models.layers import apply_conv, depthwise_conv, kernels_for, lax_convolutions
from segface_jax.models.mobilenet_v3 import InvertedResidual

C = 8  # channels of the depthwise conv: its grouped convolution has feature_group_count = C
# float32 sums of order-1 terms taken in another order (at most 9 * 8 terms in the lax
# comparisons, 390 in the float64 ones below): max |d| / max |ref| measured 8e-8 (outputs) and
# 5.5e-7 (gradients); tests/test_modules.py uses the same bound.
TOL = 2e-6
PLATFORMS = ("cpu", "cuda", "tpu")


def _rel(a: jax.Array, ref: jax.Array) -> float:
    a, ref = np.asarray(a), np.asarray(ref)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _inputs() -> tuple[jax.Array, jax.Array, nnx.Conv]:
    """NHWC input, 3x3 depthwise kernel, and a strided 1x1 conv after it."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, C))
    k = jax.random.normal(jax.random.key(1), (3, 3, C))
    return x, k, nnx.Conv(C, 6, (1, 1), strides=(2, 2), rngs=nnx.Rngs(0))


def _exported(platforms: tuple[str, ...]) -> jax.export.Exported:
    """Depthwise 3x3 conv then strided 1x1 conv, lowered on this (CPU) host for ``platforms``."""
    x, k, conv = _inputs()
    f = jax.jit(lambda x, k: apply_conv(conv, depthwise_conv(x, k, None)))
    return jax.export.export(f, platforms=platforms)(x, k)


def _convolutions(text: str) -> list[int]:
    """feature_group_count of every ``stablehlo.convolution`` in a StableHLO module's text."""
    ops = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    return sorted(int(m.group(1)) if (m := re.search(r"feature_group_count = (\d+)", op)) else 1
                  for op in ops)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerators_lower_to_lax_convolutions(platform):
    text = _exported((platform,)).mlir_module()
    assert _convolutions(text) == [1, C]  # the 1x1 conv and the grouped (depthwise) conv
    assert "stablehlo.dot_general" not in text


def test_cpu_lowers_to_slices_and_matmul():
    text = _exported(("cpu",)).mlir_module()
    assert _convolutions(text) == []
    assert "stablehlo.dot_general" in text and "stablehlo.slice" in text


def test_multi_platform_export_holds_both_and_runs_on_cpu():
    exported = _exported(PLATFORMS)
    text = exported.mlir_module()
    # every branch is kept, selected by the platform index when the artefact is compiled
    assert set(_convolutions(text)) == {1, C} and "stablehlo.dot_general" in text
    x, k, conv = _inputs()
    want = conv(depthwise_conv(x, k, None, impl="lax"))
    assert _rel(exported.call(x, k), want) <= TOL


def test_gradients_through_platform_choice_match_lax():
    x, k, conv = _inputs()
    b = jnp.linspace(-1.0, 1.0, C)

    def loss(conv: nnx.Conv, x: jax.Array, k: jax.Array, fast: bool) -> jax.Array:
        y = depthwise_conv(x, k, b, impl=None if fast else "lax")
        return jnp.sum(jnp.sin(apply_conv(conv, y) if fast else conv(y)))

    for transform in (nnx.jit, lambda f: f):  # staged (the train step) and eager
        got, want = (jax.tree.leaves(transform(nnx.grad(
            lambda c, x, k, fast=fast: loss(c, x, k, fast), argnums=(0, 1, 2)))(conv, x, k))
            for fast in (True, False))
        assert len(got) == len(want) == 4  # conv bias and kernel, x, k
        for g, w in zip(got, want):
            assert _rel(g, w) <= TOL


def test_vmap_and_eager_match_lax():
    x, k, _ = _inputs()
    want = depthwise_conv(x, k, None, impl="lax")
    assert _rel(depthwise_conv(x, k, None), want) <= TOL
    per_image = jax.jit(jax.vmap(lambda xi: depthwise_conv(xi[None], k, None)[0]))
    assert _rel(per_image(x), want) <= TOL
    with pytest.raises(ValueError, match="impl"):
        depthwise_conv(x, k, None, impl="conv")


def test_kernels_for_one_platform_fix_the_choice_at_trace_time():
    x, k, conv = _inputs()

    def jaxpr() -> str:
        # a new function each time: jax caches the trace of a function it has seen
        return str(jax.make_jaxpr(lambda x: apply_conv(conv, depthwise_conv(x, k, None)))(x))

    assert "platform_index" in jaxpr()
    with lax_convolutions():  # what the ONNX export traces: no platform_dependent left
        text = jaxpr()
    assert "platform_index" not in text and text.count("conv_general_dilated[") == 2
    with kernels_for("gpu"):
        assert jaxpr() == text
    with kernels_for("cpu"):  # what a train step jitted for CPU devices traces
        text = jaxpr()
    assert "platform_index" not in text and "conv_general_dilated[" not in text
    assert "dot_general[" in text and "slice[" in text
    assert "platform_index" in jaxpr()  # leaving the block restores the per-platform choice


def test_train_step_traces_for_its_mesh_platform():
    """The train step, jitted for a mesh of CPU devices, holds the CPU kernels and no platform
    switch: differentiating the switch would trace and differentiate both branches."""
    from segface_jax.train import optim, step

    class Tiny(nnx.Module):  # a depthwise conv and a 1x1 conv to 4 classes
        def __init__(self):
            self.kernel = nnx.Param(jax.random.normal(jax.random.key(1), (3, 3, 3)))
            self.conv = nnx.Conv(3, 4, (1, 1), rngs=nnx.Rngs(0))

        def __call__(self, x, landmarks=None):
            return apply_conv(self.conv, depthwise_conv(x, self.kernel[...], None))

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    tx = optim.adamw(1e-3, 0.0)
    graphdef, state = step.init_state(Tiny(), tx, mesh=mesh)
    train = step.make_train_step(graphdef, tx, mesh, dice_group=None, needs_landmarks=False)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 7, 9, 3), dtype=np.uint8),
             "label": rng.integers(0, 4, (2, 7, 9)).astype(np.uint8),
             "landmarks": np.zeros((2, 5, 2), np.float32)}
    text = str(train.trace(state, batch).jaxpr)
    assert "platform_index" not in text and "conv_general_dilated[" not in text
    assert "dot_general[" in text and "slice[" in text


def test_mobilenet_block_export_round_trips():
    # expand 1x1, depthwise 5x5 stride 2, squeeze-excitation (1x1 convs), project 1x1
    graphdef, state = nnx.split(InvertedResidual(16, 5, 32, 24, True, "hardswish", 2,
                                                 rngs=nnx.Rngs(0)))
    f = jax.jit(lambda x: nnx.merge(graphdef, state)(x))
    x = jax.random.normal(jax.random.key(2), (2, 9, 11, 16))
    exported = jax.export.deserialize(jax.export.export(f, platforms=PLATFORMS)(x).serialize())
    assert exported.platforms == PLATFORMS
    assert _rel(exported.call(x), f(x)) <= TOL  # the same CPU program: measured 1.2e-7


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 1), (7, 1), (5, 2)])
def test_depthwise_gradients_match_float64(k, stride):
    """The CPU kernel's hand-written backward (stride 1) and autodiff's (strided) against the
    definition in float64: dx[h, w] = sum_ij g[(h + p - i) / s, (w + p - j) / s] K[i, j] and
    dK[i, j] = sum_bhw xpad[s h + i, s w + j] g[h, w], at odd sizes where the windows clip."""
    rng = np.random.default_rng(k + stride)
    x = rng.standard_normal((2, 13, 15, C)).astype(np.float32)
    kernel = rng.standard_normal((k, k, C)).astype(np.float32)
    p = (k - 1) // 2
    ho, wo = (13 - 1) // stride + 1, (15 - 1) // stride + 1
    g = rng.standard_normal((2, ho, wo, C)).astype(np.float32)
    dx, dk = jax.jit(jax.grad(lambda x, kernel: jnp.vdot(
        depthwise_conv(x, kernel, None, impl="slices", stride=stride), g), (0, 1)))(x, kernel)

    xp = np.pad(x.astype(np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
    want_dk = np.zeros((k, k, C))
    want_dxp = np.zeros_like(xp)
    for i in range(k):
        for j in range(k):
            window = (slice(None), slice(i, i + stride * (ho - 1) + 1, stride),
                      slice(j, j + stride * (wo - 1) + 1, stride))
            want_dk[i, j] = (xp[window] * g).sum(axis=(0, 1, 2))
            want_dxp[window] += g * kernel[i, j].astype(np.float64)
    want_dx = want_dxp[:, p:p + 13, p:p + 15]
    # sums of at most 2 * 13 * 15 = 390 float32 products of order-1 terms: rounding stays
    # below 1e-6 of the largest entry; a wrong tap or offset is off by order 1
    assert _rel(dx, want_dx) <= TOL
    assert _rel(dk, want_dk) <= TOL
    # bfloat16 activations with a float32 kernel: each gradient keeps its input's dtype
    dx, dk = jax.grad(lambda x, kernel: jnp.vdot(depthwise_conv(
        x, kernel, None, impl="slices", stride=stride).astype(jnp.float32), g), (0, 1))(
        jnp.asarray(x, jnp.bfloat16), kernel)
    assert (dx.dtype, dk.dtype) == (jnp.bfloat16, jnp.float32)


def test_depthwise_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd kernel size"):
        depthwise_conv(jnp.zeros((1, 8, 8, C)), jnp.zeros((2, 2, C)), None)


@pytest.mark.parametrize("k, stride, padding", [
    (3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))),  # ResNet's, EfficientNet's 3x3
    (7, 2, ((3, 3), (3, 3))),  # ResNet's stem
    (4, 3, ((0, 2), (1, 0))),  # uneven padding, and strides that leave input rows unread
])
def test_conv_gradients_on_cpu_match_float64(k, stride, padding):
    """``apply_conv`` of a k x k convolution on CPU: the kernel gradient from one matmul per tap
    (``layers._conv_kernel_grad``), the input and bias gradients from XLA, against the
    definition in float64: dK[i, j] = sum_bhw xpad[s h + i, s w + j]^T g[h, w]. Sums of at most
    2 x 13 x 15 float32 products of order-1 terms per entry: rounding stays below 1e-6 of the
    largest one (measured 1.9e-8 to 2.8e-7); a wrong tap, offset or stride is off by order 1."""
    rng = np.random.default_rng(k + stride)
    cin, cout = 5, 6
    conv = nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding,
                    rngs=nnx.Rngs(0))
    conv.kernel[...] = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
    conv.bias[...] = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((2, 13, 15, cin)).astype(np.float32)
    xp = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
    ho, wo = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
    g = rng.standard_normal((2, ho, wo, cout)).astype(np.float32)

    def loss(conv: nnx.Conv, x: jax.Array) -> jax.Array:
        return jnp.vdot(apply_conv(conv, x), g)

    def convolutions(platform: str) -> int:
        """Convolutions XLA compiles for the kernel gradient alone, traced for ``platform``."""
        with kernels_for(platform):
            compiled = nnx.jit(nnx.grad(loss)).lower(conv, x).compile()
        return compiled.as_text().count(" convolution(")

    assert (convolutions("cpu"), convolutions("gpu")) == (0, 1)
    kernel = np.asarray(conv.kernel[...], np.float64)
    want_dk = np.zeros((k, k, cin, cout))
    want_dxp = np.zeros_like(xp)
    for i in range(k):
        for j in range(k):
            window = (slice(None), slice(i, i + stride * (ho - 1) + 1, stride),
                      slice(j, j + stride * (wo - 1) + 1, stride))
            want_dk[i, j] = np.einsum("bhwc,bhwd->cd", xp[window], g)
            want_dxp[window] += g @ kernel[i, j].T
    (top, _), (left, _) = padding
    want_dx = want_dxp[:, top:top + 13, left:left + 15]
    for platform in ("cpu", None):  # traced for CPU devices (the train step), or for any
        with kernels_for(platform):
            grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(conv, x)
        assert _rel(grads.kernel[...], want_dk) <= TOL
        assert _rel(dx, want_dx) <= TOL
        assert _rel(grads.bias[...], g.astype(np.float64).sum(axis=(0, 1, 2))) <= TOL
