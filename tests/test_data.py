"""Datasets read as upstream reads them, metrics, the grain pipeline and the TFDS builders."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from segface_jax.cli import main
from segface_jax.datasets import HELEN
from segface_jax.landmarks import helen_crop_box
from segface_jax.preprocess import resize_rgb
from segface_jax.train import data, metrics, pipeline
from tests import datasets


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    return {"celebamask_hq": datasets.write_celeba(base / "CelebAMask-HQ"),
            "lapa": datasets.write_lapa(base / "LaPa"),
            "helen": datasets.write_helen(base / "helen")}


def test_celebamask_hq_splits_and_label_merging(roots):
    root = roots["celebamask_hq"]
    assert data.CelebAMaskHQ(root, "test").names == datasets.CELEBA_TEST_ORDER
    assert data.CelebAMaskHQ(root, "train").names == ["0"]
    assert data.CelebAMaskHQ(root, "val").names == ["7"]
    src = data.open_source("celebamask_hq", root, "test")
    rec = src[0]  # HQ id 2000: masks in folder 1
    assert rec["name"] == "2000" and rec["image"].shape == (96, 96, 3)
    label = rec["label"]
    assert label.shape == (512, 512)
    # value = 1 + index in the part list; later parts overwrite earlier ones
    assert label[300, 300] == 2  # skin
    assert label[175, 175] == 8  # l_eye over skin
    assert label[120, 300] == 14  # hair over skin
    assert label[375, 225] == 18  # neck_l (last) over skin
    assert label[450, 450] == 0 and label[50, 450] == 14
    ex = data.prepare(rec, "celebamask_hq", 64)
    assert ex["label"].shape == (64, 64) and ex["image"].shape == (64, 64, 3)
    np.testing.assert_array_equal(ex["label"], np.asarray(
        Image.fromarray(label).resize((64, 64), Image.NEAREST)))
    np.testing.assert_array_equal(ex["image"], resize_rgb(rec["image"], 64))
    assert not ex["landmarks"].any()
    with pytest.raises(data.DataError, match="no 'dev' split"):
        data.open_source("celebamask_hq", root, "dev")


def test_lapa_reading_and_five_points(roots):
    src = data.open_source("lapa", roots["lapa"], "test")
    assert src.names == ["test_000", "test_001"]
    rec = src[1]
    assert rec["points"].shape == (106, 2) and rec["image"].shape == (60, 80, 3)
    ex = data.prepare(rec, "lapa", 128)
    expected = (datasets.FIVE + 1) * np.array([128 / 80, 128 / 60], np.float32)
    np.testing.assert_allclose(ex["landmarks"], expected, atol=2e-3)  # 4-decimal file
    with Image.open(roots["lapa"] / "test/labels/test_001.png") as im:
        np.testing.assert_array_equal(ex["label"], np.asarray(im.resize((128, 128),
                                                                           Image.NEAREST)))


def test_helen_crop_and_five_points(roots):
    src = data.open_source("helen", roots["helen"], "train")
    assert src.names == ["100_1", "200_2"]  # _viz files do not add samples
    rec = src[0]
    np.testing.assert_allclose(rec["points"][:2], 2 * datasets.HELEN_BOX_POINTS[:2], atol=1e-3)
    # halved points span x 20..60, y 10..50: wh 41, centre (40, 30), side int(49.2) = 49
    assert helen_crop_box(rec["points"] * 0.5, (70, 90)) == (16, 6, 65, 55)
    ex = data.prepare(rec, "helen", 98)
    crop = rec["label"][6:55, 16:65]
    np.testing.assert_array_equal(ex["label"], np.asarray(
        Image.fromarray(crop).resize((98, 98), Image.NEAREST)))
    np.testing.assert_allclose(ex["landmarks"], (datasets.FIVE - [16, 6]) * 2, atol=2e-3)


def test_lapa_affine_matches_torchvision():
    """Image and label through torchvision's ``affine``; landmarks by hand at 90 degrees."""
    import torchvision.transforms.functional as F

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    label = rng.integers(0, 11, (60, 80), dtype=np.uint8)
    for angle, scale, tr in [(23.5, 1.7, (4.2, -13.1)), (-30.0, 0.5, (20.0, 0.0))]:
        img, lab, _ = data.apply_affine(image, label, np.zeros((1, 2)), angle, scale, tr)
        ref_img = F.affine(Image.fromarray(image), angle=angle, translate=list(tr), scale=scale,
                           shear=[0.0], interpolation=F.InterpolationMode.BICUBIC)
        ref_lab = F.affine(Image.fromarray(label), angle=angle, translate=list(tr), scale=scale,
                           shear=[0.0], interpolation=F.InterpolationMode.NEAREST)
        np.testing.assert_array_equal(img, np.asarray(ref_img))
        np.testing.assert_array_equal(lab, np.asarray(ref_lab))
    # torchvision's angle turns clockwise on screen: a point 10 px right of the centre
    # (40, 30) goes 10 px below it at 90 degrees, then scale 2 and translation (1, 2)
    _, _, pts = data.apply_affine(image, label, np.array([[50.0, 30.0]]), 90.0, 2.0, (1, 2))
    np.testing.assert_allclose(pts, [[41.0, 52.0]], atol=1e-4)


