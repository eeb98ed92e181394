"""CelebAMask-HQ, LaPa and Helen, read exactly as upstream reads them, and any dataset in the
generic layout (``Folder``).

A *source* (random access: ``len``, ``[i]``) yields raw records at the files' own size:
``{"image": (H, W, 3) uint8, "label": (h, w) uint8, "points": (K, 2) float32, "name": str}``
(``points`` is empty for CelebAMask-HQ, LaPa's 106 landmarks, Helen's 68 as stored, i.e. at
twice the image scale). ``prepare`` turns a record into a model example at resolution R:
``{"image": (R, R, 3) uint8, "label": (R, R) uint8, "landmarks": (5, 2) float32}``, with
upstream's data loaders' rules:

* CelebAMask-HQ: splits from ``list_eval_partition.txt`` through
  ``CelebA-HQ-to-CelebA-mapping.txt`` (0 train, 1 val, 2 test), in the partition file's order;
  the 18 part masks merged into one label, later parts overwriting earlier ones.
* LaPa: ``<split>/images|labels|landmarks``; 106 points reduced to 5; training adds a random
  affine (rotation +-30 deg, scale 0.5-3, translation +-20 px) to image, label and landmarks.
* Helen: ``<split>/<name>_image.jpg`` and ``_label.png``, ``landmarks.txt`` (68 points at twice
  the image scale, halved as upstream does); a square crop of 1.2 x the landmark extent.
* Generic layout (``Folder``): ``classes.json`` (``segface_jax/labels.py``), ``images/``,
  ``masks/`` (PNG of class indices, palette or grayscale, same stem as the image) and optional
  ``landmarks/`` (5, 68 or 106 points per ``<stem>.txt``); splits are sub-folders
  (``<root>/<split>/images``...) or list files (``<root>/<split>.txt``, one stem per line), and
  a root with neither is all ``train``. With landmarks, examples are aligned and trained with
  LaPa's random affine; without, plainly resized, as CelebAMask-HQ.
* Images resized bicubic, labels nearest; landmarks scaled to R. Normalisation (ImageNet mean
  and std) happens on the device, so batches travel as uint8.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segface_jax import landmarks as lmk
from segface_jax.datasets import DATASETS, Dataset, get_dataset
from segface_jax.labels import IGNORE, LabelError, LabelMapping, read_label_set

# Part masks in label order: label value = 1 + index; later parts overwrite earlier ones.
CELEBA_PARTS = ("neck", "skin", "cloth", "l_ear", "r_ear", "l_brow", "r_brow", "l_eye", "r_eye",
                "nose", "mouth", "l_lip", "u_lip", "hair", "eye_g", "hat", "ear_r", "neck_l")
CELEBA_MASK_SIZE = 512
_HELEN_SUFFIX = re.compile(r"(_image|_label|_viz)")


class DataError(Exception):
    """A dataset folder that does not have the expected layout; the message names the file."""


def _read_rgb(path: Path) -> np.ndarray:
    from segface_jax.preprocess import ImageError, read_rgb

    try:
        return read_rgb(path)
    except ImageError as e:
        raise DataError(str(e)) from None


def _read_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


class _Source:
    # a stable repr: grain checks it when an iterator state is restored
    root: Path
    split: str
    names: list[str]

    @classmethod
    def has_split(cls, root: Path, split: str) -> bool:
        """Whether ``root`` holds files of ``split`` (its folder exists)."""
        return (Path(root) / split).is_dir()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"samples={len(self.names)})")


class CelebAMaskHQ(_Source):
    """CelebAMask-HQ in its release layout (``CelebA-HQ-img/``, ``CelebAMask-HQ-mask-anno/``)."""

    dataset = "celebamask_hq"

    def __init__(self, root: str | os.PathLike, split: str):
        self.root, self.split = Path(root), split
        self.names = self.split_names(self.root, split)

    @classmethod
    def has_split(cls, root: Path, split: str) -> bool:
        """Whether ``root`` holds the partition file that defines every split."""
        return (Path(root) / "list_eval_partition.txt").is_file()

    @staticmethod
    def split_names(root: Path, split: str) -> list[str]:
        """HQ ids of ``split`` in the order of ``list_eval_partition.txt``."""
        group = {"train": 0, "val": 1, "test": 2}[split]
        mapping = root / "CelebA-HQ-to-CelebA-mapping.txt"
        partition = root / "list_eval_partition.txt"
        for f in (mapping, partition):
            if not f.is_file():
                raise DataError(f"{f}: missing; CelebAMask-HQ needs it to find the {split} split")
        orig_to_hq = {}
        for line in mapping.read_text().splitlines():
            if ".jpg" in line:
                idx, _, orig = line.split()
                orig_to_hq[orig] = int(idx)
        names = []
        for line in partition.read_text().splitlines():
            if ".jpg" in line:
                orig, g = line.split()
                if int(g) == group and orig in orig_to_hq:
                    names.append(str(orig_to_hq[orig]))
        return names

    def image_path(self, name: str) -> Path:
        """The photo of HQ id ``name``."""
        return self.root / "CelebA-HQ-img" / f"{name}.jpg"

    def mask_paths(self, name: str) -> list[Path]:
        """The 18 part-mask paths of ``name`` in label order (not all exist for every face)."""
        folder = self.root / "CelebAMask-HQ-mask-anno" / str(int(name) // 2000)
        return [folder / f"{int(name):05d}_{part}.png" for part in CELEBA_PARTS]

    def label(self, name: str) -> np.ndarray:
        """The merged (512, 512) label: value 1 + part index where the part's mask is > 0."""
        label = np.zeros((CELEBA_MASK_SIZE, CELEBA_MASK_SIZE), np.uint8)
        for value, path in enumerate(self.mask_paths(name), start=1):
            if path.exists():
                mask = _read_gray(path)
                if mask.shape != label.shape:
                    raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                                    f"expected {CELEBA_MASK_SIZE}x{CELEBA_MASK_SIZE}")
                label[mask > 0] = value
        return label

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        return {"image": _read_rgb(self.image_path(name)), "label": self.label(name),
                "points": np.zeros((0, 2), np.float32), "name": name}


