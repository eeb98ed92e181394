"""PyTorch -> Orbax conversion of SegFace release checkpoints (installed as segface_jax.convert).

This is the only runtime code that imports torch, and only inside the functions that need it, so
importing this package is cheap. Code outside ``convert/`` reaches the converter through the
names below and nothing deeper:

- ``convert_checkpoint(src, out_dir, variant=None)``: a release ``model_299.pt`` -> an Orbax
  checkpoint directory (``ConversionError`` lists everything that cannot be mapped exactly).
- ``convert_backbone(arch, src, out_dir)``: a torchvision ImageNet encoder -> an Orbax directory
  for ``init="imagenet"`` training.
- ``load_state_dict(path)`` and ``infer_variant(state, requested, path)``: read a ``.pt``
  (``weights_only=True``) and tell which released variant it holds.
- ``run_parity(variant, weights, parity_inputs(variant, ...), out)``, ``run_parity_all(...)``
  (``parity --all``: every variant with local weights, ``parity.md`` and ``parity.json``) and
  ``seeded_release(variant, directory)``: the ``parity`` command and the seeded random-weights
  release file used by demos and tests (``ParityError``: nothing to check, conflicting options).
- ``check_golden(variant, directory, weights)``: ``parity --golden``, which needs no torch
  (``GoldenError``: golden files missing, of another variant or checkpoint, or modified).
- ``convert_mtcnn(folder)``: facenet-pytorch's pretrained MTCNN files -> the arrays of our P-,
  R- and O-Net (``segface_jax.mtcnn.pretrained`` caches them).
"""

from segface_jax.convert.backbone import convert_backbone
from segface_jax.convert.converter import (
    ConversionError,
    ConversionReport,
    convert_checkpoint,
    infer_variant,
    load_state_dict,
)
from segface_jax.convert.detector import convert_mtcnn
from segface_jax.convert.golden import GoldenError, check_golden
from segface_jax.convert.parity import (
    ParityError,
    parity_inputs,
    run_parity,
    run_parity_all,
    seeded_release,
)

__all__ = ["ConversionError", "ConversionReport", "GoldenError", "ParityError", "check_golden",
           "convert_backbone", "convert_checkpoint", "convert_mtcnn", "infer_variant",
           "load_state_dict", "parity_inputs", "run_parity", "run_parity_all", "seeded_release"]
