"""Training on your own data: label sets, mappings, the generic layout, its checks and build,
and fine-tuning a SegFace checkpoint to a new class set end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segface_jax import labels
from segface_jax.cli import main
from segface_jax.labels import LabelError, LabelMapping, LabelSet
from segface_jax.train import data
from tests import datasets

MERGED = ["background", "face", "lips", "hair", "beard"]  # OWN_CLASSES with the lips merged


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    return datasets.write_own(tmp_path_factory.mktemp("own") / "own")


def _merge_file(folder: Path) -> Path:
    path = folder / "merge.json"
    path.write_text(json.dumps({"to": MERGED, "map": {"upperlip": "lips", "lowerlip": "lips"}}))
    return path


def test_built_in_label_sets_pin_upstream_orders_and_mirror_pairs():
    # the orders of upstream's data loaders, written out here, not imported from the package
    assert labels.LABEL_SETS["celebamask_hq"].classes == (
        "background", "neck", "face", "cloth", "rightear", "leftear", "rightbro", "leftbro",
        "righteye", "lefteye", "nose", "innermouth", "lowerlip", "upperlip", "hair", "glass",
        "hat", "earring", "necklace")
    assert labels.LABEL_SETS["lapa"].classes == labels.LABEL_SETS["helen"].classes == (
        "background", "face", "leftbro", "rightbro", "lefteye", "righteye", "nose",
        "upperlip", "innermouth", "lowerlip", "hair")
    celeba = labels.LABEL_SETS["celebamask_hq"]
    assert set(celeba.mirror) == {("leftear", "rightear"), ("leftbro", "rightbro"),
                                  ("lefteye", "righteye")}
    swapped = [celeba.classes[i] for i in celeba.mirrored_classes]
    assert swapped[4:10] == ["leftear", "rightear", "leftbro", "rightbro", "lefteye", "righteye"]
    assert celeba.colours[celeba.index("hair")] == (0, 0, 204)


def test_classes_json_defaults_and_every_refusal(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"name": "mine", "classes": ["background", "l_eye", "r_eye",
                                                             "hair", "tattoo"],
                                "colours": {"tattoo": [1, 2, 3]}, "ignore_index": 9}))
    s = labels.read_label_set(path)
    assert s.mirror == (("l_eye", "r_eye"),) and s.mirrored_classes == (0, 2, 1, 3, 4)
    assert s.colours[3] == labels.COLOURS["hair"] and s.colours[4] == (1, 2, 3)
    assert s.colours[1] != s.colours[2]  # unknown names get distinct generated colours
    assert LabelSet.from_json(s.to_json()) == s and s.ignore_index == 9
    for spec, message in [
        ({"classes": ["a", "a"]}, "repeat"),
        ({"classes": ["a", "b c"]}, "letters, digits"),
        ({"classes": ["a", "b"], "ignore_index": 1}, "ignore_index 1"),
        ({"classes": ["a"], "colours": {"b": [0, 0, 0]}}, "not in the set"),
        ({"classes": ["a"], "colours": [[0, 0, 300]]}, "0..255"),
        ({"classes": ["a"], "mirror": [["a", "b"]]}, "mirror pair"),
        ({"names": ["a"]}, '"classes"'),
    ]:
        path.write_text(json.dumps(spec))
        with pytest.raises(LabelError, match=message) as e:
            labels.read_label_set(path)
        assert str(path) in str(e.value)
    with pytest.raises(LabelError, match="no such file"):
        labels.read_label_set(tmp_path / "missing.json")


def test_mapping_renames_merges_and_ignores(tmp_path):
    celeba = labels.LABEL_SETS["celebamask_hq"]
    path = tmp_path / "to_lapa.json"
    path.write_text(json.dumps({"to": "lapa", "map": {"neck": None, "cloth": None,
                                                      "glass": "background"}}))
    m = labels.read_mapping(path, celeba)
    lut = m.table()
    lapa = labels.LABEL_SETS["lapa"]
    # same-named classes keep their meaning in the new order; unnamed classes without a
    # counterpart (ears, hat, jewellery) and the explicit nulls are ignored (255)
    for name in ("face", "hair", "upperlip", "lefteye", "innermouth"):
        assert lut[celeba.index(name)] == lapa.index(name)
    assert lut[celeba.index("glass")] == 0
    for name in ("neck", "cloth", "leftear", "hat", "earring", "necklace"):
        assert lut[celeba.index(name)] == 255
    assert lut[255] == 255 and lut[19] == 255
    assert m.apply(np.array([[2, 1, 13]], np.uint8)).tolist() == [[1, 255, 7]]
    assert m.describe() == ["background + glass -> background",
                            "ignored: neck, cloth, rightear, leftear, hat, earring, necklace"]
    merge = labels.read_mapping(_merge_file(tmp_path), LabelSet.of("own",
                                                                   datasets.OWN_CLASSES))
    assert merge.to == (0, 1, 2, 2, 3, 4) and merge.sources_of("lips") == ("upperlip",
                                                                           "lowerlip")
    assert merge.describe() == ["upperlip + lowerlip -> lips"]
    for spec, message in [({"to": "lapa", "map": {"nose2": "nose"}}, "not classes of"),
                          ({"to": "lapa", "map": {"nose": "snout"}}, "not a class of"),
                          ({"to": "mystery"}, "unknown label set"), ({"map": {}}, '"to"'),
                          ({"to": 5}, "not 5")]:
        path.write_text(json.dumps(spec))
        with pytest.raises(LabelError, match=message) as e:
            labels.read_mapping(path, celeba)
        assert str(path) in str(e.value)
    assert LabelMapping.by_name(lapa, lapa).is_identity


def test_generic_layout_from_folders_or_lists_reads_index_masks(own, tmp_path):
    listed = datasets.write_own(tmp_path / "listed", lists=True)
    for root in (own, listed):
        d = data.folder_dataset(root)
        assert d.classes == datasets.OWN_CLASSES and d.splits == ("train", "val", "test")
        assert not d.aligns and d.title == "own"
    a, b = data.open_source("folder", own, "train"), data.open_source("folder", listed, "train")
    assert len(a) == len(b) == 12 and a.names == b.names
    rec, rec_b = a[3], b[3]
    _, mask = datasets.own_example(3)
    np.testing.assert_array_equal(rec["label"], mask)  # palette indices, not colours
    np.testing.assert_array_equal(rec["label"], rec_b["label"])
    with Image.open(own / "train/images/train_003.jpg") as im:
        np.testing.assert_array_equal(rec["image"], np.asarray(im.convert("RGB")))
    merge = labels.read_mapping(_merge_file(tmp_path), a.data.labels)
    ex = data.prepare(rec, a.data, 48, mapping=merge)
    np.testing.assert_array_equal(ex["label"], merge.apply(mask))

    # a flat root is all training data; an ignore value becomes 255; landmarks make it align
    flat = tmp_path / "flat"
    shutil.copytree(own / "train", flat)
    spec = json.loads((own / "classes.json").read_text())
    (flat / "classes.json").write_text(json.dumps({**spec, "ignore_index": 7}))
    m = np.asarray(Image.open(flat / "masks/train_000.png")).copy()
    m[:3] = 7
    Image.fromarray(m).save(flat / "masks/train_000.png")
    src = data.open_source("folder", flat, "train")
    assert src.data.splits == ("train",) and (src[0]["label"][:3] == 255).all()
    with pytest.raises(data.DataError, match="no val split"):
        data.open_source("folder", flat, "val")
    aligned = datasets.write_own(tmp_path / "aligned", {"train": 2}, landmarks=True)
    src = data.open_source("folder", aligned, "train")
    assert src.data.aligns and src.data.affine_augment and src[0]["points"].shape == (5, 2)
    ex = data.prepare(src[0], src.data, 24)
    np.testing.assert_allclose(ex["landmarks"][0], np.array([0.38, 0.42]) * 24, atol=0.01)


def test_data_check_names_every_defect(own, tmp_path, capsys):
    root = shutil.copytree(own, tmp_path / "broken")
    train = root / "train"
    (train / "masks/train_000.png").unlink()  # an image without a mask
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(train / "masks/stray.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(train / "masks/train_001.png")
    Image.fromarray(np.full((48, 48), 6, np.uint8)).save(train / "masks/train_002.png")
    jpeg = (train / "images/train_003.jpg").read_bytes()
    (train / "images/train_003.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    shutil.copy(train / "images/train_004.jpg", train / "images/train_004.png")
    (train / "masks/train_005.png").write_bytes(b"not a png")
    Image.fromarray(np.stack([np.full((48, 48), 200, np.uint8)] * 2 + [np.zeros(
        (48, 48), np.uint8)], -1)).save(train / "masks/train_006.png")
    (root / "val").rename(root / "val_folder")
    (root / "val.txt").write_text("val_000\nghost\n")
    for sub in ("images", "masks"):  # the list-file layout reads <root>/images, masks
        shutil.copytree(root / "val_folder" / sub, root / sub)

    assert main(["data", "check", "--dataset", "folder", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    for line in [
        "1 images without a mask: " + str(train / "masks/train_000.png"),
        "1 masks without an image: " + str(train / "masks/stray.png"),
        "1 masks whose size differs from the image: " + str(train / "masks/train_001.png"),
        "1 masks with values outside classes.json: ",
        "values [6] are not classes of",
        "truncated JPEG",
        "images sharing a stem (one mask cannot label both): ",
        "2 unreadable or truncated files: ",
        str(train / "masks/train_005.png") + ": not a readable image",
        "1 unreadable masks: " + str(train / "masks/train_006.png") + ": a colour",
        "1 listed but missing images: " + str(root / "images/ghost") + ".*",
    ]:
        assert line in out, (line, out)
    (root / "classes.json").write_text('{"classes": ["a", "a"]}')
    assert main(["data", "check", "--dataset", "folder", "--root", str(root)]) == 1
    assert "layout errors: " in (out := capsys.readouterr().out) and "repeat" in out

    aligned = datasets.write_own(tmp_path / "aligned", {"train": 2}, landmarks=True)
    (aligned / "train/landmarks/train_000.txt").unlink()
    (aligned / "train/landmarks/train_001.txt").write_text("1 2 3")
    assert main(["data", "check", "--dataset", "folder", "--root", str(aligned)]) == 1
    out = capsys.readouterr().out
    assert "1 missing landmark files: " in out and "1 bad landmark files: " in out
    assert main(["data", "check", "--dataset", "folder", "--root", str(own)]) == 0


def test_tfds_build_of_the_generic_layout_reads_back_the_same_records(own, tmp_path, capsys):
    from segface_jax.train import tfds_builders

    assert main(["data", "build", "--dataset", "folder", "--root", str(own), "--data-dir",
                 str(tmp_path)]) == 0
    assert "built " in capsys.readouterr().out
    for split in ("train", "test"):
        folder = data.open_source("folder", own, split)
        built = tfds_builders.TFDSSource("folder", tmp_path, split)
        assert built.data == folder.data  # the classes travel with the build
        by_name = {built[i]["name"]: built[i] for i in range(len(built))}
        for i in range(len(folder)):
            a = folder[i]
            b = by_name[a["name"]]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


def test_masks_label_the_image_as_shown_in_check_source_and_build(own, tmp_path, capsys):
    """A phone photo stored sideways with an EXIF orientation: its mask is drawn on the upright
    image, and data check, the folder source and the TFDS build all agree on that. A gray mask
    with alpha reads as its gray values; a second build into the same folder is refused."""
    from segface_jax.train import tfds_builders

    root = datasets.write_own(tmp_path / "phone", {"train": 2})
    stored = np.zeros((40, 48, 3), np.uint8)  # 48 wide, 40 high as stored
    stored[:, :24] = 200
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 40 wide, 48 high
    Image.fromarray(stored).save(root / "train/images/train_000.jpg", exif=exif)
    mask = np.zeros((48, 40), np.uint8)
    mask[:24] = 1
    Image.fromarray(mask).save(root / "train/masks/train_000.png")
    gray_alpha = np.stack([datasets.own_example(1)[1], np.full((48, 48), 255, np.uint8)], -1)
    Image.fromarray(gray_alpha, mode="LA").save(root / "train/masks/train_001.png")

    assert main(["data", "check", "--dataset", "folder", "--root", str(root)]) == 0
    src = data.open_source("folder", root, "train")
    assert src[0]["image"].shape == (48, 40, 3)
    np.testing.assert_array_equal(src[0]["label"], mask)
    np.testing.assert_array_equal(src[1]["label"], datasets.own_example(1)[1])
    assert main(["data", "build", "--dataset", "folder", "--root", str(root), "--data-dir",
                 str(tmp_path / "tfds")]) == 0
    built = tfds_builders.TFDSSource("folder", tmp_path / "tfds", "train")
    by_name = {built[i]["name"]: built[i] for i in range(len(built))}
    np.testing.assert_array_equal(by_name["train_000"]["label"], mask)
    np.testing.assert_array_equal(by_name["train_000"]["image"], src[0]["image"])
    capsys.readouterr()
    assert main(["data", "build", "--dataset", "folder", "--root", str(own), "--data-dir",
                 str(tmp_path / "tfds")]) == 2
    assert "already holds a generic-layout build" in capsys.readouterr().err

    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "train/masks/train_000.png")
    assert main(["data", "check", "--dataset", "folder", "--root", str(root)]) == 1
    assert "masks whose size differs from the image: " in capsys.readouterr().out


def test_losses_skip_ignored_pixels():
    import jax.numpy as jnp

    from segface_jax.train import losses

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
    lab = rng.integers(0, 4, (2, 6, 5)).astype(np.uint8)
    ignored = lab.copy()
    ignored[:, :2] = 255
    keep = ignored != 255
    # the reference: the same losses over the labelled pixels alone, as one flat "image"
    flat_logits, flat_labels = logits[keep][None, :, None], lab[keep][None, :, None]
    ce = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(ignored))
    np.testing.assert_allclose(ce, losses.cross_entropy(flat_logits, flat_labels), rtol=1e-6)
    dice = losses.dice_loss(jnp.asarray(logits), jnp.asarray(ignored))
    np.testing.assert_allclose(dice, losses.dice_loss(flat_logits, flat_labels), rtol=1e-6)
    # and with nothing ignored, exactly torch's plain mean (upstream's loss is unchanged)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    plain = -np.take_along_axis(logp, lab[..., None].astype(int), -1).mean()
    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(lab)),
                               plain, rtol=1e-6)


SMALL = [["embed_dim", 16], ["num_heads", [1, 1, 1, 1]], ["depths", [1, 1, 1, 1]],
         ["stochastic_depth_prob", 0.0]]


def _hand_confusion(model, source, label_map=None, pred_map=None) -> np.ndarray:
    """The confusion matrix counted image by image in numpy, for comparison with ``eval``."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    n = len(pred_map.target) if pred_map else len(model.class_names)
    cm = np.zeros((n, n), np.int64)
    for i in range(len(source)):
        ex = data.prepare(source[i], source.data, model.resolution)
        x = ((ex["image"][None] / np.float32(255) - mean) / std).astype(np.float32)
        pred = np.asarray(model(x))[0].argmax(-1)
        label = ex["label"] if label_map is None else label_map.apply(ex["label"])
        if pred_map is not None:
            pred = pred_map.apply(pred)
        for t, p in zip(label.ravel(), pred.ravel(), strict=True):
            if t != 255 and p != 255:
                cm[t, p] += 1
    return cm


