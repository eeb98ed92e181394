"""Training holds on every encoder family: one step against PyTorch at sizes where every Swin
stage pads, Swin blocks at the released resolutions' stage shapes, rematerialisation and
gradient accumulation against the plain step, and each family's tiny recipe through the CLI.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torchvision.models import swin_transformer as tv_swin

from segface_jax.checkpoint import abstract_model, fill_module
from segface_jax.cli import main
from segface_jax.convert import reference
from segface_jax.convert.converter import convert_state_dict
from segface_jax.convert.rules import SWIN_RULES, SWINV2_RULES
from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.models import swin as jswin
from segface_jax.models.layers import kernels_for, set_remat
from segface_jax.train import optim, step
from segface_jax.variants import get_variant
from tests import datasets, small_models
from tests.helpers import copy_from_torch, gradient_errors, torch_train_step

# see README, "Tests": the fast tier leaves this file out; every model here is small
pytestmark = [pytest.mark.slow, pytest.mark.quick_compile]

FAMILIES = list(small_models.FAMILY_VARIANT)
BN_FAMILIES = ("mobilenet_v3_large", "efficientnet_v2_m", "resnet101")
# 72 px: Swin stages of 18, 9, 5, 3 tokens, padded to 21, 14, 7, 7 (window 7) and 24, 16, 8, 8
# (SwinV2, window 8): every stage pads; the CNNs see odd sizes at strides 8, 16 and 32.
SIZE = 72


def _one_device_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))


def _pair(family: str):
    """(variant, config, randomised torch reference, the same weights converted to JAX)."""
    v = get_variant(small_models.FAMILY_VARIANT[family])
    seed = FAMILIES.index(family)
    torch.manual_seed(seed)
    ref = small_models.torch_reference(v, family)
    ref = small_models.no_stochastic_depth(reference.randomize(ref, seed))
    cfg = SegFaceConfig(v.backbone, v.classes, False, small_models.jax_config(family))
    # copies: torch's optimizer later updates ``ref`` in place
    params, _, _ = convert_state_dict({k: t.numpy().copy() for k, t in ref.state_dict().items()},
                                      v, cfg)
    return v, cfg, ref, fill_module(abstract_model(cfg), params)


def _batch(n: int, size: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, (n, size, size)).astype(np.uint8),
            "landmarks": np.zeros((n, 5, 2), np.float32)}


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_matches_torch(family):
    """Loss, every gradient and the BatchNorm statistics' update of one step, batch 2, 72 px.

    Against a float64 run of the same torch model, every gradient tensor of ours (relative to
    its scale) must be within 2x (+1e-6) of the largest float32 distance of torch's own: the
    two frameworks round differently, and torch float32 measures how much rounding this
    model's gradients carry (measured: torch 2.6e-6 to 1.7e-5, 1.0e-4 for SwinV2, whose cosine
    attention scaled by up to 100 amplifies it; ours 4.0e-6 to 1.5e-5, SwinV2 1.8e-4; median
    ours/torch per tensor 0.8-1.8). Per tensor against torch's error on that same tensor is no
    fairer a bar: torch's is sometimes lucky-small. Gradients that are zero in exact
    arithmetic stay at noise level (1e-5 of the largest gradient). BatchNorm running
    statistics: within 2x (+1e-6) of torch float32's distance, per tensor. The loss: 2x torch
    float32's distance + 2e-6 relative. For Swin the whole compiled train step runs too, and
    its AdamW update is held against torch's (``_assert_update_matches_torch``).
    """
    v, cfg, ref, model = _pair(family)
    batch = _batch(2, SIZE, v.num_classes)
    loss64, grads64, _, buf64 = torch_train_step(copy.deepcopy(ref), batch["image"],
                                                 batch["label"], v.num_classes, torch.float64)
    loss32, grads32, new32, buf32 = torch_train_step(ref, batch["image"], batch["label"],
                                                     v.num_classes, torch.float32)

    tx = optim.adamw(1e-4, 1e-5)  # torch_train_step's AdamW
    graphdef, state = step.init_state(model, tx)
    core = jax.jit(functools.partial(step.loss_and_grads, graphdef, dice_group=None,
                                     needs_landmarks=False))
    with kernels_for("cpu"):  # as the train step traces it for CPU devices
        loss, _, rest, grads = core(state, batch)
    assert abs(float(loss) - loss64) <= 2 * abs(loss32 - loss64) + 2e-6 * abs(loss64)

    def to_jax(tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> dict:
        state_dict = {k: t.detach().double().numpy() for k, t in {**buffers, **tensors}.items()}
        return convert_state_dict(state_dict, v, cfg)[0]

    ours = _flat(grads)
    assert all(np.isfinite(g).all() for g in ours.values())
    g64, g32 = to_jax(grads64, buf64), to_jax(grads32, buf32)
    assert set(ours) <= set(g64)
    errors, zero_noise = gradient_errors(ours, g32, g64)
    torch_worst = max(t for _, t in errors.values())
    worst = max(errors, key=lambda k: errors[k][0])
    ratio = np.median([o / t for o, t in errors.values()])
    print(f"\n{family}: {len(errors)} gradients; worst {worst} {errors[worst][0]:.2e}, torch "
          f"float32 at most {torch_worst:.2e}; median ours/torch {ratio:.2f}; zero-gradient "
          f"noise {zero_noise:.1e}")
    assert errors[worst][0] <= 2 * torch_worst + 1e-6 and zero_noise <= 1e-5

    stats = {k: a for k, a in _flat(rest).items() if k.endswith((".mean", ".var"))}
    assert bool(stats) == (family in BN_FAMILIES)
    if stats:  # torch's running averages after its training-mode forward
        for k, a in stats.items():
            scale = np.abs(g64[k]).max()
            ours_err, torch_err = (np.abs(a - g64[k]).max() / scale,
                                   np.abs(g32[k] - g64[k]).max() / scale)
            assert ours_err <= 2 * torch_err + 1e-6, (k, ours_err, torch_err)

    if family == "swin_b":  # the whole compiled step once: AdamW's update against torch's
        before = _flat(state["params"])
        train = step.make_train_step(graphdef, tx, _one_device_mesh(), dice_group=None,
                                     needs_landmarks=False)
        state, metrics = train(state, batch)
        assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
        _assert_update_matches_torch(before, _flat(state["params"]), to_jax(new32, buf32),
                                     ours, g32)


def _assert_update_matches_torch(before: dict, after: dict, torch_after: dict, ours: dict,
                                 g32: dict, lr: float = 1e-4, wd: float = 1e-5,
                                 eps: float = 1e-8) -> None:
    """Our parameters after one AdamW step against torch's float32 step.

    Adam's first step moves a weight by lr * g / (|g| + eps) (plus lr * wd * p): where |g| >>
    eps in both frameworks, both move by ~lr and must agree to a few float32 ulps of |p|
    (bound 1e-6). Near g = 0 the move is lr * g / eps: float32 gradient noise decides it, in
    torch as in ours, so those weights are only held to the step size: lr (1 + wd |p|) plus
    the float32 rounding of p + step (half an ulp of the result).
    """
    moved = max(np.abs(after[k] - before[k]).max() for k in after)
    beyond = max(float((np.abs(after[k] - before[k]) - lr * (1 + wd * np.abs(before[k]))
                        - np.spacing(np.abs(after[k])) / 2).max()) for k in after)
    strong_off, strong_count, total = 0.0, 0, 0
    for k in after:
        strong = np.minimum(np.abs(ours[k]), np.abs(g32[k])) > 100 * eps
        strong_count, total = strong_count + int(strong.sum()), total + strong.size
        if strong.any():
            strong_off = max(strong_off, float(np.abs(after[k] - torch_after[k])[strong].max()))
    print(f"update: largest move {moved:.2e}; where |g| > 1e-6 ({100 * strong_count / total:.1f}%"
          f" of weights) largest difference from torch {strong_off:.2e}")
    assert beyond <= 0 and strong_count >= 0.85 * total
    assert strong_off <= 1e-6


SWIN_STAGE_SIZES = sorted({r // 2 ** (2 + i) for r in (224, 256, 448, 512) for i in range(4)})


def _torch_to_jax(tensors: dict[str, np.ndarray], rules, torch_prefix: str,
                  jax_prefix: str) -> dict[str, np.ndarray]:
    """Torch-keyed arrays of a sub-module -> its JAX-keyed arrays, through the converter's rules."""
    out = {}
    for key, value in tensors.items():
        rule = next(r for r in rules if r.apply(torch_prefix + key) is not None)
        out[rule.apply(torch_prefix + key).removeprefix(jax_prefix)] = rule.transform(value)
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_swin_block_gradients_at_released_stage_shapes(version):
    """A Swin block's input and parameter gradients at every stage size of the released
    resolutions (7 to 128 tokens a side), unshifted and shifted, against torch float64.

    Bound as in the step test: every tensor at every size within 2x (+1e-6) of torch float32's
    largest distance from float64 here. The largest are long reductions (SwinV2's logit-scale
    gradient, a sum over every attention entry: up to 1.0e-4 in ours and 9.4e-5 in torch at
    56 tokens a side), where XLA's summation order and torch's differ most. SwinV2 (window 8)
    pads 28, 14 and 7 (224 px) and 28, 14 (448 px); Swin v1 (window 7) pads every stage at 256
    and 512 px.
    """
    ws = 7 if version == 1 else 8
    tv_block = tv_swin.SwinTransformerBlock if version == 1 else tv_swin.SwinTransformerBlockV2
    rules = SWIN_RULES if version == 1 else SWINV2_RULES
    prefixes = ("backbone.0.1.0.", "backbone.stages.0.blocks.0.")

    @nnx.jit
    def jax_grads(module, x, w):
        return nnx.grad(lambda m, x: (m(x) * w).sum(), argnums=(0, 1))(module, x)

    ours_worst = torch_worst = 0.0
    for shift in (0, ws // 2):
        tm = reference.randomize(tv_block(8, 1, [ws, ws], [shift, shift]), 3).train()
        jm = copy_from_torch(jswin.SwinBlock(8, 1, ws, shift, 4.0, version, rngs=nnx.Rngs(0)),
                             tm, rules, *prefixes)
        for size in SWIN_STAGE_SIZES:
            rng = np.random.default_rng(size)
            x = rng.normal(size=(1, size, size, 8)).astype(np.float32)
            w = rng.normal(size=(1, size, size, 8)).astype(np.float32)
            g_module, g_x = jax_grads(jm, x, w)
            ours = {**_flat(g_module), "x": np.asarray(g_x)}
            want = []
            for dtype in (torch.float32, torch.float64):
                t = copy.deepcopy(tm).to(dtype)
                xt = torch.from_numpy(x).to(dtype).requires_grad_()
                (t(xt) * torch.from_numpy(w).to(dtype)).sum().backward()
                grads = {k: p.grad.double().numpy() for k, p in t.named_parameters()}
                want.append({**_torch_to_jax(grads, rules, *prefixes),
                             "x": xt.grad.double().numpy()})
            assert set(ours) == set(want[1])
            assert all(np.isfinite(g).all() for g in ours.values())
            errors, zero_noise = gradient_errors(ours, *want)
            assert zero_noise <= 1e-5
            ours_worst = max(ours_worst, *(o for o, _ in errors.values()))
            torch_worst = max(torch_worst, *(t for _, t in errors.values()))
    print(f"\nSwin v{version} blocks at {SWIN_STAGE_SIZES}: ours at most {ours_worst:.1e} "
          f"from float64, torch float32 at most {torch_worst:.1e}")
    assert ours_worst <= 2 * torch_worst + 1e-6


def _step_with(family: str, remat: str, accum_steps: int, batch: dict, **encoder_changes):
    """One compiled step of a freshly initialised small model: (metrics, params, statistics).

    Adam's eps is 1e-3 here: with torch's 1e-8 a gradient that is reduction noise around 0
    becomes a full +-lr move, which says nothing about rematerialisation or accumulation; with
    1e-3 the update is a smooth function of the gradient.
    """
    v = get_variant(small_models.FAMILY_VARIANT[family])
    enc = dataclasses.replace(small_models.jax_config(family), **encoder_changes)
    model = SegFace(SegFaceConfig(v.backbone, v.classes, False, enc), rngs=nnx.Rngs(0))
    set_remat(model, remat)
    tx = optim.adamw(1e-3, 1e-5, eps=1e-3)
    mesh = _one_device_mesh()
    graphdef, state = step.init_state(model, tx, mesh=mesh)
    train = step.make_train_step(graphdef, tx, mesh, dice_group=2, needs_landmarks=False,
                                 accum_steps=accum_steps)
    state, metrics = train(state, batch)
    return ({k: float(x) for k, x in metrics.items()}, _flat(state["params"]),
            _flat(state["rest"]))


@pytest.mark.parametrize("family, modes, encoder_changes", [
    # stochastic depth on: recomputed blocks must draw the same masks (Swin and SwinV2 blocks
    # are one class, so one of them; remat wraps every family's blocks the same way)
    ("swin_b", [("block", 1)], {"stochastic_depth_prob": 0.3}),
    ("mobilenet_v3_large", [("block", 1), ("encoder", 1)], {}),  # BatchNorm inside remat
    ("swin_b", [("none", 2)], {}),  # 2 micro-batches of 2 images, Dice groups of 2
])
def test_remat_and_accumulation_equal_the_plain_step(family, modes, encoder_changes):
    """Loss, gradient norm, updated parameters and BatchNorm statistics of one step with
    rematerialisation (per block, whole encoder) or 2-step gradient accumulation against the
    plain step. The same arithmetic, fused or summed in another order by XLA, so float32
    rounding only: losses and gradient norms within 1e-6 relative; every updated tensor within
    the rounding its float32 gradients carry (test_one_step_matches_torch measures torch's
    float32 gradients 4e-6 to 1.7e-5 from float64 for these families), so 2e-5 of the tensor's
    scale plus the largest move an update makes (lr = 1e-3). That second term is for tensors
    initialised to 0 whose gradient is 0 in exact arithmetic (attention key biases, the last
    hypernetwork bias): they move by rounding noise alone (~1e-11) in both runs. Measured:
    2.0e-6 (Swin remat with stochastic depth), 3.6e-6 and 3.3e-6 (MobileNet per block and whole
    encoder), 2.3e-6 (accumulation). A remat that redrew stochastic depth, or an accumulation
    that dropped, repeated or mis-weighted a micro-batch, moves the loss by far more than 1e-6.
    """
    lr, bound = 1e-3, 2e-5
    batch = _batch(4, 40, get_variant(small_models.FAMILY_VARIANT[family]).num_classes, seed=5)
    plain = _step_with(family, "none", 1, batch, **encoder_changes)
    for remat, accum in modes:
        other = _step_with(family, remat, accum, batch, **encoder_changes)
        for key in ("loss", "ce", "dice", "grad_norm"):
            assert other[0][key] == pytest.approx(plain[0][key], rel=1e-6), (remat, accum, key)
        worst = 0.0
        for ours, base in ((other[1], plain[1]), (other[2], plain[2])):
            assert set(ours) == set(base)
            worst = max([worst] + [float(np.abs(ours[k] - base[k]).max()
                                         / (np.abs(base[k]).max() + lr)) for k in base])
        print(f"\n{family} remat={remat} accum_steps={accum}: largest difference {worst:.1e}")
        assert worst <= bound


def test_accumulation_refuses_to_split_dice_groups():
    batch = _batch(4, 40, 19)
    with pytest.raises(ValueError, match="whole Dice groups"):
        _step_with("swin_b", "none", 3, batch)
    with pytest.raises(ValueError, match="remat must be one of"):
        _step_with("swin_b", "blocks", 1, batch)


RECIPE = '''
import dataclasses

from segface_jax.train.trainer import TrainConfig
from tests.small_models import jax_config


def get_config():
    return TrainConfig(variant={variant!r}, data_root={root!r}, init="scratch", resolution=40,
                       global_batch=8, dice_group=4, lr=1e-4, weight_decay=1e-5, epochs=300,
                       milestones=(80, 200), gamma=0.1, workers=0, log_every=1,
                       checkpoint_every=100, eval_every_epochs=0, max_steps=2,
                       encoder_overrides=tuple(dataclasses.asdict(jax_config({family!r}))
                                               .items()))
'''


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_recipe_of_every_family_trains_through_the_cli(tmp_path, family):
    """`segface-jax train` runs two steps of each family's small model at 40 px, where every
    Swin stage pads (10, 5, 3, 2 tokens), with finite losses and gradients; MobileNet also
    with per-block remat and 2-step accumulation from the command line."""
    root = datasets.write_celeba(tmp_path / "celeba", extra_train=16)
    work = tmp_path
    config = work / "recipe.py"
    config.write_text(RECIPE.format(variant=small_models.FAMILY_VARIANT[family], root=str(root),
                                    family=family))
    # 2 micro-batches on 8 devices: a global batch of 16 (2 x 8, whole Dice groups of 4)
    extra = (["--set", "remat=block", "--set", "accum_steps=2", "--set", "global_batch=16"]
             if family == "mobilenet_v3_large" else [])
    assert main(["train", "--config", str(config), "--workdir", str(work / "run"), "--quiet",
                 *extra]) == 0
    rows = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "grad_norm"))
