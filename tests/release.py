"""Seeded release-format checkpoints built once per test session and shared by the test files."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from segface_jax.convert import reference
from segface_jax.variants import get_variant

# One randomised reference per distinct set of weights; resolutions share weights.
KINDS = {
    "swin_celeba": ("swinb_celeba_512", 0),
    "swin_lapa": ("swinb_lapa_512", 1),
    "swin_helen": ("swinb_helen_512", 2),
    "convnext_celeba": ("convnext_celeba_512", 3),
    "swinv2_celeba": ("swinv2b_celeba_512", 4),
    "mobilenet_celeba": ("mobilenet_celeba_512", 5),
    "efficientnet_celeba": ("efficientnet_celeba_512", 6),
    "resnet_celeba": ("resnet_celeba_512", 7),
}
KIND_OF_VARIANT = {
    **{f"swinb_celeba_{r}": "swin_celeba" for r in (224, 256, 448, 512)},
    **{f"swinb_lapa_{r}": "swin_lapa" for r in (224, 256, 448, 512)},
    "swinb_helen_512": "swin_helen",
    "convnext_celeba_512": "convnext_celeba",
    "swinv2b_celeba_512": "swinv2_celeba",
    "mobilenet_celeba_512": "mobilenet_celeba",
    "efficientnet_celeba_512": "efficientnet_celeba",
    "resnet_celeba_512": "resnet_celeba",
}

_DIR = Path(tempfile.mkdtemp(prefix="segface-tests-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def session_dir() -> Path:
    """A temporary directory removed when the test session ends."""
    return _DIR


@functools.lru_cache(maxsize=2)  # rebuilt the same from its seed when evicted; ~400 MB each
def reference_model(kind: str) -> reference.SegFaceReference:
    """The randomised PyTorch reference for ``kind`` (eval mode, float32)."""
    name, seed = KINDS[kind]
    torch.manual_seed(seed)
    return reference.randomize(reference.build_reference(get_variant(name)), seed).eval()


@functools.cache
def release_file(kind: str) -> Path:
    """``reference_model(kind)`` saved exactly like a release ``model_299.pt``."""
    return reference.save_release(reference_model(kind), _DIR / f"{kind}.pt")


def state_dict(kind: str) -> dict[str, torch.Tensor]:
    """A fresh copy of the reference's state_dict, safe to modify."""
    return {k: v.clone() for k, v in reference_model(kind).state_dict().items()}


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Save a (possibly modified) state_dict in the release layout."""
    torch.save({"epoch": 299, "state_dict_backbone": state}, path)
    return path


@functools.cache
def converted(variant: str) -> Path:
    """The seeded release file of ``variant`` converted into the session's segface-jax cache."""
    from segface_jax.hub import converted_checkpoint

    return converted_checkpoint(release_file(KIND_OF_VARIANT[variant]), get_variant(variant),
                                quiet=True)
