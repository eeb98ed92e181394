"""A PyTorch SegFace reference with the release checkpoints' exact state_dict keys.

Assembled from torchvision's encoders (``weights=None``) and the segment-anything package's
TwoWayTransformer, LayerNorm2d, PositionEmbeddingRandom and MLP, plus glue that reproduces
upstream's module names. It serves the parity tests and ``segface-jax parity``: build it,
randomise it (``randomize``), save it in the release format (``save_release``), convert it
with the converter under test and compare the logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from segface_jax.variants import Variant

# Upstream's literal values (its alignment and dataset code), written out here, not imported from
# segface_jax, so that a wrong constant in the port cannot also be in its reference: the
# standard 5 face points on a 512 canvas mapped to [-1, 1], the tanh-warp factor, and the
# class-token order of each dataset's heads.
UPSTREAM_FACE_POINTS = (torch.tensor([[196.0, 226.0], [316.0, 226.0], [256.0, 286.0],
                                      [220.0, 360.4], [292.0, 360.4]]) / 256.0 - 1.0)
UPSTREAM_WARP_FACTOR = 0.8
UPSTREAM_CLASSES = {
    "celebamask_hq": ("background", "neck", "face", "cloth", "rightear", "leftear", "rightbro",
                      "leftbro", "righteye", "lefteye", "nose", "innermouth", "lowerlip",
                      "upperlip", "hair", "glass", "hat", "earring", "necklace"),
    "lapa": ("background", "face", "leftbro", "rightbro", "lefteye", "righteye", "nose",
             "upperlip", "innermouth", "lowerlip", "hair"),
    "helen": ("background", "face", "leftbro", "rightbro", "lefteye", "righteye", "nose",
              "upperlip", "innermouth", "lowerlip", "hair"),
}

# torchvision builder, upstream's backbone module, the tapped indices and their widths.
# Swin/SwinV2/ConvNeXt and ResNet keep the classifier minus its head (Sequential of children),
# MobileNetV3 and EfficientNetV2 keep ``.features``.
_BACKBONES = {
    "swin_b": (torchvision.models.swin_b, "children", (1, 3, 5, 7), (128, 256, 512, 1024)),
    "swin_v2_b": (torchvision.models.swin_v2_b, "children", (1, 3, 5, 7), (128, 256, 512, 1024)),
    "convnext_base": (torchvision.models.convnext_base, "children", (1, 3, 5, 7),
                      (128, 256, 512, 1024)),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, "features", (3, 6, 12, 16),
                           (24, 40, 112, 960)),
    "efficientnet_v2_m": (torchvision.models.efficientnet_v2_m, "features", (2, 3, 5, 8),
                          (48, 80, 176, 1280)),
    "resnet101": (torchvision.models.resnet101, "children", (4, 5, 6, 7),
                  (256, 512, 1024, 2048)),
}


def small_swin() -> nn.Module:
    """A tiny torchvision Swin (width 32, one block per stage) for fast unit tests."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2],
                           num_heads=[2, 2, 2, 2], window_size=[7, 7])


