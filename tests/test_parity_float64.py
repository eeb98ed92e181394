"""Every encoder family's small SegFace, and the LaPa alignment, in float64 against the PyTorch
reference in float64.

The float32 parity bars (1e-6 to 2e-5 of the logits' scale) are set by the two frameworks'
different rounding, so they cannot see a difference in the arithmetic that is smaller than that
rounding. In float64 the rounding falls to ~1e-16 and the bar to 1e-12: any constant, epsilon,
order of operations that is not a reassociation, or formula that differs from upstream's shows.
Measured (72 px, batch 2, every parameter and buffer random; float64 input): 2.8e-15 to 3.9e-15
for five families, 1.2e-14 for SwinV2 (its cosine attention scales logits by up to 100). Before
the random-Fourier positions' pixel grid followed the gaussian matrix's dtype, every family
stood at 6e-8 to 3e-7: that grid was rounded to float32 whatever the model's dtype. The weights
are float32 values (randomised in float32, then widened), so loading them through the model's
float32 variables and widening those is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from segface_jax import align
from segface_jax.checkpoint import abstract_model, fill_module
from segface_jax.convert import reference
from segface_jax.convert.converter import convert_state_dict
from segface_jax.models import SegFaceConfig
from segface_jax.models.swin import relative_coords_table
from segface_jax.variants import get_variant
from tests import small_models
from tests.helpers import rel_error, widened

pytestmark = pytest.mark.quick_compile  # small models (tests/conftest.py)

BAR = 1e-12


def _swinv2_tables_shared(ref: torch.nn.Module) -> int:
    """Give the reference's SwinV2 attention layers our log-spaced coordinate table.

    Both are float32 tables (torchvision's a buffer computed in float32 at construction, ours
    computed in float64 and rounded once), so they may differ by an ulp, which float64 logits
    show at ~3e-7. The tables themselves must agree within float32 rounding; then the rest of
    the computation is compared on equal constants. Returns how many tables were replaced.
    """
    replaced = 0
    for module in ref.modules():
        table = getattr(module, "relative_coords_table", None)
        if table is None:
            continue
        ws = module.window_size[0]
        ours = torch.from_numpy(relative_coords_table(ws)).reshape(table.shape)
        torch.testing.assert_close(table.float(), ours, rtol=2 ** -23, atol=0)
        table.copy_(ours.to(table.dtype))
        replaced += 1
    return replaced


def _float64_logits(variant: str, family: str, landmarks: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ours, torch's) float64 logits of ``family``'s small model under ``variant``'s head (and
    alignment), same random weights, on a random 72 px batch of 2."""
    v = get_variant(variant)
    torch.manual_seed(0)
    ref = reference.randomize(small_models.torch_reference(v, family), 0)
    ref = small_models.no_stochastic_depth(ref).eval().double()
    if family == "swin_v2_b":
        assert _swinv2_tables_shared(ref) == 8  # two blocks a stage
    cfg = SegFaceConfig(v.backbone, v.classes, v.needs_landmarks,
                        small_models.jax_config(family))
    x = np.random.default_rng(0).normal(size=(2, 72, 72, 3))
    with torch.no_grad():
        lm = None if landmarks is None else torch.from_numpy(landmarks)
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), lm).permute(0, 2, 3, 1).numpy()

    with jax.enable_x64(True):
        params = convert_state_dict({k: t.numpy() for k, t in ref.state_dict().items()}, v,
                                    cfg)[0]
        model = fill_module(abstract_model(cfg), params)  # float32 variables
        nnx.update(model, widened(nnx.state(model)))
        got = nnx.jit(lambda m, a, lm: m(a, lm))(model, jnp.asarray(x), landmarks)
        assert got.dtype == jnp.float64
    return np.asarray(got), want


@pytest.mark.parametrize("family", list(small_models.FAMILY_VARIANT))
def test_float64_logits_match_torch_float64(family):
    rel = rel_error(*_float64_logits(small_models.FAMILY_VARIANT[family], family))
    print(f"\n{family}: float64 logits {rel:.1e} of their scale from torch's")
    assert rel <= BAR


def test_lapa_float64_alignment_and_logits_match_torch_float64():
    """The whole LaPa model (5-point similarity, tanh warp, network, inverse warp) on landmarks
    3 px around the standard points. In float32 the warp's grids amplify rounding ~100x
    (arctanh near the border, the similarity fit's cancellation): torch's own float32 run is
    ~1e-4 from its float64 one at the released sizes. In float64 ours is 3.4e-14 from torch's
    (measured; 2.3e-5 while the grids were built in float32 whatever the landmarks' dtype);
    bar 1e-11, the network's 1e-12 with room for that amplification."""
    rng = np.random.default_rng(1)
    lm = align.standard_landmarks(72)[None].astype(np.float64) + rng.normal(scale=3.0,
                                                                            size=(2, 5, 2))
    rel = rel_error(*_float64_logits("swinb_lapa_224", "swin_b", lm))
    print(f"\nLaPa: float64 logits after the inverse warp {rel:.1e} of their scale from torch's")
    assert rel <= 1e-11
