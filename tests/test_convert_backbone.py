"""``segface-jax convert-backbone``: torchvision ImageNet classifiers -> encoder parameters.

Backbone-only parity at 224 px: a randomised torchvision classifier saved as torchvision stores
its weights, converted, restored into our encoder; the four tapped feature maps must match
torchvision's own modules with max |delta| / max |reference| <= 2e-6 plus twice the reference's
own float32-vs-float64 difference, measured in the test (SwinV2's clamped logit scale of 100
amplifies cosine rounding: torch float32 is 3.8e-6 to 3.5e-5 off float64 at its four taps,
ours 3.0e-6 to 3.8e-5; every other encoder is below 2e-6 on both counts). The classification
head is dropped and reported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from segface_jax.checkpoint import restore_params
from segface_jax.cli import main
from segface_jax.convert import backbone, reference
from tests.helpers import rel_error, to_nhwc

pytestmark = pytest.mark.slow  # see README, "Tests": the fast tier leaves this file out

# arch, torchvision builder, where the taps are
ARCHS = {
    "swin_b": (torchvision.models.swin_b, "features", (1, 3, 5, 7)),
    "swin_v2_b": (torchvision.models.swin_v2_b, "features", (1, 3, 5, 7)),
    "convnext_base": (torchvision.models.convnext_base, "features", (1, 3, 5, 7)),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, "features", (3, 6, 12, 16)),
    "efficientnet_v2_m": (torchvision.models.efficientnet_v2_m, "features", (2, 3, 5, 8)),
    "resnet101": (torchvision.models.resnet101, "children", (4, 5, 6, 7)),
}


def _taps(model: torch.nn.Module, kind: str, taps, x: torch.Tensor) -> list[np.ndarray]:
    """torchvision's own tapped feature maps (NHWC for Swin, NCHW otherwise)."""
    seq = model.features if kind == "features" else list(model.children())
    out = []
    with torch.no_grad():
        for i, layer in enumerate(seq):
            x = layer(x)
            if i in taps:
                out.append(x.numpy())
            if i == max(taps):
                break
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_backbone_parity_with_torchvision_features(arch, tmp_path, capsys):
    builder, kind, taps = ARCHS[arch]
    torch.manual_seed(0)
    model = reference.randomize(builder(weights=None), 0).eval()
    src = tmp_path / "weights.pth"
    torch.save(model.state_dict(), src)  # torchvision's cache files are bare state_dicts
    out = tmp_path / "enc"
    assert main(["convert-backbone", str(src), "--arch", arch, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "classification head: not used by SegFace" in text
    encoder = restore_params(out, backbone.abstract_encoder(arch))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    # jitted, as SegFace runs it: eagerly, each of the encoder's ops compiled a program of its
    # own (EfficientNetV2-M's test: 204 s in a full-suite run, 39 s jitted)
    ours = nnx.jit(lambda m, x: m(x))(encoder, to_nhwc(x))
    refs = _taps(model, kind, taps, x)
    refs64 = _taps(model.double(), kind, taps, x.double())
    for i, (o, ref, ref64) in enumerate(zip(ours, refs, refs64, strict=True)):
        if not arch.startswith("swin"):  # Swin stages are already NHWC
            ref, ref64 = ref.transpose(0, 2, 3, 1), ref64.transpose(0, 2, 3, 1)
        err, noise = rel_error(np.asarray(o), ref), rel_error(ref, ref64)
        print(f"{arch} tap {i}: rel {err:.2e} (torch float32 vs float64 {noise:.2e})")
        assert err <= 2e-6 + 2 * noise, (arch, i, err, noise)


def test_missing_weights_say_which_file_and_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(backbone.socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert main(["convert-backbone", "--arch", "swin_b", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    url = torchvision.models.Swin_B_Weights.IMAGENET1K_V1.url
    assert url in err and str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert not (tmp_path / "o").exists()


def test_cached_weights_are_found_by_arch_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = reference.randomize(torchvision.models.mobilenet_v3_large(weights=None), 0)
    cached = backbone.torchvision_cache_dir() / backbone.weights_url("mobilenet_v3_large").rsplit(
        "/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)
    out = tmp_path / "o"
    assert main(["convert-backbone", "--arch", "mobilenet_v3_large", "--out", str(out)]) == 0
    assert cached.name in capsys.readouterr().out


def test_wrong_arch_for_the_file_is_refused(tmp_path, capsys):
    model = torchvision.models.mobilenet_v3_large(weights=None)
    src = tmp_path / "m.pth"
    torch.save(model.state_dict(), src)
    assert main(["convert-backbone", str(src), "--arch", "efficientnet_v2_m",
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not map exactly" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
