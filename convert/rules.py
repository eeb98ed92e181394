"""Explicit key rules from the release state_dict to the Flax parameter paths, one table per family.

Each rule full-matches a torch key and names the Flax path and the transform of the tensor.
Buffers that torchvision stores but we compute from static shapes (Swin's relative position
index) are not loaded: their rule *checks* that the stored values equal ours.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from segface_jax.models.convnext import ConvNeXt
from segface_jax.models.efficientnet_v2 import EfficientNetV2
from segface_jax.models.mobilenet_v3 import MobileNetV3
from segface_jax.models.resnet import ResNet
from segface_jax.models.segface import ENCODERS
from segface_jax.models.swin import SwinTransformer, relative_coords_table, relative_position_index

Transform = Callable[[np.ndarray], np.ndarray]


def identity(w: np.ndarray) -> np.ndarray:
    """Tensor used as stored (biases, norm scales, embeddings, tables)."""
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax kernel (in, out)."""
    return w.T


def conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (out, in, kh, kw) -> Flax HWIO (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


def conv1x1(w: np.ndarray) -> np.ndarray:
    """torch 1x1 Conv2d (out, in, 1, 1) -> dense kernel (in, out)."""
    return w[:, :, 0, 0].T


def depthwise(w: np.ndarray) -> np.ndarray:
    """torch depthwise Conv2d (C, 1, kh, kw) -> (kh, kw, C)."""
    return w[:, 0].transpose(1, 2, 0)


def conv_transpose(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), not mirrored (k == stride)."""
    return w.transpose(2, 3, 0, 1)


def channel_vector(w: np.ndarray) -> np.ndarray:
    """ConvNeXt layer scale (C, 1, 1) -> (C,)."""
    return w.reshape(w.shape[0])


@dataclasses.dataclass(frozen=True)
class Rule:
    """torch key pattern -> Flax path (template or function of the match) and tensor transform."""

    pattern: str
    target: str | Callable[[re.Match], str]
    transform: Transform = identity

    def apply(self, key: str) -> str | None:
        """The Flax path for ``key``, or None when the rule does not match it."""
        m = re.fullmatch(self.pattern, key)
        if m is None:
            return None
        return self.target(m) if callable(self.target) else m.expand(self.target)


@dataclasses.dataclass(frozen=True)
class Check:
    """A stored buffer that is recomputed from static shapes: its values must equal ``expected``.

    ``rtol`` 0 means bit-equal; float tables allow a few ulps of libm differences.
    """

    pattern: str
    expected: Callable[[re.Match, np.ndarray], np.ndarray]
    reason: str
    rtol: float = 0.0

    def matches(self, stored: np.ndarray, m: re.Match) -> bool:
        """Whether the stored buffer equals the recomputed one."""
        want = self.expected(m, stored)
        stored = np.asarray(stored).reshape(want.shape) if stored.size == want.size else stored
        if stored.shape != want.shape:
            return False
        if self.rtol == 0:
            return bool(np.array_equal(stored, want))
        return bool(np.allclose(stored, want, rtol=self.rtol, atol=self.rtol))


def _norm(prefix: str, target: str) -> list[Rule]:
    # torch norm weight/bias -> Flax scale/bias
    return [Rule(prefix + r"\.weight", target + ".scale"),
            Rule(prefix + r"\.bias", target + ".bias")]


def _dense(prefix: str, target: str, transform: Transform = linear) -> list[Rule]:
    return [Rule(prefix + r"\.weight", target + ".kernel", transform),
            Rule(prefix + r"\.bias", target + ".bias")]


# backbone.0.<i>: odd i are stages (i - 1) // 2, even i >= 2 are the downsampling between them.
_ODD = r"backbone\.0\.(?P<i>[1357])\.(?P<j>\d+)\."
_EVEN = r"backbone\.0\.(?P<i>[246])\."


def _stage_rules(pairs: list[tuple[str, str, Transform]]) -> list[Rule]:
    def target(m: re.Match, rest: str) -> str:
        return f"backbone.stages.{(int(m['i']) - 1) // 2}.blocks.{m['j']}.{m.expand(rest)}"

    return [Rule(_ODD + pat, lambda m, t=tgt: target(m, t), tf) for pat, tgt, tf in pairs]


def _between_rules(name: str, pairs: list[tuple[str, str, Transform]]) -> list[Rule]:
    def target(m: re.Match, rest: str) -> str:
        return f"backbone.{name}.{int(m['i']) // 2 - 1}.{m.expand(rest)}"

    return [Rule(_EVEN + pat, lambda m, t=tgt: target(m, t), tf) for pat, tgt, tf in pairs]


def _swin_rules(version: int) -> list[Rule]:
    if version == 1:
        position = [(r"attn\.relative_position_bias_table", "attn.relative_position_bias_table",
                     identity)]
    else:
        position = [
            (r"attn\.cpb_mlp\.0\.weight", "attn.cpb_fc1.kernel", linear),
            (r"attn\.cpb_mlp\.0\.bias", "attn.cpb_fc1.bias", identity),
            (r"attn\.cpb_mlp\.2\.weight", "attn.cpb_fc2.kernel", linear),
            (r"attn\.logit_scale", "attn.logit_scale", channel_vector),
        ]
    return [
        *_dense(r"backbone\.0\.0\.0", "backbone.patch_embed.conv", conv),
        *_norm(r"backbone\.0\.0\.2", "backbone.patch_embed.norm"),
        *_stage_rules([
            (r"norm(\d)\.weight", r"norm\3.scale", identity),
            (r"norm(\d)\.bias", r"norm\3.bias", identity),
            (r"attn\.(qkv|proj)\.weight", r"attn.\3.kernel", linear),
            (r"attn\.(qkv|proj)\.bias", r"attn.\3.bias", identity),
            *position,
            (r"mlp\.0\.weight", "fc1.kernel", linear),
            (r"mlp\.0\.bias", "fc1.bias", identity),
            (r"mlp\.3\.weight", "fc2.kernel", linear),
            (r"mlp\.3\.bias", "fc2.bias", identity),
        ]),
        *_between_rules("merges", [
            (r"norm\.weight", "norm.scale", identity),
            (r"norm\.bias", "norm.bias", identity),
            (r"reduction\.weight", "reduction.kernel", linear),
        ]),
    ]


def _window(stored: np.ndarray) -> int:
    # relative_position_index has ws^4 entries
    return round(np.sqrt(np.sqrt(stored.size)))


SWIN_RULES: list[Rule] = _swin_rules(1)
SWINV2_RULES: list[Rule] = _swin_rules(2)

SWIN_CHECKS: list[Check] = [
    Check(_ODD + r"attn\.relative_position_index",
          lambda m, stored: relative_position_index(_window(stored)),
          "relative position index: recomputed from the window size"),
]
SWINV2_CHECKS: list[Check] = SWIN_CHECKS + [
    Check(_ODD + r"attn\.relative_coords_table",
          lambda m, stored: relative_coords_table((round(np.sqrt(stored.size // 2)) + 1) // 2),
          "log-spaced coordinate table: recomputed from the window size", rtol=1e-6),
]

CONVNEXT_RULES: list[Rule] = [
    *_dense(r"backbone\.0\.0\.0", "backbone.stem.conv", conv),
    *_norm(r"backbone\.0\.0\.1", "backbone.stem.norm"),
    *_stage_rules([
        (r"layer_scale", "layer_scale", channel_vector),
        (r"block\.0\.weight", "dwconv_kernel", depthwise),
        (r"block\.0\.bias", "dwconv_bias", identity),
        (r"block\.2\.weight", "norm.scale", identity),
        (r"block\.2\.bias", "norm.bias", identity),
        (r"block\.3\.weight", "fc1.kernel", linear),
        (r"block\.3\.bias", "fc1.bias", identity),
        (r"block\.5\.weight", "fc2.kernel", linear),
        (r"block\.5\.bias", "fc2.bias", identity),
    ]),
    *_between_rules("downsamples", [
        (r"0\.weight", "norm.scale", identity),
        (r"0\.bias", "norm.bias", identity),
        (r"1\.weight", "conv.kernel", conv),
        (r"1\.bias", "conv.bias", identity),
    ]),
]

def _bn(prefix: str, target: str) -> list[Rule]:
    # torch BatchNorm2d -> our BatchNorm (scale, bias, running statistics)
    return [Rule(prefix + r"\.weight", target + ".scale"),
            Rule(prefix + r"\.bias", target + ".bias"),
            Rule(prefix + r"\.running_mean", target + ".mean"),
            Rule(prefix + r"\.running_var", target + ".var")]


_BN_COUNTER = {r".+\.num_batches_tracked": "BatchNorm step counters: unused at inference, and "
               "training uses a fixed momentum"}

# MobileNetV3 / EfficientNetV2: our modules mirror torchvision's ``features`` indices.
# <path> is e.g. "3." (a conv block), "4.block.1." (inside an inverted residual) or
# "2.0.block.0." (inside an EfficientNet stage); Conv2dNormActivation holds conv 0 and BN 1.
_F = r"backbone\.(?P<path>(?:\d+\.)+(?:block\.\d+\.)?)"
FEATURES_RULES: list[Rule] = [
    Rule(_F + r"0\.weight", r"backbone.features.\g<path>conv.kernel", conv),
    *_bn(_F + "1", r"backbone.features.\g<path>bn"),
    Rule(_F + r"fc([12])\.weight", r"backbone.features.\g<path>fc\2.kernel", conv),
    Rule(_F + r"fc([12])\.bias", r"backbone.features.\g<path>fc\2.bias"),
]

# ResNet: backbone = Sequential(conv1, bn1, relu, maxpool, layer1..layer4, avgpool)
_L = r"backbone\.(?P<i>[4-7])\.(?P<j>\d+)\."


def _layer(rest: str) -> Callable[[re.Match], str]:
    return lambda m: f"backbone.layers.{int(m['i']) - 4}.{m['j']}.{m.expand(rest)}"


RESNET_RULES: list[Rule] = [
    Rule(r"backbone\.0\.weight", "backbone.conv1.kernel", conv),
    *_bn(r"backbone\.1", "backbone.bn1"),
    Rule(_L + r"conv([123])\.weight", _layer(r"conv\3.kernel"), conv),
    *[Rule(_L + rf"bn([123])\.{t}", _layer(rf"bn\3.{f}"))
      for t, f in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                   ("running_var", "var"))],
    Rule(_L + r"downsample\.0\.weight", _layer("downsample_conv.kernel"), conv),
    *[Rule(_L + rf"downsample\.1\.{t}", _layer(f"downsample_bn.{f}"))
      for t, f in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                   ("running_var", "var"))],
]

_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_TF = r"face_decoder\.transformer\."
DECODER_RULES: list[Rule] = [
    *_dense(r"linear_c\.(\d)\.proj", r"fusion.linear_c.\1"),
    Rule(r"linear_fuse\.weight", "fusion.linear_fuse.kernel", conv1x1),
    Rule(r"pe_layer\.positional_encoding_gaussian_matrix",
         "pe_layer.positional_encoding_gaussian_matrix"),
    Rule(r"face_decoder\.(\w+)_token\.weight", r"face_decoder.\1_token"),
    *_dense(_TF + r"layers\.(\d)\." + _ATTN + r"\.(q|k|v|out)_proj",
            r"face_decoder.transformer.layers.\1.\2.\3_proj"),
    *_norm(_TF + r"layers\.(\d)\.norm([1-4])", r"face_decoder.transformer.layers.\1.norm\2"),
    *_dense(_TF + r"layers\.(\d)\.mlp\.lin([12])", r"face_decoder.transformer.layers.\1.mlp_lin\2"),
    *_dense(_TF + r"final_attn_token_to_image\.(q|k|v|out)_proj",
            r"face_decoder.transformer.final_attn_token_to_image.\1_proj"),
    *_norm(_TF + r"norm_final_attn", "face_decoder.transformer.norm_final_attn"),
    Rule(r"face_decoder\.output_upscaling\.0\.weight", "face_decoder.upscale1_kernel",
         conv_transpose),
    Rule(r"face_decoder\.output_upscaling\.0\.bias", "face_decoder.upscale1_bias"),
    *_norm(r"face_decoder\.output_upscaling\.1", "face_decoder.upscale_norm"),
    Rule(r"face_decoder\.output_upscaling\.3\.weight", "face_decoder.upscale2_kernel",
         conv_transpose),
    Rule(r"face_decoder\.output_upscaling\.3\.bias", "face_decoder.upscale2_bias"),
    *_dense(r"face_decoder\.output_hypernetwork_mlps\.layers\.(\d)", r"face_decoder.hyper_mlp.\1"),
]


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the converter knows about one encoder family."""

    name: str
    rules: list[Rule]
    checks: list[Check]
    ignored: dict[str, str]


def _rule_family(arch: str) -> str:
    # torchvision lays out every architecture of one encoder class alike (MobileNetV3 and
    # EfficientNetV2 both as ``features``); Swin v1 and v2 differ.
    cls, preset = ENCODERS[arch]
    if cls is SwinTransformer:
        return "swinv2" if preset().version == 2 else "swin"
    return {ConvNeXt: "convnext", MobileNetV3: "features", EfficientNetV2: "features",
            ResNet: "resnet"}[cls]


# torchvision architecture -> rule family, for every encoder the model registry implements
BACKBONE_FAMILY = {arch: _rule_family(arch) for arch in ENCODERS}

_SWIN_NORM = {r"backbone\.1\.(weight|bias)": "final Swin norm: stored, never used by the output"}
FAMILIES: dict[str, Family] = {
    "swin": Family("swin", SWIN_RULES + DECODER_RULES, SWIN_CHECKS, _SWIN_NORM),
    "swinv2": Family("swinv2", SWINV2_RULES + DECODER_RULES, SWINV2_CHECKS, _SWIN_NORM),
    "convnext": Family("convnext", CONVNEXT_RULES + DECODER_RULES, [], {}),
    "features": Family("features", FEATURES_RULES + DECODER_RULES, [], _BN_COUNTER),
    "resnet": Family("resnet", RESNET_RULES + DECODER_RULES, [], _BN_COUNTER),
}