def _plain_numpy_metrics(gt, pred, num_classes):
    # independent of train/metrics.py: boolean masks per class, no confusion matrix
    keep = gt != 255
    g, p = gt[keep], pred[keep]
    f1, iou, acc = {}, [], []
    for c in range(num_classes):
        tp = np.sum((g == c) & (p == c))
        fp = np.sum((g != c) & (p == c))
        fn = np.sum((g == c) & (p != c))
        f1[c] = None if 2 * tp + fp + fn == 0 else 200 * tp / (2 * tp + fp + fn)
        iou.append(100 * tp / max(1, tp + fp + fn))
        acc.append(100 * tp / max(1, tp + fn))
    mean_f1 = np.mean([v for c, v in f1.items() if c > 0 and v is not None])
    return f1, mean_f1, 100 * np.mean(g == p), np.mean(acc), iou, np.mean(iou)


@pytest.mark.parametrize("helen", [False, True])
def test_metrics_against_plain_numpy(helen):
    rng = np.random.default_rng(0)
    names = ("background", "face", "leftbro", "rightbro", "lefteye", "righteye",
                              "nose", "upperlip", "innermouth", "lowerlip", "hair")
    gt = rng.integers(0, 11, (4, 64, 64)).astype(np.uint8)
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 11, gt.shape))
    gt[gt == 6] = 5  # class 6 (nose) absent from the labels ...
    pred[pred == 6] = 4  # ... and from the predictions: F1 undefined
    gt[:, :5] = 255  # ignored pixels, whatever is predicted there
    pred[:, :5] = 3
    cm = metrics.confusion_matrix(gt, pred, 11)
    rep = metrics.summarize(cm, names, HELEN.merged_f1 if helen else ())
    f1, mean_f1, pa, ma, iou, miou = _plain_numpy_metrics(gt, pred, 11)
    assert rep["pixels"] == 4 * 59 * 64
    for c, name in enumerate(names):
        assert (rep["f1"][name] is None) == (f1[c] is None)
        if f1[c] is not None:
            assert rep["f1"][name] == pytest.approx(f1[c], rel=1e-12)
        assert rep["iou"][name] == pytest.approx(iou[c], rel=1e-12)
    assert rep["absent_classes"] == ["nose"]
    assert rep["mean_f1"] == pytest.approx(mean_f1, rel=1e-12)
    assert rep["pixel_accuracy"] == pytest.approx(pa, rel=1e-12)
    assert rep["mean_accuracy"] == pytest.approx(ma, rel=1e-12)
    assert rep["miou"] == pytest.approx(miou, rel=1e-12)
    if helen:
        keep = gt != 255
        g, p = gt[keep], pred[keep]
        for merged, members in [("eyes", (4, 5)), ("brows", (2, 3)), ("mouth", (7, 8, 9)),
                                ("overall", (2, 3, 4, 5, 6, 7, 8, 9))]:
            gm, pm = np.isin(g, members), np.isin(p, members)
            want = 200 * np.sum(gm & pm) / (gm.sum() + pm.sum())
            assert rep["merged_f1"][merged] == pytest.approx(want, rel=1e-12)
    else:
        assert "merged_f1" not in rep
    device = metrics.confusion_matrix_device(jnp.asarray(gt), jnp.asarray(pred), 11)
    np.testing.assert_array_equal(np.asarray(device), cm)
    with pytest.raises(ValueError, match="outside 0..10"):
        metrics.confusion_matrix(np.full((2, 2), 11), np.zeros((2, 2)), 11)


