"""SegFace's decoder: multi-scale MLP fusion, random-Fourier positions, two-way transformer,
and the face decoder that turns one learned token per class into a logit map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segface_jax.models.layers import (
    Buffer,
    Dtype,
    accumulation_dtype,
    gelu,
    layer_norm,
    linear,
    resize_bilinear,
    softmax,
    upcast,
)

DIM = 256  # decoder width of every released model


class MultiScaleFusion(nnx.Module):
    """Project features to 256 channels, upsample to stride 4, concat deepest-first, fuse.

    Upstream computes ``linear_fuse(concat_i(resize(f_i @ P_i + b_i)))``. Every step there is
    linear and a bilinear resize's weights sum to 1 at every output pixel, so this equals
    ``sum_i resize(f_i @ (P_i @ W_i)) + b_i @ W_i``, where ``W_i`` is the block of the fuse
    kernel that multiplies map i. That is what runs: the same parameters, float32 rounding
    apart (tests/test_modules.py holds it to torch), without the (B, H/4, W/4, 4 * dim)
    concatenation and its 4 * dim x dim matmul at stride 4 (29% of MobileNetV3-512's forward
    FLOPs, 4% of Swin-B-512's), in the forward pass and twice in the backward.
    """

    def __init__(self, in_dims: Sequence[int], dim: int = DIM, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.linear_c = nnx.List([linear(d, dim, dtype, param_dtype, rngs) for d in in_dims])
        # torch: 1x1 Conv2d(4 * dim, dim, bias=False), here the equivalent dense layer.
        self.linear_fuse = linear(len(in_dims) * dim, dim, dtype, param_dtype, rngs,
                                  use_bias=False)

    def __call__(self, features: Sequence[jnp.ndarray]) -> jnp.ndarray:
        # features: NHWC maps, the first at stride 4 -> (B, H/4, W/4, dim).
        hw = features[0].shape[1:3]
        fuse = self.linear_fuse.kernel[...]  # (4 * dim, dim), rows in deepest-first order
        dim, n = fuse.shape[1], len(features)
        out, bias = None, 0.0
        for i, (proj, f) in enumerate(zip(self.linear_c, features)):
            w = fuse[(n - 1 - i) * dim:(n - i) * dim]  # the rows that multiply map i
            dt = self.dtype or f.dtype
            m = resize_bilinear(f.astype(dt) @ (proj.kernel[...] @ w).astype(dt), hw)
            out = m if out is None else out + m
            bias = bias + proj.bias[...] @ w
        return out + bias.astype(out.dtype)


class PositionEmbeddingRandom(nnx.Module):
    """SAM's random-Fourier positional encoding; the gaussian matrix comes from the checkpoint."""

    def __init__(self, num_feats: int = DIM // 2, *, rngs: nnx.Rngs):
        self.positional_encoding_gaussian_matrix = Buffer(
            jax.random.normal(rngs.params(), (2, num_feats), jnp.float32))

    def __call__(self, h: int, w: int) -> jnp.ndarray:
        """(h, w, 2 * num_feats) encoding of the pixel centres of an h x w grid."""
        matrix = self.positional_encoding_gaussian_matrix[...]
        yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        # the pixel grid in the matrix's precision (float32 at least), as SAM builds it
        coords = 2.0 * np.stack([xx, yy], axis=-1).astype(accumulation_dtype(matrix)) - 1.0
        proj = 2.0 * math.pi * (jnp.asarray(coords) @ matrix)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class Attention(nnx.Module):
    """SAM's attention: project q, k, v to ``dim // downsample``, multi-head, project back."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        inner = dim // downsample
        self.num_heads = num_heads
        self.q_proj = linear(dim, inner, dtype, param_dtype, rngs)
        self.k_proj = linear(dim, inner, dtype, param_dtype, rngs)
        self.v_proj = linear(dim, inner, dtype, param_dtype, rngs)
        self.out_proj = linear(inner, dim, dtype, param_dtype, rngs)

    def __call__(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
        # (B, Nq, dim), (B, Nk, dim), (B, Nk, dim) -> (B, Nq, dim)
        def heads(x):  # (B, N, inner) -> (B, heads, N, inner / heads)
            b, n, c = x.shape
            return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        logits = upcast(jnp.einsum("bhnd,bhmd->bhnm", q, k)) / math.sqrt(q.shape[-1])
        attn = softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhnm,bhmd->bnhd", attn, v)
        return self.out_proj(out.reshape(*out.shape[:2], -1))


class TwoWayBlock(nnx.Module):
    """Tokens attend to themselves and to the image; the image attends back to the tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool, *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, num_heads, **kw)
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.mlp_lin1 = linear(dim, mlp_dim, **kw)
        self.mlp_lin2 = linear(mlp_dim, dim, **kw)
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.norm4 = layer_norm(dim, 1e-5, **kw)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2, **kw)

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:  # first layer: no query PE and no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp_lin2(jax.nn.relu(self.mlp_lin1(queries))))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """SAM's two-way transformer between class tokens and the flattened image embedding."""

    def __init__(self, depth: int = 2, dim: int = DIM, num_heads: int = 8, mlp_dim: int = 2048, *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            TwoWayBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0), **kw)
            for i in range(depth)
        ])
        self.final_attn_token_to_image = Attention(dim, num_heads, 2, **kw)
        self.norm_final_attn = layer_norm(dim, 1e-5, **kw)

    def __call__(self, image: jnp.ndarray, image_pe: jnp.ndarray, tokens: jnp.ndarray):
        # image (B, N, dim), image_pe (1 or B, N, dim), tokens (B, T, dim)
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attn), keys


