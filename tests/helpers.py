"""Helpers shared by the tests: small configs, torch -> JAX weight copies, parity figures."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import torch
from flax import nnx

from segface_jax.checkpoint import fill_module, flat_state
from segface_jax.convert.rules import Rule
from segface_jax.models.layers import abstract


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy."""
    return t.detach().permute(0, 2, 3, 1).numpy()


def copy_from_torch(module: nnx.Module, torch_module: torch.nn.Module, rules: list[Rule],
                    torch_prefix: str = "", jax_prefix: str = "") -> nnx.Module:
    """Fill a JAX sub-module from a torch sub-module using the converter's own rules.

    Torch keys get ``torch_prefix`` so they look like release keys; targets lose ``jax_prefix``.
    Every JAX variable must be filled (``fill_module`` raises otherwise).
    """
    arrays = {}
    for key, value in torch_module.state_dict().items():
        full = torch_prefix + key
        rule = next((r for r in rules if r.apply(full) is not None), None)
        if rule is None:
            continue  # e.g. index buffers, checked elsewhere
        target = rule.apply(full)
        assert target.startswith(jax_prefix), (full, target)
        arrays[target[len(jax_prefix):]] = rule.transform(value.detach().numpy())
    expected = set(flat_state(module))
    assert expected <= set(arrays), f"not filled: {sorted(expected - set(arrays))}"
    return fill_module(module, arrays)


def from_torch(build: Callable[[nnx.Rngs], nnx.Module], torch_module: torch.nn.Module,
               rules: list[Rule], torch_prefix: str = "", jax_prefix: str = "") -> nnx.Module:
    """``copy_from_torch`` into the structure ``build(rngs)`` makes, never initialised: every
    weight comes from torch (an eager initialisation compiles a program per parameter op)."""
    return copy_from_torch(abstract(build), torch_module, rules, torch_prefix, jax_prefix)


def run_jitted(module: nnx.Module, *inputs):
    """``module(*inputs)`` as one compiled program, as SegFace runs its blocks (eagerly, every
    op compiles a program of its own); its output (array or tuple of them) as numpy."""
    return jax.tree.map(np.asarray, nnx.jit(lambda m, *a: m(*a))(module, *inputs))


def widened(tree):
    """``tree`` with its float32 leaves in float64 (for runs under ``jax.enable_x64``)."""
    return jax.tree.map(lambda a: a.astype(np.float64) if a.dtype == np.float32 else a, tree)


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())



def torch_segface_loss(logits: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
    """Upstream's 0.5 CE + 0.5 Dice written independently of train/losses.py (Dice per class)."""
    ce = torch.nn.functional.cross_entropy(logits, labels)
    p = logits.softmax(1)
    dice = 0.0
    for k in range(c):
        t = (labels == k).to(p.dtype)
        inter = (p[:, k] * t).sum()
        dice = dice + 1 - (2 * inter + 1e-5) / ((p[:, k] ** 2).sum() + (t * t).sum() + 1e-5)
    return 0.5 * ce + 0.5 * dice / c


def torch_train_step(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, c: int,
                     dtype: torch.dtype, lr: float = 1e-4, weight_decay: float = 1e-5):
    """Upstream's step on ``model`` (moved to ``dtype``, training mode): forward on the
    normalised uint8 NHWC ``images``, loss, backward, AdamW.

    Returns (loss, {name: float32 gradient}, {name: new float32 parameter}, {name: buffer
    after the step}); parameters without a gradient (the Swin final norm) are left out.
    """
    x = (images / np.float32(255) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    xt = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2).to(dtype)
    model = model.to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch_segface_loss(model(xt, None), torch.from_numpy(labels.astype(np.int64)), c)
    opt.zero_grad()
    loss.backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters()
             if p.grad is not None}
    opt.step()
    new = {k: p.detach().float().clone() for k, p in model.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    return loss.item(), grads, new, buffers


def gradient_errors(ours: dict[str, np.ndarray], g32: dict[str, np.ndarray],
                    g64: dict[str, np.ndarray]) -> tuple[dict[str, tuple[float, float]], float]:
    """Per tensor (ours, torch float32) distance from torch float64, relative to its scale.

    Tensors whose float64 gradient is zero in exact arithmetic (below 1e-12 of the largest
    gradient: attention key biases, whose softmax ignores a constant per query; the last
    hypernetwork bias, which adds the same to every class) are left out of the dict; the
    second value is the largest of ours there, relative to the largest gradient.
    """
    overall = max(np.abs(g).max() for k, g in g64.items() if k in ours)
    errors, zero_noise = {}, 0.0
    for key, ref64 in g64.items():
        if key not in ours:
            continue  # buffers (no gradient)
        scale = np.abs(ref64).max()
        if scale < 1e-12 * overall:
            zero_noise = max(zero_noise, float(np.abs(ours[key]).max() / overall))
            continue
        errors[key] = (float(np.abs(ours[key] - ref64).max() / scale),
                       float(np.abs(g32[key] - ref64).max() / scale))
    return errors, zero_noise


def facenet_data():
    """facenet-pytorch's pretrained MTCNN folder; skips the test when the package is absent
    (outside CI: `.ci/run` installs it, and there a missing package fails the test)."""
    import os

    import pytest

    from segface_jax.mtcnn import facenet_data as data_folder

    try:
        import facenet_pytorch  # noqa: F401
    except ImportError as e:
        if e.name != "facenet_pytorch" or os.environ.get("CI"):
            raise
        pytest.skip("facenet-pytorch is not installed; it pins torch<2.3, so install it with "
                    "pip install --no-deps facenet-pytorch==2.6.0")
    return data_folder()
