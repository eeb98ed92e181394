"""``segface-jax convert-backbone``: torchvision ImageNet classifiers -> encoder parameters.

Training starts from ImageNet weights (upstream uses torchvision's). The classifier's keys are
renamed to where SegFace's backbone holds the same modules, then mapped by the same explicit
rules as the release converter; the classification head is dropped and reported.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from pathlib import Path

import numpy as np
from flax import nnx

from segface_jax.checkpoint import flat_state, save_checkpoint
from segface_jax.convert.converter import (
    ConversionError,
    ConversionReport,
    load_state_dict,
    map_state_dict,
)
from segface_jax.convert.rules import BACKBONE_FAMILY, FAMILIES
from segface_jax.files import sha256_file
from segface_jax.models.layers import abstract
from segface_jax.models.segface import ENCODERS

# torchvision weights enum of each architecture (the ones upstream's ``pretrained=True`` meant)
WEIGHTS = {
    "swin_b": "Swin_B_Weights", "swin_v2_b": "Swin_V2_B_Weights",
    "convnext_base": "ConvNeXt_Base_Weights", "mobilenet_v3_large": "MobileNet_V3_Large_Weights",
    "efficientnet_v2_m": "EfficientNet_V2_M_Weights", "resnet101": "ResNet101_Weights",
}
_RESNET_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
_HEADS = {
    "swin": r"head\..+", "swinv2": r"head\..+", "convnext": r"classifier\..+",
    "features": r"classifier\..+", "resnet": r"fc\..+",
}


def weights_url(arch: str) -> str:
    """Download address of torchvision's IMAGENET1K_V1 weights for ``arch``."""
    import torchvision

    return getattr(torchvision.models, WEIGHTS[arch]).IMAGENET1K_V1.url


def torchvision_cache_dir() -> Path:
    """Where torchvision keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(arch: str) -> Path:
    """The cached torchvision file for ``arch``, downloading it when the network allows."""
    import torch

    url = weights_url(arch)
    path = torchvision_cache_dir() / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    host = re.match(r"https?://([^/]+)", url).group(1)
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise ConversionError(
            f"{arch}: {path.name} is not in torchvision's cache and {host} cannot be reached; "
            f"download {url} and put it at {path} (or pass the file's path)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


def _release_key(family: str, key: str) -> str | None:
    """Where SegFace's backbone stores the module behind a torchvision classifier key."""
    if family in ("swin", "swinv2", "convnext"):
        if key.startswith("features."):
            return "backbone.0." + key[len("features."):]
        if family != "convnext" and key.startswith("norm."):
            return "backbone.1." + key[len("norm."):]
    elif family == "features":
        if key.startswith("features."):
            return "backbone." + key[len("features."):]
    else:
        child, _, rest = key.partition(".")
        if child in _RESNET_CHILDREN:
            return f"backbone.{_RESNET_CHILDREN[child]}.{rest}"
    return None


def abstract_encoder(arch: str) -> nnx.Module:
    """The encoder of ``arch`` with abstract leaves."""
    cls, preset = ENCODERS[arch]
    return abstract(lambda rngs: cls(preset(), rngs=rngs))


def map_classifier(state: dict[str, np.ndarray], arch: str) -> tuple[dict[str, np.ndarray],
                                                                     list[str], dict[str, str]]:
    """Encoder parameters (keys relative to the encoder) from a torchvision classifier."""
    name = BACKBONE_FAMILY[arch]
    family = FAMILIES[name]
    head = {k for k in state if re.fullmatch(_HEADS[name], k)}
    renamed, unknown = {}, []
    for key, value in state.items():
        if key in head:
            continue
        new = _release_key(name, key)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    expected = {f"backbone.{k}": v for k, v in flat_state(abstract_encoder(arch)).items()}
    try:
        params, checked, skipped = map_state_dict(renamed, family, expected)
    except ConversionError as e:
        if not unknown:
            raise
        raise ConversionError(f"{e}\nkeys that are neither encoder nor head: {unknown}") from None
    if unknown:
        raise ConversionError(f"keys that are neither encoder nor classification head: {unknown}")
    skipped.update({k: "classification head: not used by SegFace" for k in sorted(head)})
    return {k[len("backbone."):]: v for k, v in params.items()}, checked, skipped


def convert_backbone(arch: str, src: str | os.PathLike | None, out_dir: str | os.PathLike,
                     overwrite: bool = False) -> ConversionReport:
    """Convert torchvision ImageNet weights of ``arch`` into encoder parameters at ``out_dir``."""
    if arch not in WEIGHTS:
        raise ConversionError(f"unknown --arch {arch!r}; choose one of: {', '.join(WEIGHTS)}")
    src = Path(src) if src else find_weights(arch)
    state = load_state_dict(src)
    params, checked, skipped = map_classifier(state, arch)
    report = ConversionReport(None, src, sha256_file(src), mapped=len(params),
                              num_parameters=sum(a.size for a in params.values()),
                              checked=checked, skipped=skipped, label=f"{arch} ImageNet encoder")
    metadata = {
        "kind": "backbone", "arch": arch,
        "source": {"file": src.name, "sha256": report.sha256, "bytes": src.stat().st_size},
        "skipped_keys": skipped,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    save_checkpoint(out_dir, params, metadata, overwrite=overwrite)
    return report