def _digest(batch) -> str:
    return hashlib.sha256(batch["image"].tobytes() + batch["label"].tobytes()
                          + batch["landmarks"].tobytes()).hexdigest()


@pytest.mark.slow
def test_pipeline_is_deterministic_and_resumable(roots):
    src = data.open_source("lapa", roots["lapa"], "train")

    def batches(seed, n, workers=0, state=None):
        it = iter(pipeline.train_loader(src, "lapa", 64, 2, seed=seed, worker_count=workers,
                                        process_index=0, process_count=1))
        if state is not None:
            it.set_state(state)
        return [_digest(next(it)) for _ in range(n)], it

    first, _ = batches(1, 5)  # 2 batches per epoch: crosses into a reshuffled epoch
    assert batches(1, 5)[0] == first
    assert batches(2, 5)[0] != first
    assert len(set(first)) == 5  # augmentation differs per epoch, so every batch differs
    _, it = batches(1, 2)
    state = it.get_state()
    assert json.loads(state) == {"step": 2}  # the position is the global step
    resumed, _ = batches(1, 3, state=state)
    assert resumed == first[2:]
    # decoding in 2 worker processes gives the same batches, and resumes the same way
    multi, it = batches(1, 4, workers=2)
    assert multi == first[:4]
    _, it = batches(1, 1, workers=2)
    assert batches(1, 3, workers=2, state=it.get_state())[0] == first[1:4]


def test_every_process_count_reads_the_same_global_batches(roots):
    """Process p of P reads rows [p b, (p + 1) b) of each global batch (b = B / P): the
    processes' rows are disjoint, cover each epoch's batches, and put together in process order
    they are the one-process batch, augmentation included, for P = 1, 2, 4."""
    src = data.open_source("lapa", roots["lapa"], "train")  # 4 records: 1 global batch of 4

    def global_batches(processes: int, steps: int = 3) -> list[dict[str, np.ndarray]]:
        its = [pipeline.train_loader(src, "lapa", 32, 4, seed=3, process_index=p,
                                     process_count=processes) for p in range(processes)]
        return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
                for parts in zip(*[[next(it) for _ in range(steps)] for it in its])]

    one = global_batches(1)
    for processes in (2, 4):
        for a, b in zip(one, global_batches(processes)):
            assert _digest(a) == _digest(b)
    # each epoch's batch holds every record once (without augmentation, they can be matched)
    plain = pipeline.train_loader(src, "lapa", 32, 4, seed=3, process_index=0, process_count=1,
                                  augment=False)
    batch = next(plain)
    direct = {_digest({k: v[None] for k, v in data.prepare(src[i], "lapa", 32).items()})
              for i in range(4)}
    assert {_digest({k: batch[k][r:r + 1] for k in batch}) for r in range(4)} == direct


class _CountingSource:
    """A source of ``n`` LaPa records (record 0's, repeated) that counts the reads."""

    def __init__(self, source, n: int):
        self.record, self.n, self.reads = source[0], n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        return self.record


def _settled(source: _CountingSource) -> int:
    """``source.reads`` once grain's read-ahead threads have stopped reading."""
    reads = -1
    while reads != source.reads:
        reads = source.reads
        time.sleep(0.5)
    return reads


def test_read_ahead_is_a_few_batches(roots):
    """The pipelines decode at most a few batches ahead of the consumer (grain's default read
    options, 16 threads and 500 elements, would decode hundreds of batches into host memory
    while their threads hold the GIL against the training step and the checkpoint writer)."""
    src = _CountingSource(data.open_source("lapa", roots["lapa"], "train"), 1000)
    it = pipeline.train_loader(src, "lapa", 32, 2, process_index=0, process_count=1)
    next(it)
    threads = pipeline._READ_THREADS  # 2 to 16, the cores this process may use
    # one batch of 2 handed out, a buffer of one batch per thread, one being decoded per thread
    assert _settled(src) <= 2 * (1 + 2 * threads)
    src.reads = 0
    _, batches = pipeline.eval_batches(src, "lapa", 32, 2)
    next(batches)
    assert _settled(src) <= 2 + max(threads, 2 * 2) + threads  # records, not batches


