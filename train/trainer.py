"""``segface-jax train``: upstream's recipe as a sharded jit loop that survives interruption.

One process per host (``jax.distributed.initialize`` when ``--num-processes`` > 1), a
``("data",)`` mesh over every device, each process feeding its shard of the global batch.
Orbax ``CheckpointManager`` keeps the last K checkpoints (parameters, optimizer state, step,
the stochastic-depth random stream, the data iterator's position) and the best one by
validation mean F1; ``--resume`` continues exactly where the last checkpoint left off.
Metrics go to ``metrics.jsonl`` and TensorBoard event files in the work directory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.variants import get_variant


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training recipe (``configs/<variant>.py`` returns one)."""

    variant: str
    data_root: str | None = None  # the dataset folder in its release layout
    tfds_dir: str | None = None  # or a `segface-jax data build` directory
    epochs: int = 300
    global_batch: int = 32  # upstream: 4 per GPU on 8 GPUs
    dice_group: int | None = 4  # upstream's per-GPU Dice
    lr: float = 1e-4
    weight_decay: float = 1e-5
    milestones: tuple[int, ...] = (80, 200)
    gamma: float = 0.1
    seed: int = 0
    workers: int = 4
    init: str = "imagenet"  # imagenet (convert-backbone dir) | segface (converted) | scratch
    init_path: str | None = None
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    log_every: int = 20
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    eval_every_epochs: int = 1
    max_steps: int | None = None  # stop early (tests, smoke runs)
    encoder_overrides: tuple[tuple[str, Any], ...] = ()  # tiny test models

    resolution: int | None = None  # None: the variant's (tests use small inputs)

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
    """``get_config()`` of a config file, with ``key=value`` overrides applied."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such config file (see configs/)")
    spec = importlib.util.spec_from_file_location(f"segface_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise TrainingError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        changes[key.strip()] = value.strip()
    try:
        return cfg.replace(**changes)
    except (ValueError, TypeError) as e:
        raise TrainingError(f"{path}: {e}") from None


def build_model(cfg: TrainConfig) -> SegFace:
    """The SegFace network of ``cfg`` with its initial weights (ImageNet, SegFace or random)."""
    from flax import nnx

    from segface_jax.checkpoint import abstract_model, fill_module, flat_state, restore_params

    v = get_variant(cfg.variant)
    seg_cfg = SegFaceConfig.from_variant(v)
    if cfg.encoder_overrides:
        enc = dataclasses.replace(seg_cfg.make_encoder_config(), **dict(cfg.encoder_overrides))
        seg_cfg = dataclasses.replace(seg_cfg, encoder_config=enc)
    dtype = None if cfg.dtype == "float32" else cfg.dtype
    model = SegFace(seg_cfg, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    if cfg.init == "scratch":
        return model
    if not cfg.init_path:
        raise TrainingError(f"init={cfg.init} needs init_path (a `segface-jax convert-backbone` "
                            "or `convert` output directory); or use init=scratch")
    if cfg.init == "segface":
        restored = restore_params(cfg.init_path, abstract_model(seg_cfg, dtype))
        return nnx.merge(*nnx.split(restored))
    if cfg.init == "imagenet":
        encoder = restore_params(cfg.init_path, nnx.eval_shape(lambda: model.backbone))
        arrays = {f"backbone.{k}": v for k, v in flat_state(encoder).items()}
        arrays.update({k: v for k, v in flat_state(model).items() if not k.startswith("backbone.")})
        return fill_module(model, arrays)
    raise TrainingError(f"init must be imagenet, segface or scratch, not {cfg.init!r}")


def _loss_curve_png(path: Path, steps: list[int], losses: list[float]) -> None:
    from PIL import Image, ImageDraw

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
    d.text((m, h - m + 8), f"step {steps[0] if steps else 0}", fill=(0, 0, 0))
    d.text((w - 90, h - m + 8), f"step {steps[-1] if steps else 0}", fill=(0, 0, 0))
    im.save(path)


def train(cfg: TrainConfig, workdir: str | os.PathLike, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. Raises ``TrainingError`` on NaN loss."""
    import grain  # noqa: F401  (the train extra)
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    from segface_jax.train import data, optim, pipeline, step
    from segface_jax.train.evaluate import data_mesh

    workdir = Path(workdir).absolute()
    v = get_variant(cfg.variant)
    n_proc = jax.process_count()
    if cfg.global_batch % jax.device_count():
        raise TrainingError(f"global_batch {cfg.global_batch} must be a multiple of the "
                            f"{jax.device_count()} devices")
    if cfg.dice_group and cfg.global_batch % cfg.dice_group:
        raise TrainingError(f"dice_group {cfg.dice_group} must divide global_batch "
                            f"{cfg.global_batch}")
    if cfg.tfds_dir:
        from segface_jax.train.tfds_builders import TFDSSource

        source = TFDSSource(v.dataset, cfg.tfds_dir, "train")
    elif cfg.data_root:
        source = data.open_source(v.dataset, cfg.data_root, "train")
    else:
        raise TrainingError("set data_root (dataset folder) or tfds_dir in the config or with "
                            "--set data_root=DIR")
    steps_per_epoch = len(source) // cfg.global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(source)} training images cannot fill one global batch of "
                            f"{cfg.global_batch}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    mesh = data_mesh()
    schedule = optim.multistep_schedule(cfg.lr, cfg.milestones, cfg.gamma, steps_per_epoch)
    tx = optim.adamw(schedule, cfg.weight_decay)
    model = build_model(cfg)
    graphdef, state = step.init_state(model, tx, cfg.seed)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    train_step = step.make_train_step(graphdef, tx, mesh, dice_group=cfg.dice_group,
                                      needs_landmarks=v.needs_landmarks, lr_schedule=schedule)
    resolution = cfg.resolution or v.resolution
    loader = pipeline.train_loader(source, v.dataset, resolution, cfg.global_batch // n_proc,
                                   seed=cfg.seed, worker_count=cfg.workers)
    it = iter(loader)

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    best = ocp.CheckpointManager(workdir / "best", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["mean_f1"], best_mode="max", create=True,
        enable_async_checkpointing=False))
    start = 0
    if resume and manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        state = jax.device_put(restored["state"], replicated)
        states = restored["data"]["iterators"]
        if len(states) != n_proc:
            raise TrainingError(f"checkpoint step {start} was written by {len(states)} "
                                f"process(es); resume it with as many (now {n_proc})")
        it.set_state(base64.b64decode(states[jax.process_index()]))
        print(f"resumed from step {start} ({workdir / 'checkpoints'})")
    elif resume:
        print(f"nothing to resume in {workdir / 'checkpoints'}; starting from step 0")
    elif manager.latest_step() is not None:
        raise TrainingError(f"{workdir} already has checkpoints (step "
                            f"{manager.latest_step()}); pass --resume or another --workdir")

    def save(step_no: int) -> None:
        # every process's iterator position (each reads its own shard), gathered to all
        iterators = [base64.b64encode(s).decode() for s in _gather_bytes(it.get_state())]
        manager.save(step_no, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterators": iterators,
                                    "epoch": step_no // steps_per_epoch})), force=True)
        manager.wait_until_finished()

    writer = None
    jsonl = None
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        jsonl = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(str(workdir / "tensorboard"))
        except ModuleNotFoundError:
            print("tensorboardX not installed: metrics go to metrics.jsonl only")

    def log(record: dict) -> None:
        if jsonl is not None:
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
        if writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, int | float):
                    writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    batch_sharding = NamedSharding(mesh, P("data"))
    bar = tqdm(total=total_steps, initial=start, unit="step", desc=f"train {v.name}",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    curve_steps, curve_losses = [], []
    last_saved = start
    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM saves like Ctrl-C
    t0, images = time.perf_counter(), 0
    step_no = start
    metrics: dict = {"loss": 0.0}
    try:
        while step_no < total_steps:
            local = next(it)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
                     for k in ("image", "label", "landmarks")}
            state, metrics = train_step(state, batch)
            step_no += 1
            images += cfg.global_batch
            bar.update(1)
            want_log = step_no % cfg.log_every == 0 or step_no == total_steps
            want_save = step_no % cfg.checkpoint_every == 0 or step_no == total_steps
            if want_log or want_save:
                host = {k: float(x) for k, x in metrics.items()}
                if not all(math.isfinite(x) for x in host.values()):
                    raise TrainingError(
                        f"loss became {host['loss']} at step {step_no}; stopped. The last good "
                        f"checkpoint is step {last_saved} in {workdir / 'checkpoints'} (resume "
                        "with --resume, perhaps with a lower lr)")
                rate = images / (time.perf_counter() - t0)
                log({"kind": "train", "step": step_no, "epoch": step_no / steps_per_epoch,
                     **host, "images_per_s": rate})
                curve_steps.append(step_no)
                curve_losses.append(host["loss"])
                bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host.get('lr', 0):.1e}")
            if want_save:
                save(step_no)
                last_saved = step_no
            if cfg.eval_every_epochs and step_no % (cfg.eval_every_epochs * steps_per_epoch) \
                    == 0 and _has_val(v.dataset, cfg):
                mean_f1 = _validate(cfg, graphdef, state, v)
                log({"kind": "val", "step": step_no, "mean_f1": mean_f1})
                best.save(step_no, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state)),
                    metrics={"mean_f1": mean_f1}, force=True)
                best.wait_until_finished()
    except KeyboardInterrupt:
        interrupted = True
        try:  # the state of the last completed step (an interrupted call leaves the previous)
            done = int(state["step"])
            if done > last_saved and math.isfinite(float(metrics["loss"])):
                save(done)
                last_saved = done
        except Exception as e:  # noqa: BLE001 - e.g. arrays donated to an interrupted call
            print(f"\ncould not save at the interruption ({type(e).__name__})", file=sys.stderr)
        print(f"\ninterrupted: checkpoint saved at step {last_saved}; continue with --resume",
              file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        manager.close()
        best.close()
        if writer is not None:
            writer.close()
        if jsonl is not None:
            jsonl.close()
            if curve_steps:
                _loss_curve_png(workdir / "loss_curve.png", curve_steps, curve_losses)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state["params"]):
        digest.update(np.asarray(jax.device_get(leaf)).tobytes())
    return {"step": step_no, "interrupted": interrupted, "last_checkpoint": last_saved,
            "model": nnx.merge(graphdef, state["params"], state["rest"]),
            "digest": digest.hexdigest()[:16]}


