"""Small building blocks shared by the encoders and the decoder, with torch's numerics."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type | None
M = TypeVar("M", bound=nnx.Module)


def abstract(build: Callable[[nnx.Rngs], M]) -> M:
    """The module ``build(rngs)`` makes, with ShapeDtypeStruct leaves: no random numbers drawn,
    nothing allocated beyond key-free constants (zero biases, unit norm scales).

    The same graph and leaves as ``build(nnx.Rngs(0))``. Shape evaluation of the constructor
    alone (``nnx.eval_shape``) slows down with every parameter: each draw from an ``nnx.Rngs``
    stores a new counter, and Flax compares its sharding, which for a traced counter makes JAX
    scan the whole trace so far. Here the key is traced, so the initialisers stay abstract,
    while the counter is computed as a concrete value (``ensure_compile_time_eval``): the
    released models' structures take 0.5-2.4 s instead of 1.9-15.5 s, 2.9-9.6x faster
    (``bench/abstract_model.py``, side by side, 2-core AMD EPYC).
    """
    def traced(key: jax.Array) -> M:
        with jax.ensure_compile_time_eval():
            return build(nnx.Rngs(key))

    return nnx.eval_shape(traced, jax.random.key(0))


class Buffer(nnx.Variable):
    """A stored, non-trainable array loaded from the checkpoint (torch's ``register_buffer``)."""


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact (erf) GELU, as torch's ``nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over the rows of the input's (-1, C) view.

    The same per-row arithmetic. What changes is the backward pass: the scale and bias
    gradients become sums over axis 0 of a 2-D array. On a (1, N, C) array (batch 1), XLA:CPU
    sends the sum to YNNPACK as a sum over axis 1, several times slower for a LayerNorm's
    gradient (bench/xla_cpu_reduce.py).
    """

    def __call__(self, x: jnp.ndarray, *args, **kwargs) -> jnp.ndarray:
        return super().__call__(x.reshape(-1, x.shape[-1]), *args, **kwargs).reshape(x.shape)


def layer_norm(dim: int, eps: float, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> LayerNorm:
    """LayerNorm over the last axis with an explicit epsilon (torch 1e-5, ConvNeXt 1e-6)."""
    return LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Linear(nnx.Linear):
    """``nnx.Linear`` over the rows of the input's (-1, C) view, for the same reason as
    ``LayerNorm``: the bias gradient becomes a sum over axis 0 of a 2-D array instead of a sum
    over the middle axis of (1, N, C), which XLA:CPU runs several times slower at batch 1."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def linear(din: int, dout: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
           use_bias: bool = True) -> Linear:
    """Dense layer over the last axis (torch ``nn.Linear``; kernel is the transposed weight)."""
    return Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Softmax whose derivative is torch's closed form, y * (dx - sum(y * dx)).

    The forward pass computes what ``jax.nn.softmax`` does. Its derivative, unless JAX's
    ``jax_softmax_custom_jvp`` option is on (off by default in JAX 0.10), is autodiff of
    exp / sum, which XLA:CPU runs as several slow fused reductions over the short class or
    window axis; this one is a single sum."""
    unnormalized = jnp.exp(x - x.max(axis, keepdims=True))
    return unnormalized / unnormalized.sum(axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple:
    (x,), (dx,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (dx - (y * dx).sum(axis, keepdims=True))


def patchify_conv(din: int, dout: int, patch: int, dtype: Dtype, param_dtype: Dtype,
                  rngs: nnx.Rngs) -> nnx.Conv:
    """Non-overlapping conv with kernel = stride = ``patch`` and no padding (patch embed/merge)."""
    return nnx.Conv(din, dout, (patch, patch), strides=(patch, patch), padding="VALID",
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


# None: choose per platform at lowering; else the platform to trace for ("cpu", "gpu", ...), or
# "lax" for lax convolutions on every platform.
_KERNELS = contextvars.ContextVar("kernels", default=None)


@contextlib.contextmanager
def kernels_for(platform: str | None) -> Iterator[None]:
    """Trace ``depthwise_conv`` and ``apply_conv`` for one platform only (``"cpu"``: the
    XLA:CPU kernels; any other: plain lax convolutions).

    By default both are ``lax.platform_dependent``, so one trace lowers right for every
    platform (a StableHLO export made on a CPU host). A function jitted for known devices
    (the train step, the evaluation step) traces for their platform instead: autodiff of the
    switch traces and differentiates both branches, which made tracing and lowering a small
    MobileNetV3's train step take 9.4 s instead of 6.4 s, and compiling it 43 s instead of
    38 s. Only tracing inside the block is affected: a function jitted and traced before keeps
    its cached choice.
    """
    token = _KERNELS.set(platform)
    try:
        yield
    finally:
        _KERNELS.reset(token)


def lax_convolutions() -> contextlib.AbstractContextManager[None]:
    """Trace ``depthwise_conv`` and ``apply_conv`` as plain lax convolutions on every platform.

    For converters that target no XLA platform and cannot lower ``lax.platform_dependent``
    (jax2onnx); the CPU-only kernels are XLA:CPU workarounds.
    """
    return kernels_for("lax")


def _cpu_or_default(*args: jnp.ndarray, cpu: Callable, default: Callable) -> jnp.ndarray:
    """``cpu(*args)`` when lowered for CPU, else ``default(*args)`` (inside ``kernels_for``:
    the choice for its platform)."""
    platform = _KERNELS.get()
    if platform is None:
        return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
    return cpu(*args) if platform == "cpu" else default(*args)


def _shifted_sum(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Depthwise conv as the sum of k*k shifted (strided) slices times the kernel's taps."""
    k = kernel.shape[0]
    p = (k - 1) // 2
    b, h, w, c = x.shape
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = jnp.zeros((b, ho, wo, c), x.dtype)
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    for i in range(k):
        for j in range(k):
            out = out + xp[:, i:i + span_h:stride, j:j + span_w:stride] * kernel[i, j]
    return out


