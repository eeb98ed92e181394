"""Where a training run's metrics go: ``metrics.jsonl``, TensorBoard, the progress bar and
``loss_curve.png``, behind one ``MetricWriter``.

Process 0 writes the files (through ``etils.epath``, so the work directory may be ``gs://``
where its file-system backend is installed); every process keeps its own progress count.
"""

from __future__ import annotations

import json
from typing import Any

import jax
from etils import epath

from segface_jax.train.tensorboard import EventWriter


class MetricWriter:
    """One training run's metric sink; use as a context manager (closing writes the curve)."""

    def __init__(self, workdir: epath.Path, *, total_steps: int, initial_step: int, desc: str,
                 progress: bool = True) -> None:
        from tqdm import tqdm

        self._workdir = workdir
        self._main = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard: EventWriter | None = None
        self._curve: list[tuple[int, float]] = []
        if self._main:
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (workdir / "metrics.jsonl").open("a")
            self._tensorboard = EventWriter(workdir / "tensorboard")
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", desc=desc,
                         disable=not progress or not self._main, dynamic_ncols=True)

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` finished training steps on the progress bar."""
        self._bar.update(steps)

    def write(self, record: dict[str, Any]) -> None:
        """Record ``{"kind": "train" | "val", "step": ..., name: value, ...}`` everywhere."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tensorboard is not None:
            scalars = {}
            for key, value in record.items():
                values = value if isinstance(value, dict) else {"": value}  # per-class F1s
                for sub, x in values.items():
                    if key not in ("step", "epoch", "kind") and isinstance(x, int | float):
                        scalars[f"{record['kind']}/{key}" + (f"/{sub}" if sub else "")] = x
            if scalars:
                self._tensorboard.scalars(record["step"], scalars)
        if record["kind"] == "val" and self._main:
            self._bar.write(_val_line(record))
        if record["kind"] == "train":
            self._curve.append((record["step"], record["loss"]))
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.1e}",
                                  img_s=f"{record.get('images_per_s', 0):.1f}")

    def close(self) -> None:
        """Close the bar and the files; draw ``loss_curve.png`` from this run's train records."""
        self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            if self._curve:
                _loss_curve_png(self._workdir / "loss_curve.png", self._curve)


def _val_line(record: dict[str, Any]) -> str:
    """"step N: validation mean F1 x (class a, class b, ...)" for the console."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    line = f"step {record['step']}: validation mean F1 {fmt(record.get('mean_f1'))}"
    per_class = record.get("f1") or {}
    if per_class:
        line += " (" + ", ".join(f"{k} {fmt(v)}" for k, v in per_class.items()) + ")"
    return line


def _loss_curve_png(path: epath.Path, curve: list[tuple[int, float]]) -> None:
    """Draw loss against step, axes labelled with the first and last values."""
    from PIL import Image, ImageDraw

    steps, losses = [s for s, _ in curve], [v for _, v in curve]
    w, h, m = 640, 360, 40
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle((m, 10, w - 10, h - m), outline=(0, 0, 0))
    if len(steps) >= 2:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        pts = [(m + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - m - 10),
                h - m - (v - lo) / span * (h - m - 10)) for s, v in zip(steps, losses)]
        d.line(pts, fill=(30, 90, 200), width=2)
        d.text((m + 4, 14), f"loss {hi:.3f}", fill=(0, 0, 0))
        d.text((m + 4, h - m - 14), f"{lo:.3f}", fill=(0, 0, 0))
    d.text((m, h - m + 8), f"step {steps[0]}", fill=(0, 0, 0))
    d.text((w - 90, h - m + 8), f"step {steps[-1]}", fill=(0, 0, 0))
    with path.open("wb") as f:
        im.save(f, format="PNG")