class LaPa(_Source):
    """LaPa: ``<split>/images/*.jpg``, ``labels/*.png``, ``landmarks/*.txt`` (106 points)."""

    dataset = "lapa"

    def __init__(self, root: str | os.PathLike, split: str):
        self.root, self.split = Path(root), split
        folder = self.root / split / "images"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; LaPa's layout is <root>/{split}/images, "
                            "labels and landmarks")
        self.names = sorted(p.stem for p in folder.glob("*.jpg"))

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        """Image, label and landmark file of ``name``."""
        base = self.root / self.split
        return (base / "images" / f"{name}.jpg", base / "labels" / f"{name}.png",
                base / "landmarks" / f"{name}.txt")

    def points(self, name: str) -> np.ndarray:
        """The 106 landmarks of ``name`` (the file's first number must be 106)."""
        path = self.paths(name)[2]
        try:
            values = [float(v) for v in path.read_text().split()]
        except FileNotFoundError:
            raise DataError(f"{path}: no such landmark file") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable landmarks ({e})") from None
        if len(values) != 213 or values[0] != 106:
            raise DataError(f"{path}: expected '106' then 106 'x y' pairs, found "
                            f"{len(values)} numbers")
        return np.asarray(values[1:], np.float32).reshape(106, 2)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        image, label, _ = self.paths(name)
        return {"image": _read_rgb(image), "label": _read_gray(label),
                "points": self.points(name), "name": name}


class Helen(_Source):
    """Helen: ``<split>/<name>_image.jpg``, ``<name>_label.png``; ``landmarks.txt`` (68 points)."""

    dataset = "helen"

    def __init__(self, root: str | os.PathLike, split: str):
        self.root, self.split = Path(root), split
        folder = self.root / split
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; Helen's layout is <root>/train|test/"
                            "<name>_image.jpg and <name>_label.png")
        self.names = sorted({_HELEN_SUFFIX.sub("", p.name).rsplit(".", 1)[0]
                             for p in folder.iterdir() if not p.name.startswith(".")})
        self._table: dict[str, np.ndarray] | None = None

    def landmark_table(self) -> dict[str, np.ndarray]:
        """{name: (68, 2) points as stored} from ``landmarks.txt`` (136 numbers, then the name)."""
        if self._table is None:
            path = self.root / "landmarks.txt"
            if not path.is_file():
                raise DataError(f"{path}: missing; Helen needs its 68-point landmarks")
            table = {}
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    table[parts[-1]] = np.asarray(parts[:136], np.float32).reshape(68, 2)
                except ValueError:
                    raise DataError(f"{path}:{n}: expected 136 numbers and a name") from None
            self._table = table
        return self._table

    def paths(self, name: str) -> tuple[Path, Path]:
        """Image and label file of ``name``."""
        base = self.root / self.split
        return base / f"{name}_image.jpg", base / f"{name}_label.png"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        table = self.landmark_table()
        if name not in table:
            raise DataError(f"{self.root / 'landmarks.txt'}: no landmarks for {name}")
        image, label = self.paths(name)
        return {"image": _read_rgb(image), "label": _read_gray(label), "points": table[name],
                "name": name}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
GENERIC_SPLITS = ("train", "val", "test")


