"""Convert a SegFace release checkpoint (``model_299.pt``) into a segface-jax Orbax checkpoint."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segface_jax.checkpoint import abstract_model, flat_state, save_checkpoint
from segface_jax.convert.rules import BACKBONE_FAMILY, FAMILIES, Family
from segface_jax.files import sha256_file
from segface_jax.models import SegFaceConfig
from segface_jax.variants import VARIANTS, Variant, get_variant


class ConversionError(Exception):
    """The file cannot be converted exactly; the message lists every problem and the fix."""


@dataclasses.dataclass
class ConversionReport:
    """What a conversion mapped, checked and skipped."""

    variant: Variant | None  # None for an encoder-only (convert-backbone) conversion
    source: Path
    sha256: str
    mapped: int = 0
    num_parameters: int = 0
    checked: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    label: str | None = None  # what was converted, when not a whole variant

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        what = self.label or f"variant {self.variant.name}"
        lines = [f"{what}: {self.mapped} tensors mapped "
                 f"({self.num_parameters / 1e6:.2f} M values) from {self.source.name}"]
        if self.checked:
            lines.append(f"{len(self.checked)} index buffers checked against the values "
                         "recomputed from static shapes (not loaded)")
        reasons: dict[str, list[str]] = {}
        for key, why in self.skipped.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            lines.append(f"skipped {', '.join(keys)}: {why}")
        return "\n".join(lines)


def torch_load(path: str | os.PathLike, source: str) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is one ``ConversionError`` naming
    the file and ``source``, where a good copy comes from."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols mean nothing here
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = re.search(r"Trying to [^\n]*?(?:blocked|allowed)\.?|Unsupported [^\n]*", text)
        detail = detail.group(0).strip() if detail else "rejected by the weights-only unpickler"
        if "GLOBAL" in text or "Trying to" in text:  # the pickle names code to import or call
            raise ConversionError(
                f"{path}: refused to load: the file asks to import or call Python code, which a "
                f"safe (weights_only) load never runs ({detail}). Use {source}.") from None
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({detail}). "
                              f"Download it again: {source}.") from None
    except Exception as e:  # noqa: BLE001 - garbage bytes drive the unpickler into any error
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{first}). Download it again: {source}.") from None


def tensors_as_numpy(state: Any) -> dict[str, np.ndarray] | None:
    """A state_dict of torch tensors as NumPy arrays (floats as float32), or None when
    ``state`` is not a non-empty mapping of names to tensors."""
    import torch

    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return None
    return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy()
            for k, v in state.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The model tensors of a release ``.pt`` file, loaded with ``weights_only=True`` only.

    Accepts the release format (a dict with ``state_dict_backbone``) or a bare state_dict.
    """
    path = Path(path)
    obj = torch_load(path, "the original model_299.pt from kartiknarayan/SegFace")
    state = tensors_as_numpy(obj.get("state_dict_backbone", obj)
                             if isinstance(obj, Mapping) else None)
    if state is None:
        raise ConversionError(
            f"{path}: not a SegFace checkpoint: expected a dict with 'state_dict_backbone' "
            "(a state_dict of tensors), as in the release files model_299.pt")
    return state


_TOKEN = re.compile(r"face_decoder\.(\w+)_token\.weight")


def detect_backbone(state: Mapping[str, Any]) -> str:
    """torchvision architecture name of the encoder that produced ``state``."""
    def has(k: str) -> bool:
        return k in state

    def blocks(stage_index: int) -> int:
        pat = re.compile(rf"backbone\.0\.{stage_index}\.(\d+)\.")
        return len({m.group(1) for k in state if (m := pat.match(k))})

    if any(".cpb_mlp." in k for k in state):
        width = state["backbone.0.0.0.weight"].shape[0]
        return "swin_v2_b" if width == 128 else ("swin_v2_s" if blocks(5) == 18 else "swin_v2_t")
    if has("backbone.0.1.0.attn.relative_position_bias_table"):
        width = state["backbone.0.0.0.weight"].shape[0]
        return "swin_b" if width == 128 else ("swin_s" if blocks(5) == 18 else "swin_t")
    if has("backbone.0.1.0.layer_scale"):
        width = state["backbone.0.0.0.weight"].shape[0]
        return "convnext_base" if width == 128 else (
            "convnext_small" if blocks(5) == 27 else "convnext_tiny")
    if has("backbone.4.0.conv1.weight"):
        n = len({k.split(".")[2] for k in state if k.startswith("backbone.6.")})
        if n != 23:
            raise ConversionError(f"a ResNet with {n} blocks in layer3 (ResNet-101 has 23) "
                                  "matches no released variant")
        return "resnet101"
    if has("backbone.0.0.weight") and has("backbone.16.0.weight"):
        return "mobilenet_v3_large"
    if has("backbone.0.0.weight"):
        return "efficientnet_v2_m"
    raise ConversionError("cannot recognise the backbone from the checkpoint keys "
                          f"(first keys: {', '.join(list(state)[:5])})")