def test_eval_batches_shard_and_pad(roots):
    src = data.open_source("celebamask_hq", roots["celebamask_hq"], "test")  # 3 records
    seen = []
    for shard in (0, 1):
        steps, it = pipeline.eval_batches(src, "celebamask_hq", 32, 1, shard_index=shard,
                                          shard_count=2)
        got = list(it)
        assert steps == 2 and len(got) == 2  # both processes run ceil(ceil(3 / 2) / 1) steps
        for b in got:
            if b["valid"][0]:
                seen.append(_digest({k: b[k][:1] for k in ("image", "label", "landmarks")}))
            else:
                assert (b["label"] == 255).all() and not b["image"].any()
    direct = [data.prepare(src[i], "celebamask_hq", 32) for i in range(3)]
    assert sorted(seen) == sorted(_digest({k: v[None] for k, v in ex.items()})
                                  for ex in direct)


def test_tfds_builders_build_and_read_back_without_tensorflow(roots, tmp_path):
    import importlib.util

    # TensorFlow is not installed (nor a dependency): the builders must work without it
    assert importlib.util.find_spec("tensorflow") is None
    from segface_jax.train import tfds_builders

    for dataset, split in (("celebamask_hq", "test"), ("lapa", "train"), ("helen", "train")):
        folder = data.open_source(dataset, roots[dataset], split)
        assert main(["data", "build", "--dataset", dataset, "--root", str(roots[dataset]),
                     "--data-dir", str(tmp_path)]) == 0
        built = tfds_builders.TFDSSource(dataset, tmp_path, split)
        assert len(built) == len(folder)
        by_name = {built[i]["name"]: built[i] for i in range(len(built))}
        for i in range(len(folder)):
            want = folder[i]
            got = by_name[want["name"]]
            for key in ("image", "label", "points"):
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{dataset} {key}")
    assert "tensorflow" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
    with pytest.raises(data.DataError, match="no 'val' split"):
        tfds_builders.TFDSSource("helen", tmp_path, "val")