@jax.custom_vjp
def _depthwise_slices(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Stride-1 ``_shifted_sum`` with a backward pass written for XLA:CPU
    (``_depthwise_slices_bwd``)."""
    return _shifted_sum(x, kernel, 1)


def _depthwise_slices_fwd(x: jnp.ndarray, kernel: jnp.ndarray
                          ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    """The forward pass, keeping only the input and the kernel for the backward."""
    return _shifted_sum(x, kernel, 1), (x, kernel)


def _depthwise_slices_bwd(residuals: tuple[jnp.ndarray, jnp.ndarray],
                          g: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The gradients of a stride-1 ``_shifted_sum`` in a few fused passes instead of
    autodiff's 2 k*k.

    The input gradient is the same shifted sum of ``g`` with the kernel flipped, one fused
    loop. The kernel gradient, dK[i, j, c] = sum over b, h, w of xpad[b, h + i, w + j, c] *
    g[b, h, w, c], is one batched contraction (channel-major) of k row-shifted copies of the
    padded input with k column-shifted copies of ``g`` over each image row (w), in float32 (or
    wider), then a sum over the rows: autodiff's k*k full-image reductions take 2.4x as long
    at ConvNeXt's 7x7 shapes (bench/depthwise.py). Summing per row first keeps the rounding
    far below torch's own (tests/test_platform_kernels.py checks it against float64).
    """
    x, kernel = residuals
    k = kernel.shape[0]
    p = (k - 1) // 2
    b, h, w, c = x.shape
    dx = _shifted_sum(g, kernel[::-1, ::-1], 1).astype(x.dtype)
    # channel-major, so the contraction below is a plain batched matmul over (b, c, h)
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).transpose(0, 3, 1, 2)
    gp = jnp.pad(g.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (0, 0), (2 * p, 2 * p)))
    rows = jnp.stack([xp[:, :, i:i + h] for i in range(k)], axis=2)  # (b, c, k, h, w + 2p)
    cols = jnp.stack([gp[..., 2 * p - j:2 * p - j + w + 2 * p] for j in range(k)],
                     axis=2)  # (b, c, k, h, w + 2p): g shifted right by j
    per_row = jnp.einsum("bcihw,bcjhw->bchij", rows, cols,
                         preferred_element_type=accumulation_dtype(x))
    return dx, per_row.sum(axis=(0, 2)).transpose(1, 2, 0).astype(kernel.dtype)