def infer_variant(state: Mapping[str, Any], requested: str | None, path: Path) -> Variant:
    """The released variant a state_dict belongs to, or an error naming the candidates."""
    backbone = detect_backbone(state)
    tokens = {m.group(1) for k in state if (m := _TOKEN.fullmatch(k))}
    same_backbone = [v for v in VARIANTS.values() if v.backbone == backbone]
    candidates = [v for v in same_backbone if set(v.classes) == tokens]
    found = f"{backbone} encoder with {len(tokens)} class tokens"
    if requested is not None:
        variant = get_variant(requested)
        if variant.backbone != backbone:
            names = ", ".join(v.name for v in same_backbone) or "none of the released variants"
            raise ConversionError(f"{path}: --variant {requested} expects a {variant.backbone} "
                                  f"encoder, but the file has a {found}; it fits: {names}")
        return variant  # class tokens are checked key by key by the strict mapping
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        names = ", ".join(v.name for v in same_backbone)
        raise ConversionError(f"{path}: a {found} matches no released variant's classes; pass "
                              f"--variant ({names or 'none released'}) to list what differs")
    raise ConversionError(
        f"{path}: a {found} fits several variants (the resolution is not stored and LaPa and "
        f"Helen share shapes); pass --variant with one of: "
        f"{', '.join(v.name for v in candidates)}")


def family_of(backbone: str) -> Family:
    """The rule family for a torchvision backbone, or a clear error for unimplemented ones."""
    if backbone not in BACKBONE_FAMILY:
        raise ConversionError(f"backbone {backbone} is not implemented in segface-jax yet "
                              f"(implemented: {', '.join(sorted(BACKBONE_FAMILY))})")
    return FAMILIES[BACKBONE_FAMILY[backbone]]


def map_state_dict(state: Mapping[str, np.ndarray], family: Family,
                   expected: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str],
                                                         dict[str, str]]:
    """Apply ``family``'s rules to ``state``; raise ONE error listing every problem.

    ``expected`` maps each Flax path to a leaf with ``.shape``. Returns the Flax arrays, the
    checked buffer keys and the skipped keys with their reasons.
    """
    out: dict[str, np.ndarray] = {}
    unused, mismatched, duplicate, bad_buffers, checked, nonfinite = [], [], [], [], [], []
    skipped: dict[str, str] = {}
    seen_targets: set[str] = set()
    for key, tensor in state.items():
        reason = next((why for pat, why in family.ignored.items() if re.fullmatch(pat, key)), None)
        if reason is not None:
            skipped[key] = reason
            continue
        check = next(((c, m) for c in family.checks if (m := re.fullmatch(c.pattern, key))), None)
        if check is not None:
            c, m = check
            if not c.matches(tensor, m):
                bad_buffers.append(f"{key} ({c.reason}: stored values differ)")
            checked.append(key)
            continue
        rule, target = next(((r, t) for r in family.rules if (t := r.apply(key)) is not None),
                            (None, None))
        if rule is None or target not in expected:
            unused.append(key if target is None else f"{key} (-> {target}, not in the model)")
            continue
        seen_targets.add(target)
        want = tuple(expected[target].shape)
        try:
            value = rule.transform(tensor)
        except (ValueError, IndexError):  # e.g. a 3-D tensor where a conv kernel belongs
            mismatched.append(f"{key} {tuple(tensor.shape)} -> {target}: a tensor of rank "
                              f"{np.ndim(tensor)} cannot be mapped, model expects {want}")
            continue
        if tuple(value.shape) != want:
            mismatched.append(f"{key} {tuple(tensor.shape)} -> {target}: got "
                              f"{tuple(value.shape)}, model expects {want}")
            continue
        if not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            nonfinite.append(f"{key}: {bad} of {np.size(value)} values are NaN or Inf")
            continue
        if target in out:
            duplicate.append(f"{key} -> {target}")
            continue
        out[target] = np.ascontiguousarray(value, dtype=np.float32)
    unfilled = [k for k in expected if k not in out and k not in seen_targets]
    problems = []
    for title, items in (("unused checkpoint keys", unused),
                         ("model parameters not filled", unfilled),
                         ("shape mismatches", mismatched),
                         ("several keys map to one parameter", duplicate),
                         ("tensors with NaN or Inf values (a damaged or diverged checkpoint)",
                          nonfinite),
                         ("stored index buffers that differ from torchvision's", bad_buffers)):
        if items:
            problems.append(f"{len(items)} {title}:\n" + "\n".join(f"  {i}" for i in items))
    if problems:
        raise ConversionError("the checkpoint does not map exactly onto the model:\n"
                              + "\n".join(problems))
    return out, checked, skipped


def convert_state_dict(state: Mapping[str, np.ndarray], variant: Variant,
                       cfg: SegFaceConfig | None = None) -> tuple[dict[str, np.ndarray],
                                                                  list[str], dict[str, str]]:
    """Map a release state_dict onto the Flax model of ``variant`` (or of ``cfg``)."""
    cfg = cfg or SegFaceConfig.from_variant(variant)
    expected = flat_state(abstract_model(cfg))
    return map_state_dict(state, family_of(cfg.backbone), expected)


def convert_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike,
                       variant: str | None = None, overwrite: bool = False,
                       state: Mapping[str, np.ndarray] | None = None) -> ConversionReport:
    """Convert ``src`` (a release ``.pt``) into an Orbax checkpoint directory at ``out_dir``.

    Nothing is written unless every key maps exactly; the directory appears atomically.
    ``state`` is ``load_state_dict(src)`` when the caller has already read it.
    """
    src = Path(src)
    state = load_state_dict(src) if state is None else state
    v = infer_variant(state, variant, src)
    params, checked, skipped = convert_state_dict(state, v)
    report = ConversionReport(v, src, sha256_file(src), mapped=len(params),
                              num_parameters=sum(a.size for a in params.values()),
                              checked=checked, skipped=skipped)
    metadata = {
        "variant": v.name, "backbone": v.backbone, "dataset": v.dataset,
        "resolution": v.resolution, "classes": list(v.classes),
        "source": {"file": src.name, "sha256": report.sha256, "bytes": src.stat().st_size},
        "skipped_keys": skipped,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    save_checkpoint(out_dir, params, metadata, overwrite=overwrite)
    return report
