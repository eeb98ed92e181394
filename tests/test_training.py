"""Training: stochastic depth, the loss, torch's AdamW, sharding, overfitting and bfloat16.

One step of every encoder family against PyTorch is in test_training_families.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from segface_jax.checkpoint import abstract_model, fill_module
from segface_jax.convert import reference
from segface_jax.convert.converter import convert_state_dict
from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.models.convnext import ConvNeXtBlock
from segface_jax.models.layers import set_training
from segface_jax.models.swin import SwinConfig
from segface_jax.train import losses, optim, step
from segface_jax.variants import get_variant
from tests.helpers import torch_segface_loss, widened

# see README, "Tests": the fast tier leaves this file out; every model here is small
pytestmark = [pytest.mark.slow, pytest.mark.quick_compile]


def _one_device_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))


SMALL_SWIN = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2),
                        stochastic_depth_prob=0.0)  # reference.small_swin()'s
# Two blocks a stage (unshifted and shifted), one head of width 16: the smallest Swin SegFace
# that keeps every kind of layer, for tests whose claim is about the step, not the encoder.
TINY_SWIN = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1),
                       stochastic_depth_prob=0.0)


def _tiny_segface(classes: tuple[str, ...], dtype=None) -> SegFace:
    return SegFace(SegFaceConfig("swin_b", classes, False, TINY_SWIN), dtype=dtype,
                   rngs=nnx.Rngs(0))


def _randomised_small_swin(seed: int) -> SegFace:
    """A small Swin SegFace with every parameter random (no zero-initialised biases, whose
    relative differences would be meaningless), through the converter from torch."""
    v = get_variant("swinb_celeba_512")
    torch.manual_seed(seed)
    ref = reference.randomize(reference.build_reference(v, reference.small_swin()), seed)
    cfg = SegFaceConfig(v.backbone, v.classes, False, SMALL_SWIN)
    params, _, _ = convert_state_dict({k: t.numpy() for k, t in ref.state_dict().items()}, v, cfg)
    return fill_module(abstract_model(cfg), params)


@pytest.mark.parametrize("arch", ["swin_b", "swin_v2_b", "convnext_base", "efficientnet_v2_m"])
def test_stochastic_depth_rates_are_torchvision_s(arch):
    import torchvision
    from torchvision.ops import StochasticDepth

    from segface_jax.models.segface import ENCODERS

    tv = getattr(torchvision.models, arch)(weights=None)
    want = [m.p for m in tv.modules() if isinstance(m, StochasticDepth)]
    if arch.startswith("efficientnet"):  # torchvision builds it in every block, uses it in
        want = [m.stochastic_depth.p for m in tv.modules()  # residual ones only
                if getattr(m, "use_res_connect", False)]
    enc = nnx.eval_shape(lambda: ENCODERS[arch][0](ENCODERS[arch][1](), rngs=nnx.Rngs(0)))
    got = [m.rate for _, m in nnx.iter_modules(enc) if isinstance(m, nnx.Dropout)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    block = ConvNeXtBlock(8, 7, drop_rate=0.5, rngs=nnx.Rngs(0))
    block.layer_scale[...] = jnp.ones(8)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 6, 6, 8)), (400, 6, 6, 8))
    eval_out = block(x)
    set_training(block, True, nnx.Rngs(dropout=1))
    out = block(x)
    branch = eval_out - x
    kept = jnp.all(jnp.isclose(out, x + 2 * branch, atol=1e-5), axis=(1, 2, 3))
    dropped = jnp.all(out == x, axis=(1, 2, 3))
    assert bool(jnp.all(kept | dropped))  # each sample: whole branch kept (x2) or dropped
    assert 0.4 < float(dropped.mean()) < 0.6  # rate 0.5 over 400 samples (5 sigma: +-0.125)
    set_training(block, False)
    np.testing.assert_array_equal(block(x), eval_out)
    set_training(block, True)  # training without a random stream attached cannot run
    with pytest.raises(ValueError, match="rngs"):
        block(x)


def test_loss_matches_torch_and_dice_groups():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 8, 8, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, (4, 8, 8))
    labels[:, :, 0] = 4
    want = torch_segface_loss(torch.from_numpy(logits).permute(0, 3, 1, 2),
                              torch.from_numpy(labels), 5)
    got, parts = losses.segface_loss(jnp.asarray(logits), jnp.asarray(labels))
    # float32 sums over 256 pixels in another order: a few ulps of a loss ~1.8
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # groups of 2 = the mean of each half's loss (upstream: 4 images per GPU, gradients averaged)
    halves = [torch_segface_loss(torch.from_numpy(logits[i:i + 2]).permute(0, 3, 1, 2),
                                 torch.from_numpy(labels[i:i + 2]), 5) for i in (0, 2)]
    grouped, _ = losses.segface_loss(jnp.asarray(logits), jnp.asarray(labels), dice_group=2)
    assert float(grouped) == pytest.approx(float(sum(halves) / 2), rel=1e-6)
    with pytest.raises(ValueError, match="multiple of the Dice group"):
        losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels), group=3)


def test_adamw_and_multistep_match_torch():
    """Three epochs of 2 steps with a milestone after the first: torch vs optax, same grads."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(64,)).astype(np.float32)
    grads = [rng.normal(size=(64,)).astype(np.float32) * s for s in (1, 1e-3, 10, 1, 0.1, 2)]
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.AdamW([tp], lr=1e-2, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(topt, milestones=[1, 2], gamma=0.1)
    lr = optim.multistep_schedule(1e-2, [1, 2], 0.1, steps_per_epoch=2)
    tx = optim.adamw(lr, weight_decay=1e-2)
    params = jnp.asarray(p0)
    opt = tx.init(params)
    for i, g in enumerate(grads):
        tp.grad = torch.from_numpy(g)
        topt.step()
        if i % 2 == 1:
            sched.step()
        updates, opt = tx.update(jnp.asarray(g), opt, params)
        params = optax.apply_updates(params, updates)
        # float32 in both; the same formulas in another order: ~1 ulp of |p| <= 4 per step
        np.testing.assert_allclose(np.asarray(params), tp.detach().numpy(), rtol=0, atol=3e-6)
    assert [float(lr(k)) for k in range(6)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4])


