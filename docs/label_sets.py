"""Write docs/label_sets.png: every built-in label set, index by index, in its colours.

    python docs/label_sets.py

One column per set (``segface_jax.labels.LABEL_SETS``): the mask value, the colour overlays and
label PNGs use, and the class name. Mirror pairs (swapped by a horizontal flip) are marked.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from segface_jax.labels import LABEL_SETS

ROW, SWATCH, COLUMN = 22, 40, 230


def main() -> None:
    """Draw the sets side by side; save next to this script."""
    sets = [s for name, s in LABEL_SETS.items() if name != "helen"]  # Helen's is LaPa's
    rows = max(len(s) for s in sets)
    im = Image.new("RGB", (COLUMN * len(sets) + 10, ROW * (rows + 2)), (255, 255, 255))
    pen = ImageDraw.Draw(im)
    for c, labels in enumerate(sets):
        x = 10 + c * COLUMN
        title = "lapa and helen" if labels.name == "lapa" else labels.name
        pen.text((x, 6), title, fill=(0, 0, 0))
        paired = {name for pair in labels.mirror for name in pair}
        for i, (name, rgb) in enumerate(zip(labels.classes, labels.colours, strict=True)):
            y = ROW * (i + 1) + 6
            pen.text((x, y + 4), f"{i:2d}", fill=(0, 0, 0))
            pen.rectangle((x + 22, y, x + 22 + SWATCH, y + ROW - 4), fill=rgb,
                          outline=(120, 120, 120))
            pen.text((x + 30 + SWATCH, y + 4), name + ("  <->" if name in paired else ""),
                     fill=(0, 0, 0))
    pen.text((10, ROW * (rows + 1) + 6), "<->: swapped with its left/right twin when the "
             "image is mirrored", fill=(90, 90, 90))
    im.save(Path(__file__).with_name("label_sets.png"), optimize=True)


if __name__ == "__main__":
    main()
