"""``segface-jax predict``: folders of good and bad images, outputs, atomicity, caches, README."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segface_jax.cli import main
from segface_jax.examples import ASTRONAUT_LANDMARKS, astronaut
from segface_jax.variants import get_variant
from tests import release

pytestmark = pytest.mark.slow  # see README, "Tests": the fast tier leaves this file out

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _no_partials(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".partial" in p.name]
    assert not leftovers, leftovers


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """Good and bad images of every kind the issue names, plus a non-image file."""
    rgb = astronaut()
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(rgb).save(d / "photo.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb[:200, :300], np.full((200, 300), 200, np.uint8)])).save(
        d / "sub" / "rgba.png")
    Image.fromarray(rgb[:120, :90, 1].astype(np.uint16) * 257).save(d / "sixteen.png")
    data = (d / "photo.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "garbage.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((600, 600, 3), np.uint8)).save(d / "huge.png")
    (d / "notes.txt").write_text("not an image")
    # "huge": over twice PIL's decompression-bomb limit, lowered here so the test stays small
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600 * 600 // 2 - 1)
    return d


def test_folder_with_bad_inputs(folder, tmp_path, capsys):
    out = tmp_path / "out"
    weights = release.converted("swinb_celeba_224")
    rc, stdout, stderr = _run(capsys, folder, "--variant", "swinb_celeba_224", "--weights",
                              weights, "--out", out, "--batch-size", "2",
                              "--save", "labels,overlay,probs,json")
    assert rc == 1  # some inputs failed
    assert "parsed 4 of 7 image(s) with swinb_celeba_224" in stdout and "img/s" in stdout
    failed = stderr[stderr.index("3 input(s) failed"):]
    assert re.search(r"garbage\.png: not a readable image", failed)
    assert re.search(r"truncated\.jpg: not a readable image .*truncated", failed)
    assert re.search(r"huge\.png: too large to read safely", failed)
    base = out / "in"
    for stem, size in [("photo", (512, 512)), ("gray", (512, 512)), ("sub/rgba", (200, 300)),
                       ("sixteen", (120, 90))]:
        with Image.open(base / f"{stem}_labels.png") as im:
            assert im.mode == "P" and im.size == size[::-1]
            labels = np.asarray(im)
        with Image.open(base / f"{stem}_overlay.png") as im:
            assert im.mode == "RGB" and im.size == size[::-1]
        info = json.loads((base / f"{stem}.json").read_text())
        assert (info["height"], info["width"]) == size and info["variant"] == "swinb_celeba_224"
        counts = np.bincount(labels.ravel(), minlength=19)
        assert [c["pixels"] for c in info["classes"].values()] == counts.tolist()
        assert info["weights"]["sha256"] and info["weights"]["random"] is False
        with np.load(base / f"{stem}_probs.npz") as z:
            probs = z["probabilities"]
            assert probs.shape == (*size, 19) and probs.dtype == np.float16
            assert list(z["class_names"]) == list(get_variant("swinb_celeba_224").classes)
            # float16 storage may flip near-tied pixels; the argmax is the label elsewhere
            assert float((probs.argmax(-1) == labels).mean()) >= 0.99
    for stem in ("truncated", "garbage", "huge", "notes"):
        assert not list(base.glob(f"{stem}*"))
    _no_partials(out)


def test_existing_outputs_are_kept_unless_asked(tmp_path, capsys):
    img = tmp_path / "face.png"
    Image.fromarray(astronaut()[:128, :128]).save(img)
    out = tmp_path / "out"
    args = [img, "--variant", "swinb_celeba_224", "--weights",
            release.converted("swinb_celeba_224"), "--out", out, "--save", "labels"]
    assert _run(capsys, *args)[0] == 0
    (out / "face_labels.png").write_bytes(b"mine")
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "already exist" in err and "--overwrite" in err
    assert (out / "face_labels.png").read_bytes() == b"mine"
    rc, stdout, _ = _run(capsys, *args, "--skip-existing")
    assert rc == 0 and "1 already done" in stdout
    assert (out / "face_labels.png").read_bytes() == b"mine"
    assert _run(capsys, *args, "--overwrite")[0] == 0
    with Image.open(out / "face_labels.png") as im:
        assert im.size == (128, 128)


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    """An --out that cannot be created (under a file here; a read-only mount alike) is one
    line, before the weights are even looked at (this path does not exist)."""
    img = tmp_path / "face.png"
    Image.fromarray(astronaut()[:64, :64]).save(img)
    (tmp_path / "file").write_text("x")
    rc, stdout, err = _run(capsys, img, "--variant", "swinb_celeba_224", "--weights",
                           tmp_path / "no-such-weights", "--out", tmp_path / "file" / "out")
    assert rc == 2 and "cannot write to --out" in err and "no-such-weights" not in err
    assert "Traceback" not in err and stdout == ""


def test_interrupted_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    img = tmp_path / "face.png"
    Image.fromarray(astronaut()[:96, :96]).save(img)
    original = Image.Image.save

    def save_then_interrupt(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)  # a full temporary file exists now
        if "overlay" in str(fp):
            raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, img, "--variant", "swinb_celeba_224", "--weights",
                      release.converted("swinb_celeba_224"), "--out", out)
    assert rc == 130 and "interrupted" in err
    assert (out / "face_labels.png").exists()  # written before the interruption, complete
    assert not (out / "face_overlay.png").exists() and not (out / "face.json").exists()
    _no_partials(out)


def test_landmarks_for_a_variant_that_ignores_them_are_noted(tmp_path, capsys):
    img = tmp_path / "face.png"
    Image.fromarray(astronaut()[:96, :96]).save(img)
    lm = tmp_path / "lm.json"
    lm.write_text(json.dumps({"face.png": ASTRONAUT_LANDMARKS.tolist()}))
    rc, _, err = _run(capsys, img, "--variant", "swinb_celeba_224", "--weights",
                      release.converted("swinb_celeba_224"), "--out", tmp_path / "out",
                      "--save", "json", "--landmarks", lm, "--faces", "none")
    assert rc == 0 and err.count("does not use landmarks") == 1 and str(lm) in err


def test_lapa_landmarks_file_and_usage_errors(tmp_path, capsys):
    rgb = astronaut()
    for name in ("a", "b"):
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
    lm = tmp_path / "lm.json"
    lm.write_text(json.dumps({"a.png": ASTRONAUT_LANDMARKS.tolist()}))
    out = tmp_path / "out"
    common = ["--variant", "swinb_lapa_224", "--weights", release.converted("swinb_lapa_224"),
              "--out", out, "--faces", "none"]
    rc, _, err = _run(capsys, tmp_path / "a.png", tmp_path / "b.png", *common,
                      "--landmarks", lm, "--save", "json")
    assert rc == 0
    assert err.count("no landmarks given") == 1 and "have no entry in" in err
    a = json.loads((out / "a.json").read_text())
    b = json.loads((out / "b.json").read_text())
    np.testing.assert_allclose(a["landmarks"], ASTRONAUT_LANDMARKS, rtol=1e-6)
    assert a["alignment"] == "landmarks" and b["alignment"] == "assumed aligned face crop"

    one = tmp_path / "one.txt"
    one.write_text("5\n" + "\n".join(f"{x} {y}" for x, y in ASTRONAUT_LANDMARKS))
    rc, _, err = _run(capsys, tmp_path / "a.png", tmp_path / "b.png", *common,
                      "--landmarks", one, "--overwrite")
    assert rc == 2 and "single-image .txt" in err
    rc, _, err = _run(capsys, tmp_path / "a.png", *common, "--save", "labels,masks")
    assert rc == 2 and "unknown output kind(s) masks" in err
    rc, _, err = _run(capsys, tmp_path / "a.png", *common, "--batch-size", "0")
    assert rc == 2 and "--batch-size must be >= 1" in err
    rc, _, err = _run(capsys, tmp_path / "*.webp", *common)
    assert rc == 2 and "matches no files" in err
    rc, _, err = _run(capsys, tmp_path / "a.png", *common[:2], "--weights", tmp_path / "x.pt",
                      "--out", tmp_path / "out2")
    assert rc == 2 and "x.pt: no such file" in err and "Traceback" not in err


def _readme_main_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.+?)\n```", text, re.S).group(1)
    predict = first.split("&&")[-1].strip()
    assert predict.startswith(".venv/bin/segface-jax predict"), predict
    return shlex.split(predict)[1:]


def test_readme_main_job_offline_twice_converts_and_compiles_once(tmp_path):
    """The README's first command, offline: seeded fallback, labelled; the second run reuses
    the converted checkpoint and JAX's persistent compilation cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEGFACE_JAX_CACHE": str(tmp_path / "cache"),
           "SEGFACE_JAX_COMPILATION_CACHE": "1", "XLA_FLAGS": ""}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's shared cache: not this test's
    args = _readme_main_command()
    code = "import sys; from segface_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(proc.stdout + proc.stderr)
        xla = sorted((tmp_path / "cache" / "xla").iterdir())
        runs.append(xla)
    first, xla1, second, xla2 = runs
    assert "RANDOM WEIGHTS" in first and "hub unreachable (HF_HUB_OFFLINE is set)" in first
    assert "converting swinb_celeba_512_seed0.pt" in first and "converting" not in second
    assert xla1 and xla2 == xla1  # the second run compiled nothing new
    out = tmp_path / "segface-out"
    with Image.open(out / "astronaut_overlay.png") as im:
        overlay = np.asarray(im)
    assert overlay.shape == (512, 512, 3)
    assert (overlay[8:14, 8:60, 0] > 200).any()  # the red banner is drawn into the image
    info = json.loads((out / "astronaut.json").read_text())
    assert info["weights"]["random"] is True and info["source"] == "skimage:astronaut"
