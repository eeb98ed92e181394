"""Small building blocks shared by the encoders and the decoder, with torch's numerics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type | None


class Buffer(nnx.Variable):
    """A stored, non-trainable array loaded from the checkpoint (torch's ``register_buffer``)."""


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact (erf) GELU, as torch's ``nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(dim: int, eps: float, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with an explicit epsilon (torch 1e-5, ConvNeXt 1e-6)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def linear(din: int, dout: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
           use_bias: bool = True) -> nnx.Linear:
    """Dense layer over the last axis (torch ``nn.Linear``; kernel is the transposed weight)."""
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)


def patchify_conv(din: int, dout: int, patch: int, dtype: Dtype, param_dtype: Dtype,
                  rngs: nnx.Rngs) -> nnx.Conv:
    """Non-overlapping conv with kernel = stride = ``patch`` and no padding (patch embed/merge)."""
    return nnx.Conv(din, dout, (patch, patch), strides=(patch, patch), padding="VALID",
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray | None,
                   impl: str | None = None) -> jnp.ndarray:
    """Stride-1 depthwise conv, symmetric padding: (B, H, W, C), (k, k, C) -> (B, H, W, C).

    XLA:CPU's grouped convolution is ~13x slower than torch's here (see PERF.md), while a sum
    of k*k shifted slices is fused into one fast loop, so CPU uses the slices and other backends
    use ``lax.conv_general_dilated``; ``impl`` ("slices" or "lax") forces one. Both compute the
    same sum.
    """
    k = kernel.shape[0]
    p = (k - 1) // 2
    impl = impl or ("slices" if jax.default_backend() == "cpu" else "lax")
    if impl == "slices":
        b, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        out = jnp.zeros_like(x)
        for i in range(k):
            for j in range(k):
                out = out + xp[:, i:i + h, j:j + w, :] * kernel[i, j]
    else:
        out = jax.lax.conv_general_dilated(
            x, kernel[:, :, None, :], window_strides=(1, 1), padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    return out if bias is None else out + bias


def resize_bilinear(x: jnp.ndarray, hw: tuple[int, int]) -> jnp.ndarray:
    """Bilinear resize of NHWC like torch ``interpolate(align_corners=False)``, no antialias."""
    if x.shape[1:3] == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "bilinear", antialias=False)