_depthwise_slices.defvjp(_depthwise_slices_fwd, _depthwise_slices_bwd)


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray | None,
                   impl: str | None = None, stride: int = 1) -> jnp.ndarray:
    """Depthwise conv, symmetric padding (k-1)//2: (B, H, W, C), (k, k, C) -> (B, H/s, W/s, C).

    XLA:CPU's grouped convolution is many times slower than torch's (bench/depthwise.py), while
    a sum of k*k shifted (strided) slices is fused into one fast loop, with a hand-written
    backward pass (``_depthwise_slices_bwd``). The choice is made per platform at lowering
    (``lax.platform_dependent``): CPU runs the slices, every other platform
    ``lax.conv_general_dilated``, so one multi-platform export is right everywhere. ``impl``
    ("slices" or "lax") forces one on every platform. Both compute the same sum.
    """
    k = kernel.shape[0]
    p = (k - 1) // 2
    if k % 2 == 0:
        raise ValueError(f"depthwise_conv needs an odd kernel size (symmetric padding), not {k}")

    def slices(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
        # strided layers keep autodiff's backward: spreading the gradient onto the input grid
        # for the hand-written one made them slower (bench/depthwise.py)
        return _depthwise_slices(x, kernel) if stride == 1 else _shifted_sum(x, kernel, stride)

    def grouped(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
        return jax.lax.conv_general_dilated(
            x, kernel[:, :, None, :], window_strides=(stride, stride), padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])

    if impl is None:
        out = _cpu_or_default(x, kernel, cpu=slices, default=grouped)
    elif impl in ("slices", "lax"):
        out = (slices if impl == "slices" else grouped)(x, kernel)
    else:
        raise ValueError(f"depthwise_conv impl must be 'slices' or 'lax', not {impl!r}")
    return out if bias is None else out + bias


def _lax_conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: tuple[int, int],
              padding: tuple[tuple[int, int], ...]) -> jnp.ndarray:
    """NHWC x HWIO convolution, as ``nnx.Conv`` computes it."""
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: tuple[int, int],
          padding: tuple[tuple[int, int], ...]) -> jnp.ndarray:
    """``_lax_conv`` whose kernel gradient, lowered for CPU, is one matmul per tap
    (``_conv_kernel_grad``) instead of XLA:CPU's convolution over the whole image."""
    return _lax_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
    return _lax_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals

    def xla(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
        return jax.vjp(lambda k: _lax_conv(x, k, strides, padding), kernel)[1](g)[0]

    def taps(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
        return _conv_kernel_grad(x, g, kernel, strides, padding)

    _, input_vjp = jax.vjp(lambda x: _lax_conv(x, kernel, strides, padding), x)
    return input_vjp(g)[0], _cpu_or_default(x, g, cpu=taps, default=xla)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_kernel_grad(x: jnp.ndarray, g: jnp.ndarray, kernel: jnp.ndarray,
                      strides: tuple[int, int], padding: tuple[tuple[int, int], ...]
                      ) -> jnp.ndarray:
    """dK[i, j] = sum over b, h, w of xpad[b, i + s h, j + s w]^T g[b, h, w]: one (Cin, N) by
    (N, Cout) matmul per tap, accumulated in float32 (or wider).

    XLA:CPU computes a convolution's kernel gradient as a convolution whose window is the
    whole image; these matmuls take up to 3.3x less time at most of ResNet-101's and
    EfficientNetV2-M's shapes, and about as long at the others (``python
    bench/cpu_backward.py``: ResNet's 7x7 stem 80 ms instead of 199, a 3x3 layer at 32x32x256
    14 instead of 24; torch's oneDNN takes 19 and 17)."""
    kh, kw, cin, cout = kernel.shape
    b, ho, wo, _ = g.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    g2 = g.reshape(-1, cout)
    taps = [jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                          (1, sh, sw, 1)).reshape(-1, cin)
            for i in range(kh) for j in range(kw)]
    wide = accumulation_dtype(x)
    dk = jnp.stack([jax.lax.dot_general(t, g2, (((0,), (0,)), ((), ())),
                                        preferred_element_type=wide) for t in taps])
    return dk.reshape(kernel.shape).astype(kernel.dtype)


def apply_conv(conv: nnx.Conv, x: jnp.ndarray) -> jnp.ndarray:
    """``conv(x)``, with kernels chosen for XLA:CPU: a 1x1 convolution runs as a (strided)
    matmul, and a larger one takes its kernel gradient from matmuls (``_conv_kernel_grad``).

    XLA:CPU runs a 1x1 convolution 1.3-2.6x slower than the same contraction as a dot
    (measured at EfficientNet/ResNet shapes); other platforms were not measured and keep the
    convolution. The choice is made per platform at lowering (``lax.platform_dependent``);
    the arithmetic is the same sum, in the dtype ``conv`` itself would use. Larger kernels run
    the same convolution forward on every platform; only the kernel gradient differs. Grouped
    or dilated convolutions, padding other than explicit pairs, and tracing for a non-CPU
    platform (``kernels_for``; ``lax_convolutions``, whose converters know no custom
    gradients) run ``conv(x)`` as it is.
    """
    strides = conv.strides if isinstance(conv.strides, tuple) else (conv.strides,) * 2
    bias = None if conv.bias is None else conv.bias[...]
    if tuple(conv.kernel_size) == (1, 1):
        sh, sw = strides

        def as_matmul(x: jnp.ndarray) -> jnp.ndarray:
            x, kernel, b = conv.promote_dtype((x, conv.kernel[...], bias), dtype=conv.dtype)
            y = x[:, ::sh, ::sw] @ kernel[0, 0]
            return y if b is None else y + b

        return _cpu_or_default(x, cpu=as_matmul, default=lambda x: conv(x))
    plain = (conv.feature_group_count != 1 or not isinstance(conv.padding, tuple | list)
             or any(d not in (None, 1) for d in (conv.input_dilation, conv.kernel_dilation)))
    if plain or _KERNELS.get() not in (None, "cpu"):
        return conv(x)
    x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], bias), dtype=conv.dtype)
    y = _conv(x, kernel, tuple(strides), tuple(tuple(p) for p in conv.padding))
    return y if bias is None else y + bias


