"""MTCNN's three networks (Zhang et al. 2016) in Flax NNX, as ``facenet-pytorch`` 2.6.0 ships them.

P-Net proposes faces on every level of an image pyramid (fully convolutional), R-Net refines
24x24 crops of the proposals and O-Net scores 48x48 crops, regresses their boxes and places 5
landmarks. Attribute names follow facenet-pytorch's modules (``conv1``, ``prelu1``, ...), so
its ``pnet.pt`` / ``rnet.pt`` / ``onet.pt`` state_dicts map key for key. Inputs are NHWC and
already normalised as facenet-pytorch does, ``(pixel - 127.5) / 128``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from segface_jax.models.layers import abstract


class PReLU(nnx.Module):
    """torch ``nn.PReLU(C)``: x where x >= 0, weight * x elsewhere, one weight per channel."""

    def __init__(self, channels: int):
        self.weight = nnx.Param(jnp.full((channels,), 0.25, jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.where(x >= 0, x, self.weight[...] * x)


def max_pool_ceil(x: jnp.ndarray, window: int, stride: int) -> jnp.ndarray:
    """torch ``MaxPool2d(window, stride, ceil_mode=True)`` on NHWC (no padding).

    Ceil mode adds one more window per axis when the last one would start inside the input
    but run past its end; the missing pixels count as -inf.
    """
    pads = []
    for n in x.shape[1:3]:
        out = math.ceil((n - window) / stride) + 1
        if (out - 1) * stride >= n:  # a window may not start in the padding
            out -= 1
        pads.append((0, max((out - 1) * stride + window - n, 0)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), ((0, 0), *pads, (0, 0)))


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), padding="VALID", rngs=rngs)


def _flatten_like_torch(x: jnp.ndarray) -> jnp.ndarray:
    """facenet-pytorch flattens ``x.permute(0, 3, 2, 1)`` of NCHW: (B, W, H, C) order."""
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], -1)


class PNet(nnx.Module):
    """Proposal network: (B, H, W, 3) -> box offsets (B, h, w, 4), face probabilities (B, h, w, 2)
    with h = ceil((H - 2) / 2) - 4 (one cell per 12x12 window at stride 2)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1, self.prelu1 = _conv(3, 10, 3, rngs), PReLU(10)
        self.conv2, self.prelu2 = _conv(10, 16, 3, rngs), PReLU(16)
        self.conv3, self.prelu3 = _conv(16, 32, 3, rngs), PReLU(32)
        self.conv4_1 = _conv(32, 2, 1, rngs)
        self.conv4_2 = _conv(32, 4, 1, rngs)

    def __call__(self, x: jnp.ndarray, valid_hw: jnp.ndarray | None = None
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``valid_hw``: the (height, width) of the image inside an input padded at the bottom
        and right (a shape bucket). The cells over the image then hold exactly what the
        unpadded image gives: the first convolution's outputs beyond it count as -inf in the
        ceil-mode pooling, as the edge of the image does; the other cells are to be cut off."""
        x = self.prelu1(self.conv1(x))
        if valid_hw is not None:
            rows = jnp.arange(x.shape[1])[:, None] < valid_hw[0] - 2
            cols = jnp.arange(x.shape[2])[None, :] < valid_hw[1] - 2
            x = jnp.where((rows & cols)[None, :, :, None], x, -jnp.inf)
        x = max_pool_ceil(x, 2, 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), jax.nn.softmax(self.conv4_1(x), axis=-1)


class RNet(nnx.Module):
    """Refinement network: (B, 24, 24, 3) -> box offsets (B, 4), face probabilities (B, 2)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1, self.prelu1 = _conv(3, 28, 3, rngs), PReLU(28)
        self.conv2, self.prelu2 = _conv(28, 48, 3, rngs), PReLU(48)
        self.conv3, self.prelu3 = _conv(48, 64, 2, rngs), PReLU(64)
        self.dense4, self.prelu4 = nnx.Linear(576, 128, rngs=rngs), PReLU(128)
        self.dense5_1 = nnx.Linear(128, 2, rngs=rngs)
        self.dense5_2 = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
        x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu4(self.dense4(_flatten_like_torch(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), jax.nn.softmax(self.dense5_1(x), axis=-1)


class ONet(nnx.Module):
    """Output network: (B, 48, 48, 3) -> box offsets (B, 4), landmarks (B, 10: five x then five
    y, relative to the box), face probabilities (B, 2)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1, self.prelu1 = _conv(3, 32, 3, rngs), PReLU(32)
        self.conv2, self.prelu2 = _conv(32, 64, 3, rngs), PReLU(64)
        self.conv3, self.prelu3 = _conv(64, 64, 3, rngs), PReLU(64)
        self.conv4, self.prelu4 = _conv(64, 128, 2, rngs), PReLU(128)
        self.dense5, self.prelu5 = nnx.Linear(1152, 256, rngs=rngs), PReLU(256)
        self.dense6_1 = nnx.Linear(256, 2, rngs=rngs)
        self.dense6_2 = nnx.Linear(256, 4, rngs=rngs)
        self.dense6_3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        x = max_pool_ceil(self.prelu1(self.conv1(x)), 3, 2)
        x = max_pool_ceil(self.prelu2(self.conv2(x)), 3, 2)
        x = max_pool_ceil(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu5(self.dense5(_flatten_like_torch(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), jax.nn.softmax(self.dense6_1(x), axis=-1)


NETWORKS = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def abstract_network(name: str) -> nnx.Module:
    """Network ``name`` (pnet, rnet, onet) with ShapeDtypeStruct leaves: nothing allocated and
    no random initialisation compiled."""
    return abstract(lambda rngs: NETWORKS[name](rngs=rngs))
