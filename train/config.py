"""A training recipe: the ``TrainConfig`` a config file returns, and its loading.

``load_config`` runs the file's ``get_config()``, applies ``--set key=value`` overrides and
checks the result, so a bad value stops the run before anything is built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training recipe, as a config file's ``get_config()`` returns it.

    The fields without a default are the recipe itself: a config file states each of them
    (``configs/segface.py`` holds upstream's). The rest say where data and outputs are and how
    the run uses the machine.
    """

    # -- the recipe --------------------------------------------------------------------------
    variant: str  # the released variant: backbone, dataset, classes, resolution
    epochs: int
    global_batch: int  # images per step, over all devices and processes
    dice_group: int | None  # images per Dice loss (upstream: one GPU's batch); None: all
    lr: float  # AdamW's peak learning rate
    weight_decay: float  # AdamW's decoupled decay, on every parameter
    milestones: tuple[int, ...]  # MultiStepLR: epochs at which the learning rate x gamma
    gamma: float
    init: str  # imagenet (convert-backbone dir) | segface (converted checkpoint) | scratch
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8

    # -- data, initialisation, outputs -------------------------------------------------------
    data_root: str | None = None  # the dataset folder in its release layout
    tfds_dir: str | None = None  # or a `segface-jax data build` directory
    dataset: str | None = None  # None: the variant's; "folder": the generic layout (images/,
    #                             masks/, classes.json); the model learns the data's classes
    label_map: str | None = None  # a mapping JSON (segface_jax/labels.py): the model learns
    #                               its target classes, the data's labels mapped into them
    init_path: str | None = None
    seed: int = 0
    workers: int = 4  # grain worker processes per host
    log_every: int = 20
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    eval_every_epochs: int = 1
    max_steps: int | None = None  # stop early (tests, smoke runs)

    # -- the machine -------------------------------------------------------------------------
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    remat: str = "none"  # recompute in the backward pass: none | block (each encoder block)
    #                      | encoder (the whole encoder)
    accum_steps: int = 1  # micro-batches per step (gradient accumulation; whole Dice groups)
    freeze: str = "none"  # parts left as loaded: none | encoder | encoder+fusion
    peak_tflops: float | None = None  # per-device peak for MFU (default: train/perf.py's table)

    # -- small models and inputs (tests, smoke runs) -----------------------------------------
    encoder_overrides: tuple[tuple[str, Any], ...] = ()  # e.g. (("embed_dim", 16),)
    resolution: int | None = None  # None: the variant's

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``; strings from the command line are read as JSON when they
        parse (numbers, true/false, null, lists) and kept as text otherwise (paths)."""
        names = {f.name for f in dataclasses.fields(self)}
        parsed = {}
        for key, value in changes.items():
            if key not in names:
                known = ", ".join(sorted(names))
                raise ValueError(f"unknown config field {key!r}; fields: {known}")
            if isinstance(value, str) and not isinstance(getattr(self, key), str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            if isinstance(value, list):
                value = tuple(tuple(x) if isinstance(x, list) else x for x in value)
            parsed[key] = value
        return dataclasses.replace(self, **parsed)


class TrainingError(Exception):
    """A run that cannot start or continue; the message says why and what to do."""


def load_config(path: str | os.PathLike, overrides: list[str]) -> TrainConfig:
    """``get_config()`` of a config file (``FILE.py:ARG`` calls ``get_config("ARG")``), with
    ``key=value`` overrides applied and checked."""
    path, arg = Path(path), None  # a local Python file, imported
    if not path.is_file() and ":" in str(path):
        head, arg = str(path).rsplit(":", 1)
        path = Path(head)
    if not path.is_file():
        raise TrainingError(f"{path}: no such config file (see configs/)")
    spec = importlib.util.spec_from_file_location(f"segface_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        cfg = module.get_config() if arg is None else module.get_config(arg)
    except TypeError as e:  # the file takes no argument, or needs one
        raise TrainingError(f"{path}: get_config: {e}") from None
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise TrainingError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        changes[key.strip()] = value.strip()
    try:
        cfg = cfg.replace(**changes)
    except (ValueError, TypeError) as e:
        raise TrainingError(f"{path}: {e}") from None
    check_config(cfg, jax.device_count())
    return cfg


def check_config(cfg: TrainConfig, device_count: int) -> None:
    """Raise ``TrainingError`` naming the first value ``cfg`` cannot train with on
    ``device_count`` devices (batch splits, Dice groups, remat, accumulation)."""
    from segface_jax.models.layers import REMAT_POLICIES
    from segface_jax.train.optim import FREEZE

    if cfg.remat not in REMAT_POLICIES:
        raise TrainingError(f"remat must be one of {', '.join(REMAT_POLICIES)}, not "
                            f"{cfg.remat!r}")
    if cfg.freeze not in FREEZE:
        raise TrainingError(f"freeze must be one of {', '.join(FREEZE)}, not {cfg.freeze!r}")
    if not isinstance(cfg.accum_steps, int) or cfg.accum_steps < 1:
        raise TrainingError(f"accum_steps must be a whole number >= 1, not {cfg.accum_steps!r}")
    if cfg.global_batch % (cfg.accum_steps * device_count):
        raise TrainingError(f"global_batch {cfg.global_batch} must be a multiple of accum_steps "
                            f"{cfg.accum_steps} x {device_count} devices")
    if cfg.dice_group and cfg.global_batch % cfg.dice_group:
        raise TrainingError(f"dice_group {cfg.dice_group} must divide global_batch "
                            f"{cfg.global_batch}")
    if cfg.accum_steps > 1 and (not cfg.dice_group or
                                cfg.global_batch % (cfg.dice_group * cfg.accum_steps)):
        raise TrainingError(f"accum_steps {cfg.accum_steps} splits global_batch "
                            f"{cfg.global_batch} into micro-batches of whole Dice groups: "
                            f"it needs dice_group set and global_batch a multiple of "
                            f"dice_group x accum_steps")
