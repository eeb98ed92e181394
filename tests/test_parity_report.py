"""The parity report locates a fault: per-stage deltas on a small model with one weight broken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segface_jax.checkpoint import abstract_model, fill_module
from segface_jax.convert import reference
from segface_jax.convert.converter import convert_state_dict
from segface_jax.convert.parity import run_torch, torch_stages
from segface_jax.convert.report import (
    REL_BAR,
    ParityResult,
    jax_stages,
    stage_deltas,
    stage_report,
    verdict_against_referee,
    verdict_against_torch,
)
from segface_jax.models import SegFaceConfig
from segface_jax.models.swin import SwinConfig
from segface_jax.variants import get_variant

# Stage 3 of the small torchvision Swin: features[5], its first block's attention output
# projection, 128 x 128, so a transposed copy still converts without a shape error.
STAGE3_WEIGHT = "backbone.0.5.0.attn.proj.weight"


@pytest.fixture(scope="module")
def small_pair():
    v = get_variant("swinb_celeba_512")
    torch.manual_seed(0)
    ref = reference.randomize(reference.build_reference(v, reference.small_swin()), 0).eval()
    cfg = SegFaceConfig(v.backbone, v.classes, False,
                        SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2)))
    return v, cfg, ref


def _stages(v, cfg, ref, state, x):
    model = fill_module(abstract_model(cfg), convert_state_dict(state, v, cfg)[0])
    return jax_stages(model, x, None)


def test_stage_report_names_the_first_broken_stage(small_pair):
    """Converted faithfully, every stage is within the 2e-5 share of the bar (float32 rounding,
    ~1e-6). With stage 3's projection weight transposed (what a wrong converter rule does),
    taps 1 and 2 stay clean and the report names encoder tap 3 first."""
    v, cfg, ref = small_pair
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    theirs = torch_stages(ref, x, None)
    # the reference's last stage is its forward output, bit for bit
    np.testing.assert_array_equal(list(theirs.values())[-1], run_torch(ref, x, None))
    assert list(theirs) == ["encoder tap 1", "encoder tap 2", "encoder tap 3", "encoder tap 4",
                            "fused features", "class tokens after the transformer", "logits"]

    state = {k: t.numpy() for k, t in ref.state_dict().items()}
    good = stage_deltas(_stages(v, cfg, ref, state, x), theirs)
    print("\nfaithful conversion:\n" + stage_report(good))
    assert not any(row.over for row in good)
    assert "every stage within its share of the bar" in stage_report(good)

    broken = dict(state, **{STAGE3_WEIGHT: state[STAGE3_WEIGHT].T.copy()})
    rows = stage_deltas(_stages(v, cfg, ref, broken, x), theirs)
    report = stage_report(rows)
    print("\nstage 3 projection transposed:\n" + report)
    assert [row.over for row in rows[:2]] == [False, False]
    assert "first stage over its share of the bar: encoder tap 3" in report


def test_verdicts_state_the_bar_and_what_missed_it():
    ok = verdict_against_torch(ParityResult(1e-6, 1.0, 1.0))
    assert ok.passed and ok.line().startswith("PASS: relative 1.00e-06")
    assert "matmul precision highest" in ok.line()
    bad = verdict_against_torch(ParityResult(3e-5, 1.0, 0.99), "tf32")
    assert not bad.passed
    assert bad.line().startswith(f"FAIL: relative 3.00e-05 > {REL_BAR:.0e}; argmax agreement "
                                 "99.0000% < 99.99%") and "matmul precision tf32" in bad.line()
    nan = verdict_against_torch(ParityResult(float("nan"), 1.0, 1.0))
    assert not nan.passed
    # float64 referee: ours 1.4x as far from float64 as torch float32 passes, 1.6x fails
    torch32 = ParityResult(1e-4, 1.0, 1.0)
    assert verdict_against_referee(ParityResult(1.4e-4, 1.0, 1.0), torch32,
                                   ParityResult(0, 1.0, 1.0)).passed
    assert not verdict_against_referee(ParityResult(1.6e-4, 1.0, 1.0), torch32,
                                       ParityResult(0, 1.0, 1.0)).passed
