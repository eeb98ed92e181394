"""Faces in the wild: each dataset's crop, the paste-back, the overlap rule, and ``predict`` on
a folder of group, single-face and faceless photos against facenet-pytorch's detector."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segface_jax import faces
from segface_jax.examples import ASTRONAUT_LANDMARKS, astronaut, group_photo

R = 256


def _ramp(h: int, w: int) -> np.ndarray:
    """An image whose channels are affine in the pixel position: bilinear sampling and block
    averages reproduce it exactly, so any geometric slip shows as a difference."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([0.7 * x + 0.2 * y, 0.1 * x + 0.9 * y + 5, 0.5 * x - 0.3 * y + 300], -1)


def _inside(frame: faces.Frame, image_hw, margin: float) -> np.ndarray:
    """Pixels whose centres lie in the frame's central part (``margin`` of each side cut)."""
    ys, xs = np.mgrid[0:image_hw[0], 0:image_hw[1]]
    ab = frame.to_crop(np.stack([xs + 0.5, ys + 0.5], -1))
    return ((ab >= margin) & (ab <= 1 - margin)).all(-1)


@pytest.mark.parametrize("convention", sorted(faces.FRAMES))
def test_crop_samples_the_photo_where_the_frame_says(convention):
    """On an affine image the crop is exact: crop pixel (u, v) holds the photo's value at
    origin + ((u + 0.5) / R) across + ((v + 0.5) / R) down (pixel-corner coordinates), for
    every convention, wherever the frame lies inside the photo. Bar 1e-3 on values up to
    ~700 (float32 sampling)."""
    image = _ramp(600, 700)
    frame = faces.FRAMES[convention](ASTRONAUT_LANDMARKS + [150, 200])
    assert (frame.corners() > 0).all() and (frame.corners() < [700, 600]).all()
    got = faces.crop(image, frame, R)
    ab = (np.arange(R) + 0.5) / R
    a, b = np.meshgrid(ab, ab, indexing="xy")
    points = frame.origin + a[..., None] * frame.across + b[..., None] * frame.down
    want = _ramp(600, 700)[0, 0] + (points - 0.5) @ np.array([[0.7, 0.1, 0.5],
                                                                 [0.2, 0.9, -0.3]])
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("convention", sorted(faces.FRAMES))
def test_paste_back_returns_the_photo_inside_the_face(convention):
    """Crop, then paste the crop's own pixels back as if they were logits: on the affine image
    the round trip is exact inside the crop (bar 1e-3, float32); on the astronaut photo it
    returns the pixels within interpolation error. Measured at R = 512 over the central 60% of
    the crop, mean / 99th percentile of |difference| in 0-255: celebahq 1.45 / 7.6, helen
    0.83 / 5.3, lapa 2.05 / 15.2, growing with the photo pixels per crop pixel (0.36, 0.23,
    0.69: the 2 x 2 averaging and both bilinear steps blur by a fraction of a crop pixel).
    Bar: mean below 2.5 and 99th percentile below 20 (a half-pixel slip fails the ramp)."""
    frame = faces.FRAMES[convention](ASTRONAUT_LANDMARKS)
    for image, exact in ((_ramp(512, 512), True), (astronaut().astype(np.float64), False)):
        pasted = faces.paste(faces.crop(image, frame, 512), frame, image.shape[:2])
        y0, y1, x0, x1 = pasted.window
        inner = _inside(frame, image.shape[:2], 0.2)[y0:y1, x0:x1]
        assert inner.sum() > 5000 and pasted.covered[inner].all()
        diff = np.abs(pasted.logits - image[y0:y1, x0:x1])[inner]
        if exact:
            assert diff.max() < 1e-3
        else:
            assert diff.mean() < 2.5 and np.percentile(diff, 99) < 20


