"""Helpers shared by the tests: small configs, torch -> JAX weight copies, parity figures."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

from segface_jax.checkpoint import fill_module, flat_state
from segface_jax.convert.rules import Rule


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


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())

