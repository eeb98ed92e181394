"""Input-pipeline throughput (images/s) for each dataset layout at 512 px, raw folders and TFDS.

Writes synthetic datasets with the real files' sizes (CelebAMask-HQ: 1024 px JPEG and eight
512 px part masks per face; LaPa: ~700 x 500 JPEG, label PNG, 106 landmarks; Helen: ~800 x 600
JPEG, label, 68 landmarks), then times the training loader (decode, LaPa's affine, Helen's
crop, resize, batch) over ``--batches`` batches after one warm-up batch (the loader is endless,
so they span several epochs; the few batches it decoded ahead during the warm-up, one per
reading thread, are a small share of them). Compare with the train step's images/s: a step
faster than the pipeline leaves the accelerator waiting.

    python bench/input_pipeline.py [--images 48] [--batches 30] [--workers 0 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def write_datasets(root: Path, n: int) -> dict[str, Path]:
    """Synthetic CelebAMask-HQ, LaPa and Helen folders with realistic file sizes."""
    from segface_jax.train.data import CELEBA_PARTS

    celeba = root / "CelebAMask-HQ"
    (celeba / "CelebA-HQ-img").mkdir(parents=True)
    mapping = ["idx orig_idx orig_file"] + [f"{i} {i} {i + 1:06d}.jpg" for i in range(n)]
    (celeba / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(mapping))
    (celeba / "list_eval_partition.txt").write_text(
        "\n".join(f"{i + 1:06d}.jpg 0" for i in range(n)))
    for i in range(n):
        Image.fromarray(_photo(1024, 1024, i)).save(celeba / f"CelebA-HQ-img/{i}.jpg", quality=95)
        folder = celeba / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(CELEBA_PARTS[:8]):
            m = np.zeros((512, 512), np.uint8)
            m[40 * k:200 + 30 * k, 60 + 20 * k:300 + 10 * k] = 255
            Image.fromarray(m).save(folder / f"{i:05d}_{part}.png")
    lapa = root / "LaPa"
    for sub in ("images", "labels", "landmarks"):
        (lapa / "train" / sub).mkdir(parents=True)
    helen = root / "helen"
    (helen / "train").mkdir(parents=True)
    lines = []
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 500 + 10 * (i % 5), 700 - 10 * (i % 3)
        Image.fromarray(_photo(h, w, i)).save(lapa / f"train/images/{i}.jpg", quality=95)
        Image.fromarray((np.arange(h * w).reshape(h, w) // 997 % 11).astype(np.uint8)).save(
            lapa / f"train/labels/{i}.png")
        pts = rng.uniform([200, 150], [500, 400], (106, 2))
        (lapa / f"train/landmarks/{i}.txt").write_text(
            "106\n" + "\n".join(f"{x:.2f} {y:.2f}" for x, y in pts))
        h, w = 600, 800
        Image.fromarray(_photo(h, w, i)).save(helen / f"train/{i}_image.jpg", quality=95)
        Image.fromarray((np.arange(h * w).reshape(h, w) // 991 % 11).astype(np.uint8)).save(
            helen / f"train/{i}_label.png")
        pts = 2 * rng.uniform([250, 150], [550, 450], (68, 2))  # stored at twice the scale
        lines.append(" ".join(f"{v:.2f}" for v in pts.ravel()) + f" {i}")
    (helen / "landmarks.txt").write_text("\n".join(lines))
    return {"celebamask_hq": celeba, "lapa": lapa, "helen": helen}


def images_per_second(source, dataset: str, batch: int, workers: int, resolution: int,
                      batches: int) -> float:
    """Training-loader throughput over ``batches`` batches after one warm-up batch."""
    from segface_jax.train.pipeline import train_loader

    it = iter(train_loader(source, dataset, resolution, batch, seed=0, worker_count=workers,
                           process_index=0, process_count=1))
    next(it)  # warm-up: worker start, first reads
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    """Build the datasets, time each layout and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48, help="images per synthetic dataset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=30, help="timed batches per layout")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args()

    from segface_jax.train import data, tfds_builders

    root = Path(tempfile.mkdtemp(prefix="segface-bench-data-"))
    try:
        roots = write_datasets(root, args.images)
        rows = []
        for dataset, folder in roots.items():
            tfds_builders.build(dataset, folder, root / "tfds")
            sources = {"raw folders": data.open_source(dataset, folder, "train"),
                       "TFDS array_record": tfds_builders.TFDSSource(dataset, root / "tfds",
                                                                     "train")}
            for kind, source in sources.items():
                for workers in args.workers:
                    rate = images_per_second(source, dataset, args.batch, workers,
                                             args.resolution, args.batches)
                    rows.append((dataset, kind, workers, rate))
                    print(f"{dataset:14} {kind:18} workers {workers}: {rate:6.1f} img/s",
                          flush=True)
        print(f"\n| dataset | source | grain workers | images/s at {args.resolution} px "
              f"(batch {args.batch}) |\n|---|---|---:|---:|")
        for dataset, kind, workers, rate in rows:
            print(f"| {dataset} | {kind} | {workers} | {rate:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