def folder_dataset(root: str | os.PathLike) -> Dataset:
    """The ``Dataset`` of a folder in the generic layout: its ``classes.json`` label set, its
    splits, and whether it carries landmarks (then it aligns and augments as LaPa)."""
    root = Path(root)
    try:
        labels = read_label_set(root / "classes.json")
    except LabelError as e:
        raise DataError(str(e)) from None
    splits = tuple(s for s in GENERIC_SPLITS if Folder.has_split(root, s))
    landmarks = any((root / s / "landmarks").is_dir() for s in splits) or (
        root / "landmarks").is_dir()
    return Dataset("folder", labels.name, labels, splits or ("train",), val_split="val",
                   aligns=landmarks, affine_augment=landmarks,
                   face_frame="lapa" if landmarks else "celebahq")


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as it is shown, i.e. after its EXIF orientation (which is
    how images are read for training, so how its mask must be drawn); from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _read_mask(path: Path) -> np.ndarray:
    """A mask's class indices: a palette PNG's indices or a grayscale image's values."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            mask = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: no such mask") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    if mask.ndim == 3 and mask.shape[-1] < 3:  # gray with alpha (LA): the gray values
        mask = mask[..., 0]
    if mask.ndim == 3:  # RGB(A) that is really gray (an index mask saved as colour) is fine
        if not (np.array_equal(mask[..., 0], mask[..., 1])
                and np.array_equal(mask[..., 0], mask[..., 2])):
            raise DataError(f"{path}: a colour ({mode}) mask; save class indices instead "
                            "(a palette or grayscale PNG whose values are the classes.json "
                            "indices)")
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise DataError(f"{path}: mask values reach {int(mask.max())}; class indices are "
                            "0..254")
        mask = mask.astype(np.uint8)
    return mask


class Folder(_Source):
    """A dataset in the generic layout (see the module docstring)."""

    dataset = "folder"

    def __init__(self, root: str | os.PathLike, split: str, data: Dataset | None = None):
        self.root, self.split = Path(root), split
        self.data = data or folder_dataset(self.root)
        self.base, listed = self._layout(self.root, split)
        folder = self.base / "images"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; the generic layout is <root>/images, masks "
                            "(and landmarks), or <root>/<split>/images, ...")
        self.images: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                self.images.setdefault(p.stem, p)
        self.names = sorted(self.images) if listed is None else listed

    @staticmethod
    def _layout(root: Path, split: str) -> tuple[Path, list[str] | None]:
        """(folder holding images/ and masks/, the split's stems from its list file or None)."""
        if (root / split / "images").is_dir():
            return root / split, None
        listing = root / f"{split}.txt"
        if listing.is_file():
            try:
                lines = listing.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{listing}: not a readable list of stems ({e})") from None
            return root, [line.strip() for line in lines if line.strip()]
        if split == "train" and not any((root / f"{s}.txt").is_file() for s in GENERIC_SPLITS):
            return root, None
        raise DataError(f"{root}: no {split} split (neither {root / split / 'images'} nor "
                        f"{listing})")

    @classmethod
    def has_split(cls, root: Path, split: str) -> bool:
        """Whether ``root`` has ``split``: a sub-folder, a list file or (train) a flat root."""
        try:
            base, _ = cls._layout(Path(root), split)
        except DataError:
            return False
        return (base / "images").is_dir()

    def paths(self, name: str) -> tuple[Path, Path, Path]:
        """Image, mask and landmark file of ``name`` (the image as found, .jpg if missing)."""
        image = self.images.get(name, self.base / "images" / f"{name}.jpg")
        return (image, self.base / "masks" / f"{name}.png",
                self.base / "landmarks" / f"{name}.txt")

    def points(self, name: str) -> np.ndarray:
        """The landmarks of ``name`` ((0, 2) when the dataset has none)."""
        if not self.data.aligns:
            return np.zeros((0, 2), np.float32)
        try:
            return lmk.read_points_txt(self.paths(name)[2])
        except lmk.LandmarkError as e:
            raise DataError(str(e)) from None

    def label(self, name: str, image_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The mask of ``name`` as class indices, 255 where ignored; ``DataError`` for a size
        other than ``image_hw`` or a value that is no class."""
        path = self.paths(name)[1]
        mask = _read_mask(path)
        if image_hw is not None and mask.shape != tuple(image_hw):
            raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                            f"{image_hw[1]}x{image_hw[0]}")
        labels = self.data.labels
        bad = np.setdiff1d(np.unique(mask), [*range(len(labels)), labels.ignore_index])
        if bad.size:
            raise DataError(f"{path}: values {bad.tolist()} are not classes of "
                            f"{self.root / 'classes.json'} (0..{len(labels) - 1}, ignore "
                            f"{labels.ignore_index})")
        return np.where(mask == labels.ignore_index, IGNORE, mask).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        image = _read_rgb(self.paths(name)[0])
        return {"image": image, "label": self.label(name, image.shape[:2]),
                "points": self.points(name), "name": name}


SOURCES = {source.dataset: source for source in (CelebAMaskHQ, LaPa, Helen, Folder)}


def open_source(dataset: str, root: str | os.PathLike, split: str):
    """The raw-folder source of ``dataset``/``split`` under ``root`` (``folder``: the generic
    layout)."""
    if dataset not in SOURCES:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(SOURCES)}")
    if not Path(root).is_dir():
        raise DataError(f"{root}: no such folder")
    if dataset == "folder":
        return Folder(root, split)
    splits = DATASETS[dataset].splits
    if split not in splits:
        raise DataError(f"{dataset} has no {split!r} split; it has {', '.join(splits)}")
    return SOURCES[dataset](root, split)


def source_dataset(source) -> Dataset:
    """The ``Dataset`` a source's records belong to."""
    return getattr(source, "data", None) or DATASETS[source.dataset]


# -- transforms -------------------------------------------------------------------------------


def inverse_affine_matrix(center: tuple[float, float], angle: float,
                          translate: tuple[float, float], scale: float) -> list[float]:
    """PIL's output->input affine coefficients for torchvision's ``affine`` (no shear).

    torchvision's ``affine`` rotates by ``angle`` degrees clockwise on screen about ``center``,
    scales, then translates; PIL needs the inverse map.
    """
    rot = math.radians(angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    m = [v / scale for v in (d, -b, 0.0, -c, a, 0.0)]
    cx, cy = center
    tx, ty = translate
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def random_affine(image: np.ndarray, label: np.ndarray, points: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upstream's LaPa augmentation: one random affine applied to image, label and points."""
    angle = float(rng.uniform(-30, 30))
    scale = float(rng.uniform(0.5, 3))
    translate = (float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20)))
    return apply_affine(image, label, points, angle, scale, translate)


def apply_affine(image: np.ndarray, label: np.ndarray, points: np.ndarray, angle: float,
                 scale: float, translate: tuple[float, float]):
    """torchvision's ``affine`` (bicubic image, nearest label, zero fill) and upstream's point
    transform: rotate by ``angle`` about the centre, scale, translate."""
    h, w = image.shape[:2]
    center = (w * 0.5, h * 0.5)
    m = inverse_affine_matrix(center, angle, translate, scale)
    img = Image.fromarray(image).transform((w, h), Image.AFFINE, m, Image.BICUBIC,
                                           fillcolor=(0, 0, 0))
    lab = Image.fromarray(label).transform((label.shape[1], label.shape[0]), Image.AFFINE, m,
                                           Image.NEAREST, fillcolor=0)
    rad = np.deg2rad(-angle)
    rotation = np.array([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])
    c = np.array(center)
    moved = (np.asarray(points, np.float64) - c) @ rotation * scale + c + np.array(translate)
    return np.asarray(img), np.asarray(lab), moved.astype(np.float32)


def _resize(image: np.ndarray, label: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    from segface_jax.preprocess import resize_rgb

    lab = label if label.shape == (r, r) else np.asarray(
        Image.fromarray(label).resize((r, r), Image.NEAREST))
    return resize_rgb(image, r), lab


def prepare(record: dict[str, Any], dataset: Dataset | str, resolution: int,
            rng: np.random.Generator | None = None,
            mapping: LabelMapping | None = None) -> dict[str, np.ndarray]:
    """A raw record -> a model example at ``resolution`` (``rng``: LaPa training augmentation;
    ``mapping``: the label in another label set, 255 where it ignores a class)."""
    d = get_dataset(dataset)
    image, label, points = record["image"], record["label"], record["points"]
    if mapping is not None:
        label = mapping.apply(label)
    r = resolution
    if d.landmark_scale != 1.0:
        points = points * np.float32(d.landmark_scale)
    if d.crops_to_face:
        x1, y1, x2, y2 = lmk.helen_crop_box(points, image.shape[:2])
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        points = points - np.array([x1, y1], np.float32)
    elif d.affine_augment and rng is not None:
        image, label, points = random_affine(image, label, points, rng)
    h, w = image.shape[:2]
    image, label = _resize(image, label, r)
    if d.uses_landmarks:
        five = lmk.to_five(np.asarray(points) * np.array([r / w, r / h]))
    else:
        five = np.zeros((5, 2), np.float32)
    return {"image": image, "label": label, "landmarks": five.astype(np.float32)}
