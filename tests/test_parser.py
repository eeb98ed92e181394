"""FaceParser: any image sizes and kinds, fixed compiled shapes, landmarks, Helen crops, caching.

The models are the session's seeded release-format checkpoints (tests/release.py), converted
through the same cache the parser uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import segface_jax
from segface_jax import files, hub, postprocess, preprocess
from segface_jax import landmarks as lmk
from segface_jax.align import standard_landmarks
from segface_jax.checkpoint import CheckpointError
from segface_jax.examples import ASTRONAUT_LANDMARKS, astronaut
from segface_jax.parser import FaceParser
from segface_jax.runtime import load
from segface_jax.variants import HUB_REPO, UnknownVariantError, get_variant
from tests import release
from tests.test_inputs import FIVE, _68_points, _106_points

# Under xdist the module stays on one worker: its parsers compile full-size models once.
pytestmark = pytest.mark.xdist_group("parser")


@pytest.fixture(scope="module")
def celeba():
    return FaceParser(load(release.converted("swinb_celeba_224")), batch_size=4)


@pytest.fixture(scope="module")
def lapa():
    return FaceParser(load(release.converted("swinb_lapa_224")), batch_size=2)


def _direct_labels(model, rgb: np.ndarray, lm: np.ndarray | None = None) -> np.ndarray:
    # The model on one image resized to R, logits resized back: the parser's contract.
    x = preprocess.normalize(preprocess.resize_rgb(rgb, model.resolution))[None]
    logits = np.asarray(model(x, landmarks=None if lm is None else lm[None]))[0]
    return postprocess.labels_at_size(logits, rgb.shape[:2])[0]


def test_resize_back_matches_torch_interpolate():
    """Our host-side resize against torch's ``interpolate`` (what upstream's evaluation uses)."""
    logits = np.random.default_rng(0).normal(size=(224, 224, 19)).astype(np.float32)
    for hw in [(512, 512), (300, 200), (50, 80), (224, 224), (1000, 37)]:
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(logits).permute(2, 0, 1)[None], size=hw, mode="bilinear",
            align_corners=False)[0].permute(1, 2, 0).numpy()
        ours = postprocess.resize_logits(logits, hw)
        # two float32 lerps in a different association than torch's: a few ulps of |x| <= 5
        np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_mixed_sizes_and_kinds_compile_one_batch_shape(celeba, tmp_path):
    rgb = astronaut()
    Image.fromarray(rgb[:300, :200]).save(tmp_path / "crop.png")
    gray16 = (rgb[..., 1].astype(np.uint16) * 257)[::3, ::2]
    rgba = np.concatenate([rgb[100:, 50:], np.full((412, 462, 1), 255, np.uint8)], axis=2)
    images = [rgb, str(tmp_path / "crop.png"), Image.fromarray(rgb[:50, :80]), gray16, rgba,
              rgb[::-1], rgb[200:, :]]
    before = celeba.model._forward._cache_size()
    result = celeba(images)
    # 7 images at batch size 4: one full batch and one padded from 3 to 4, a single shape
    assert celeba.model._forward._cache_size() - before <= 1
    shapes = [(512, 512), (300, 200), (50, 80), (171, 256), (412, 462), (512, 512), (312, 512)]
    assert [lab.shape for lab in result.labels] == shapes
    assert all(lab.dtype == np.uint8 for lab in result.labels)
    assert result.class_names == get_variant("swinb_celeba_224").classes
    # each result is the model run on that image alone: batching, padding and order are exact
    for i in (0, 1, 3, 6):
        expected = _direct_labels(celeba.model, preprocess.to_rgb(images[i]))
        assert float((result.labels[i] == expected).mean()) >= 0.9999, i
    over = result.overlay(2)
    assert over.shape == (50, 80, 3) and over.dtype == np.uint8
    areas = result.areas(0)
    assert sum(a["pixels"] for a in areas.values()) == 512 * 512


def test_flip_tta_is_mirror_consistent_and_averages_the_mirror(celeba):
    """tta="flip": parsing the mirror image gives the mirrored result with left and right
    classes swapped, and each result is the mean of the plain probabilities of the image and
    of its mirror mirrored back. Exact in exact arithmetic (the same two terms are added, at
    the model resolution no resize breaks the symmetry); in float32 an image sits at another
    batch position in the mirrored call, which moves the last bit (measured 3e-8): bar 1e-6,
    and equal labels wherever the top two classes are more than 1e-5 apart."""
    tta = FaceParser(celeba.model, batch_size=2, tta="flip")
    rgb = astronaut()[20:244, 130:354]  # 224 x 224: the model's own size
    mirrored = np.ascontiguousarray(rgb[:, ::-1])
    swap = np.asarray(celeba.variant.data.mirrored_classes)
    assert sorted(celeba.variant.classes[i] for i in swap[[4, 5, 6, 7, 8, 9]]) == sorted(
        celeba.variant.classes[i] for i in (4, 5, 6, 7, 8, 9)) and (swap[[4, 6, 8]] == [5, 7, 9]
                                                                    ).all()
    got = tta([rgb, mirrored], return_probabilities=True)
    np.testing.assert_allclose(got.probabilities[1], got.probabilities[0][:, ::-1][..., swap],
                               atol=1e-6)
    top2 = np.sort(got.probabilities[0], -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0] > 1e-5)[:, ::-1]
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got.labels[1][clear], swap[got.labels[0][:, ::-1]][clear])
    plain = celeba([rgb, mirrored], return_probabilities=True).probabilities
    want = (plain[0] + plain[1][:, ::-1][..., swap]) / 2
    np.testing.assert_allclose(got.probabilities[0], want, atol=1e-6)
    assert (got.labels[0] != celeba(rgb).labels[0]).any()  # the average changed something


def test_probabilities_and_single_image(celeba):
    rgb = astronaut()[:200, :260]
    result = celeba(rgb, return_probabilities=True)
    probs = result.probabilities[0]
    assert probs.shape == (200, 260, 19) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), result.labels[0])
    assert celeba([rgb]).probabilities is None
    batch = np.stack([rgb, rgb[::-1]])  # an (N, H, W, 3) array is N images, so is a generator
    assert len(celeba(batch)) == 2 and len(celeba(im for im in batch)) == 2


def test_bad_input_raises_naming_it(celeba, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(preprocess.ImageError, match="bad.jpg"):
        celeba([astronaut(), str(tmp_path / "bad.jpg")])
    out = list(celeba.parse_iter([str(tmp_path / "bad.jpg"), astronaut()[:64, :64]]))
    assert out[0].error and out[0].labels is None and out[1].labels.shape == (64, 64)


@pytest.mark.slow
def test_lapa_landmark_formats_give_identical_results(lapa):
    rgb = astronaut()
    lm5 = ASTRONAUT_LANDMARKS
    with pytest.warns(UserWarning, match="no landmarks given"):  # for the fourth image
        result = lapa([rgb, rgb, rgb, rgb[:, ::-1]],
                      landmarks=[lm5, _106_points(lm5), _68_points(lm5), None])
    assert (result.labels[0] == result.labels[1]).all()
    # the 68-point eye centres are float32 means of six points: ~1e-5 px from the 5-point ones
    assert float((result.labels[0] == result.labels[2]).mean()) >= 0.9999
    # explicit landmarks equal the model called directly with them scaled to R
    r = lapa.variant.resolution
    expected = _direct_labels(lapa.model, rgb, lm5 * r / 512)
    assert float((result.labels[0] == expected).mean()) >= 0.9999


@pytest.mark.slow
def test_lapa_without_landmarks_assumes_an_aligned_crop_and_says_so_once(tmp_path):
    notes: list[str] = []
    parser = FaceParser(load(release.converted("swinb_lapa_224")), batch_size=2,
                        notify=notes.append)
    crop = preprocess.resize_rgb(astronaut()[0:256, 94:350], 224)
    first = parser([crop, crop])
    parser([crop])
    assert len(notes) == 1 and "aligned" in notes[0]
    standard = standard_landmarks(224)
    expected = _direct_labels(parser.model, crop, standard)
    assert float((first.labels[0] == expected).mean()) >= 0.9999
    with pytest.raises(lmk.LandmarkError, match="<image 0>"):
        parser([crop], landmarks=[np.zeros((7, 2))])
    with pytest.raises(lmk.LandmarkError, match="one per image"):
        parser([crop, crop], landmarks=[FIVE])


@pytest.mark.slow
def test_helen_crop_from_68_points_and_paste_back():
    parser = FaceParser(load(release.converted("swinb_helen_512")), batch_size=1)
    rgb = astronaut()
    pts = _68_points(ASTRONAUT_LANDMARKS)
    pts[:17] = np.linspace([150, 60], [300, 220], 17)  # a jaw line that widens the box
    box = lmk.helen_crop_box(pts, (512, 512))
    result = parser([rgb], landmarks=[pts], return_probabilities=True)
    labels = result.labels[0]
    x1, y1, x2, y2 = box
    outside = np.ones((512, 512), bool)
    outside[y1:y2, x1:x2] = False
    assert labels.shape == (512, 512) and (labels[outside] == 0).all()
    assert (result.probabilities[0][outside][:, 0] == 1).all()
    crop = rgb[y1:y2, x1:x2]
    expected = _direct_labels(parser.model, crop)
    assert float((labels[y1:y2, x1:x2] == expected).mean()) >= 0.9999
    five_only = parser([rgb], landmarks=[ASTRONAUT_LANDMARKS]).labels[0]  # no crop: whole image
    assert float((five_only == _direct_labels(parser.model, rgb)).mean()) >= 0.9999


@pytest.mark.slow
def test_bfloat16_parser_agrees_with_float32(celeba):
    """bfloat16 compute on the full astronaut photo, against our own float32 run."""
    bf16 = FaceParser(load(release.converted("swinb_celeba_224"), dtype="bfloat16"))
    rgb = astronaut()
    agreement = float((bf16(rgb).labels[0] == celeba(rgb).labels[0]).mean())
    print(f"\nparser bfloat16 vs float32 argmax agreement: {100 * agreement:.2f}%")
    # Measured 95.2% with these random weights: bfloat16's 8-bit mantissa (~4e-3 per op)
    # compounds over 24 blocks, and random logits are close to tied. The bound catches a
    # bfloat16 path that computes something else: unrelated maps agree on ~1/19 of pixels.
    assert agreement >= 0.90


def _fake_hub(root, variant: str, files: dict[str, bytes]) -> None:
    # huggingface_hub's cache layout: refs/<name> -> commit, snapshots/<commit>/<path>
    repo = root / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    for ref, data in files.items():
        commit = (ref * 40)[:40] if len(ref) < 40 else ref
        if len(ref) < 40:
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
        target = repo / "snapshots" / commit / variant / "model_299.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@pytest.mark.slow
def test_from_pretrained_uses_the_hub_cache_and_converts_once(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SEGFACE_JAX_CACHE", str(tmp_path / "cache"))
    other = release.save_state_dict(release.state_dict("swin_celeba") | {
        "pe_layer.positional_encoding_gaussian_matrix": torch.ones(2, 128)}, tmp_path / "o.pt")
    _fake_hub(tmp_path, "swinb_celeba_224", {"main": release.release_file("swin_celeba")
                                             .read_bytes(), "b" * 40: other.read_bytes()})
    parser = FaceParser.from_pretrained("swinb_celeba_224", compilation_cache=False)
    assert "converting model_299.pt (swinb_celeba_224)" in capsys.readouterr().out
    digest = files.sha256_file(release.release_file("swin_celeba"))
    assert parser.model.metadata["source"]["sha256"] == digest
    pinned = FaceParser.from_pretrained("swinb_celeba_224", revision="b" * 40,
                                        compilation_cache=False)
    assert pinned.model.metadata["source"]["sha256"] == files.sha256_file(other)
    del parser, pinned  # ~400 MB of weights each

    def entries() -> list[str]:  # the converted checkpoints (each also has a hidden .lock)
        return [n for n in os.listdir(tmp_path / "cache" / "converted") if not n.startswith(".")]

    assert len(entries()) == 2

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("segface_jax.convert.convert_checkpoint", no_conversion)
    capsys.readouterr()
    again = FaceParser.from_pretrained("swinb_celeba_224", compilation_cache=False)
    assert again.model.metadata["source"]["sha256"] == digest
    del again
    # the same file given by path hits the same cache entry
    FaceParser.from_pretrained("swinb_celeba_224", weights=release.release_file("swin_celeba"),
                               compilation_cache=False)
    assert "converting" not in capsys.readouterr().out
    assert len(entries()) == 2


def _truncate_largest_file(directory) -> None:
    largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)


@pytest.mark.slow
def test_a_damaged_cache_entry_is_converted_again(tmp_path, monkeypatch, capsys):
    """A truncated file in the conversion cache: said in one line and converted again from the
    source .pt; a damaged directory the user converted is reported (with the fix), not touched."""
    from segface_jax.checkpoint import flat_state

    monkeypatch.setenv("SEGFACE_JAX_CACHE", str(tmp_path / "cache"))
    weights = hub.resolve("swinb_celeba_224", release.release_file("swin_celeba"), quiet=True)
    want = {k: np.asarray(v) for k, v in flat_state(hub.load_weights(weights).module).items()}
    _truncate_largest_file(weights.checkpoint)
    capsys.readouterr()
    healed = hub.load_weights(weights)
    out = capsys.readouterr().out
    assert "is damaged" in out and "converting it again" in out and len(out.splitlines()) == 1
    for k, v in flat_state(healed.module).items():
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)

    own = shutil.copytree(release.converted("swinb_celeba_224"), tmp_path / "mine")
    _truncate_largest_file(own)
    with pytest.raises(CheckpointError, match="cannot read parameters .* Convert the checkpoint"):
        hub.load_weights(hub.resolve(None, own))
    # the CLI says the same in one line, with no traceback after it
    code = "import sys; from segface_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "predict", "--example", "--variant",
                           "swinb_celeba_224", "--weights", str(own), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("segface-jax predict: error: cannot read parameters")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_offline_without_cache_names_the_file(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(hub.WeightsUnavailableError) as err:
        FaceParser.from_pretrained("swinb_lapa_448", compilation_cache=False)
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text and "swinb_lapa_448/model_299.pt" in text
    assert f"huggingface-cli download {HUB_REPO} swinb_lapa_448/model_299.pt" in text
    assert "--weights" in text


def test_from_pretrained_path_errors(tmp_path):
    with pytest.raises(UnknownVariantError, match="released variants"):
        FaceParser.from_pretrained("swinb_celeba_999")
    with pytest.raises(CheckpointError, match="no such file"):
        FaceParser.from_pretrained(weights=tmp_path / "missing.pt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="not a segface-jax checkpoint"):
        FaceParser.from_pretrained(weights=tmp_path / "dir")
    with pytest.raises(CheckpointError, match="holds variant 'swinb_celeba_224'"):
        FaceParser.from_pretrained("swinb_lapa_224", weights=release.converted("swinb_celeba_224"))
    # a file given where the variant name goes: told where it belongs
    for path in (tmp_path / "missing.pt", str(tmp_path / "dir")):
        with pytest.raises(CheckpointError, match="looks like a file: pass it as weights="):
            FaceParser.from_pretrained(path)
    with pytest.raises(CheckpointError, match="pass a released variant name, or weights"):
        FaceParser.from_pretrained()
    # a release .pt without a variant: inferred when the keys say it, asked for otherwise
    ambiguous = shutil.copy(release.release_file("swin_lapa"), tmp_path / "lapa.pt")
    with pytest.raises(Exception, match="--variant"):
        FaceParser.from_pretrained(weights=ambiguous)
    # a converted directory alone: its variant is read from it
    parser = FaceParser.from_pretrained(weights=release.converted("swinb_celeba_224"),
                                        compilation_cache=False)
    assert parser.variant.name == "swinb_celeba_224"
    assert isinstance(segface_jax.FaceParser, type)


@pytest.mark.slow
def test_detector_supplies_missing_landmarks():
    """With faces="none", a detector (any callable) finds LaPa's landmarks for whole images
    given without any."""
    from segface_jax.detect import mesh_to_five

    mesh = np.random.default_rng(0).uniform(0, 500, (478, 2)).astype(np.float32)
    # iris centres and mouth corners given right-to-left: the mapping orders them by x
    mesh[468], mesh[473] = ASTRONAUT_LANDMARKS[1], ASTRONAUT_LANDMARKS[0]
    mesh[1], mesh[61], mesh[291] = ASTRONAUT_LANDMARKS[2], ASTRONAUT_LANDMARKS[4], \
        ASTRONAUT_LANDMARKS[3]
    np.testing.assert_array_equal(mesh_to_five(mesh), ASTRONAUT_LANDMARKS)

    calls: list[tuple[int, ...]] = []

    def detector(rgb):
        calls.append(rgb.shape)
        return mesh_to_five(mesh) if rgb.shape[0] == 512 else None  # "no face" in the crop

    notes: list[str] = []
    parser = FaceParser(load(release.converted("swinb_lapa_224")), batch_size=2,
                        notify=notes.append, detector=detector, faces="none")
    rgb = astronaut()
    out = list(parser.parse_iter([rgb, rgb[:100, :100], rgb], [None, None, ASTRONAUT_LANDMARKS]))
    assert calls == [(512, 512, 3), (100, 100, 3)]  # not called where landmarks were given
    assert not notes  # nothing is assumed when a detector is there
    assert "found no face" in out[1].error
    np.testing.assert_array_equal(out[0].landmarks, ASTRONAUT_LANDMARKS)
    assert (out[0].labels == out[2].labels).all()
