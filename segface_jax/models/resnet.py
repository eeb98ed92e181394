"""ResNet-101 encoder, numerically identical to torchvision's ``resnet101`` (v1.5: stride on 3x3).

Returns the outputs of ``layer1..layer4`` (strides 4, 8, 16, 32), NHWC.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segface_jax.models.layers import BatchNorm, Dtype, RematUnit, apply_conv, remat_call

_EPS = 1e-5  # torchvision ResNet BatchNorm


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Bottleneck ResNet hyper-parameters."""

    depths: tuple[int, ...] = (3, 4, 23, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    expansion: int = 4

    @classmethod
    def resnet101(cls) -> ResNetConfig:
        """torchvision ``resnet101``."""
        return cls()

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each stage output."""
        return tuple(w * self.expansion for w in self.widths)


def _conv(cin, cout, k, stride, dtype, param_dtype, rngs):
    p = (k - 1) // 2
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                    use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Bottleneck(RematUnit, nnx.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each with BatchNorm; projection shortcut if needed."""

    def __init__(self, cin: int, width: int, stride: int, expansion: int, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        cout = width * expansion
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv1 = _conv(cin, width, 1, 1, rngs=rngs, **kw)
        self.bn1 = BatchNorm(width, _EPS, **kw)
        self.conv2 = _conv(width, width, 3, stride, rngs=rngs, **kw)
        self.bn2 = BatchNorm(width, _EPS, **kw)
        self.conv3 = _conv(width, cout, 1, 1, rngs=rngs, **kw)
        self.bn3 = BatchNorm(cout, _EPS, **kw)
        self.has_downsample = stride != 1 or cin != cout
        if self.has_downsample:
            self.downsample_conv = _conv(cin, cout, 1, stride, rngs=rngs, **kw)
            self.downsample_bn = BatchNorm(cout, _EPS, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = jax.nn.relu(self.bn1(apply_conv(self.conv1, x)))
        y = jax.nn.relu(self.bn2(apply_conv(self.conv2, y)))
        y = self.bn3(apply_conv(self.conv3, y))
        identity = (self.downsample_bn(apply_conv(self.downsample_conv, x)) if self.has_downsample
                    else x)
        return jax.nn.relu(y + identity)


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    """torch ``MaxPool2d(3, 2, padding=1)``: padding never wins the max."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet(nnx.Module):
    """ResNet encoder: (B, H, W, 3) -> the four ``layer`` outputs at strides 4, 8, 16, 32."""

    def __init__(self, cfg: ResNetConfig, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv1 = nnx.Conv(3, 64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                              use_bias=False, rngs=rngs, **kw)
        self.bn1 = BatchNorm(64, _EPS, **kw)
        layers, cin = [], 64
        for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(cin, width, stride, cfg.expansion, rngs=rngs, **kw))
                cin = width * cfg.expansion
            layers.append(nnx.List(blocks))
        self.layers = nnx.List(layers)

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(apply_conv(self.conv1, x))))
        outs = []
        for blocks in self.layers:
            for block in blocks:
                x = remat_call(block, x)
            outs.append(x)
        return outs
