"""Torch-free input handling: images of every kind, landmark formats, resizing, input lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segface_jax import landmarks as lmk
from segface_jax import postprocess, preprocess
from segface_jax.predict import InputError, Job, collect_inputs, label_png

FIVE = np.array([[80, 90], [140, 92], [110, 120], [85, 150], [135, 151]], np.float32)


def _106_points(five: np.ndarray) -> np.ndarray:
    # Random points, with the entries the reduction reads set so it must return ``five``:
    # mean(74, 104) and mean(83, 105) are the eyes, 54 the nose, 84 and 90 the mouth corners.
    p = np.random.default_rng(0).uniform(0, 200, (106, 2)).astype(np.float32)
    p[74], p[104] = five[0] - 3, five[0] + 3
    p[83], p[105] = five[1] + 2, five[1] - 2
    p[54], p[84], p[90] = five[2], five[3], five[4]
    return p


def _68_points(five: np.ndarray) -> np.ndarray:
    p = np.random.default_rng(1).uniform(0, 200, (68, 2)).astype(np.float32)
    offsets = np.linspace(-5, 5, 6, dtype=np.float32)[:, None]  # sums to zero
    p[36:42], p[42:48] = five[0] + offsets, five[1] - offsets
    p[30], p[48], p[54] = five[2], five[3], five[4]
    return p


def test_landmark_reductions_follow_upstream_indices():
    np.testing.assert_allclose(lmk.to_five(_106_points(FIVE)), FIVE, atol=1e-5)
    np.testing.assert_allclose(lmk.to_five(_68_points(FIVE)), FIVE, atol=1e-5)
    np.testing.assert_array_equal(lmk.to_five(FIVE.ravel()), FIVE)  # flat [x0, y0, x1, ...]
    for bad in (np.zeros((7, 2)), np.zeros((5, 3)), np.full((5, 2), np.nan)):
        with pytest.raises(lmk.LandmarkError, match="face.jpg"):
            lmk.to_five(bad, "face.jpg")


def test_helen_crop_box_by_hand():
    # points spanning x 100..200, y 50..150: wh = 100 + 1, centre int(100 + 50.5) = 150 and
    # int(50 + 50.5) = 100, side int(101 * 1.2) = 121, corner 150 - 121 // 2 = 90 and 40
    pts = np.array([[100, 50], [200, 150]] + [[150, 100]] * 66, np.float32)
    assert lmk.helen_crop_box(pts, (400, 400)) == (90, 40, 211, 161)
    assert lmk.helen_crop_box(pts, (120, 200)) == (90, 40, 200, 120)  # clipped to the image
    assert lmk.helen_crop_box(pts - 95, (400, 400)) == (0, 0, 116, 66)  # corner (-5, -55)


def test_landmark_files(tmp_path):
    lapa = tmp_path / "lapa.txt"
    pts = _106_points(FIVE)
    lapa.write_text("106\n" + "\n".join(f"{x} {y}" for x, y in pts))
    np.testing.assert_allclose(lmk.read_points_txt(lapa), pts, rtol=1e-6)
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(f"{x}, {y}" for x, y in FIVE))
    np.testing.assert_array_equal(lmk.read_points_txt(plain), FIVE)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3 4 5 6 7")
    with pytest.raises(lmk.LandmarkError, match="bad.txt"):
        lmk.read_points_txt(bad)

    table_file = tmp_path / "lm.json"
    table_file.write_text(json.dumps({"a.jpg": FIVE.tolist(), "sub/b.png": _68_points(FIVE)
                                      .tolist()}))
    table = lmk.read_landmark_file(table_file)
    assert lmk.lookup(table, "/data/x/a.jpg").shape == (5, 2)  # by file name
    assert lmk.lookup(table, "sub/b.png").shape == (68, 2)  # by the path as written
    assert lmk.lookup(table, "c.jpg") is None
    folder = tmp_path / "lms"
    folder.mkdir()
    (folder / "a.txt").write_text(lapa.read_text())
    assert lmk.lookup(lmk.read_landmark_file(folder), "imgs/a.jpg").shape == (106, 2)  # by stem
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(lmk.LandmarkError, match="broken.json"):
        lmk.read_landmark_file(tmp_path / "broken.json")
    with pytest.raises(lmk.LandmarkError, match="no such landmark file"):
        lmk.read_landmark_file(tmp_path / "missing.json")


def test_to_rgb_accepts_every_common_form(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess.to_rgb(rgb), rgb)
    np.testing.assert_array_equal(preprocess.to_rgb(Image.fromarray(rgb)), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(preprocess.to_rgb(gray), np.repeat(gray[..., None], 3, 2))
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(preprocess.to_rgb(rgba), rgb)  # opaque alpha: unchanged
    assert preprocess.to_rgb(np.zeros((20, 30, 4), np.uint8)).max() == 0  # transparent: black
    np.testing.assert_array_equal(preprocess.to_rgb(rgb.astype(np.uint16) * 257), rgb)
    np.testing.assert_array_equal(preprocess.to_rgb(rgb / 255.0), rgb)
    for bad, match in [(np.zeros((4, 4, 2), np.uint8), "shape"), (np.zeros((4, 4), np.int64),
                       "pixel type"), (np.full((4, 4), 2.0), r"\[0, 1\]"), (object(), "object")]:
        with pytest.raises(preprocess.ImageError, match=match):
            preprocess.to_rgb(bad, "x")

    # files: 16-bit grayscale PNG, RGBA PNG, palette GIF, EXIF-rotated JPEG
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(preprocess.read_rgb(tmp_path / "g16.png")[..., 0], gray)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(preprocess.read_rgb(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.gif")
    assert preprocess.read_rgb(tmp_path / "p.gif").shape == (20, 30, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert preprocess.read_rgb(tmp_path / "rot.jpg").shape == (30, 20, 3)


def test_unreadable_files_name_the_file(tmp_path, monkeypatch):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    for name, match in [("truncated.jpg", "truncated"), ("garbage.png", "cannot identify"),
                        ("missing.jpg", "no such file")]:
        with pytest.raises(preprocess.ImageError, match=match) as err:
            preprocess.read_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    # Beyond twice PIL's decompression-bomb limit PIL refuses; below it the image is read.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    with pytest.raises(preprocess.ImageError, match="too large"):
        preprocess.read_rgb(tmp_path / "ok.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL warns; the library lets it show
        assert preprocess.read_rgb(tmp_path / "ok.jpg").shape == (64, 64, 3)


def test_bilinear_resize_by_hand():
    # 2 -> 4 along one axis: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> 1)
    x = np.array([[[0.0], [4.0]]], np.float32)  # (h=1, w=2, C=1)
    out = postprocess.resize_logits(x, (1, 4))[0, :, 0]
    np.testing.assert_allclose(out, [0.0, 1.0, 3.0, 4.0])
    same = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(postprocess.resize_logits(same, (5, 7)), same)


def test_labels_at_size_is_chunked_consistently(monkeypatch):
    logits = np.random.default_rng(0).normal(size=(16, 16, 5)).astype(np.float32)
    full_labels, full_probs = postprocess.labels_at_size(logits, (333, 200), True)
    monkeypatch.setattr(postprocess, "_CHUNK_ROWS", 7)
    labels, probs = postprocess.labels_at_size(logits, (333, 200), True)
    np.testing.assert_array_equal(labels, full_labels)
    np.testing.assert_array_equal(probs, full_probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probs.argmax(-1), labels)


def test_paste_and_areas():
    labels = np.full((2, 3), 4, np.uint8)
    full, probs = postprocess.paste(labels, np.full((2, 3, 5), 0.2, np.float32), (1, 1, 4, 3),
                                    (4, 5))
    assert full.sum() == 4 * 6 and (full[1:3, 1:4] == 4).all()
    assert probs[0, 0, 0] == 1.0 and probs[0, 0, 1:].sum() == 0
    areas = postprocess.class_areas(full, ["bg", "a", "b", "c", "d"])
    assert areas["d"] == {"pixels": 6, "fraction": 0.3} and areas["a"]["pixels"] == 0


def test_label_png_stores_class_indices(tmp_path):
    labels = np.arange(19, dtype=np.uint8).reshape(1, 19).repeat(3, 0)
    palette = [(i, 2 * i, 3 * i) for i in range(19)]
    label_png(labels, palette).save(tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB"))[0, 5], (5, 10, 15))


def test_collect_inputs(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("imgs/a.jpg", "imgs/sub/b.PNG", "imgs/notes.txt", "imgs/.hidden.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    out = tmp_path / "out"
    jobs = collect_inputs([str(tmp_path / "imgs"), str(tmp_path / "*.jpg")], out)
    assert [(j.source, j.stem) for j in jobs] == [
        (str(tmp_path / "imgs/a.jpg"), out / "imgs" / "a"),
        (str(tmp_path / "imgs/sub/b.PNG"), out / "imgs" / "sub" / "b"),
        (str(tmp_path / "c.jpg"), out / "c")]
    assert Job("x.jpg", out / "x").outputs(["labels", "json"]) == {
        "labels": out / "x_labels.png", "json": out / "x.json"}
    # one file named twice is parsed once
    jobs = collect_inputs([str(tmp_path / "c.jpg"), str(tmp_path / "imgs/a.jpg"),
                           str(tmp_path / "imgs/../c.jpg")], out)
    assert [j.stem for j in jobs] == [out / "c", out / "a"]
    # different files with one stem keep their extension in it, said once
    (tmp_path / "c.png").write_bytes(b"x")
    notes = []
    jobs = collect_inputs([str(tmp_path / "c.jpg"), str(tmp_path / "c.png"),
                           str(tmp_path / "imgs/a.jpg")], out, notify=notes.append)
    assert [j.stem for j in jobs] == [out / "c.jpg", out / "c.png", out / "a"]
    assert jobs[0].outputs(["labels"])["labels"] == out / "c.jpg_labels.png"
    assert len(notes) == 1 and "c.jpg_labels.png" in notes[0]
    # the same file name in two folders: the extension cannot tell them apart
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="same output names"):
        collect_inputs([str(tmp_path / "c.jpg"), str(tmp_path / "other" / "c.jpg")], out)
    with pytest.raises(InputError, match="matches no files"):
        collect_inputs([str(tmp_path / "*.webp")], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        collect_inputs([str(tmp_path / "empty")], out)


def test_mediapipe_detector_explains_what_is_missing(tmp_path, monkeypatch):
    import sys
    import urllib.request

    from segface_jax import detect

    monkeypatch.setitem(sys.modules, "mediapipe", None)  # the extra is not installed
    with pytest.raises(lmk.LandmarkError, match=r"segface-jax\[detect\]"):
        detect.MediaPipeDetector()

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("SEGFACE_JAX_CACHE", str(tmp_path))
    with pytest.raises(lmk.LandmarkError) as err:
        detect.mediapipe_model()
    assert detect.MEDIAPIPE_MODEL_URL in str(err.value)
    assert str(tmp_path / "mediapipe" / "face_landmarker.task") in str(err.value)
    assert not list((tmp_path / "mediapipe").iterdir())  # no partial file left


def test_degenerate_landmarks_are_named():
    good = np.array([[196, 226], [316, 226], [256, 286], [220, 360], [292, 360]], np.float32)
    assert lmk.degenerate(good, (512, 512)) is None
    assert "coincide" in lmk.degenerate(np.full((5, 2), 100.0), (512, 512))
    assert "far outside the 100x80 image" in lmk.degenerate(good, (80, 100))
    assert lmk.degenerate(good - 150, (512, 512)) is None  # partly outside: a cropped face