def hardsigmoid(x: jnp.ndarray) -> jnp.ndarray:
    """torch ``hardsigmoid``: relu6(x + 3) / 6."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hardswish(x: jnp.ndarray) -> jnp.ndarray:
    """torch ``hardswish``: x * relu6(x + 3) / 6."""
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


ACTIVATIONS = {"relu": jax.nn.relu, "hardswish": hardswish, "silu": jax.nn.silu, None: None}


class BatchNorm(nnx.Module):
    """torch ``BatchNorm2d`` over NHWC: running statistics in inference, torch's update in training.

    ``momentum`` is torch's (weight of the new batch); the running variance is updated with
    the unbiased batch variance, as torch does. ``train_mode`` switches to batch statistics.
    """

    def __init__(self, c: int, eps: float, momentum: float = 0.1, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32):
        self.eps = eps
        self.momentum = momentum
        self.dtype = dtype
        self.train_mode = False
        self.scale = nnx.Param(jnp.ones((c,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dt = jnp.dtype(self.dtype or x.dtype)
        if not self.train_mode:
            return _normalize(x, self.mean[...], self.var[...], self.scale[...], self.bias[...],
                              self.eps, dt)
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps, dt)
        n = x.size // x.shape[-1]
        m = self.momentum
        self.mean.set_value((1 - m) * self.mean[...] + m * mean)
        self.var.set_value((1 - m) * self.var[...] + m * var * n / max(n - 1, 1))
        return y


def _normalize(x: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray, scale: jnp.ndarray,
               bias: jnp.ndarray, eps: float, dt: jnp.dtype) -> jnp.ndarray:
    """BatchNorm's affine normalisation with given statistics, computed in ``dt``."""
    inv = jax.lax.rsqrt(var + eps) * scale
    return ((x - mean.astype(dt)) * inv.astype(dt) + bias.astype(dt)).astype(dt)


