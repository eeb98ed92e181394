"""Swin Transformer v1 and v2 encoders, numerically identical to torchvision's ``swin_b/s/t``
and ``swin_v2_b/s/t``.

Returns the outputs of the four stages (torchvision ``features[1, 3, 5, 7]``), NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segface_jax.models.layers import (
    Dtype,
    RematUnit,
    depth_rates,
    gelu,
    layer_norm,
    linear,
    patchify_conv,
    remat_call,
    softmax,
    stochastic_depth,
    upcast,
)

_MASKED = -100.0  # torchvision's additive mask value for tokens from different shifted regions


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Swin hyper-parameters; presets follow torchvision."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    version: int = 1  # 2: cosine attention, continuous position bias, post-norm
    stochastic_depth_prob: float = 0.5  # training only; torchvision's default per preset

    @classmethod
    def base(cls) -> SwinConfig:
        """torchvision ``swin_b``."""
        return cls()

    @classmethod
    def v2_base(cls) -> SwinConfig:
        """torchvision ``swin_v2_b``."""
        return cls(window_size=8, version=2)

    @classmethod
    def v2_small(cls) -> SwinConfig:
        """torchvision ``swin_v2_s``."""
        return dataclasses.replace(cls.small(), window_size=8, version=2)

    @classmethod
    def v2_tiny(cls) -> SwinConfig:
        """torchvision ``swin_v2_t``."""
        return dataclasses.replace(cls.tiny(), window_size=8, version=2)

    @classmethod
    def small(cls) -> SwinConfig:
        """torchvision ``swin_s``."""
        return cls(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                   stochastic_depth_prob=0.3)

    @classmethod
    def tiny(cls) -> SwinConfig:
        """torchvision ``swin_t``."""
        return cls(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                   stochastic_depth_prob=0.2)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each stage output."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@functools.cache
def relative_position_index(ws: int) -> np.ndarray:
    """Index into the ((2ws-1)^2, heads) bias table for every token pair: -> (ws^2 * ws^2,)."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).reshape(-1)


@functools.cache
def relative_coords_table(ws: int) -> np.ndarray:
    """SwinV2's log-spaced relative coordinates: -> ((2ws-1)^2, 2) float32 (dy, dx).

    x / (ws - 1) * 8, then sign(x) * log2(|x| + 1) / 3, computed in float64 and rounded once.
    """
    r = np.arange(-(ws - 1), ws, dtype=np.float64) / (ws - 1) * 8
    r = np.sign(r) * np.log2(np.abs(r) + 1.0) / 3.0
    dy, dx = np.meshgrid(r, r, indexing="ij")
    return np.stack([dy, dx], axis=-1).reshape(-1, 2).astype(np.float32)