def small_convnext() -> nn.Module:
    """A tiny torchvision ConvNeXt (widths 32..256, one block per stage) for fast unit tests."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1),
                     CNBlockConfig(128, 256, 1), CNBlockConfig(256, None, 1)])


class _Proj(nn.Module):
    """Upstream's per-scale 'MLP': a Linear over flattened pixels, stored as ``proj``."""

    def __init__(self, dim_in: int, dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.proj(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, -1, h, w)


class _FaceDecoder(nn.Module):
    """Class tokens named ``<class>_token``, SAM's transformer, upscaling and one shared MLP."""

    def __init__(self, class_names: Sequence[str], dim: int = 256):
        super().__init__()
        self.class_names = tuple(class_names)
        self.transformer = TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=8, mlp_dim=2048)
        for name in self.class_names:
            setattr(self, f"{name}_token", nn.Embedding(1, dim))
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4),
            nn.GELU(), nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetwork_mlps = MLP(dim, dim, dim // 8, 3)

    def tokens(self, batch: int) -> torch.Tensor:
        """(batch, T, C) class tokens in class order."""
        tokens = torch.cat([getattr(self, f"{n}_token").weight for n in self.class_names])
        return tokens.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(image.shape[0])
        b, c, h, w = image.shape
        hs, src = self.transformer(image, image_pe.expand(b, -1, -1, -1), tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = self.output_hypernetwork_mlps(hs)
        b, c, h, w = up.shape
        return (hyper @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)


class SegFaceReference(nn.Module):
    """SegFace in PyTorch; ``forward(x NCHW[, landmarks])`` -> NCHW logits at input size."""

    def __init__(self, backbone: nn.Module, taps: Sequence[int], dims: Sequence[int],
                 class_names: Sequence[str], align: bool = False, nhwc_features: bool = False,
                 taps_in_first: bool = False):
        super().__init__()
        self.backbone = backbone
        self.taps = tuple(taps)
        self.taps_in_first = taps_in_first  # Swin/ConvNeXt: taps index backbone[0] (features)
        self.nhwc_features = nhwc_features  # Swin stages are NHWC and get permuted
        self.align = align
        self.linear_c = nn.ModuleList(_Proj(d) for d in dims)
        self.linear_fuse = nn.Conv2d(4 * 256, 256, kernel_size=1, bias=False)
        self.pe_layer = PositionEmbeddingRandom(128)
        self.face_decoder = _FaceDecoder(class_names)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four NCHW maps that upstream's forward hooks collect."""
        # Swin/ConvNeXt: the taps are inside features (backbone[0]); the Swin final norm,
        # ConvNeXt's pooling etc. never reach the output, so they are not run.
        seq = self.backbone[0] if self.taps_in_first else self.backbone
        out = []
        for i, layer in enumerate(seq):
            x = layer(x)
            if i in self.taps:
                out.append(x.permute(0, 3, 1, 2) if self.nhwc_features else x)
            if i == max(self.taps):
                break
        return out

    def _positional_encoding(self, h: int, w: int) -> torch.Tensor:
        gaussian = self.pe_layer.positional_encoding_gaussian_matrix
        if gaussian.dtype == torch.float32:
            return self.pe_layer((h, w))  # segment-anything's own float32 path
        # float64 runs (to measure float32 noise): the same pixel-centre grid in float64
        yy, xx = torch.meshgrid((torch.arange(h).to(gaussian) + 0.5) / h,
                                (torch.arange(w).to(gaussian) + 0.5) / w, indexing="ij")
        return self.pe_layer._pe_encoding(torch.stack([xx, yy], -1)).permute(2, 0, 1)

    def fuse(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The multi-scale MLP fusion of the four maps, at the first map's size."""
        size = feats[0].shape[-2:]
        maps = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
                for p, f in zip(self.linear_c, feats, strict=True)]
        return self.linear_fuse(torch.cat(maps[::-1], dim=1))

    def parse(self, x: torch.Tensor) -> torch.Tensor:
        """The network without alignment: NCHW image -> NCHW logits."""
        fused = self.fuse(self.features(x))
        pe = self._positional_encoding(*fused.shape[-2:]).unsqueeze(0)
        return self.face_decoder(fused, pe)

    def align_input(self, x: torch.Tensor, landmarks: torch.Tensor):
        """LaPa: warp the image to the aligned crop; returns it and the alignment matrix."""
        matrix = face_align_matrix(landmarks, x.shape[-1])
        grid = warp_grid(matrix, x.shape[-2:], x.shape[-2:])
        return F.grid_sample(x, grid, mode="bilinear", align_corners=False), matrix

    def stages(self, x: torch.Tensor, landmarks: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """``forward``'s intermediate results by name (NCHW maps, (B, T, C) tokens), in order;
        the last is ``forward``'s output."""
        out: dict[str, torch.Tensor] = {}
        orig_hw = x.shape[-2:]
        if self.align:
            x, matrix = self.align_input(x, landmarks)
            out["aligned input"] = x
        feats = self.features(x)
        out.update({f"encoder tap {i + 1}": f for i, f in enumerate(feats)})
        fused = out["fused features"] = self.fuse(feats)
        pe = self._positional_encoding(*fused.shape[-2:]).unsqueeze(0)
        decoder = self.face_decoder
        hs, _ = decoder.transformer(fused, pe, decoder.tokens(x.shape[0]))
        out["class tokens after the transformer"] = hs
        logits = out["logits"] = decoder(fused, pe)
        if self.align:
            grid = inverse_warp_grid(matrix, logits.shape[-2:], orig_hw)
            out["logits after the inverse warp"] = F.grid_sample(
                logits, grid, mode="bilinear", align_corners=False)
        return out

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        if not self.align:  # Helen's forward ignores landmarks, as upstream's does
            return self.parse(x)
        warped, matrix = self.align_input(x, landmarks)
        logits = self.parse(warped)
        grid = inverse_warp_grid(matrix, logits.shape[-2:], x.shape[-2:])
        return F.grid_sample(logits, grid, mode="bilinear", align_corners=False)


def build_reference(variant: Variant, encoder: nn.Module | None = None,
                    taps: Sequence[int] | None = None) -> SegFaceReference:
    """The PyTorch reference of a released variant (optionally with a small torchvision encoder
    of the same family, and its own tapped indices if it is shallower, for fast tests)."""
    builder, kind, released_taps, dims = _BACKBONES[variant.backbone]
    taps = released_taps if taps is None else tuple(taps)
    model = builder(weights=None) if encoder is None else encoder
    backbone = (model.features if kind == "features"
                else nn.Sequential(*list(model.children())[:-1]))
    classes = UPSTREAM_CLASSES[variant.dataset]
    kw = dict(align=variant.needs_landmarks, nhwc_features=variant.backbone.startswith("swin"),
              taps_in_first=variant.backbone.startswith(("swin", "convnext")))
    if encoder is not None:  # a small encoder: read its tapped widths off a dry run
        probe = SegFaceReference(backbone, taps, dims, classes, **kw)
        was_training = backbone.training
        with torch.no_grad():
            dims = tuple(f.shape[1] for f in probe.eval().features(torch.zeros(1, 3, 64, 64)))
        backbone.train(was_training)
    return SegFaceReference(backbone, taps, dims, classes, **kw)


# --- alignment, written from the SegFace/facer description (tanh warp, factor 0.8) ----------

def _similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - ms, dst - md
    den = (s * s).sum((1, 2))
    a = (d * s).sum((1, 2)) / den
    b = (d[..., 0] * s[..., 1] - d[..., 1] * s[..., 0]).sum(1) / den
    tx = md[:, 0, 0] - a * ms[:, 0, 0] - b * ms[:, 0, 1]
    ty = md[:, 0, 1] + b * ms[:, 0, 0] - a * ms[:, 0, 1]
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, -b, a, ty, z, z, o], -1).reshape(-1, 3, 3)


def face_align_matrix(landmarks: torch.Tensor, resolution: int) -> torch.Tensor:
    """Similarity taking (B, 5, 2) landmarks to the standard points scaled to (R - 1) / 2."""
    target = (UPSTREAM_FACE_POINTS.to(landmarks) + 1) * (resolution - 1) / 2
    return _similarity(landmarks, target.expand_as(landmarks))


def _pixels(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h).to(like), torch.arange(w).to(like), indexing="ij")
    return torch.stack([xx, yy], -1).reshape(1, h * w, 2).expand(like.shape[0], -1, -1)


