"""ConvNeXt encoder, numerically identical to torchvision's ``convnext_base/small/tiny``.

Returns the outputs of the four stages (torchvision ``features[1, 3, 5, 7]``), NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from segface_jax.models.layers import (
    Dtype,
    RematUnit,
    depth_rates,
    depthwise_conv,
    gelu,
    layer_norm,
    linear,
    patchify_conv,
    remat_call,
    stochastic_depth,
)

_EPS = 1e-6  # every ConvNeXt LayerNorm (torchvision's LayerNorm2d and the block norm)


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """ConvNeXt hyper-parameters; presets follow torchvision."""

    dims: tuple[int, ...] = (128, 256, 512, 1024)
    depths: tuple[int, ...] = (3, 3, 27, 3)
    kernel_size: int = 7
    stochastic_depth_prob: float = 0.5  # training only; torchvision's default per preset

    @classmethod
    def base(cls) -> ConvNeXtConfig:
        """torchvision ``convnext_base``."""
        return cls()

    @classmethod
    def small(cls) -> ConvNeXtConfig:
        """torchvision ``convnext_small``."""
        return cls(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), stochastic_depth_prob=0.4)

    @classmethod
    def tiny(cls) -> ConvNeXtConfig:
        """torchvision ``convnext_tiny``."""
        return cls(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), stochastic_depth_prob=0.1)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each stage output."""
        return self.dims


class ConvNeXtBlock(RematUnit, nnx.Module):
    """Depthwise 7x7 conv, LayerNorm, MLP with exact GELU, layer scale, residual."""

    def __init__(self, dim: int, kernel_size: int, drop_rate: float = 0.0, *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.truncated_normal(0.02)
        self.dwconv_kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, dim),
                                            param_dtype))
        self.dwconv_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.norm = layer_norm(dim, _EPS, dtype, param_dtype, rngs)
        self.fc1 = linear(dim, 4 * dim, dtype, param_dtype, rngs)
        self.fc2 = linear(4 * dim, dim, dtype, param_dtype, rngs)
        self.layer_scale = nnx.Param(jnp.full((dim,), 1e-6, param_dtype))
        self.drop_path = stochastic_depth(drop_rate)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dt = self.dtype or x.dtype
        # after the convolution the block works on the (pixels, C) view: the gradients of the
        # conv bias and the layer scale are then sums over axis 0 of a 2-D array, not over
        # (1, H, W) at batch 1, which XLA:CPU runs many times slower (bench/xla_cpu_reduce.py)
        y = depthwise_conv(x, self.dwconv_kernel[...].astype(dt), None).reshape(-1, x.shape[-1])
        y = self.fc2(gelu(self.fc1(self.norm(y + self.dwconv_bias[...].astype(dt)))))
        return x + self.drop_path((self.layer_scale[...].astype(dt) * y).reshape(x.shape))


class Downsample(nnx.Module):
    """LayerNorm then a 2x2 stride-2 conv between stages."""

    def __init__(self, din: int, dout: int, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.norm = layer_norm(din, _EPS, dtype, param_dtype, rngs)
        self.conv = patchify_conv(din, dout, 2, dtype, param_dtype, rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.conv(self.norm(x))


class Stem(nnx.Module):
    """4x4 stride-4 conv then LayerNorm (torchvision ``features[0]``)."""

    def __init__(self, dim: int, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = patchify_conv(3, dim, 4, dtype, param_dtype, rngs)
        self.norm = layer_norm(dim, _EPS, dtype, param_dtype, rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.norm(self.conv(x))


class ConvNeXtStage(nnx.Module):
    """A stack of ConvNeXt blocks at one resolution."""

    def __init__(self, dim: int, depth: int, kernel_size: int,
                 drop_rates: Sequence[float] = (), *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        rates = list(drop_rates) or [0.0] * depth
        self.blocks = nnx.List([
            ConvNeXtBlock(dim, kernel_size, rates[i], dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
            for i in range(depth)
        ])

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for block in self.blocks:
            x = remat_call(block, x)
        return x


class ConvNeXt(nnx.Module):
    """ConvNeXt encoder: (B, H, W, 3) -> four NHWC stage outputs at strides 4, 8, 16, 32."""

    def __init__(self, cfg: ConvNeXtConfig, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = Stem(cfg.dims[0], **kw)
        rates = depth_rates(cfg.stochastic_depth_prob, cfg.depths, 1)
        self.stages = nnx.List([
            ConvNeXtStage(d, n, cfg.kernel_size, r, **kw)
            for d, n, r in zip(cfg.dims, cfg.depths, rates)
        ])
        self.downsamples = nnx.List([
            Downsample(a, b, **kw) for a, b in zip(cfg.dims[:-1], cfg.dims[1:])
        ])

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return outs