def _gather_bytes(blob: bytes, size: int = 1 << 16) -> list[bytes]:
    """``blob`` of every process, in process order (one collective)."""
    if jax.process_count() == 1:
        return [blob]
    from jax.experimental import multihost_utils

    if len(blob) + 4 > size:
        raise TrainingError(f"data iterator state of {len(blob)} bytes exceeds {size - 4}")
    buf = np.zeros(size, np.uint8)
    buf[:4] = np.frombuffer(np.uint32(len(blob)).tobytes(), np.uint8)
    buf[4:4 + len(blob)] = np.frombuffer(blob, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [row[4:4 + int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])].tobytes()
            for row in rows]


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _has_val(dataset: str, cfg: TrainConfig) -> bool:
    # CelebAMask-HQ and LaPa have a val split; upstream validates Helen on its test split
    from segface_jax.train import data

    if not cfg.data_root:
        return False
    try:
        return len(data.open_source(dataset, cfg.data_root, _val_split(dataset))) > 0
    except data.DataError:
        return False


def _val_split(dataset: str) -> str:
    return "test" if dataset == "helen" else "val"


def _validate(cfg: TrainConfig, graphdef, state, v) -> float:
    from flax import nnx

    from segface_jax.checkpoint import LoadedModel
    from segface_jax.models.layers import set_training
    from segface_jax.train import data, metrics
    from segface_jax.train.evaluate import evaluate

    module = nnx.merge(graphdef, state["params"], state["rest"])
    set_training(module, False)
    model = LoadedModel(v, module, {})
    source = data.open_source(v.dataset, cfg.data_root, _val_split(v.dataset))
    cm, _, _ = evaluate(model, source, v.dataset, cfg.global_batch, 0, progress=False,
                        resolution=cfg.resolution)
    report = metrics.summarize(cm, v.classes, helen=v.dataset == "helen")
    return float(report["mean_f1"] or 0.0)


def run_train(args) -> int:
    """The ``train`` command."""
    if args.num_processes and args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    cfg = load_config(args.config, args.set or [])
    workdir = args.workdir or f"runs/{cfg.variant}"
    summary = train(cfg, workdir, resume=args.resume, progress=not args.quiet)
    print(f"process {jax.process_index()}: parameter digest {summary['digest']}")
    if jax.process_index() == 0:
        state = "interrupted" if summary["interrupted"] else "finished"
        print(f"{state} at step {summary['step']}; checkpoints in {Path(workdir) / 'checkpoints'}"
              f", metrics in {Path(workdir) / 'metrics.jsonl'}")
    return 130 if summary["interrupted"] else 0
