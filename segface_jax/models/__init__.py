"""Flax NNX modules for SegFace: encoders, decoder and the assembled model."""

from segface_jax.models.segface import SegFace, SegFaceConfig

__all__ = ["SegFace", "SegFaceConfig"]
