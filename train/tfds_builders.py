"""TensorFlow Datasets builders (no TensorFlow needed): manual download folder -> array_record.

Each record keeps the files' encoded bytes (the JPEG as downloaded; the label as PNG, merged
from the part masks for CelebAMask-HQ) plus the landmarks as stored, so reading back gives
exactly the raw records of the folder sources in ``train/data.py``, decoded in Python (Pillow)
by ``TFDSSource``. Features are ``tfds.features.Tensor`` / ``Text``, never TF-encoded images,
which is what lets TFDS build and read them without TensorFlow.

```bash
segface-jax data build --dataset lapa --root /data/LaPa --data-dir ~/tensorflow_datasets
```
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segface_jax.datasets import DATASETS, Dataset
from segface_jax.preprocess import upright_rgb
from segface_jax.train import data

VERSION = "1.0.0"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _builder_class(dataset: str):
    import tensorflow_datasets as tfds
    from etils import epath

    # not registered in TFDS's global catalogue: segface-jax finds its builders itself
    class SegFaceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        __doc__ = f"{dataset} for segface-jax: encoded image and label bytes, landmarks."
        name = f"segface_{dataset}"
        VERSION = tfds.core.Version(VERSION)
        # where TFDS looks for README/CITATIONS: this file's real folder (the package is
        # installed under another name, so TFDS's guess from the module name would not exist)
        pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
        code_path = epath.Path(os.path.abspath(__file__))
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            f"Put {dataset} in its release layout (see segface_jax/train/data.py) and pass "
            "that folder as manual_dir (segface-jax data build --root).")

        def _info(self):
            return self.dataset_info_from_configs(
                description=self.__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "points": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
                    "name": tfds.features.Text(),
                }))

        def _split_generators(self, dl_manager):
            root = Path(dl_manager.manual_dir)
            splits = data.GENERIC_SPLITS if dataset == "folder" else DATASETS[dataset].splits
            return {split: self._generate_examples(root, split) for split in splits
                    if _has_split(dataset, root, split)}

        def _generate_examples(self, root: Path, split: str):
            source = data.open_source(dataset, root, split)
            for name in source.names:
                yield name, _encoded_record(source, name)

    SegFaceBuilder.__name__ = SegFaceBuilder.__qualname__ = f"SegFace_{dataset}"
    return SegFaceBuilder


def _has_split(dataset: str, root: Path, split: str) -> bool:
    # a split with files (TFDS cannot write an empty split)
    return data.SOURCES[dataset].has_split(root, split) and len(
        data.open_source(dataset, root, split)) > 0


def _encoded_record(source, name: str) -> dict[str, Any]:
    # The raw record with the image as its file's bytes and the label as PNG bytes.
    if isinstance(source, data.Folder):
        image = source.paths(name)[0]
        hw = data.upright_size(image)[::-1]  # the mask labels the image as shown
        return {"image": image.read_bytes(), "label": _png(source.label(name, hw)),
                "points": source.points(name), "name": name}
    if isinstance(source, data.CelebAMaskHQ):
        return {"image": source.image_path(name).read_bytes(), "label": _png(source.label(name)),
                "points": np.zeros((0, 2), np.float32), "name": name}
    if isinstance(source, data.LaPa):
        image, label, _ = source.paths(name)
        return {"image": image.read_bytes(), "label": label.read_bytes(),
                "points": source.points(name), "name": name}
    image, label = source.paths(name)
    table = source.landmark_table()
    if name not in table:
        raise data.DataError(f"{source.root / 'landmarks.txt'}: no landmarks for {name}")
    return {"image": image.read_bytes(), "label": label.read_bytes(), "points": table[name],
            "name": name}


_BUILDERS: dict[str, Any] = {}
DATASET_FILE = "segface_dataset.json"  # a generic-layout build's classes and conventions


def _built_dataset(dataset: str, built: Path) -> Dataset:
    """The ``Dataset`` of a build: a built-in one, or the generic layout's recorded one."""
    if dataset != "folder":
        return DATASETS[dataset]
    try:
        return Dataset.from_json(json.loads((built / DATASET_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise data.DataError(f"{built / DATASET_FILE}: unreadable ({e}); build it again with "
                             "`segface-jax data build --dataset folder`") from None


def builder(dataset: str, data_dir: str | os.PathLike):
    """The TFDS builder of ``dataset`` writing array_record files under ``data_dir``."""
    if dataset not in data.SOURCES:
        raise data.DataError(f"unknown dataset {dataset!r}; choose from "
                             f"{', '.join(data.SOURCES)}")
    if dataset not in _BUILDERS:
        _BUILDERS[dataset] = _builder_class(dataset)
    return _BUILDERS[dataset](data_dir=str(data_dir), file_format="array_record")


def build(dataset: str, root: str | os.PathLike, data_dir: str | os.PathLike):
    """Build the array_record files of every split found under ``root``; returns the builder."""
    import tensorflow_datasets as tfds

    folder = data.folder_dataset(root) if dataset == "folder" else None  # checks classes.json
    b = builder(dataset, data_dir)
    if folder is not None and Path(b.data_dir).exists():  # TFDS would keep the old records
        raise data.DataError(f"{b.data_dir} already holds a generic-layout build; remove it "
                             "or pass another --data-dir")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    if folder is not None:  # the classes travel with the records
        Path(b.data_dir, DATASET_FILE).write_text(json.dumps(folder.to_json(), indent=2) + "\n")
    return b


class TFDSSource:
    """A built dataset's split as a random-access source of raw records (decoded by Pillow)."""

    def __init__(self, dataset: str, data_dir: str | os.PathLike, split: str):
        b = builder(dataset, data_dir)
        if not Path(b.data_dir).is_dir():
            raise data.DataError(f"{b.data_dir}: not built; run `segface-jax data build "
                                 f"--dataset {dataset} --root DIR --data-dir {data_dir}`")
        splits = b.as_data_source()
        if split not in splits:
            raise data.DataError(f"{b.data_dir} has no {split!r} split ({', '.join(splits)})")
        self.dataset, self.split, self._source = dataset, split, splits[split]
        self.data_dir = Path(data_dir)
        self.data = _built_dataset(dataset, Path(b.data_dir))

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:  # stable: grain checks it when an iterator state is restored
        return (f"TFDSSource(dataset={self.dataset!r}, data_dir={str(self.data_dir)!r}, "
                f"split={self.split!r}, samples={len(self)})")

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self._source[i]
        name = rec["name"].decode() if isinstance(rec["name"], bytes) else str(rec["name"])
        with Image.open(io.BytesIO(rec["image"])) as im:
            image = upright_rgb(im)
        with Image.open(io.BytesIO(rec["label"])) as im:
            label = np.asarray(im.convert("L"))
        return {"image": image, "label": label,
                "points": np.asarray(rec["points"], np.float32).reshape(-1, 2), "name": name}

    def __getstate__(self):  # grain workers re-open the files instead of pickling readers
        return {"dataset": self.dataset, "data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["dataset"], state["data_dir"], state["split"])