def accumulation_dtype(x: jnp.ndarray) -> jnp.dtype:
    """The dtype sums, softmaxes and statistics are computed in: float32, or x's own if wider
    (bfloat16 compute accumulates in float32; a float64 run stays float64 throughout)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` in ``accumulation_dtype(x)``."""
    return x.astype(accumulation_dtype(x))


def _batch_stats(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-channel mean and biased variance of an NHWC batch, in float32 at least, over its
    (-1, C) view (a 2-D column sum: XLA:CPU's sums over the leading axes of a 4-D array are
    slower)."""
    xf = upcast(x).reshape(-1, x.shape[-1])
    mean = xf.mean(axis=0)
    return mean, jnp.mean(jnp.square(xf - mean), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, eps: float,
                     dt: jnp.dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Training-mode BatchNorm: (output, batch mean, biased batch variance), with the closed-form
    backward torch and cuDNN use.

    Autodiff of the mean/variance formula makes several passes over the activations for the
    statistics' gradients; the closed form needs one reduction pass (the sums of g and g x-hat)
    and one elementwise pass: gx = scale / sigma (g - mean(g) - x-hat mean(g x-hat)), plus the
    terms for cotangents of the returned statistics (zero in training: the running averages
    take no gradient). BatchNorm + ReLU forward and backward at ResNet-101's 128x128x256 on a
    2-core EPYC: 18 ms instead of 40 (torch 26; ``python bench/cpu_backward.py``)."""
    return _batch_norm_train_fwd(x, scale, bias, eps, dt)[0]


def _batch_norm_train_fwd(x, scale, bias, eps, dt):
    mean, var = _batch_stats(x)
    y = _normalize(x, mean, var, scale, bias, eps, dt)
    return (y, mean, var), (x, mean, jax.lax.rsqrt(var + eps), scale)


def _batch_norm_train_bwd(eps, dt, residuals, cotangents):
    x, mean, inv, scale = residuals
    g, g_mean, g_var = cotangents
    c = x.shape[-1]
    n = x.size // c
    centred = upcast(x).reshape(-1, c) - mean
    xhat = centred * inv
    g = g.astype(centred.dtype).reshape(-1, c)
    g_bias, g_scale = g.sum(axis=0), (g * xhat).sum(axis=0)
    gx = (scale * inv) * (g - g_bias / n - xhat * (g_scale / n))
    gx = gx + g_mean / n + centred * (2 * g_var / n)
    return (gx.reshape(x.shape).astype(x.dtype), g_scale.astype(scale.dtype),
            g_bias.astype(scale.dtype))


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class ConvBNAct(nnx.Module):
    """torchvision ``Conv2dNormActivation``: conv (no bias, pad (k-1)//2), BatchNorm, activation.

    Depthwise convs (``groups == channels``) keep a (k, k, 1, C) kernel and run through
    ``depthwise_conv``.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: str | None = "relu", *, eps: float, momentum: float = 0.1,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.stride = stride
        self.depthwise = groups > 1
        self.act = act
        self.dtype = dtype
        p = (k - 1) // 2
        self.conv = nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                             feature_group_count=groups, use_bias=False, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(cout, eps, momentum, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.depthwise:
            dt = self.dtype or x.dtype
            x = depthwise_conv(x.astype(dt), self.conv.kernel[...][:, :, 0, :].astype(dt), None,
                               stride=self.stride)
        else:
            x = apply_conv(self.conv, x)
        x = self.bn(x)
        return x if self.act is None else ACTIVATIONS[self.act](x)


class SqueezeExcitation(nnx.Module):
    """torchvision ``SqueezeExcitation``: global mean, 1x1 fc1, activation, 1x1 fc2, gate, scale."""

    def __init__(self, c: int, squeeze: int, act: str, gate: str, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.act = act
        self.gate = gate
        self.fc1 = nnx.Conv(c, squeeze, (1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Conv(squeeze, c, (1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = x.mean(axis=(1, 2), keepdims=True)
        s = apply_conv(self.fc2, ACTIVATIONS[self.act](apply_conv(self.fc1, s)))
        s = hardsigmoid(s) if self.gate == "hardsigmoid" else jax.nn.sigmoid(s)
        return x * s


def stochastic_depth(rate: float) -> nnx.Dropout:
    """torchvision's ``StochasticDepth(rate, "row")`` for an NHWC residual branch.

    In training, each sample's branch is dropped with probability ``rate`` and kept ones are
    scaled by 1 / (1 - rate); at inference (the default, ``deterministic``) it is the identity.
    ``set_training`` switches it and gives it a random stream; until then it holds no state.
    """
    return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=True)


def depth_rates(prob: float, depths: Sequence[int], denominator_offset: int) -> list[list[float]]:
    """Per-block stochastic-depth rates rising linearly with the block's global index.

    torchvision: rate = prob * index / (total - 1) for Swin and ConvNeXt (offset 1), and
    prob * index / total for EfficientNet (offset 0).
    """
    total = sum(depths) - denominator_offset
    rates, index = [], 0
    for n in depths:
        rates.append([prob * (index + j) / total if total > 0 else 0.0 for j in range(n)])
        index += n
    return rates


def set_training(model: nnx.Module, training: bool, rngs: nnx.Rngs | None = None) -> None:
    """Switch BatchNorm to batch statistics and stochastic depth on (or both back off).

    ``rngs`` (with a ``dropout`` stream) drives stochastic depth; without it the modules hold
    no random state (what the jitted step keeps), and a forward pass in training mode needs
    one attached first.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, BatchNorm):
            module.train_mode = training
        elif isinstance(module, nnx.Dropout) and module.rate > 0:
            module.deterministic = not training
            module.rngs = rngs.dropout if training and rngs is not None else None