@functools.cache
def shifted_window_mask(ph: int, pw: int, ws: int, sh: int, sw: int) -> np.ndarray:
    """Additive attention mask for shifted windows on a padded (ph, pw) map: -> (nW, ws^2, ws^2).

    Regions are labelled with torchvision's slices (including its behaviour when one of the
    two shifts was clipped to 0); token pairs from different regions get -100.
    """
    region = np.zeros((ph, pw), np.float32)
    count = 0
    for h0, h1 in ((0, -ws), (-ws, -sh), (-sh, None)):
        for w0, w1 in ((0, -ws), (-ws, -sw), (-sw, None)):
            region[h0:h1, w0:w1] = count
            count += 1
    windows = region.reshape(ph // ws, ws, pw // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, _MASKED, 0.0).astype(np.float32)


def window_partition(x: jnp.ndarray, ws: int) -> jnp.ndarray:
    """(B, H, W, C) -> (B * nW, ws * ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_merge(x: jnp.ndarray, ws: int, b: int, h: int, w: int) -> jnp.ndarray:
    """(B * nW, ws * ws, C) -> (B, H, W, C); inverse of ``window_partition``."""
    c = x.shape[-1]
    x = x.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    v1: scaled dot product plus a learned ((2ws-1)^2, heads) bias table. v2: cosine similarity
    times exp(min(logit_scale, log 100)), bias 16 * sigmoid(MLP(log-spaced coordinates)), and
    the k part of the qkv bias zeroed at every call.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, version: int = 1, *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.window_size = window_size
        self.version = version
        self.dtype = dtype
        self.qkv = linear(dim, 3 * dim, dtype, param_dtype, rngs)
        self.proj = linear(dim, dim, dtype, param_dtype, rngs)
        if version == 1:
            n_rel = (2 * window_size - 1) ** 2
            self.relative_position_bias_table = nnx.Param(
                0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (n_rel, num_heads),
                                                   param_dtype))
        else:
            self.logit_scale = nnx.Param(jnp.full((num_heads,), math.log(10.0), param_dtype))
            self.cpb_fc1 = linear(2, 512, None, param_dtype, rngs)
            self.cpb_fc2 = linear(512, num_heads, None, param_dtype, rngs, use_bias=False)

    def position_bias(self) -> jnp.ndarray:
        """(heads, N, N) bias gathered with the static index."""
        n = self.window_size**2
        if self.version == 1:
            table = self.relative_position_bias_table[...]
        else:
            coords = jnp.asarray(relative_coords_table(self.window_size))
            table = upcast(self.cpb_fc2(jax.nn.relu(self.cpb_fc1(coords))))
        bias = table[relative_position_index(self.window_size)].reshape(n, n, self.num_heads)
        bias = bias.transpose(2, 0, 1)
        return bias if self.version == 1 else 16.0 * jax.nn.sigmoid(bias)

    def __call__(self, x: jnp.ndarray, mask: np.ndarray | None) -> jnp.ndarray:
        # x: (B * nW, N, C); mask: (nW, N, N) or None.
        bw, n, c = x.shape
        hd = c // self.num_heads
        if self.version == 1:
            qkv = self.qkv(x)
        else:  # torchvision zeroes the k bias at every forward
            dt = self.dtype or x.dtype
            bias = self.qkv.bias[...] * jnp.repeat(jnp.array([1.0, 0.0, 1.0]), c)
            qkv = x @ self.qkv.kernel[...].astype(dt) + bias.astype(dt)
        qkv = qkv.reshape(bw, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        if self.version == 1:
            q, k, v = qkv[0] * hd**-0.5, qkv[1], qkv[2]
            attn = upcast(jnp.einsum("bhnd,bhmd->bhnm", q, k))
        else:
            q, k, v = _l2_normalize(qkv[0]), _l2_normalize(qkv[1]), qkv[2]
            attn = upcast(jnp.einsum("bhnd,bhmd->bhnm", q, k))
            scale = jnp.exp(jnp.minimum(self.logit_scale[...], math.log(100.0)))
            attn = attn * scale[:, None, None].astype(attn.dtype)
        attn = attn + self.position_bias().astype(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.reshape(bw, self.num_heads, n, n)
        attn = softmax(attn, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhnm,bhmd->bnhd", attn, v).reshape(bw, n, c)
        return self.proj(out)


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """torch ``F.normalize(x, dim=-1)``: x / max(||x||, eps), with torch's gradient at x = 0.

    SwinV2's padded window tokens have k = 0, where sqrt's derivative is infinite and the
    plain norm's gradient 0 * inf = NaN; torch's is finite there. The square root therefore
    never sees a 0 (the double ``where``): the values are the plain formula's, bit for bit,
    and at x = 0 the gradient is x's own path, 1 / eps, as torch's.
    """
    sq = jnp.sum(upcast(x) ** 2, axis=-1, keepdims=True)
    nonzero = sq > 0
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class SwinBlock(RematUnit, nnx.Module):
    """Pre-norm Swin block: (shifted) window attention and an MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float,
                 version: int = 1, drop_rate: float = 0.0, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.window_size = window_size
        self.shift = shift
        self.post_norm = version == 2
        self.norm1 = layer_norm(dim, 1e-5, dtype, param_dtype, rngs)
        self.attn = WindowAttention(dim, num_heads, window_size, version, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, 1e-5, dtype, param_dtype, rngs)
        hidden = int(dim * mlp_ratio)
        self.fc1 = linear(dim, hidden, dtype, param_dtype, rngs)
        self.fc2 = linear(hidden, dim, dtype, param_dtype, rngs)
        self.drop_path = stochastic_depth(drop_rate)  # one module for both branches, as torch

    def _attention(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, _ = x.shape
        ws = self.window_size
        # torchvision pads bottom/right with zeros (before the shift) and never masks padding.
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        ph, pw = h + pad_b, w + pad_r
        # A window covering the whole (padded) axis makes the shift pointless: clip it to 0.
        sh = 0 if ws >= ph else self.shift
        sw = 0 if ws >= pw else self.shift
        shifted = sh + sw > 0
        if shifted:
            x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
        mask = shifted_window_mask(ph, pw, ws, sh, sw) if shifted else None
        x = window_merge(self.attn(window_partition(x, ws), mask), ws, b, ph, pw)
        if shifted:
            x = jnp.roll(x, (sh, sw), axis=(1, 2))
        return x[:, :h, :w]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        drop = self.drop_path
        if self.post_norm:  # v2: x + norm(f(x))
            x = x + drop(self.norm1(self._attention(x)))
            return x + drop(self.norm2(self.fc2(gelu(self.fc1(x)))))
        x = x + drop(self._attention(self.norm1(x)))
        return x + drop(self.fc2(gelu(self.fc1(self.norm2(x)))))


def merge_patches(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), zero-padding odd sizes, torchvision order."""
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    parts = (x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2])
    return jnp.concatenate(parts, axis=-1)


class PatchMerging(nnx.Module):
    """2x2 neighbourhood concat and a linear 4C -> 2C; LayerNorm before (v1) or after (v2)."""

    def __init__(self, dim: int, version: int = 1, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.version = version
        norm_dim = 4 * dim if version == 1 else 2 * dim
        self.norm = layer_norm(norm_dim, 1e-5, dtype, param_dtype, rngs)
        self.reduction = linear(4 * dim, 2 * dim, dtype, param_dtype, rngs, use_bias=False)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.version == 1:
            return self.reduction(self.norm(merge_patches(x)))
        return self.norm(self.reduction(merge_patches(x)))


class SwinStage(nnx.Module):
    """A stack of Swin blocks alternating unshifted and shifted windows."""

    def __init__(self, dim: int, depth: int, num_heads: int, cfg: SwinConfig,
                 drop_rates: Sequence[float] = (), *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        ws = cfg.window_size
        rates = list(drop_rates) or [0.0] * depth
        self.blocks = nnx.List([
            SwinBlock(dim, num_heads, ws, 0 if i % 2 == 0 else ws // 2, cfg.mlp_ratio,
                      cfg.version, rates[i], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(depth)
        ])

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for block in self.blocks:
            x = remat_call(block, x)
        return x


class PatchEmbed(nnx.Module):
    """4x4 patchify conv followed by LayerNorm (torchvision ``features[0]``)."""

    def __init__(self, dim: int, patch: int, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = patchify_conv(3, dim, patch, dtype, param_dtype, rngs)
        self.norm = layer_norm(dim, 1e-5, dtype, param_dtype, rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.norm(self.conv(x))


class SwinTransformer(nnx.Module):
    """Swin v1/v2 encoder: (B, H, W, 3) -> four NHWC stage outputs at strides 4, 8, 16, 32."""

    def __init__(self, cfg: SwinConfig, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = cfg.stage_dims
        self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size, **kw)
        rates = depth_rates(cfg.stochastic_depth_prob, cfg.depths, 1)
        self.stages = nnx.List([
            SwinStage(d, n, h, cfg, r, **kw)
            for d, n, h, r in zip(dims, cfg.depths, cfg.num_heads, rates)
        ])
        self.merges = nnx.List([PatchMerging(d, cfg.version, **kw) for d in dims[:-1]])

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        return outs