def test_data_check_reports_missing_files(roots, tmp_path, capsys):
    import shutil

    root = shutil.copytree(roots["lapa"], tmp_path / "LaPa")
    assert main(["data", "check", "--dataset", "lapa", "--root", str(root)]) == 0
    assert "lapa is complete" in capsys.readouterr().out
    (root / "train/labels/train_001.png").unlink()
    (root / "train/landmarks/train_002.txt").unlink()
    (root / "test/landmarks/test_000.txt").write_text("106\n1 2\n")
    Image.new("L", (4, 4)).save(root / "val/labels/orphan.png")
    assert main(["data", "check", "--dataset", "lapa", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "1 missing labels: " in out and "train_001.png" in out
    assert "1 missing landmark files: " in out and "train_002.txt" in out
    assert "1 bad landmark files: " in out and "test_000.txt: expected '106'" in out
    assert "1 labels without an image: " in out and "orphan.png" in out

    # without --decode, headers: a truncated JPEG, a non-image, a label of the wrong size
    helen = shutil.copytree(roots["helen"], tmp_path / "helen")
    assert main(["data", "check", "--dataset", "helen", "--root", str(helen)]) == 0
    capsys.readouterr()
    first, second, third = sorted(helen.glob("*/*_image.jpg"))  # test/300_3, train/100_1, ..
    first.write_bytes(first.read_bytes()[:-200])
    second.write_bytes(b"not a jpeg at all")
    label = Path(str(third).replace("_image.jpg", "_label.png"))
    with Image.open(label) as im:
        im.resize((im.width + 3, im.height)).save(label)
    assert main(["data", "check", "--dataset", "helen", "--root", str(helen)]) == 1
    out = capsys.readouterr().out
    assert f"{first.name}: truncated JPEG (its end marker is missing)" in out
    assert f"{second.name}: not a readable image" in out
    assert "1 labels whose size differs: " in out and f"{label.name} (93, 70) vs (90, 70)" in out

    celeba = shutil.copytree(roots["celebamask_hq"], tmp_path / "CelebAMask-HQ")
    (celeba / "CelebA-HQ-img/1999.jpg").unlink()
    for p in (celeba / "CelebAMask-HQ-mask-anno/0").glob("00005_*.png"):
        p.unlink()
    assert main(["data", "check", "--dataset", "celebamask_hq", "--root", str(celeba),
                 "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert "1 missing images: " in out and "1999.jpg" in out
    assert "1 samples without any part mask: 5" in out
    assert main(["data", "check", "--dataset", "helen", "--root", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_is_sharded_over_devices_and_matches_a_direct_count(roots, tmp_path, capsys):
    import json

    from segface_jax.runtime import load
    from tests import release

    assert jax.device_count() == 8  # conftest: the batch is split over 8 host devices
    weights = release.converted("swinb_celeba_224")
    out = tmp_path / "report"
    assert main(["eval", "--variant", "swinb_celeba_224", "--weights", str(weights),
                 "--dataset", "celebamask_hq", "--root", str(roots["celebamask_hq"]),
                 "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 images" in text and "(paper: 87.47)" in text
    report = json.loads((out / "metrics.json").read_text())
    cm = np.asarray(report["confusion_matrix"])
    assert report["images"] == 3 and cm.sum() == 3 * 224 * 224

    model = load(weights)
    src = data.open_source("celebamask_hq", roots["celebamask_hq"], "test")
    direct = np.zeros_like(cm)
    for i in range(len(src)):
        ex = data.prepare(src[i], "celebamask_hq", 224)
        x = (ex["image"][None] / np.float32(255) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        logits = np.asarray(model(x.astype(np.float32)))
        direct += metrics.confusion_matrix(ex["label"][None], logits.argmax(-1), 19)
    # sharded vs single-device float32 sums may flip near-tied argmaxes (random weights)
    assert np.abs(cm - direct).sum() <= 2e-4 * cm.sum()
    assert "| mean F1 (no background) |" in (out / "metrics.md").read_text()
    with Image.open(out / "confusion.png") as im:
        assert im.size[0] > 19 * 28
    rc = main(["eval", "--variant", "swinb_celeba_224", "--weights", str(weights),
               "--dataset", "lapa", "--root", str(roots["lapa"])])
    assert rc == 2 and "trained on celebamask_hq" in capsys.readouterr().err
    assert not Path("eval-swinb_celeba_224-test").exists()  # refused before creating its --out


@pytest.mark.slow
def test_eval_prints_its_metrics_when_the_reports_cannot_be_written(roots, tmp_path, capsys,
                                                                    monkeypatch):
    """A disk that fills up after the check: the metrics still reach the terminal, then one
    line says what could not be written, exit 1, no traceback."""
    from segface_jax.train import evaluate
    from tests import release

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_reports", full_disk)
    rc = main(["eval", "--variant", "swinb_celeba_224", "--weights",
               str(release.converted("swinb_celeba_224")), "--dataset", "celebamask_hq",
               "--root", str(roots["celebamask_hq"]), "--batch-size", "4", "--out",
               str(tmp_path / "report"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1 and "3 images, mean F1" in captured.out
    assert "cannot write the reports" in captured.err and "No space left" in captured.err
    assert "Traceback" not in captured.err


def test_eval_batches_with_workers_leave_no_shared_memory_behind(roots):
    """grain's workers hand batches over in shared memory; every block must be unlinked before
    the process exits (else Python's resource tracker warns of leaked shared_memory objects).
    grain unlinks on a background thread: slowed down here (as on a loaded machine, where this
    leaked), the iterator must still wait for it."""
    import subprocess
    import sys

    code = ("import sys, time\n"
            "from absl import flags\n"
            "from grain._src.python.ipc import shared_memory_array as sma\n"
            "unlink = sma.SharedMemoryArray.close_shm_async.__func__\n"
            "sma.SharedMemoryArray.close_shm_async = classmethod(\n"
            "    lambda cls, shm, u: (time.sleep(0.3), unlink(cls, shm, u)))\n"
            "from segface_jax.train import data, pipeline\n"
            "flags.FLAGS.mark_as_parsed()\n"
            "src = data.open_source('celebamask_hq', sys.argv[1], 'test')\n"
            "steps, batches = pipeline.eval_batches(src, 'celebamask_hq', 32, 2, worker_count=2)\n"
            "print(sum(int(b['valid'].sum()) for b in batches), 'images')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(roots["celebamask_hq"])],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3 images"
    assert "leaked shared_memory" not in proc.stderr, proc.stderr