REMAT_POLICIES = ("none", "block", "encoder")


class RematUnit:
    """Mixin marking an encoder block: ``set_remat(model, "block")`` rematerialises each one."""


def remat_call(module: nnx.Module, x: jnp.ndarray):
    """``module(x)``, recomputed in the backward pass when ``set_remat`` marked ``module``.

    Only the input is kept for the backward pass; everything inside is computed again there
    (``nnx.remat``: BatchNorm statistics and stochastic-depth draws are updated as usual).
    """
    if getattr(module, "remat", False):
        return nnx.remat(lambda m, y: m(y))(module, x)
    return module(x)


def set_remat(model: nnx.Module, policy: str) -> None:
    """Choose what a training step recomputes instead of storing: ``none``, every encoder
    ``block``, or the whole ``encoder`` (``model.backbone``, keeping only its input)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, not {policy!r}")
    backbone = model.backbone
    for _, module in nnx.iter_modules(model):
        if isinstance(module, RematUnit) or module is backbone:
            module.remat = False
    if policy == "encoder":
        backbone.remat = True
    elif policy == "block":
        for _, module in nnx.iter_modules(backbone):
            if isinstance(module, RematUnit):
                module.remat = True


class ResidualBlock(RematUnit, nnx.Module):
    """Apply ``self.block`` (an nnx.List) in order; add the input when ``self.residual``.

    Base of torchvision's inverted-residual family (MobileNetV3, (Fused)MBConv), whose
    subclasses set both in ``__init__``; a subclass may set ``self.drop_path`` (stochastic
    depth on the residual branch, identity at inference).
    """

    drop_path: nnx.Dropout | None = None

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = x
        for layer in self.block:
            y = layer(y)
        if not self.residual:
            return y
        return x + (self.drop_path(y) if self.drop_path is not None else y)


def tapped_features(features: nnx.List, taps: tuple[int, ...], x: jnp.ndarray) -> list:
    """Run torchvision-style ``features`` (modules or lists of modules) and collect ``taps``."""
    outs = []
    for i, layer in enumerate(features):
        for module in (layer if isinstance(layer, nnx.List) else (layer,)):
            x = remat_call(module, x)
        if i in taps:
            outs.append(x)
        if i == max(taps):
            break
    return outs


def resize_bilinear(x: jnp.ndarray, hw: tuple[int, int]) -> jnp.ndarray:
    """Bilinear resize of NHWC like torch ``interpolate(align_corners=False)``, no antialias."""
    if x.shape[1:3] == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "bilinear", antialias=False)

