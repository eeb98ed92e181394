"""MTCNN face detection speed: ours (JAX) beside facenet-pytorch 2.6.0's, on this machine.

    python bench/detector.py     # needs: pip install --no-deps facenet-pytorch==2.6.0

The input is ``examples.group_photo(4)`` (four faces) at 640x480 and resized to 1920x1080; both
detectors use the same pretrained files and defaults (min face 20 px, factor 0.709). Ours
compiles P-Net once per padded pyramid-level shape and R-/O-Net once per padded crop count (4
sizes per doubling in both), so the first image of a size is slow: the table reports that first
call and the median of the next runs.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def main() -> None:
    """Print a Markdown table of detection times per image size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    import facenet_pytorch
    import jax
    import torch
    from PIL import Image

    from segface_jax.convert import convert_mtcnn
    from segface_jax.examples import group_photo
    from segface_jax.mtcnn import MTCNN, facenet_data, networks_from_arrays

    data = facenet_data()
    ours = MTCNN(networks_from_arrays(convert_mtcnn(data)))
    theirs = facenet_pytorch.MTCNN(device="cpu")
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads) "
          f"on {platform.processor() or platform.machine()}\n")
    print("| image | faces | ours first call s | ours img/s | facenet-pytorch img/s | ours / "
          "facenet |\n|---|---:|---:|---:|---:|---:|")
    small = group_photo(4)
    for image in (small, np.asarray(Image.fromarray(small).resize((1920, 1080)))):
        t0 = time.perf_counter()
        faces = len(ours(image))
        first = time.perf_counter() - t0
        times = {}
        for name, detect in (("ours", ours), ("theirs", lambda im: theirs.detect(im))):
            detect(image)
            runs = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                detect(image)
                runs.append(time.perf_counter() - t0)
            times[name] = float(np.median(runs))
        print(f"| {image.shape[1]}x{image.shape[0]} | {faces} | {first:.1f} | "
              f"{1 / times['ours']:.2f} | {1 / times['theirs']:.2f} | "
              f"{times['theirs'] / times['ours']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
