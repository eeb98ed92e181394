"""``segface-jax eval``: upstream's test protocol, sharded over every device of every process.

Batches are split over a ``("data",)`` mesh; each device runs the model on its rows, takes the
argmax and counts its confusion matrix, and the sum over devices comes back replicated (XLA
inserts the all-reduce). Writes ``metrics.json``, ``metrics.md`` (next to the paper's mean F1)
and ``confusion.png``.

A model whose classes are not the labels' is scored through a label mapping
(``segface_jax/labels.py``): either its predictions map into the labels' classes (a
CelebAMask-HQ model scored on LaPa labels) or the labels map into its classes (a model trained
on a merged set scored on the original masks). A pixel that either side maps to "ignored" is
left out of the confusion matrix, like label 255.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw

from segface_jax.datasets import DATASETS, Dataset
from segface_jax.files import atomic_write, ensure_writable
from segface_jax.labels import LabelError, LabelMapping, LabelSet, read_mapping
from segface_jax.models.layers import kernels_for
from segface_jax.runtime import LoadedModel
from segface_jax.train import metrics
from segface_jax.train.mesh import data_mesh, normalize_on_device


def confusion_step(model: LoadedModel, mesh: jax.sharding.Mesh,
                   predictions: LabelMapping | None = None):
    """jit: (state, uint8 images, labels, landmarks) -> (C, C) int32 confusion matrix, C the
    model's classes, or ``predictions``' target classes when the predictions map into them."""
    from flax import nnx

    graphdef = nnx.graphdef(model.module)
    c = model.variant.num_classes
    scored = c if predictions is None else len(predictions.target)
    lut = None if predictions is None else jnp.asarray(predictions.table()[:c], jnp.int32)
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    platform = mesh.devices.flat[0].platform  # the kernels to trace (layers.kernels_for)

    @functools.partial(jax.jit, in_shardings=(replicated, batch, batch, batch),
                       out_shardings=replicated)
    def step(state, images, labels, landmarks):
        module = nnx.merge(graphdef, state)
        lm = landmarks if model.variant.needs_landmarks else None
        with kernels_for(platform):
            logits = module(normalize_on_device(images), lm)
        r = labels.shape[1:3]
        if logits.shape[1:3] != r:  # upstream resizes to R; the models already output R
            logits = jax.image.resize(logits, (logits.shape[0], *r, c), "bilinear",
                                      antialias=False)
        preds = jnp.argmax(logits, -1)
        if lut is not None:  # predictions -> the labels' classes; unmapped ones ignored
            preds = lut[preds]
            labels = jnp.where(preds == metrics.IGNORE_LABEL, metrics.IGNORE_LABEL, labels)
        return metrics.confusion_matrix_device(labels, preds, scored)

    return step


def evaluate(model: LoadedModel, source, dataset: Dataset | str, batch_size: int = 8,
             worker_count: int = 0, progress: bool = True, resolution: int | None = None,
             mapping: LabelMapping | None = None,
             predictions: LabelMapping | None = None) -> tuple[np.ndarray, int, float]:
    """(confusion matrix, images counted, seconds) of ``model`` on ``source``.

    ``batch_size`` is global; it is rounded up to a multiple of the device count.
    ``resolution`` defaults to the variant's. ``mapping`` turns the labels into the model's
    classes; ``predictions`` turns the model's classes into the labels' (then the matrix is
    over the labels' classes).
    """
    from tqdm import tqdm

    from segface_jax.train.pipeline import eval_batches

    mesh = data_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    global_batch = max(1, -(-batch_size // n_dev)) * n_dev
    local_batch = global_batch // n_proc
    steps, batches = eval_batches(source, dataset, resolution or model.resolution, local_batch,
                                  worker_count=worker_count, mapping=mapping)
    sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(model._state, NamedSharding(mesh, P()))
    step = confusion_step(model, mesh, predictions)
    scored = model.variant.num_classes if predictions is None else len(predictions.target)
    cm = np.zeros((scored,) * 2, np.int64)
    counted = 0
    t0 = time.perf_counter()
    bar = tqdm(total=steps * global_batch, unit="img", desc=f"eval {model.variant.name}",
               disable=not progress or jax.process_index() != 0)
    pending = None
    for b in batches:
        arrays = [jax.make_array_from_process_local_data(sharding, b[k])
                  for k in ("image", "label", "landmarks")]
        result = step(state, *arrays)  # asynchronous: the next batch decodes meanwhile
        if pending is not None:
            cm += np.asarray(pending)
        pending = result
        counted += int(b["valid"].sum())
        bar.update(global_batch)
    if pending is not None:
        cm += np.asarray(pending)
    bar.close()
    counted = int(_sum_over_processes(counted))
    return cm, counted, time.perf_counter() - t0


def _sum_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.array([value]))))


def paper_table(report: dict, variant_name: str, paper_f1: float | None) -> str:
    """Markdown: our figures next to the paper's mean F1 for the variant."""
    lines = [f"# {variant_name} on {report['dataset']} ({report['split']}, "
             f"{report['images']} images)", "",
             "| metric | segface-jax | paper |", "|---|---:|---:|"]
    paper = f"{paper_f1:.2f}" if paper_f1 is not None else "-"
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines.append(f"| mean F1 (no background) | {fmt(report['mean_f1'])} | {paper} |")
    for key, label in (("pixel_accuracy", "pixel accuracy"), ("mean_accuracy", "mean accuracy"),
                       ("miou", "mIoU")):
        lines.append(f"| {label} | {fmt(report[key])} | - |")
    for name, value in report.get("merged_f1", {}).items():
        lines.append(f"| F1 {name} (merged) | {fmt(value)} | - |")
    lines += ["", "| class | F1 | IoU |", "|---|---:|---:|"]
    for name, f1 in report["f1"].items():
        lines.append(f"| {name} | {fmt(f1)} | {fmt(report['iou'][name])} |")
    if report["absent_classes"]:
        lines += ["", "Absent from labels and predictions (F1 undefined, left out of the mean): "
                  + ", ".join(report["absent_classes"])]
    return "\n".join(lines) + "\n"


def confusion_png(cm: np.ndarray, class_names: Sequence[str], cell: int = 28) -> Image.Image:
    """A row-normalised confusion-matrix heatmap (rows: ground truth) with class names."""
    cm = np.asarray(cm, np.float64)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n, margin = len(class_names), 8 * max(len(c) for c in class_names) + 12
    size = margin + n * cell + 4
    im = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.text((4, 4), "rows: ground truth", fill=(0, 0, 0))
    draw.text((4, 16), "columns: prediction", fill=(0, 0, 0))
    draw.text((4, 28), "cells: % of the row", fill=(0, 0, 0))
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 3), class_names[i], fill=(0, 0, 0))
        label = Image.new("RGB", (margin, cell), (255, 255, 255))
        ImageDraw.Draw(label).text((4, cell // 3), class_names[i], fill=(0, 0, 0))
        im.paste(label.rotate(90, expand=True), (margin + i * cell, 0))
        for j in range(n):
            v = rows[i, j]
            shade = int(255 * (1 - v))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1,
                   margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            if v >= 0.005:
                draw.text((box[0] + 2, box[1] + cell // 3), f"{100 * v:.0f}",
                          fill=(255, 255, 255) if v > 0.5 else (0, 0, 0))
    return im


def write_reports(out_dir: Path, report: dict, cm: np.ndarray, title: str,
                  class_names: Sequence[str], paper_f1: float | None) -> None:
    """metrics.json, metrics.md and confusion.png, each written atomically."""
    def atomic(name: str, write) -> None:
        atomic_write(out_dir / name, write)

    atomic("metrics.json", lambda p: p.write_text(json.dumps(
        {**report, "confusion_matrix": cm.tolist()}, indent=2) + "\n"))
    atomic("metrics.md", lambda p: p.write_text(paper_table(report, title, paper_f1)))
    atomic("confusion.png", lambda p: confusion_png(cm, class_names).save(p, format="PNG"))


def scoring(model_classes: LabelSet, data_labels: LabelSet, mapping_file: str | None,
            ) -> tuple[LabelMapping | None, LabelMapping | None, tuple[str, ...]]:
    """(labels mapping, predictions mapping, the classes scored) for a model on data: both
    None when the classes agree; otherwise ``mapping_file`` read in whichever direction fits
    (its "to" set is the labels' or the model's), or ``LabelError`` saying what to pass."""
    if mapping_file is None:
        if tuple(model_classes.classes) != tuple(data_labels.classes):
            raise LabelError("its classes differ from the labels' ("
                             f"{', '.join(model_classes.classes)} vs "
                             f"{', '.join(data_labels.classes)}); evaluate through a label "
                             "mapping: --mapping FILE (see segface_jax/labels.py)")
        return None, None, model_classes.classes
    errors = []
    for source, target, kind in ((model_classes, data_labels, "predictions"),
                                 (data_labels, model_classes, "labels")):
        try:
            m = read_mapping(mapping_file, source)
        except LabelError as e:
            errors.append(str(e))
            continue
        if m.target.classes == target.classes:
            return (None, m, target.classes) if kind == "predictions" else (m, None,
                                                                            target.classes)
        errors.append(f"{mapping_file}: its \"to\" classes are neither the model's nor the "
                      "labels'")
    raise LabelError(errors[-1] if len(set(errors)) == 1 else "; ".join(dict.fromkeys(errors)))


def _open_split(args):
    """The split ``eval`` reads: a TFDS build (``--data-dir``) or the dataset folder."""
    from segface_jax.train import data

    if args.data_dir:
        from segface_jax.train.tfds_builders import TFDSSource

        return TFDSSource(args.dataset, args.data_dir, args.split)
    if not args.root:
        raise data.DataError("pass --root (the dataset folder) or --data-dir (built TFDS)")
    return data.open_source(args.dataset, args.root, args.split)


def run_eval(args) -> int:
    """The ``eval`` command."""
    from segface_jax import hub
    from segface_jax.train import data

    v, weights = hub.named_model(args.variant, args.weights, args.revision)
    out = Path(args.out or f"eval-{v.name}-{args.split}")
    # a built-in dataset's classes are known without reading anything; a generic-layout
    # dataset's come with its files
    source = _open_split(args) if args.dataset == "folder" else None
    data_set = DATASETS[args.dataset] if source is None else data.source_dataset(source)
    try:  # before anything is created
        labels_map, preds_map, classes = scoring(v.data.labels, data_set.labels, args.mapping)
    except LabelError as e:
        raise data.DataError(f"{v.name} was trained on {v.dataset} ({v.data.title}), not "
                             f"{args.dataset} ({data_set.title}): {e}") from None
    if jax.process_index() == 0:
        ensure_writable(out, "--out")
    if source is None:
        source = _open_split(args)
    if len(source) == 0:
        raise data.DataError(f"the {args.split} split of {args.dataset} is empty")
    model = hub.load_weights(weights or hub.resolve(v, args.weights, args.revision), args.dtype)
    cm, images, seconds = evaluate(model, source, data_set, args.batch_size, args.workers,
                                   progress=not args.quiet, mapping=labels_map,
                                   predictions=preds_map)
    merged = v.data.merged_f1 if preds_map is None else data_set.merged_f1
    report = {"variant": v.name, "dataset": args.dataset, "split": args.split,
              "images": images, "seconds": round(seconds, 2),
              "weights_sha256": model.metadata.get("source", {}).get("sha256"),
              **({"mapping": str(args.mapping)} if args.mapping else {}),
              **metrics.summarize(cm, classes, merged)}
    paper_f1 = v.mean_f1 if labels_map is None and preds_map is None else None
    if jax.process_index() == 0:
        mean = "n/a" if report["mean_f1"] is None else f"{report['mean_f1']:.2f}"
        paper = f" (paper: {paper_f1:.2f})" if paper_f1 is not None else ""
        print(f"{v.name} on {args.dataset} {args.split}: {images} images, mean F1 {mean}"
              f"{paper}, mIoU {report['miou']:.2f}, pixel accuracy "
              f"{report['pixel_accuracy']:.2f}; {images / max(seconds, 1e-9):.2f} img/s")
        print("F1 per class: " + ", ".join(
            f"{name} {'-' if f1 is None else f'{f1:.1f}'}" for name, f1 in report["f1"].items()))
        try:  # the metrics are printed above whatever happens here
            write_reports(out, report, cm, v.name, classes, paper_f1)
        except OSError as e:
            print(f"segface-jax eval: error: cannot write the reports to {out}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return 1
        print(f"reports in {out}")
    return 0