def conv_transpose_2x2(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """torch ``ConvTranspose2d(k=2, s=2)``: (B, H, W, Cin), (2, 2, Cin, Cout) -> (B, 2H, 2W, Cout).

    With kernel == stride the output windows do not overlap: output pixel (2i + a, 2j + b) is
    x[i, j] @ kernel[a, b]. kernel[a, b, c, o] is torch's weight[c, o, a, b], not mirrored.
    One (pixels, Cin) @ (Cin, 4 Cout) matmul, then a pixel shuffle: the einsum that says the
    same thing in one line lets XLA:CPU pick a channel-major matmul output and a slow full
    transpose (1.5-2x slower forward and backward, identical values).
    """
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    y = x.reshape(b * h * w, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, 4 * o)
    y = y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5)  # (b, h, a, w, b', o)
    return y.reshape(b, 2 * h, 2 * w, o) + bias


class FaceDecoder(nnx.Module):
    """Class tokens -> two-way transformer -> hypernetwork weights @ upscaled image embedding."""

    def __init__(self, class_names: Sequence[str], dim: int = DIM, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.class_names = tuple(class_names)
        self.dtype = dtype
        for name in self.class_names:  # one learned (1, dim) embedding per class, as released
            setattr(self, f"{name}_token",
                    nnx.Param(jax.random.normal(rngs.params(), (1, dim), param_dtype)))
        self.transformer = TwoWayTransformer(dim=dim, **kw)
        init = nnx.initializers.lecun_normal()
        self.upscale1_kernel = nnx.Param(init(rngs.params(), (2, 2, dim, dim // 4), param_dtype))
        self.upscale1_bias = nnx.Param(jnp.zeros((dim // 4,), param_dtype))
        self.upscale_norm = layer_norm(dim // 4, 1e-6, **kw)  # SAM's LayerNorm2d
        self.upscale2_kernel = nnx.Param(init(rngs.params(), (2, 2, dim // 4, dim // 8),
                                              param_dtype))
        self.upscale2_bias = nnx.Param(jnp.zeros((dim // 8,), param_dtype))
        # ONE hypernetwork MLP shared by all tokens (SAM has one per token).
        self.hyper_mlp = nnx.List([
            linear(dim, dim, **kw), linear(dim, dim, **kw), linear(dim, dim // 8, **kw),
        ])

    def tokens(self) -> jnp.ndarray:
        """(T, dim) class tokens in class order."""
        return jnp.concatenate([getattr(self, f"{n}_token")[...] for n in self.class_names])

    def __call__(self, image: jnp.ndarray, image_pe: jnp.ndarray) -> jnp.ndarray:
        # image (B, h, w, dim), image_pe (h, w, dim) -> logits (B, 4h, 4w, T)
        b, h, w, c = image.shape
        dt = self.dtype or image.dtype
        tokens = jnp.broadcast_to(self.tokens().astype(dt), (b, len(self.class_names), c))
        hs, src = self.transformer(image.reshape(b, h * w, c),
                                   image_pe.reshape(1, h * w, c).astype(dt), tokens)
        src = src.reshape(b, h, w, c)
        up = conv_transpose_2x2(src, self.upscale1_kernel[...].astype(dt),
                                self.upscale1_bias[...].astype(dt))
        up = gelu(self.upscale_norm(up))
        up = gelu(conv_transpose_2x2(up, self.upscale2_kernel[...].astype(dt),
                                     self.upscale2_bias[...].astype(dt)))
        for i, layer in enumerate(self.hyper_mlp):
            hs = layer(hs)
            if i < len(self.hyper_mlp) - 1:
                hs = jax.nn.relu(hs)
        return jnp.einsum("btc,bhwc->bhwt", hs, up)
