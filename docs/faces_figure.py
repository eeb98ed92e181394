"""Write docs/faces_in_the_wild.jpg: the detector and the alignment on the 4-face composite.

    python docs/faces_figure.py

Left: ``examples.group_photo(4)`` with each MTCNN face's box, number, score and landmarks, and
the oriented square that a CelebAMask-HQ variant cuts out of it (in yellow). Right: those
four squares as the model receives them (shown at 120 px). No SegFace weights are involved:
the released ones cannot be downloaded where this figure is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segface_jax import faces, mtcnn
from segface_jax.examples import group_photo


def main() -> None:
    """Detect, align and draw; save next to this script."""
    photo = group_photo(4)
    found = mtcnn.pretrained()(photo)
    people = [faces.Face(b, float(s), lm) for b, s, lm in
              zip(found.boxes, found.scores, found.landmarks)]
    frames = [faces.celebahq_frame(f.landmarks) for f in people]
    left = Image.fromarray(faces.draw(photo, people))
    pen = ImageDraw.Draw(left)
    for frame in frames:
        corners = [tuple(c) for c in frame.corners()]
        pen.line([*corners, corners[0]], fill=(255, 220, 0), width=2)
    size = 120
    crops = [Image.fromarray(faces.crop(photo, f, 512).round().astype(np.uint8)).resize(
        (size, size), Image.Resampling.LANCZOS) for f in frames]
    canvas = Image.new("RGB", (photo.shape[1] + size, photo.shape[0]), (255, 255, 255))
    canvas.paste(left, (0, 0))
    for k, crop in enumerate(crops):
        canvas.paste(crop, (photo.shape[1], k * size))
    out = Path(__file__).with_name("faces_in_the_wild.jpg")
    canvas.save(out, quality=85)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
