"""MTCNN's three networks against a PyTorch reference with facenet-pytorch's module names.

The reference is written here from torch.nn layers (facenet-pytorch 2.6.0's structure: VALID
convolutions, per-channel PReLU, ceil-mode max pooling, the (B, W, H, C) flatten before the
dense layers), every parameter randomised, saved as the release files are (a bare state_dict
per network) and converted by ``convert/detector.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference networks and the converter need torch")
nn, F = torch.nn, torch.nn.functional

from segface_jax.convert import convert_mtcnn  # noqa: E402
from segface_jax.convert.converter import ConversionError  # noqa: E402
from segface_jax.convert.detector import (  # noqa: E402
    convert_network,
    load_network_file,
)
from segface_jax.examples import astronaut  # noqa: E402
from segface_jax.models.mtcnn import max_pool_ceil  # noqa: E402
from segface_jax.mtcnn import networks_from_arrays  # noqa: E402
from tests.helpers import facenet_data, rel_error  # noqa: E402

# float32 sums of at most 3*3*64 or 1152 products, in another order than torch's: measured
# max |ours - torch| / max |torch| 2e-7 to 6e-7; the bar for each network is 1e-5
TOL = 1e-5


class _Net(nn.Module):
    """Conv/PReLU/pool trunk, then dense heads (R/O-Net) or 1x1 conv heads (P-Net)."""

    def trunk(self, x, pools):
        for i, pool in enumerate(pools, start=1):
            x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
            if pool:
                x = F.max_pool2d(x, pool[0], pool[1], ceil_mode=True)
        return x

    def flatten(self, x):
        return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class TorchPNet(_Net):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.trunk(x, [(2, 2), None, None])
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)


class TorchRNet(_Net):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = self.prelu4(self.dense4(self.flatten(self.trunk(x, [(3, 2), (3, 2), None]))))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)


class TorchONet(_Net):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2 = nn.Linear(256, 2), nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.trunk(x, [(3, 2), (3, 2), (2, 2), None])
        x = self.prelu5(self.dense5(self.flatten(x)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)


REFERENCES = {"pnet": TorchPNet, "rnet": TorchRNet, "onet": TorchONet}
# P-Net at odd sizes where ceil mode adds a pooling window (37 -> 35 -> 18), R/O-Net at their
# crop sizes
INPUT_SIZES = {"pnet": (37, 52), "rnet": (24, 24), "onet": (48, 48)}


def _randomised(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = REFERENCES[name]().eval()
    with torch.no_grad():
        for p in net.parameters():  # PReLU slopes too, negative ones included
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 1.0 / np.sqrt(p[0].numel())))
    return net


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Randomised reference networks, their files, and our networks converted from the files."""
    folder = tmp_path_factory.mktemp("mtcnn")
    refs, arrays = {}, {}
    for seed, name in enumerate(REFERENCES):
        refs[name] = _randomised(name, seed)
        torch.save(refs[name].state_dict(), folder / f"{name}.pt")
        arrays[name] = convert_network(name, load_network_file(folder / f"{name}.pt"))
    return refs, networks_from_arrays(arrays), folder


@pytest.mark.parametrize("name", list(REFERENCES))
def test_network_matches_reference(converted, name):
    refs, ours, _ = converted
    h, w = INPUT_SIZES[name]
    x = np.random.default_rng(7).uniform(-1, 1, (3, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        want = refs[name](torch.from_numpy(x.transpose(0, 3, 1, 2)))
    got = ours[name](x)
    assert len(got) == len(want)
    for g, t in zip(got, want):
        t = t.numpy()
        t = t.transpose(0, 2, 3, 1) if t.ndim == 4 else t  # P-Net's maps are NCHW in torch
        assert g.shape == t.shape
        assert rel_error(np.asarray(g), t) <= TOL


@pytest.mark.parametrize("size", [(37, 53), (38, 52), (13, 12), (12, 15)])
def test_pnet_on_a_padded_bucket_matches_the_torch_pnet_on_the_image(converted, size):
    """P-Net on a level padded at the bottom and right to its shape bucket, told the image's
    size, gives the reference P-Net's maps of the unpadded level on the cells over the image
    (odd sizes: the ceil-mode pool's last window is partial). Bar: the network bar above."""
    from segface_jax.mtcnn import _bucket, _pnet_cells

    refs, ours, _ = converted
    x = np.random.default_rng(sum(size)).uniform(-1, 1, (1, *size, 3)).astype(np.float32)
    padded = np.full((1, _bucket(size[0]) + 5, _bucket(size[1]) + 3, 3), 9.0, np.float32)
    padded[:, :size[0], :size[1]] = x  # what lies beyond the image must not matter
    rows, cols = (_pnet_cells(n) for n in size)
    with torch.no_grad():
        want = refs["pnet"](torch.from_numpy(x.transpose(0, 3, 1, 2)))
    got = ours["pnet"](padded, np.asarray(size, np.int32))
    for g, t in zip(got, want):
        t = t.numpy().transpose(0, 2, 3, 1)
        assert t.shape[1:3] == (rows, cols)
        assert rel_error(np.asarray(g)[:, :rows, :cols], t) <= TOL


@pytest.mark.parametrize("size,window,stride", [(35, 2, 2), (22, 3, 2), (10, 3, 2), (9, 2, 2),
                                                (7, 3, 2)])
def test_ceil_mode_pooling_matches_torch(size, window, stride):
    x = np.random.default_rng(size).standard_normal((1, size, size + 1, 4)).astype(np.float32)
    want = F.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), window, stride,
                        ceil_mode=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(max_pool_ceil(x, window, stride)), want)


def test_converter_names_every_problem(converted):
    _, _, folder = converted
    state = load_network_file(folder / "rnet.pt")
    state["dense4.weight"] = state["dense4.weight"][:, :500]  # wrong shape
    state["prelu2.weight"] = np.full_like(state["prelu2.weight"], np.nan)  # not finite
    del state["conv3.bias"]  # missing
    state["conv9.weight"] = np.zeros((1, 1, 1, 1), np.float32)  # not in the model
    with pytest.raises(ConversionError) as e:
        convert_network("rnet", state)
    text = str(e.value)
    for needle in ("dense4.weight (128, 500)", "prelu2.weight: 48 of 48 values are NaN",
                   "conv3.bias", "conv9.weight"):
        assert needle in text, needle


def test_unreadable_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "pnet.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"pnet\.pt: not a readable PyTorch checkpoint"):
        load_network_file(bad)
    with pytest.raises(ConversionError, match="no such file"):
        load_network_file(tmp_path / "onet.pt")


def test_released_weights_match_facenet_pytorch():
    """The pretrained files through our converter against facenet-pytorch's own networks, on
    crops of scikit-image's astronaut (measured 1.4e-6 at most, P-Net's probabilities)."""
    data = facenet_data()
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    ours = networks_from_arrays(convert_mtcnn(data))
    img = (astronaut().astype(np.float32) - 127.5) / 128  # facenet's normalisation
    crops = {PNet: ("pnet", img[None, :240, :320]), RNet: ("rnet", img[None, 62:86, 181:205]),
             ONet: ("onet", img[None, 62:110, 181:229])}
    for cls, (name, x) in crops.items():
        x = np.ascontiguousarray(x)
        with torch.no_grad():
            want = cls().eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        for g, t in zip(ours[name](x), want):
            t = t.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.numpy()
            assert rel_error(np.asarray(g), t) <= TOL, name
