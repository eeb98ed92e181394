"""The network a training run starts from: SegFace with ImageNet, SegFace or random weights.

A run may train other classes than its checkpoint's (a user's label set, or a mapping's
target). Starting from a SegFace checkpoint, the encoder, the fusion and the decoder's shared
parts load as they are; each class token comes from the checkpoint's token of the same name,
or, through the run's label mapping, from the checkpoint classes that map to it (their mean
when several merge); a class with neither gets a fresh token, drawn as SegFace draws its
tokens (standard normal), seeded by the run's seed and the class's index.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from segface_jax.labels import LabelMapping
from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.train.config import TrainConfig, TrainingError
from segface_jax.variants import Variant, checkpoint_variant

_TOKEN = re.compile(r"face_decoder\.(\w+)_token")


def build_model(cfg: TrainConfig, variant: Variant,
                mapping: LabelMapping | None = None) -> SegFace:
    """The network of ``variant`` (the model a run trains) with ``cfg``'s initial weights."""
    from segface_jax.checkpoint import abstract_model, fill_module, flat_state, restore_params

    seg_cfg = SegFaceConfig.from_variant(variant)
    dtype = _compute_dtype(cfg)
    if cfg.init not in ("imagenet", "segface", "scratch"):
        raise TrainingError(f"init must be imagenet, segface or scratch, not {cfg.init!r}")
    if cfg.init != "scratch" and not cfg.init_path:
        raise TrainingError(f"init={cfg.init} needs init_path (a `segface-jax convert-backbone` "
                            "or `convert` output directory); or use init=scratch")
    if cfg.init == "segface":  # every weight from the checkpoint: no random initialisation
        source_cfg = dataclasses.replace(
            SegFaceConfig.from_variant(_checkpoint_model(cfg.init_path, variant)),
            encoder_config=seg_cfg.encoder_config, align_faces=seg_cfg.align_faces)
        restored = restore_params(cfg.init_path, abstract_model(source_cfg, dtype))
        if source_cfg.class_names == seg_cfg.class_names:
            return nnx.merge(*nnx.split(restored))
        target = abstract_model(seg_cfg, dtype)
        arrays, report = inherit_classes(_fresh_tokens(target, cfg.seed), flat_state(restored),
                                         mapping)
        print(f"classes from {cfg.init_path}: {report}")
        return fill_module(target, arrays)
    model = SegFace(seg_cfg, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    if cfg.init == "scratch":
        return model
    # imagenet: the encoder from torchvision's weights, the rest as initialised
    encoder = restore_params(cfg.init_path, nnx.eval_shape(lambda: model.backbone))
    arrays = {f"backbone.{k}": v for k, v in flat_state(encoder).items()}
    arrays.update({k: v for k, v in flat_state(model).items() if not k.startswith("backbone.")})
    return fill_module(model, arrays)


def model_structure(cfg: TrainConfig, variant: Variant) -> SegFace:
    """The model ``build_model`` makes, as a structure only (ShapeDtypeStruct leaves): what a
    resumed run restores its checkpoint into."""
    from segface_jax.checkpoint import abstract_model

    return abstract_model(SegFaceConfig.from_variant(variant), _compute_dtype(cfg))


def _compute_dtype(cfg: TrainConfig) -> str | None:
    """The model's compute dtype argument: None for float32 (the parameters' own)."""
    return None if cfg.dtype == "float32" else cfg.dtype


def _checkpoint_model(path: str, variant: Variant) -> Variant:
    """The model a SegFace checkpoint holds (its classes), for a run that trains ``variant``."""
    from segface_jax.checkpoint import read_metadata

    try:
        stored = checkpoint_variant(read_metadata(path))
    except ValueError as e:
        raise TrainingError(f"{path}: {e}") from None
    if stored.backbone != variant.backbone:
        raise TrainingError(f"{path} holds a {stored.backbone} model; the run trains "
                            f"{variant.backbone} (set variant to one with that backbone)")
    return stored


def _fresh_tokens(abstract: SegFace, seed: int) -> dict:
    """The abstract model's leaves, with a seeded standard-normal draw for each class token
    (SegFace's token initialisation; class ``i``'s from key ``(seed, i)``, whatever the
    other classes)."""
    from segface_jax.checkpoint import flat_state

    out = dict(flat_state(abstract))
    key = jax.random.key(seed)
    for i, name in enumerate(abstract.cfg.class_names):
        leaf = out[f"face_decoder.{name}_token"]
        out[f"face_decoder.{name}_token"] = jax.random.normal(
            jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    return out


def inherit_classes(fresh: dict, checkpoint: dict,
                    mapping: LabelMapping | None = None) -> tuple[dict, str]:
    """(arrays for the new model, a one-line report): every parameter from ``checkpoint``
    except class tokens, which come by name, through ``mapping`` or stay ``fresh``."""
    have = {m.group(1): k for k in checkpoint if (m := _TOKEN.fullmatch(k))}
    arrays, named, mapped, new = {}, [], [], []
    for key, value in fresh.items():
        m = _TOKEN.fullmatch(key)
        if m is None:
            if key not in checkpoint:
                raise TrainingError(f"the checkpoint lacks {key}")
            arrays[key] = checkpoint[key]
            continue
        name = m.group(1)
        if name in have:
            arrays[key] = checkpoint[have[name]]
            named.append(name)
            continue
        sources = [s for s in (mapping.sources_of(name) if mapping else ()) if s in have]
        if sources:
            arrays[key] = jnp.mean(jnp.stack([checkpoint[have[s]] for s in sources]), 0)
            mapped.append(f"{name} <- {' + '.join(sources)}")
        else:
            arrays[key] = value
            new.append(name)
    parts = [f"{len(named)} by name"]
    if mapped:
        parts.append(f"{len(mapped)} through the mapping ({'; '.join(mapped)})")
    parts.append(f"{len(new)} new" + (f" ({', '.join(new)})" if new else ""))
    return arrays, ", ".join(parts)
