"""MTCNN weights (facenet-pytorch 2.6.0's ``pnet.pt``, ``rnet.pt``, ``onet.pt``) -> Flax arrays.

The same exactness as the SegFace converter: an explicit rule per tensor kind, files loaded with
``weights_only=True``, and one error naming every key that does not map, every shape that
differs and every tensor that is not finite.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from segface_jax.checkpoint import flat_state
from segface_jax.convert.converter import (
    ConversionError,
    map_state_dict,
    tensors_as_numpy,
    torch_load,
)
from segface_jax.convert.rules import Family, Rule, conv, linear
from segface_jax.models.mtcnn import NETWORKS, abstract_network

# facenet-pytorch's module names are the Flax attribute names (segface_jax/models/mtcnn.py)
RULES = [
    Rule(r"(conv\d(?:_\d)?)\.weight", r"\1.kernel", conv),
    Rule(r"(conv\d(?:_\d)?)\.bias", r"\1.bias"),
    Rule(r"(prelu\d)\.weight", r"\1.weight"),
    Rule(r"(dense\d(?:_\d)?)\.weight", r"\1.kernel", linear),
    Rule(r"(dense\d(?:_\d)?)\.bias", r"\1.bias"),
]
FAMILY = Family("mtcnn", RULES, [], {})


def convert_network(name: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map one network's state_dict (``name`` in pnet / rnet / onet) onto its Flax paths."""
    expected = flat_state(abstract_network(name))
    arrays, _, _ = map_state_dict(state, FAMILY, expected)
    return arrays


def load_network_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A facenet-pytorch network file's tensors, loaded with ``weights_only=True`` only."""
    path = Path(path)
    state = tensors_as_numpy(torch_load(path, "facenet-pytorch 2.6.0's wheel "
                                              "(facenet_pytorch/data/)"))
    if state is None:
        raise ConversionError(f"{path}: not an MTCNN state_dict (a dict of tensors)")
    return state


def convert_mtcnn(folder: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """PNet, RNet and ONet arrays (``{"pnet": {path: array}, ...}``) converted from
    ``folder``'s pnet.pt, rnet.pt and onet.pt (the layout of facenet-pytorch's
    ``facenet_pytorch/data``); ``segface_jax.mtcnn.networks_from_arrays`` fills the networks."""
    return {name: convert_network(name, load_network_file(Path(folder) / f"{name}.pt"))
            for name in NETWORKS}