def _project(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    homo = torch.cat([c, torch.ones_like(c[..., :1])], -1) @ m.transpose(1, 2)
    return homo[..., :2] / homo[..., 2:]


def warp_grid(matrix: torch.Tensor, warped_hw, orig_hw,
              f: float = UPSTREAM_WARP_FACTOR) -> torch.Tensor:
    """grid_sample grid from the original image into the aligned tanh-warped crop."""
    h, w = warped_hw
    wh = torch.tensor([w, h]).to(matrix)
    c = _pixels(h, w, matrix) / wh * 2 - 1
    hi = torch.clamp((c - 1 + f) / f, -1 + 1e-3, 1 - 1e-3).arctanh() * f + 1 - f
    lo = torch.clamp((c + 1 - f) / f, -1 + 1e-3, 1 - 1e-3).arctanh() * f - 1 + f
    c = torch.where(c > 1 - f, hi, torch.where(c < -1 + f, lo, c))
    orig = _project(torch.linalg.inv(matrix), (c + 1) / 2 * wh)
    owh = torch.tensor([orig_hw[1], orig_hw[0]]).to(matrix)
    return (orig / owh * 2 - 1).reshape(-1, h, w, 2)


def inverse_warp_grid(matrix: torch.Tensor, warped_hw, orig_hw,
                      f: float = UPSTREAM_WARP_FACTOR) -> torch.Tensor:
    """grid_sample grid from the warped crop back onto the original image."""
    h, w = warped_hw
    wh = torch.tensor([w, h]).to(matrix)
    c = _project(matrix, _pixels(*orig_hw, matrix)) / wh * 2 - 1
    hi = torch.tanh((c - 1 + f) / f) * f + 1 - f
    lo = torch.tanh((c + 1 - f) / f) * f - 1 + f
    c = torch.where(c > 1 - f, hi, torch.where(c < -1 + f, lo, c))
    return ((c + 1) / 2 * wh / wh * 2 - 1).reshape(-1, *orig_hw, 2)


# --- randomisation and the release file format ---------------------------------------------

_STRUCTURAL_BUFFERS = ("relative_position_index", "relative_coords_table")


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and buffer seeded random values that make every path matter.

    Weights ~ N(0, 1/fan_in) (unit-variance outputs), biases 0.05 N, norm scales 1 + 0.1 N,
    ConvNeXt layer scales 0.2 + 0.05 N (torchvision's 1e-6 would make blocks identities),
    relative-position tables 0.5 N, class tokens and the positional matrix N(0, 1). Structural
    index buffers keep their values. Raises if any tensor was left untouched.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, dtype=t.dtype)

    touched: set[int] = set()
    norm_types = (nn.LayerNorm, LayerNorm2d, nn.BatchNorm2d, nn.GroupNorm)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)):
            if name in _STRUCTURAL_BUFFERS or not p.is_floating_point():
                touched.add(id(p))
                continue
            if isinstance(module, norm_types) and name == "weight":
                p.copy_(1 + 0.1 * normal(p))
            elif isinstance(module, nn.BatchNorm2d) and name == "running_var":
                p.copy_(1 + 0.1 * normal(p).abs())
            elif name == "layer_scale":
                p.copy_(0.2 + 0.05 * normal(p))
            elif name == "relative_position_bias_table":
                p.copy_(0.5 * normal(p))
            elif name == "logit_scale":  # log(10) +- 1.5: some heads exceed the log(100) clamp
                p.copy_(math.log(10.0) + 1.5 * normal(p))
            elif isinstance(module, nn.Embedding) or name == "positional_encoding_gaussian_matrix":
                p.copy_(normal(p))
            elif name == "weight" and isinstance(module, nn.ConvTranspose2d):
                p.copy_(normal(p) / math.sqrt(p.shape[0]))
            elif name == "weight" and p.ndim >= 2:
                p.copy_(normal(p) / math.sqrt(p[0].numel()))
            elif p.ndim == 1:
                p.copy_(0.05 * normal(p))
            else:
                raise ValueError(f"randomize: no rule for {type(module).__name__}.{name}")
            touched.add(id(p))
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in touched]
    if missing:
        raise ValueError(f"randomize left tensors untouched: {missing}")
    return model


def save_release(model: nn.Module, path: str | Path) -> Path:
    """Save ``model`` exactly as the release files are laid out (``model_299.pt``)."""
    path = Path(path)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[80, 200], gamma=0.1)
    torch.save({"epoch": 299, "iteration": 0, "state_dict_backbone": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    return path
