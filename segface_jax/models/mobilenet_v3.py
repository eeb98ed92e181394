"""MobileNetV3-Large encoder, numerically identical to torchvision's ``mobilenet_v3_large``.

Module indices mirror torchvision's ``features``; SegFace taps ``features[3, 6, 12, 16]``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from segface_jax.models.layers import (
    ConvBNAct,
    Dtype,
    ResidualBlock,
    SqueezeExcitation,
    tapped_features,
)

_BN = dict(eps=1e-3, momentum=0.01)  # torchvision MobileNetV3 BatchNorm


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple, never dropping below 90%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


@dataclasses.dataclass(frozen=True)
class MobileNetV3Config:
    """Inverted-residual settings (in, kernel, expanded, out, SE, activation, stride)."""

    blocks: tuple[tuple[int, int, int, int, bool, str, int], ...] = (
        (16, 3, 16, 16, False, "relu", 1), (16, 3, 64, 24, False, "relu", 2),
        (24, 3, 72, 24, False, "relu", 1), (24, 5, 72, 40, True, "relu", 2),
        (40, 5, 120, 40, True, "relu", 1), (40, 5, 120, 40, True, "relu", 1),
        (40, 3, 240, 80, False, "hardswish", 2), (80, 3, 200, 80, False, "hardswish", 1),
        (80, 3, 184, 80, False, "hardswish", 1), (80, 3, 184, 80, False, "hardswish", 1),
        (80, 3, 480, 112, True, "hardswish", 1), (112, 3, 672, 112, True, "hardswish", 1),
        (112, 5, 672, 160, True, "hardswish", 2), (160, 5, 960, 160, True, "hardswish", 1),
        (160, 5, 960, 160, True, "hardswish", 1),
    )
    taps: tuple[int, ...] = (3, 6, 12, 16)

    @classmethod
    def large(cls) -> MobileNetV3Config:
        """torchvision ``mobilenet_v3_large``."""
        return cls()

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each tapped feature."""
        widths = [16] + [b[3] for b in self.blocks] + [6 * self.blocks[-1][3]]
        return tuple(widths[t] for t in self.taps)


class InvertedResidual(ResidualBlock):
    """Expand 1x1, depthwise k x k, optional squeeze-excitation, project 1x1, residual."""

    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str,
                 stride: int, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act, **_BN, **kw))
        layers.append(ConvBNAct(expanded, expanded, k, stride, groups=expanded, act=act, **_BN,
                                **kw))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), "relu",
                                            "hardsigmoid", **kw))
        layers.append(ConvBNAct(expanded, cout, 1, act=None, **_BN, **kw))
        self.block = nnx.List(layers)


class MobileNetV3(nnx.Module):
    """MobileNetV3-Large ``features``: (B, H, W, 3) -> the four tapped maps, NHWC."""

    def __init__(self, cfg: MobileNetV3Config, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        last_in = cfg.blocks[-1][3]
        self.features = nnx.List([
            ConvBNAct(3, 16, 3, 2, act="hardswish", **_BN, **kw),
            *(InvertedResidual(*b, **kw) for b in cfg.blocks),
            ConvBNAct(last_in, 6 * last_in, 1, act="hardswish", **_BN, **kw),
        ])

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        return tapped_features(self.features, self.cfg.taps, x)
