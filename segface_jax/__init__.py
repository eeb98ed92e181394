"""segface-jax: the JAX/Flax implementation of SegFace face parsing (AAAI 2025)."""

from segface_jax.parser import FaceParser, ParseResult
from segface_jax.runtime import LoadedModel, load
from segface_jax.variants import VARIANTS, Variant, get_variant

__all__ = ["VARIANTS", "FaceParser", "LoadedModel", "ParseResult", "Variant", "get_variant",
           "load"]
__version__ = "0.1.0"
