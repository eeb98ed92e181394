"""Tiny synthetic CelebAMask-HQ, LaPa and Helen folders in the exact release layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.test_inputs import _68_points, _106_points

# CelebAMask-HQ: HQ id -> (original CelebA file, partition group). Ids 1999 and 2000 sit in
# mask folders 0 and 1. Originals 000009.jpg / 000010.jpg have no HQ version (skipped).
CELEBA = {1999: ("000004.jpg", 2), 0: ("000001.jpg", 0), 2000: ("000003.jpg", 2),
          7: ("000002.jpg", 1), 5: ("000005.jpg", 2)}
CELEBA_TEST_ORDER = ["2000", "1999", "5"]  # the order of list_eval_partition.txt below


def _jpeg(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mask(path: Path, rows: slice, cols: slice) -> None:
    m = np.zeros((512, 512), np.uint8)
    m[rows, cols] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def write_celeba(root: Path, extra_train: int = 0) -> Path:
    """CelebA-HQ-img/<id>.jpg, the 512 px part masks, the mapping and partition files;
    ``extra_train`` more training images (HQ ids 100, 101, ...) for runs that need batches."""
    celeba = {**CELEBA, **{100 + i: (f"{200 + i:06d}.jpg", 0) for i in range(extra_train)}}
    lines = ["idx\torig_idx\torig_file"]
    lines += [f"{hq}\t{int(orig[:6]) - 1}\t{orig}" for hq, (orig, _) in sorted(celeba.items())]
    (root / "CelebA-HQ-to-CelebA-mapping.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(lines) + "\n")
    partition = ["000001.jpg 0", "000002.jpg 1", "000003.jpg 2", "000004.jpg 2",
                 "000009.jpg 2", "000005.jpg 2", "000010.jpg 0"]
    partition += [f"{orig} 0" for hq, (orig, _) in celeba.items() if hq not in CELEBA]
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    for hq in celeba:
        _jpeg(root / "CelebA-HQ-img" / f"{hq}.jpg", 96, 96, hq)
        folder = root / "CelebAMask-HQ-mask-anno" / str(hq // 2000)
        _mask(folder / f"{hq:05d}_skin.png", slice(100, 400), slice(100, 400))
        _mask(folder / f"{hq:05d}_l_eye.png", slice(150, 200), slice(150, 200))  # over skin
        _mask(folder / f"{hq:05d}_hair.png", slice(0, 150), slice(0, 512))  # over skin top
        _mask(folder / f"{hq:05d}_neck_l.png", slice(350, 400), slice(200, 250))  # last part
    return root


FIVE = np.array([[30, 25], [50, 26], [40, 35], [32, 45], [49, 46]], np.float32)


def write_lapa(root: Path, n: dict[str, int] | None = None) -> Path:
    """<split>/images/*.jpg (80 x 60), labels/*.png, landmarks/*.txt (106 points)."""
    for split, count in (n or {"train": 4, "val": 1, "test": 2}).items():
        for i in range(count):
            name = f"{split}_{i:03d}"
            _jpeg(root / split / "images" / f"{name}.jpg", 60, 80, i)
            label = (np.arange(60 * 80).reshape(60, 80) // 7 % 11).astype(np.uint8)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(root / split / "labels" / f"{name}.png")
            pts = _106_points(FIVE + i)
            (root / split / "landmarks").mkdir(parents=True, exist_ok=True)
            (root / split / "landmarks" / f"{name}.txt").write_text(
                "106\n" + "\n".join(f"{x:.4f} {y:.4f}" for x, y in pts) + "\n")
    return root


HELEN_BOX_POINTS = np.array([[20, 10], [60, 50]] + [[40, 30]] * 66, np.float32)


def write_helen(root: Path) -> Path:
    """train|test/<name>_image.jpg, _label.png, _viz.jpg; landmarks.txt at twice the scale."""
    lines = []
    for split, names in (("train", ["100_1", "200_2"]), ("test", ["300_3"])):
        for k, name in enumerate(names):
            _jpeg(root / split / f"{name}_image.jpg", 70, 90, k)
            label = (np.arange(70 * 90).reshape(70, 90) // 5 % 11).astype(np.uint8)
            Image.fromarray(label).save(root / split / f"{name}_label.png")
            _jpeg(root / split / f"{name}_viz.jpg", 70, 90, 99)  # upstream ignores these
            pts = _68_points(FIVE)
            pts[:2] = HELEN_BOX_POINTS[:2]  # the landmark box: x 20..60, y 10..50
            pts = np.clip(pts, [20, 10], [60, 50])
            lines.append(" ".join(f"{v:.3f}" for v in (2 * pts).ravel()) + f" {name}")
    (root / "landmarks.txt").write_text("\n".join(lines) + "\n")
    return root


# A user's own set relative to CelebAMask-HQ: the lips split in two (merged by a mapping),
# and a class CelebAMask-HQ does not have (beard).
OWN_CLASSES = ("background", "face", "upperlip", "lowerlip", "hair", "beard")
OWN_COLOURS = ((20, 20, 20), (220, 170, 140), (200, 40, 60), (150, 20, 40), (60, 40, 20),
               (90, 90, 200))


def own_example(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask): a face-like layout whose classes have their own colours (learnable in a
    few steps), shifted per seed; mask values index ``OWN_CLASSES``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    dx, dy = rng.uniform(-0.08, 0.08, 2)
    mask = np.zeros((size, size), np.uint8)
    mask[(xx - 0.5 - dx) ** 2 / 0.09 + (yy - 0.5 - dy) ** 2 / 0.14 < 1] = 1  # face
    mask[yy < 0.18 + dy] = 4  # hair
    lips = np.abs(xx - 0.5 - dx) < 0.12
    mask[lips & (np.abs(yy - 0.64 - dy) < 0.03)] = 2
    mask[lips & (np.abs(yy - 0.70 - dy) < 0.03)] = 3
    mask[(mask == 1) & (yy > 0.78 + dy)] = 5  # beard
    image = np.asarray(OWN_COLOURS, np.float32)[mask] + rng.normal(0, 8, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_own(root: Path, n: dict[str, int] | None = None, landmarks: bool = False,
              lists: bool = False) -> Path:
    """A dataset in the generic layout with ``OWN_CLASSES``: ``<split>/images|masks`` (or,
    with ``lists``, one ``images/``, ``masks/`` and ``<split>.txt`` files), palette-PNG masks,
    and with ``landmarks`` a ``<stem>.txt`` of 5 points per image."""
    import json

    n = n or {"train": 12, "val": 2, "test": 2}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(
        {"name": "own", "classes": list(OWN_CLASSES), "colours": [list(c) for c in OWN_COLOURS]}))
    seed = 0
    for split, count in n.items():
        base = root if lists else root / split
        stems = []
        for i in range(count):
            stem = f"{split}_{i:03d}"
            image, mask = own_example(seed)
            seed += 1
            (base / "images").mkdir(parents=True, exist_ok=True)
            (base / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(base / "images" / f"{stem}.jpg", quality=95)
            pal = Image.fromarray(mask, mode="P")
            pal.putpalette([v for c in OWN_COLOURS for v in c])
            pal.save(base / "masks" / f"{stem}.png")
            if landmarks:
                (base / "landmarks").mkdir(parents=True, exist_ok=True)
                s = image.shape[0]
                pts = np.array([[0.38, 0.42], [0.62, 0.42], [0.5, 0.55], [0.4, 0.67],
                                [0.6, 0.67]]) * s
                (base / "landmarks" / f"{stem}.txt").write_text(
                    "\n".join(f"{x:.2f} {y:.2f}" for x, y in pts))
            stems.append(stem)
        if lists:
            (root / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root
