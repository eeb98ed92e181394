"""Native-resolution parity of converted release-format checkpoints with the PyTorch reference.

Each reference is torchvision's encoder plus segment-anything's decoder parts with every
parameter and buffer randomised (``reference.randomize``), saved as a release ``model_299.pt``,
converted by the converter under test and loaded with ``segface_jax.load``. Input: the
scikit-image astronaut face crop and its mirror image (batch 2), ImageNet-normalised, with
its 5 landmarks for LaPa.

Bar: max |delta logit| / max |reference
logit| <= 2e-5 and argmax agreement >= 99.99%, float32, matmul precision "highest". The
reference's own float32-vs-float64 difference on these inputs is 1.3e-6 to 2e-6 relative,
while common porting mistakes move logits by 2e-5 or more.

Measured (this machine, CPU, JAX 0.10.2 / torch 2.14.1; relative error, argmax agreement):

    swinb_celeba_224     2.4e-06  100%         swinv2b_celeba_512       3.7e-06  99.9998%
    swinb_celeba_256     2.3e-06  99.9992%     convnext_celeba_512      1.6e-06  99.9998%
    swinb_celeba_448     2.0e-06  99.9993%     mobilenet_celeba_512     1.1e-06  100%
    swinb_celeba_512     1.8e-06  100%         efficientnet_celeba_512  1.6e-06  100%
    swinb_helen_512      2.0e-06  99.9998%     resnet_celeba_512        2.1e-06  100%
    swinb_lapa_224 / 256 / 448 / 512, network on a shared aligned input:
                         2.0e-06 / 1.7e-06 / 2.0e-06 / 2.0e-06, argmax >= 99.9992%

LaPa: the alignment's float32 grids are ill-conditioned (arctanh near the border amplifies
rounding ~100x; the similarity fit loses ~1e-4 px to cancellation), so the PyTorch reference
itself differs from its float64 run by ~1e-4 relative on LaPa logits. The network is held to the
2e-5 bar on a shared aligned input; the whole model (warp, network, inverse warp) is held to
2e-5 plus twice the reference's own measured float32 noise on the same input, and must be at
least as close to the float64 reference as torch's float32 run is (x1.5 headroom). Measured at
224 / 256 / 448 / 512: torch float32 vs float64 5.2e-05 / 4.2e-05 / 9.9e-05 / 9.8e-05; ours vs
torch float32 7.4e-05 / 5.1e-05 / 1.1e-04 / 1.1e-04; ours vs float64 4.5e-05 / 2.9e-05 /
7.8e-05 / 9.0e-05; argmax agreement >= 99.9955%.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import segface_jax
from segface_jax.convert.converter import convert_checkpoint
from segface_jax.convert.parity import compare, network_parity, run_torch
from segface_jax.examples import sample_face
from tests import release

pytestmark = pytest.mark.slow

REL_BAR = 2e-5
ARGMAX_BAR = 0.9999


# One loaded model at a time (~0.5 GB each at 512 px, with its compiled forward): the suite's
# peak memory is reached in this module. Conversions stay on disk; a reload takes seconds.
@functools.lru_cache(maxsize=1)
def _loaded(name: str) -> segface_jax.LoadedModel:
    out = release.session_dir() / f"orbax-{name}"
    if not out.exists():
        convert_checkpoint(release.release_file(release.KIND_OF_VARIANT[name]), out, name)
    return segface_jax.load(out)


def _inputs(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    _, x, lm = sample_face(resolution)
    mirrored_lm = lm.copy()
    mirrored_lm[..., 0] = resolution - 1 - mirrored_lm[..., 0]
    mirrored_lm = mirrored_lm[:, [1, 0, 2, 4, 3]]  # left/right swap under the mirror
    return (np.concatenate([x, x[:, :, ::-1]]),
            np.concatenate([lm, mirrored_lm]).astype(np.float32))


def _report(name: str, what: str, result) -> None:
    print(f"\n{name} {what}: rel {result.relative:.2e} (max |d| {result.max_abs_diff:.2e}, "
          f"max |ref| {result.ref_max_abs:.2f}), argmax {100 * result.argmax_agreement:.4f}%")


def _assert_bar(name: str, what: str, result) -> None:
    _report(name, what, result)
    assert result.relative <= REL_BAR
    assert result.argmax_agreement >= ARGMAX_BAR


@pytest.mark.parametrize("name", [
    "swinb_celeba_224", "swinb_celeba_256", "swinb_celeba_448", "swinb_celeba_512",
    "convnext_celeba_512", "swinb_helen_512", "swinv2b_celeba_512", "mobilenet_celeba_512",
    "efficientnet_celeba_512", "resnet_celeba_512",
])
def test_native_parity(name):
    model = _loaded(name)
    x, _ = _inputs(model.resolution)
    ref = run_torch(release.reference_model(release.KIND_OF_VARIANT[name]), x, None)
    _assert_bar(name, "vs torch float32", compare(np.asarray(model(x)), ref))


LAPA = ["swinb_lapa_224", "swinb_lapa_256", "swinb_lapa_448", "swinb_lapa_512"]


@pytest.mark.parametrize("name", LAPA)
def test_lapa_network_parity_on_shared_aligned_input(name):
    """The LaPa network at the 2e-5 bar: both models parse the same (torch-warped) input."""
    model = _loaded(name)
    x, lm = _inputs(model.resolution)
    result = network_parity(model, release.reference_model("swin_lapa"), x, lm)
    _assert_bar(name, "network on shared aligned input", result)


# The whole model (warp, network, inverse warp, and a float64 torch run as referee) at the
# smallest and largest resolution: the warp is the same resolution-generic code at every size,
# and the network is held to the tight bar at all four above (256 and 448 measured before:
# ours 2.9e-5 / 7.8e-5 from float64, torch float32 4.2e-5 / 9.9e-5).
@pytest.mark.parametrize("name", ["swinb_lapa_224", "swinb_lapa_512"])
def test_lapa_full_model_parity_with_landmarks(name):
    model = _loaded(name)
    ref_model = release.reference_model("swin_lapa")
    x, lm = _inputs(model.resolution)
    ref32 = run_torch(ref_model, x, lm)
    ours = np.asarray(model(x, landmarks=lm))
    try:  # in place, not a copy: 0.4 GB less at this test's peak; float32 -> 64 -> 32 is exact
        ref64 = run_torch(ref_model.double(), x.astype(np.float64), lm.astype(np.float64))
    finally:
        ref_model.float()
    noise = compare(ref32, ref64)
    result = compare(ours, ref32)
    _report(name, "torch float32 vs float64 (the reference's own noise)", noise)
    _report(name, "full model vs torch float32", result)
    _report(name, "full model vs torch float64", compare(ours, ref64))
    assert result.relative <= REL_BAR + 2 * noise.relative
    assert compare(ours, ref64).relative <= 1.5 * noise.relative
    assert result.argmax_agreement >= ARGMAX_BAR