def _random_weights(shapes: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 arrays of ``shapes``' shapes at a trainable scale: kernels ~ 1/sqrt(fan
    in), norm scales ~ 1, biases small, tokens and the positional matrix standard normal."""
    out = {}
    for key, leaf in shapes.items():
        shape = leaf.shape
        if key.endswith("scale"):
            value = 1 + rng.normal(0, 0.1, shape)
        elif key.endswith("bias") or len(shape) < 2:
            value = rng.normal(0, 0.02, shape)
        elif key.endswith(("_token", "gaussian_matrix")):
            value = rng.normal(0, 1, shape)
        else:
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        out[key] = value.astype(np.float32)
    return out


@pytest.mark.slow
@pytest.mark.quick_compile
def test_finetune_a_segface_checkpoint_to_new_classes_through_the_cli(own, tmp_path, capsys):
    """README's "Train on your own data", step by step: a CelebAMask-HQ checkpoint fine-tuned
    on a 6-class dataset merged to 5 classes (lips from upper and lower lip, a new beard)."""
    import dataclasses

    from segface_jax.checkpoint import abstract_model, flat_state, save_checkpoint
    from segface_jax.models import SegFaceConfig
    from segface_jax.runtime import load
    from segface_jax.train.config import load_config
    from segface_jax.train.model_init import build_model
    from segface_jax.variants import get_variant

    # the checkpoint to start from, as `segface-jax convert` writes it (a small encoder;
    # random values of the right shapes, drawn in numpy: a SegFace's own initialisation
    # compiles one program per parameter shape)
    celeba = get_variant("swinb_celeba_224")
    small = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in SMALL)
    shapes = flat_state(abstract_model(SegFaceConfig.from_variant(dataclasses.replace(
        celeba, encoder_overrides=small))))
    start_arrays = _random_weights(shapes, np.random.default_rng(7))
    save_checkpoint(tmp_path / "celeba", start_arrays, {"variant": celeba.name})
    merge = _merge_file(tmp_path)
    sets = ["--set", f"data_root={own}", "--set", f"init_path={tmp_path / 'celeba'}",
            "--set", f"label_map={merge}", "--set", "resolution=32",
            "--set", f"encoder_overrides={json.dumps(SMALL)}", "--set", "workers=0",
            "--set", "global_batch=8", "--set", "lr=1e-3", "--set", "log_every=1",
            "--set", "max_steps=30", "--set", "eval_every_epochs=30"]
    config = str(Path(__file__).parents[1] / "configs/finetune.py") + ":swinb_celeba_224"

    # the new model's starting tokens: inherited by name, through the mapping, or new
    cfg = load_config(config, [s for s in sets if s != "--set"])
    folder = data.folder_dataset(own)
    mapping = labels.read_mapping(merge, folder.labels)
    v = celeba.retrained("mine", dataclasses.replace(folder, labels=mapping.target), 32, small)
    first = flat_state(build_model(cfg, v, mapping))
    token = lambda arrays, name: np.asarray(arrays[f"face_decoder.{name}_token"])  # noqa: E731
    for name in ("background", "face", "hair"):
        np.testing.assert_array_equal(token(first, name), token(start_arrays, name))
    np.testing.assert_allclose(token(first, "lips"), (token(start_arrays, "upperlip")
                                                      + token(start_arrays, "lowerlip")) / 2)
    assert all(np.abs(token(first, "beard") - token(start_arrays, c)).max() > 0.1
               for c in celeba.classes)
    capsys.readouterr()

    # data check, train, eval, predict: the README's commands
    assert main(["data", "check", "--dataset", "folder", "--root", str(own)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--config", config, "--workdir", str(run), "--quiet", *sets]) == 0
    out = capsys.readouterr().out
    assert "3 by name, 1 through the mapping (lips <- upperlip + lowerlip), 1 new (beard)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    print(f"\nfine-tuning loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 30 and losses[-1] <= 0.5 * losses[0]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [30] and list(val[0]["f1"]) == MERGED
    assert "step 30: validation mean F1 " in out and "beard " in out

    trained = load(run / "model")
    assert trained.class_names == tuple(MERGED) and trained.variant.data.title == "own"
    after = flat_state(trained.module)
    frozen = [k for k in after if k.startswith("backbone.")]
    assert frozen and all(np.array_equal(after[k], start_arrays[k]) for k in frozen)
    assert not np.array_equal(after["fusion.linear_fuse.kernel"],
                              start_arrays["fusion.linear_fuse.kernel"])

    # eval through the mapping, both ways: labels merged into the model's classes, and the
    # model's predictions mapped onto the 6 original classes (beard predictions ignored)
    back = tmp_path / "back.json"
    back.write_text(json.dumps({"to": "classes.json", "map": {"lips": "upperlip",
                                                              "beard": None}}))
    shutil.copy(own / "classes.json", tmp_path / "classes.json")
    test = data.open_source("folder", own, "test")
    for mapping_file, label_map, pred_map in [
            (merge, mapping, None),
            (back, None, labels.read_mapping(back, trained.variant.data.labels))]:
        report_dir = tmp_path / f"eval-{mapping_file.stem}"
        assert main(["eval", "--weights", str(run / "model"), "--dataset", "folder", "--root",
                     str(own), "--split", "test", "--mapping", str(mapping_file), "--out",
                     str(report_dir), "--quiet"]) == 0
        report = json.loads((report_dir / "metrics.json").read_text())
        expected = _hand_confusion(trained, test, label_map, pred_map)
        np.testing.assert_array_equal(report["confusion_matrix"], expected)
        names = MERGED if pred_map is None else list(datasets.OWN_CLASSES)
        assert list(report["f1"]) == names
    assert "F1 per class: background " in capsys.readouterr().out
    rc = main(["eval", "--weights", str(run / "model"), "--dataset", "folder", "--root",
               str(own), "--split", "test", "--out", str(tmp_path / "refused")])
    assert rc == 2 and "--mapping FILE" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    photo = tmp_path / "photo.png"
    Image.fromarray(datasets.own_example(99)[0]).save(photo)
    assert main(["predict", str(photo), "--weights", str(run / "model"), "--faces", "none",
                 "--out", str(tmp_path / "parsed")]) == 0
    with Image.open(tmp_path / "parsed/photo_labels.png") as im:
        assert set(np.unique(np.asarray(im))) <= set(range(5))
    assert main(["export", "--weights", str(run / "model"), "--format", "stablehlo", "--out",
                 str(tmp_path / "mine.stablehlo")]) == 0
    assert "with R = 32, output logits (N, R, R, 5)" in capsys.readouterr().out
