"""Small encoders of every family, built twice: torchvision's module and our matching config.

Each keeps the family's structure (the tapped indices, squeeze-excitation, fused and unfused
MBConv, shifted windows, BatchNorm with the family's eps and momentum) at a width and depth
that trains in seconds on a CPU. Stochastic depth is 0 on both sides so that one step is
deterministic and comparable.
"""

from __future__ import annotations

import functools

from torch import nn
from torchvision.models import convnext, efficientnet, mobilenetv3, resnet
from torchvision.models import swin_transformer as tv_swin

from segface_jax.convert import reference
from segface_jax.convert.reference import SegFaceReference
from segface_jax.models.convnext import ConvNeXtConfig
from segface_jax.models.efficientnet_v2 import EfficientNetV2Config
from segface_jax.models.mobilenet_v3 import MobileNetV3Config
from segface_jax.models.resnet import ResNetConfig
from segface_jax.models.swin import SwinConfig

# One released variant per encoder family: its classes, and whether it aligns (none here).
FAMILY_VARIANT = {
    "swin_b": "swinb_celeba_512",
    "swin_v2_b": "swinv2b_celeba_512",
    "convnext_base": "convnext_celeba_512",
    "mobilenet_v3_large": "mobilenet_celeba_512",
    "efficientnet_v2_m": "efficientnet_celeba_512",
    "resnet101": "resnet_celeba_512",
}

# EfficientNetV2's seven stages, one block each, narrow: (fused, expand, k, stride, in, out, n)
_EFFNET_STAGES = ((True, 1, 3, 1, 16, 16, 1), (True, 4, 3, 2, 16, 24, 1),
                  (True, 4, 3, 2, 24, 32, 1), (False, 4, 3, 2, 32, 48, 1),
                  (False, 6, 3, 1, 48, 56, 1), (False, 6, 3, 2, 56, 64, 1),
                  (False, 6, 3, 1, 64, 80, 1))
_EFFNET_LAST = 128

# MobileNetV3-Large cut to seven inverted residuals (in, kernel, expanded, out, SE, activation,
# stride), one per kind the full network has: without expansion, ReLU and hard-swish, 3x3 and
# 5x5, with and without squeeze-excitation, strided and residual; tapped at strides 4 to 32
# like features[3, 6, 12, 16] (the last tap is the final 1x1 convolution).
_MOBILENET_BLOCKS = ((16, 3, 16, 16, False, "relu", 1), (16, 3, 64, 24, False, "relu", 2),
                     (24, 5, 72, 40, True, "relu", 2), (40, 3, 240, 80, False, "hardswish", 2),
                     (80, 3, 480, 112, True, "hardswish", 1),
                     (112, 5, 672, 160, True, "hardswish", 2),
                     (160, 5, 960, 160, True, "hardswish", 1))
_MOBILENET_TAPS = (2, 3, 5, 8)


def _swin_config(version: int) -> SwinConfig:
    # two blocks a stage, so every stage has an unshifted and a shifted block
    return SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2),
                      window_size=7 if version == 1 else 8, version=version,
                      stochastic_depth_prob=0.0)


def jax_config(family: str):
    """Our encoder config matching ``torch_encoder(family)``."""
    return {
        "swin_b": lambda: _swin_config(1),
        "swin_v2_b": lambda: _swin_config(2),
        "convnext_base": lambda: ConvNeXtConfig(dims=(32, 64, 128, 256), depths=(1, 1, 1, 1),
                                                stochastic_depth_prob=0.0),
        "mobilenet_v3_large": lambda: MobileNetV3Config(_MOBILENET_BLOCKS, _MOBILENET_TAPS),
        "efficientnet_v2_m": lambda: EfficientNetV2Config(_EFFNET_STAGES, _EFFNET_LAST,
                                                          stochastic_depth_prob=0.0),
        "resnet101": lambda: ResNetConfig(depths=(1, 1, 1, 1)),
    }[family]()


def torch_encoder(family: str) -> nn.Module:
    """The torchvision classifier of ``family`` at the small size of ``jax_config(family)``."""
    if family.startswith("swin"):
        cfg = _swin_config(1 if family == "swin_b" else 2)
        v2 = dict(block=tv_swin.SwinTransformerBlockV2,
                  downsample_layer=tv_swin.PatchMergingV2) if cfg.version == 2 else {}
        return tv_swin.SwinTransformer([4, 4], cfg.embed_dim, list(cfg.depths),
                                       list(cfg.num_heads), [cfg.window_size] * 2,
                                       stochastic_depth_prob=0.0, **v2)
    if family == "convnext_base":
        cfg = jax_config(family)
        stages = [convnext.CNBlockConfig(d, nxt, n) for d, nxt, n in
                  zip(cfg.dims, (*cfg.dims[1:], None), cfg.depths)]
        return convnext.ConvNeXt(stages, stochastic_depth_prob=0.0)
    if family == "mobilenet_v3_large":
        setting = [mobilenetv3.InvertedResidualConfig(i, k, e, o, se, "HS" if act == "hardswish"
                                                      else "RE", s, 1, 1.0)
                   for i, k, e, o, se, act, s in _MOBILENET_BLOCKS]
        return mobilenetv3.MobileNetV3(setting, last_channel=1280)
    if family == "efficientnet_v2_m":
        setting = [(efficientnet.FusedMBConvConfig(e, k, s, i, o, n) if fused else
                    efficientnet.MBConvConfig(e, k, s, i, o, n))
                   for fused, e, k, s, i, o, n in _EFFNET_STAGES]
        return efficientnet.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0,
                                         last_channel=_EFFNET_LAST,
                                         norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3))
    if family == "resnet101":
        return resnet.ResNet(resnet.Bottleneck, list(jax_config(family).depths))
    raise KeyError(family)


def torch_reference(variant, family: str) -> SegFaceReference:
    """``variant``'s PyTorch reference around ``torch_encoder(family)``, tapped like ours."""
    taps = jax_config(family).taps if family == "mobilenet_v3_large" else None
    return reference.build_reference(variant, torch_encoder(family), taps)


def no_stochastic_depth(model: nn.Module) -> nn.Module:
    """Set every torchvision ``StochasticDepth`` of ``model`` to p = 0 (deterministic steps)."""
    from torchvision.ops import StochasticDepth

    for m in model.modules():
        if isinstance(m, StochasticDepth):
            m.p = 0.0
    return model