def test_same_step_on_one_and_eight_devices():
    """Two sharded steps on 8 host devices against the same steps on one device, in float64.

    Only the order of reductions differs (gradient all-reduce, per-device partial sums, Dice
    groups across devices). In float32 that is not a test of the sharding: a ReLU input within
    rounding of 0 (this model's decoder MLP holds 311k of them, the nearest 1e-7 of its scale
    from 0) falls on either side of the kink in the two programs and moves a whole gradient
    column (0.9% of decoder layer 0's first MLP kernel, measured; which of two programs,
    1-device or 8-device, -O0 or full optimisation, it hits depends on the CPU). In float64
    the reordered sums differ by ~1e-16 and no kink is that close. Adam's eps is 1e-3: with
    1e-8 a gradient that is exactly 0 in exact arithmetic (attention key biases) moves by
    lr * noise / 1e-8. Bound: every weight within 1e-12 of its tensor's scale plus lr, the
    losses within 1e-12 relative (measured: 2.6e-16 and 2.2e-16); Dice groups of 8 on 8
    devices instead of 4 fail it (checked).
    """
    assert jax.device_count() == 8
    model = _randomised_small_swin(1)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 19, (8, 32, 32)).astype(np.uint8),
             "landmarks": np.zeros((8, 5, 2), np.float32)}
    lr, steps = 1e-3, 2
    results, losses_seen = [], []
    with jax.enable_x64(True):
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                                 axis_types=(jax.sharding.AxisType.Auto,))
            tx = optim.adamw(lr, 1e-5, eps=1e-3)
            graphdef, state = step.init_state(model, tx, mesh=mesh)
            state = widened(state)
            train = step.make_train_step(graphdef, tx, mesh, dice_group=4,
                                         needs_landmarks=False)
            seen = []
            for _ in range(steps):
                state, metrics = train(state, batch)
                assert metrics["loss"].dtype == jnp.float64
                seen.append(float(metrics["loss"]))
            losses_seen.append(seen)
            results.append({".".join(map(str, k)): np.asarray(v_.get_value())
                            for k, v_ in nnx.to_flat_state(state["params"])})
    np.testing.assert_allclose(losses_seen[1], losses_seen[0], rtol=1e-12)
    one, eight = results
    assert all(a.dtype == np.float64 for a in one.values())
    worst = max(np.abs(one[k] - eight[k]).max() / (np.abs(one[k]).max() + lr) for k in one)
    loss_gap = max(abs(a / b - 1) for a, b in zip(losses_seen[1], losses_seen[0]))
    print(f"\n1 vs 8 devices: largest difference {worst:.2e} of the tensor's scale, losses "
          f"{loss_gap:.1e} apart")
    assert worst <= 1e-12


