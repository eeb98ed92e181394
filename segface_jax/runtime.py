"""The inference runtime: a converted checkpoint loaded as a jit-compiled ``LoadedModel``."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from segface_jax.checkpoint import (
    METADATA_FILE,
    CheckpointError,
    abstract_model,
    read_metadata,
    restore_params,
)
from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.variants import Variant, checkpoint_variant


@dataclasses.dataclass
class LoadedModel:
    """A converted SegFace model ready to run: ``model(images[, landmarks=])`` -> logits."""

    variant: Variant
    module: SegFace
    metadata: dict[str, Any]

    def __post_init__(self):
        graphdef, state = nnx.split(self.module)
        self._state = state
        self._forward = jax.jit(functools.partial(_forward, graphdef))

    @property
    def resolution(self) -> int:
        """Input and output side length in pixels."""
        return self.variant.resolution

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the logit channels."""
        return self.variant.classes

    def __call__(self, images: Any, landmarks: Any = None) -> jax.Array:
        """(N, R, R, 3) float32 ImageNet-normalised RGB -> (N, R, R, C) float32 logits.

        LaPa variants need ``landmarks`` (N, 5, 2): pixel (x, y) of the eye centres, nose tip
        and mouth corners at resolution R.
        """
        images = jnp.asarray(images, jnp.float32)
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"{self.variant.name} expects images of shape (N, {r}, {r}, 3), "
                             f"got {tuple(images.shape)}")
        if self.variant.needs_landmarks:
            if landmarks is None:
                raise ValueError(f"{self.variant.name} aligns faces: pass landmarks=(N, 5, 2) "
                                 "pixel coordinates (x, y) at the model resolution")
            landmarks = jnp.asarray(landmarks, jnp.float32)
            if landmarks.shape != (images.shape[0], 5, 2):
                raise ValueError(f"landmarks must have shape ({images.shape[0]}, 5, 2), "
                                 f"got {tuple(landmarks.shape)}")
        else:
            landmarks = None
        return self._forward(self._state, images, landmarks)


def _forward(graphdef, state, images, landmarks):
    return nnx.merge(graphdef, state)(images, landmarks)


def load(path: str | os.PathLike, dtype: Any = None) -> LoadedModel:
    """Load a checkpoint directory written by ``segface-jax convert``; the variant comes from it.

    ``dtype`` sets the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """
    dtype = jnp.dtype(dtype) if dtype is not None else None
    meta = read_metadata(path)
    try:
        variant = checkpoint_variant(meta)
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / METADATA_FILE}: {e}") from None
    module = abstract_model(SegFaceConfig.from_variant(variant), dtype)
    return LoadedModel(variant, restore_params(path, module), meta)
