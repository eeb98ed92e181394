"""The network a training run starts from: SegFace with ImageNet, SegFace or random weights."""

from __future__ import annotations

import dataclasses

from flax import nnx

from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.train.config import TrainConfig, TrainingError
from segface_jax.variants import get_variant


def build_model(cfg: TrainConfig) -> SegFace:
    """The SegFace network of ``cfg`` with its initial weights (ImageNet, SegFace or random)."""
    from segface_jax.checkpoint import abstract_model, fill_module, flat_state, restore_params

    v = get_variant(cfg.variant)
    seg_cfg = SegFaceConfig.from_variant(v)
    if cfg.encoder_overrides:
        enc = dataclasses.replace(seg_cfg.make_encoder_config(), **dict(cfg.encoder_overrides))
        seg_cfg = dataclasses.replace(seg_cfg, encoder_config=enc)
    dtype = None if cfg.dtype == "float32" else cfg.dtype
    model = SegFace(seg_cfg, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    if cfg.init == "scratch":
        return model
    if not cfg.init_path:
        raise TrainingError(f"init={cfg.init} needs init_path (a `segface-jax convert-backbone` "
                            "or `convert` output directory); or use init=scratch")
    if cfg.init == "segface":
        restored = restore_params(cfg.init_path, abstract_model(seg_cfg, dtype))
        return nnx.merge(*nnx.split(restored))
    if cfg.init == "imagenet":
        encoder = restore_params(cfg.init_path, nnx.eval_shape(lambda: model.backbone))
        arrays = {f"backbone.{k}": v for k, v in flat_state(encoder).items()}
        arrays.update({k: v for k, v in flat_state(model).items() if not k.startswith("backbone.")})
        return fill_module(model, arrays)
    raise TrainingError(f"init must be imagenet, segface or scratch, not {cfg.init!r}")