def test_celebahq_crop_undoes_rotation_and_mirroring_of_the_face():
    """CelebA-HQ's square follows the face: the crop of the photo turned 25 degrees about the
    face (landmarks turned with it) matches the crop of the upright photo, and the eyes lie
    on one row, 4 eye distances across the crop when the eyes set the size (as here). Turned:
    measured mean difference 1.42 of 255 over the crop's central 80% (the upright square on
    the turned photo: 62.9); bar 4 (interpolation twice). Mirrored photo with mirrored
    landmarks: the mirrored crop, measured exactly; bar 0.01."""
    rgb = astronaut()
    upright = faces.celebahq_frame(ASTRONAUT_LANDMARKS)
    lm = faces.Frame.crop_pixels(upright, ASTRONAUT_LANDMARKS, R)
    assert abs(lm[0, 1] - lm[1, 1]) < 2.0  # the eyes on one row
    assert abs(np.hypot(*(lm[1] - lm[0])) - R / 4) < 1e-3
    t = np.deg2rad(25.0)
    centre = ASTRONAUT_LANDMARKS.mean(0)
    turned = np.asarray(Image.fromarray(rgb).rotate(25.0, resample=Image.Resampling.BILINEAR,
                                                    center=tuple(centre + 0.5)))
    d = ASTRONAUT_LANDMARKS - centre
    moved = np.stack([d[:, 0] * np.cos(t) + d[:, 1] * np.sin(t),
                      -d[:, 0] * np.sin(t) + d[:, 1] * np.cos(t)], -1) + centre
    a = faces.crop(rgb, upright, R)
    b = faces.crop(turned, faces.celebahq_frame(moved), R)
    c = slice(R // 10, R - R // 10)
    assert np.abs(a[c, c] - b[c, c]).mean() < 4.0
    # mirrored photo: mirrored landmarks (left and right swapped) give the mirrored crop
    mirrored = np.stack([511 - ASTRONAUT_LANDMARKS[:, 0], ASTRONAUT_LANDMARKS[:, 1]],
                        -1)[[1, 0, 2, 4, 3]]
    m = faces.crop(rgb[:, ::-1], faces.celebahq_frame(mirrored), R)
    assert np.abs(a[c, c] - m[c, c][:, ::-1]).mean() < 0.01


def test_overlapping_faces_go_to_the_surer_face():
    """Two faces' crops overlap: where both label a pixel as a part, the one with the higher
    non-background probability owns it; a face's background never takes a pixel."""
    classes, hw = 3, (40, 60)
    left = faces.Frame.square(np.array([20.0, 20.0]), 20.0)  # x 0-40
    right = faces.Frame.square(np.array([40.0, 20.0]), 20.0)  # x 20-60
    sure = np.zeros((8, 8, classes), np.float32)
    sure[..., 1] = 6.0  # class 1, p(background) ~ 0.005
    unsure = np.zeros((8, 8, classes), np.float32)
    unsure[..., 2] = 1.0  # class 2, p(background) ~ 0.21
    background = np.zeros((8, 8, classes), np.float32)
    background[..., 0] = 5.0
    for first, second, owner in ((sure, unsure, 1), (unsure, sure, 2)):
        labels, instances, probs = faces.compose(
            [faces.paste(first, left, hw), faces.paste(second, right, hw)], hw, classes, True)
        overlap = (slice(None), slice(21, 39))
        assert (instances[overlap] == owner).all() and (labels[overlap] == 1).all()
        assert (instances[:, :19] == 1).all() and (instances[:, 41:] == 2).all()
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    labels, instances, _ = faces.compose(
        [faces.paste(background, left, hw), faces.paste(unsure, right, hw)], hw, classes)
    assert (instances[:, 21:39] == 2).all() and (instances[:, :19] == 0).all()
    assert (labels[:, :19] == 0).all()


# -- the whole pipeline, against facenet-pytorch's detector ------------------------------------

def _facenet_boxes(image: np.ndarray) -> np.ndarray:
    """facenet-pytorch's MTCNN.detect boxes (N, 4), largest first."""
    import torch
    from facenet_pytorch import MTCNN

    from tests.helpers import facenet_data

    facenet_data()  # skips (outside CI) when the package is missing
    boxes, _ = MTCNN(device=torch.device("cpu")).detect(image)
    boxes = np.asarray(boxes, np.float64)  # an object array in facenet-pytorch
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return boxes[order]


@pytest.mark.slow
def test_predict_on_group_single_and_faceless_photos(tmp_path, capsys):
    """`predict` on a folder: a 4-face composite, the astronaut and a photo with no face. Each
    face's box matches facenet-pytorch's within 1 px (the issue's bar; measured 6e-5 px in
    tests/test_mtcnn_pipeline.py); the instance map numbers exactly those faces, and every
    labelled pixel belongs to one; the faceless photo is reported and its outputs are empty."""
    from segface_jax.cli import main
    from tests import release

    folder = tmp_path / "in"
    folder.mkdir()
    group = group_photo(4)
    Image.fromarray(group).save(folder / "group.png")
    Image.fromarray(astronaut()).save(folder / "single.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))[..., None]
                    .repeat(3, -1)).save(folder / "wall.png")
    out = tmp_path / "out"
    rc = main(["predict", str(folder), "--variant", "swinb_celeba_224", "--weights",
               str(release.converted("swinb_celeba_224")), "--out", str(out), "--batch-size",
               "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "parsed 3 of 3 image(s)" in captured.out
    assert "5 face(s) found, none in 1 image(s)" in captured.out
    assert captured.err.count("no face found in") == 1 and "wall.png" in captured.err
    base = out / "in"
    for stem, image, count in (("group", group, 4), ("single", astronaut(), 1)):
        info = json.loads((base / f"{stem}.json").read_text())
        assert len(info["faces"]) == count and info["alignment"] == "per face: celebahq"
        np.testing.assert_allclose([f["box"] for f in info["faces"]], _facenet_boxes(image),
                                   atol=1.0)
        with Image.open(base / f"{stem}_instances.png") as im:
            instances = np.asarray(im)
        with Image.open(base / f"{stem}_labels.png") as im:
            labels = np.asarray(im)
        assert set(np.unique(instances)) <= set(range(count + 1))
        assert ((labels != 0) == (instances != 0)).all()
        for face in info["faces"]:
            pixels = sum(c["pixels"] for name, c in face["classes"].items()
                         if name != "background")
            assert pixels == int((instances == face["id"]).sum())
    info = json.loads((base / "wall.json").read_text())
    assert info["faces"] == []
    with Image.open(base / "wall_labels.png") as im:
        assert not np.asarray(im).any()


@pytest.mark.slow
def test_detection_runs_without_torch_once_converted(tmp_path):
    """Once the detector's weights are in the cache, parsing every face needs no torch."""
    from segface_jax import mtcnn
    from tests import release

    mtcnn.pretrained()  # converts into the session's cache (torch is here)
    weights = release.converted("swinb_celeba_224")
    Image.fromarray(group_photo(2)).save(tmp_path / "two.png")
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'segment_anything', 'facenet_pytorch'):\n"
        "    sys.modules[name] = None\n"
        "from segface_jax.cli import main\n"
        f"sys.exit(main(['predict', {str(tmp_path / 'two.png')!r}, '--variant', "
        f"'swinb_celeba_224', '--weights', {str(weights)!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--save', 'json', '--quiet']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 face(s) found" in proc.stdout
    assert len(json.loads((tmp_path / "out" / "two.json").read_text())["faces"]) == 2


def test_missing_detector_weights_say_what_to_install(tmp_path, monkeypatch):
    """No converted weights and no facenet-pytorch: one message naming the package, the
    --no-deps install and the cache file."""
    import importlib.util

    from segface_jax import mtcnn

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    with pytest.raises(mtcnn.DetectorWeightsError) as e:
        mtcnn.pretrained(tmp_path)
    assert "pip install --no-deps facenet-pytorch==2.6.0" in str(e.value)
    (tmp_path / "mtcnn").mkdir()
    mtcnn.weights_file(tmp_path).write_bytes(b"not a zip")
    with pytest.raises(mtcnn.DetectorWeightsError, match="unreadable.*delete the file"):
        mtcnn.pretrained(tmp_path)