def test_tiny_model_overfits_four_images():
    """A tiny SegFace learns four synthetic images: the loss falls by at least 90%."""
    model = _tiny_segface(("background", "a", "b"))
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 32, 32), np.uint8)
    for i in range(4):
        labels[i, 4 + i:20 + i, 6:22] = 1
        labels[i, 22:30, 2 + 3 * i:12 + 3 * i] = 2
    colours = np.array([[20, 20, 20], [200, 60, 60], [60, 60, 200]], np.uint8)
    images = np.clip(colours[labels] + rng.integers(-15, 15, (4, 32, 32, 3)), 0, 255)
    batch = {"image": images.astype(np.uint8), "label": labels,
             "landmarks": np.zeros((4, 5, 2), np.float32)}
    tx = optim.adamw(1e-3, 1e-5)  # 1e-2 stalls this tiny model; 1e-3 falls >95% by step 33
    mesh = _one_device_mesh()
    graphdef, state = step.init_state(model, tx, mesh=mesh)
    train = step.make_train_step(graphdef, tx, mesh, dice_group=None, needs_landmarks=False)
    history = []
    for _ in range(40):
        state, metrics = train(state, batch)
        history.append(float(metrics["loss"]))
    print(f"\noverfit: loss {history[0]:.3f} -> {history[-1]:.3f}")
    assert history[-1] <= 0.1 * history[0]


@pytest.mark.parametrize("freeze", ["encoder", "encoder+fusion"])
def test_freezing_labels_parts_by_name(freeze):
    """``optim.freezing`` on a tree shaped like SegFace's parameters: the frozen parts get
    exactly zero updates and no optimizer state; the rest get AdamW's (the same numbers as
    AdamW alone)."""
    params = {part: {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
              for part in ("backbone", "fusion", "face_decoder")}
    grads = jax.tree.map(lambda p: p * 0.1 + 0.2, params)
    tx = optim.freezing(optim.adamw(1e-3, 1e-5), freeze)
    plain = optim.adamw(1e-3, 1e-5)
    updates, state = tx.update(grads, tx.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    for part in params:
        for name in ("w", "b"):
            if part in optim.FREEZE[freeze]:
                assert not np.asarray(updates[part][name]).any()
            else:
                np.testing.assert_array_equal(updates[part][name], want[part][name])
    trained = [p for p in params if p not in optim.FREEZE[freeze]]
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * 8 * len(trained)  # mu and nu of 6 + 2 values per trained part
    with pytest.raises(ValueError, match="freeze must be one of none, encoder"):
        optim.freezing(plain, "decoder")


@pytest.mark.slow
def test_frozen_parts_stay_bit_identical_through_training_steps():
    """Three training steps of a tiny SegFace with freeze="encoder+fusion": the encoder's and
    the fusion's parameters are bit for bit the initial ones, the decoder's move, and the
    optimizer holds Adam moments for the decoder's parameters only. The steps share one
    compiled program."""
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 3, (2, 32, 32)).astype(np.uint8),
             "landmarks": np.zeros((2, 5, 2), np.float32)}
    frozen = optim.FREEZE["encoder+fusion"]
    tx = optim.freezing(optim.adamw(1e-3, 1e-5), "encoder+fusion")
    mesh = _one_device_mesh()
    graphdef, state = step.init_state(_tiny_segface(("background", "a", "b")), tx, mesh=mesh)
    start = jax.tree.map(np.array, state["params"])
    train = step.make_train_step(graphdef, tx, mesh, dice_group=None, needs_landmarks=False)
    for _ in range(3):
        state, _ = train(state, batch)
    # one program for all three: init_state put the state where the step puts its output
    assert train._cache_size() == 1
    after = jax.tree.map(np.array, state["params"])
    assert set(after) >= {"backbone", "fusion", "face_decoder"}
    for part in after:
        same = jax.tree.all(jax.tree.map(np.array_equal, start[part], after[part]))
        assert same == (part in frozen), part
    moments = sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0)
    trained = sum(x.size for part in after if part not in frozen
                  for x in jax.tree.leaves(after[part]))
    assert moments == 2 * trained  # Adam's mu and nu, nothing for the frozen parts


def test_bfloat16_compute_keeps_float32_parameters():
    """bfloat16 compute: parameters and optimizer state stay float32, the loss stays close."""
    rng = np.random.default_rng(2)
    batch = {"image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 19, (2, 32, 32)).astype(np.uint8),
             "landmarks": np.zeros((2, 5, 2), np.float32)}
    losses_seen = []
    for dtype in (None, jnp.bfloat16):
        model = _tiny_segface(get_variant("swinb_celeba_512").classes, dtype)
        tx = optim.adamw(1e-4, 1e-5)
        graphdef, state = step.init_state(model, tx)
        train = step.make_train_step(graphdef, tx, _one_device_mesh(), dice_group=None,
                                     needs_landmarks=False)
        state, metrics = train(state, batch)
        losses_seen.append(float(metrics["loss"]))
        assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
        assert {leaf.dtype for leaf in jax.tree.leaves(state["opt"])
                if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype("float32")}
    # bfloat16's 8-bit mantissa over ~20 layers: the loss moves by well under 1%
    assert losses_seen[1] == pytest.approx(losses_seen[0], rel=1e-2)
