"""EfficientNetV2-M encoder, numerically identical to torchvision's ``efficientnet_v2_m``.

Module indices mirror torchvision's ``features``; SegFace taps ``features[2, 3, 5, 8]``.
Stochastic depth (training only) follows torchvision's rates.
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
    depth_rates,
    stochastic_depth,
    tapped_features,
)
from segface_jax.models.mobilenet_v3 import make_divisible

_BN = dict(eps=1e-3, momentum=0.1)  # torchvision EfficientNet BatchNorm


@dataclasses.dataclass(frozen=True)
class EfficientNetV2Config:
    """Stages as (fused, expand ratio, kernel, stride, in, out, layers)."""

    stages: tuple[tuple[bool, int, int, int, int, int, int], ...] = (
        (True, 1, 3, 1, 24, 24, 3), (True, 4, 3, 2, 24, 48, 5), (True, 4, 3, 2, 48, 80, 5),
        (False, 4, 3, 2, 80, 160, 7), (False, 6, 3, 1, 160, 176, 14),
        (False, 6, 3, 2, 176, 304, 18), (False, 6, 3, 1, 304, 512, 5),
    )
    last_channels: int = 1280
    taps: tuple[int, ...] = (2, 3, 5, 8)
    stochastic_depth_prob: float = 0.2  # training only; torchvision's efficientnet_v2_m

    @classmethod
    def m(cls) -> EfficientNetV2Config:
        """torchvision ``efficientnet_v2_m``."""
        return cls()

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each tapped feature."""
        widths = [self.stages[0][4]] + [s[5] for s in self.stages] + [self.last_channels]
        return tuple(widths[t] for t in self.taps)


class MBConv(ResidualBlock):
    """(Fused-)MBConv: expand (fused: k x k), [depthwise k x k, SE with SiLU], project, residual."""

    def __init__(self, fused: bool, expand: int, k: int, stride: int, cin: int, cout: int,
                 drop_rate: float = 0.0, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual = stride == 1 and cin == cout
        self.drop_path = stochastic_depth(drop_rate) if self.residual else None
        if fused:
            expanded = cin * expand
            if expanded != cin:
                layers = [ConvBNAct(cin, expanded, k, stride, act="silu", **_BN, **kw),
                          ConvBNAct(expanded, cout, 1, act=None, **_BN, **kw)]
            else:
                layers = [ConvBNAct(cin, cout, k, stride, act="silu", **_BN, **kw)]
        else:
            expanded = make_divisible(cin * expand)
            layers = [] if expanded == cin else [ConvBNAct(cin, expanded, 1, act="silu", **_BN,
                                                           **kw)]
            layers += [
                ConvBNAct(expanded, expanded, k, stride, groups=expanded, act="silu", **_BN, **kw),
                SqueezeExcitation(expanded, max(1, cin // 4), "silu", "sigmoid", **kw),
                ConvBNAct(expanded, cout, 1, act=None, **_BN, **kw),
            ]
        self.block = nnx.List(layers)


class EfficientNetV2(nnx.Module):
    """EfficientNetV2 ``features``: (B, H, W, 3) -> the four tapped maps, NHWC."""

    def __init__(self, cfg: EfficientNetV2Config, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stages = []
        rates = depth_rates(cfg.stochastic_depth_prob, [s[6] for s in cfg.stages], 0)
        for (fused, expand, k, stride, cin, cout, n), rate in zip(cfg.stages, rates):
            stages.append(nnx.List([
                MBConv(fused, expand, k, stride if j == 0 else 1, cin if j == 0 else cout, cout,
                       rate[j], **kw) for j in range(n)
            ]))
        self.features = nnx.List([
            ConvBNAct(3, cfg.stages[0][4], 3, 2, act="silu", **_BN, **kw),
            *stages,
            ConvBNAct(cfg.stages[-1][5], cfg.last_channels, 1, act="silu", **_BN, **kw),
        ])

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        return tapped_features(self.features, self.cfg.taps, x)
