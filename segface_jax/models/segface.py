"""The assembled SegFace model: encoder, fusion, positional encoding, face decoder, alignment."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from segface_jax import align
from segface_jax.models.convnext import ConvNeXt, ConvNeXtConfig
from segface_jax.models.decoder import FaceDecoder, MultiScaleFusion, PositionEmbeddingRandom
from segface_jax.models.efficientnet_v2 import EfficientNetV2, EfficientNetV2Config
from segface_jax.models.layers import Dtype, remat_call, upcast
from segface_jax.models.mobilenet_v3 import MobileNetV3, MobileNetV3Config
from segface_jax.models.resnet import ResNet, ResNetConfig
from segface_jax.models.swin import SwinConfig, SwinTransformer
from segface_jax.variants import Variant

# torchvision architecture name -> (encoder class, config preset)
ENCODERS = {
    "swin_b": (SwinTransformer, SwinConfig.base),
    "swin_s": (SwinTransformer, SwinConfig.small),
    "swin_t": (SwinTransformer, SwinConfig.tiny),
    "swin_v2_b": (SwinTransformer, SwinConfig.v2_base),
    "swin_v2_s": (SwinTransformer, SwinConfig.v2_small),
    "swin_v2_t": (SwinTransformer, SwinConfig.v2_tiny),
    "convnext_base": (ConvNeXt, ConvNeXtConfig.base),
    "convnext_small": (ConvNeXt, ConvNeXtConfig.small),
    "convnext_tiny": (ConvNeXt, ConvNeXtConfig.tiny),
    "mobilenet_v3_large": (MobileNetV3, MobileNetV3Config.large),
    "efficientnet_v2_m": (EfficientNetV2, EfficientNetV2Config.m),
    "resnet101": (ResNet, ResNetConfig.resnet101),
}


@dataclasses.dataclass(frozen=True)
class SegFaceConfig:
    """What defines a SegFace network: its encoder, its classes and whether it aligns faces."""

    backbone: str
    class_names: tuple[str, ...]
    align_faces: bool = False
    encoder_config: object | None = None  # overrides the backbone preset (small test models)

    @classmethod
    def from_variant(cls, variant: Variant) -> SegFaceConfig:
        """Config of a released variant (or a model retrained from one, its encoder overrides
        applied)."""
        if variant.backbone not in ENCODERS:
            raise NotImplementedError(
                f"variant {variant.name!r} uses backbone {variant.backbone!r}, which segface-jax "
                f"does not implement yet (available: {', '.join(sorted(ENCODERS))})")
        encoder = None
        if variant.encoder_overrides:
            encoder = dataclasses.replace(ENCODERS[variant.backbone][1](),
                                          **dict(variant.encoder_overrides))
        return cls(variant.backbone, variant.classes, align_faces=variant.needs_landmarks,
                   encoder_config=encoder)

    def make_encoder_config(self):
        """The encoder's config: the override or the backbone's preset."""
        return self.encoder_config or ENCODERS[self.backbone][1]()


class SegFace(nnx.Module):
    """SegFace face parser: (B, R, R, 3) normalised RGB -> (B, R, R, classes) float32 logits
    (float64 under ``jax.enable_x64`` with float64 inputs and weights)."""

    def __init__(self, cfg: SegFaceConfig, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        enc_cfg = cfg.make_encoder_config()
        self.backbone = ENCODERS[cfg.backbone][0](enc_cfg, **kw)
        self.fusion = MultiScaleFusion(enc_cfg.stage_dims, **kw)
        self.pe_layer = PositionEmbeddingRandom(rngs=rngs)
        self.face_decoder = FaceDecoder(cfg.class_names, **kw)

    def parse(self, images: jnp.ndarray) -> jnp.ndarray:
        """The network without alignment: (B, R, R, 3) -> (B, R, R, classes) logits in float32
        or wider."""
        x = images.astype(self.dtype) if self.dtype else images
        fused = self.fusion(remat_call(self.backbone, x))
        logits = self.face_decoder(fused, self.pe_layer(*fused.shape[1:3]))
        return upcast(logits)

    def __call__(self, images: jnp.ndarray, landmarks: jnp.ndarray | None = None) -> jnp.ndarray:
        """Logits for a batch; LaPa models warp with (B, 5, 2) pixel landmarks around ``parse``."""
        if not self.cfg.align_faces:
            return self.parse(images)
        if landmarks is None:
            raise ValueError("this model aligns faces: pass landmarks of shape (N, 5, 2)")
        warped, matrix = align.align_faces(upcast(images), landmarks)
        return align.unalign_logits(self.parse(warped), matrix, images.shape[1:3])
