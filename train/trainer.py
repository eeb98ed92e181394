"""``segface-jax train``: upstream's recipe as a sharded jit loop that survives interruption.

One process per host (``jax.distributed.initialize`` when ``--num-processes`` > 1), a
``("data",)`` mesh over every device, each process feeding its shard of the global batch, one
batch ahead of the device. The step is compiled once, before the loop; its XLA FLOP count and
the measured step rate give images/s and model FLOPs utilisation. Orbax keeps the last K
checkpoints and the best by validation mean F1 (``checkpointing.py``); ``--resume``
continues exactly where the last checkpoint left off. Metrics go to ``metrics.jsonl``,
TensorBoard and a progress bar (``writer.py``); ``--profile N`` traces N steps.

The pieces: ``config.py`` (the recipe), ``model_init.py`` (initial weights), ``mesh.py`` (the
mesh and the batches' way onto it), ``step.py`` (the jitted step), ``perf.py`` (FLOPs, MFU,
profiling). This module only wires them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from segface_jax.datasets import Dataset
from segface_jax.labels import LabelError, LabelMapping, read_mapping
from segface_jax.train import data, perf
from segface_jax.train.checkpointing import RunCheckpoints
from segface_jax.train.config import TrainConfig, TrainingError, check_config, load_config
from segface_jax.train.mesh import data_mesh, prefetch_to_device
from segface_jax.train.model_init import build_model, model_structure
from segface_jax.train.writer import MetricWriter
from segface_jax.variants import VARIANTS, Variant, get_variant

if TYPE_CHECKING:
    from segface_jax.train.pipeline import TrainBatches

__all__ = ["TrainConfig", "TrainingError", "build_model", "load_config", "run_train", "train"]

_BATCH_KEYS = ("image", "label", "landmarks")


def train(cfg: TrainConfig, workdir: str | os.PathLike, resume: bool = False,
          progress: bool = True, profile_steps: int = 0) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. Raises ``TrainingError`` on NaN loss.

    ``workdir`` (a local path or a URL such as ``gs://bucket/run``) receives checkpoints,
    metrics and, with ``profile_steps`` > 0, a profiler trace of that many steps.
    """
    workdir = epath.Path(workdir)
    workdir = workdir if workdir.is_absolute() else workdir.resolve()

    # ------------------------------------------------------------------ set-up
    run, status = _set_up(cfg, workdir, resume)
    with RunCheckpoints(workdir, cfg.keep_checkpoints) as checkpoints:

        # -------------------------------------------------------------- restore
        _restore(run, status, checkpoints, resume)

        # -------------------------------------------------------------- loop
        interrupted = False
        try:
            with MetricWriter(workdir, total_steps=run.total_steps,
                              initial_step=status.latest.step, desc=f"train {run.variant.name}",
                              progress=progress) as writer, _StopRequest() as stop:
                _loop(run, status, checkpoints, writer, profile_steps, stop)
        except KeyboardInterrupt:
            interrupted = True

        # -------------------------------------------------------------- final save
        _final_save(run, status, checkpoints, interrupted)
    return _summary(run, status, interrupted)


class _Step(NamedTuple):
    """A completed step: its number, the state after it, its metrics (on the device) and the
    data iterator's position after its batch."""

    step: int
    state: dict[str, Any]
    metrics: dict[str, Any]
    position: bytes


@dataclasses.dataclass
class _Status:
    """Where the run stands. ``latest`` is replaced in one assignment per step, so an
    interruption never separates a state from its data position."""

    latest: _Step
    saved: int  # the step of the newest checkpoint (or the start)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the set-up decided: the recipe, the data, the step and where results go."""

    cfg: TrainConfig
    variant: Variant  # the model trained: the recipe's variant, or retrained on other classes
    mapping: LabelMapping | None  # the data's labels -> the model's classes
    workdir: epath.Path
    steps_per_epoch: int
    total_steps: int
    mesh: jax.sharding.Mesh
    graphdef: Any  # nnx.GraphDef of the model
    train_step: Callable  # jit(state, batch) -> (state, metrics)
    batches: TrainBatches  # this process's rows of each global batch; state: the step
    val_source: Any  # the validation split, or None when the run does not validate
    fresh_state: Callable[[], dict[str, Any]]  # the initialised state (a resumed run's is abstract)


def _set_up(cfg: TrainConfig, workdir: epath.Path, resume: bool) -> tuple[_Run, _Status]:
    """Check the recipe against the devices; open the data; build the model, optimizer, state
    (replicated; with ``resume``, its structure only) and the jitted step."""
    from segface_jax.models.layers import set_remat
    from segface_jax.train import optim, pipeline, step

    check_config(cfg, jax.device_count())
    base = get_variant(cfg.variant)
    source = _train_source(cfg, base)
    data_set = data.source_dataset(source)
    v, mapping = _model_variant(cfg, base, data_set, workdir)
    steps_per_epoch = len(source) // cfg.global_batch
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(source)} training images cannot fill one global batch of "
                            f"{cfg.global_batch}")
    mesh = data_mesh()
    schedule = optim.multistep_schedule(cfg.lr, cfg.milestones, cfg.gamma, steps_per_epoch)
    tx = optim.freezing(optim.adamw(schedule, cfg.weight_decay, cfg.adam_b1, cfg.adam_b2,
                                    cfg.adam_eps), cfg.freeze)

    def initial_state(structure_only: bool) -> tuple[Any, dict[str, Any]]:
        # a resumed run restores every weight: its model need only be a structure
        model = model_structure(cfg, v) if structure_only else build_model(cfg, v, mapping)
        set_remat(model, cfg.remat)
        return (step.abstract_state(model, tx, mesh) if structure_only
                else step.init_state(model, tx, cfg.seed, mesh))

    graphdef, state = initial_state(structure_only=resume)
    train_step = step.make_train_step(graphdef, tx, mesh, dice_group=cfg.dice_group,
                                      needs_landmarks=v.needs_landmarks, lr_schedule=schedule,
                                      accum_steps=cfg.accum_steps)
    loader = pipeline.train_loader(source, data_set, v.resolution, cfg.global_batch,
                                   seed=cfg.seed, worker_count=cfg.workers, mapping=mapping)
    run = _Run(cfg, v, mapping, workdir, steps_per_epoch,
               cfg.max_steps or cfg.epochs * steps_per_epoch, mesh, graphdef, train_step, loader,
               _val_source(cfg, data_set), lambda: initial_state(structure_only=False)[1])
    return run, _Status(_Step(0, state, {}, run.batches.get_state()), saved=0)


def _train_source(cfg: TrainConfig, v: Variant):
    """The training split: a TFDS build (``tfds_dir``) or the dataset folder (``data_root``),
    of ``cfg.dataset`` (default: the variant's)."""
    dataset = cfg.dataset or v.dataset
    if cfg.tfds_dir:
        from segface_jax.train.tfds_builders import TFDSSource

        return TFDSSource(dataset, cfg.tfds_dir, "train")
    if cfg.data_root:
        return data.open_source(dataset, cfg.data_root, "train")
    raise TrainingError("set data_root (dataset folder) or tfds_dir in the config or with "
                        "--set data_root=DIR")


def _model_variant(cfg: TrainConfig, base: Variant, data_set: Dataset,
                   workdir: epath.Path) -> tuple[Variant, LabelMapping | None]:
    """(the model the run trains, the label mapping from the data to its classes): ``base``
    itself, or ``base`` retrained on the data's own classes or the mapping's target."""
    mapping, labels = None, data_set.labels
    if cfg.label_map:
        try:
            mapping = read_mapping(cfg.label_map, data_set.labels)
        except LabelError as e:
            raise TrainingError(str(e)) from None
        labels = mapping.target
    model_data = dataclasses.replace(data_set, labels=labels, merged_f1=tuple(
        (region, names) for region, names in data_set.merged_f1
        if all(n in labels.classes for n in names)))
    if (model_data == base.data and not cfg.encoder_overrides
            and cfg.resolution in (None, base.resolution)):
        return base, mapping
    name = workdir.name if workdir.name not in VARIANTS else f"{workdir.name}-retrained"
    return base.retrained(name, model_data, cfg.resolution, cfg.encoder_overrides), mapping


def _val_source(cfg: TrainConfig, data_set: Dataset):
    """The split validation reads (CelebAMask-HQ and LaPa: val; upstream validates Helen on its
    test split), or None when validation is off or the dataset folder has no such split."""
    if not cfg.eval_every_epochs or not cfg.data_root:
        return None
    try:
        source = data.open_source(data_set.name, cfg.data_root, data_set.val_split)
    except data.DataError:
        return None
    return source if len(source) else None


def _restore(run: _Run, status: _Status, checkpoints: RunCheckpoints, resume: bool) -> None:
    """With ``resume``, continue from the latest checkpoint (state and data position); without,
    refuse a work directory that already has checkpoints."""
    latest = checkpoints.latest_step()
    if latest is None:
        if resume:
            print(f"nothing to resume in {checkpoints.directory}; starting from step 0")
            status.latest = status.latest._replace(state=run.fresh_state())
        return
    if not resume:
        raise TrainingError(f"{run.workdir} already has checkpoints (step {latest}); pass "
                            "--resume or another --workdir")
    state, position = checkpoints.restore(latest, status.latest.state)
    run.batches.set_state(position)
    status.latest = _Step(latest, jax.device_put(state, NamedSharding(run.mesh, P())), {},
                          position)
    status.saved = latest
    print(f"resumed from step {latest} ({checkpoints.directory})")


def _loop(run: _Run, status: _Status, checkpoints: RunCheckpoints, writer: MetricWriter,
          profile_steps: int, stop: _StopRequest) -> None:
    """Train to ``total_steps``: log, checkpoint, validate and profile on their schedules."""
    cfg = run.cfg
    if status.latest.step >= run.total_steps:
        return
    batches = prefetch_to_device(run.batches, NamedSharding(run.mesh, P("data")), _BATCH_KEYS)
    first = next(batches)
    # compiled once here and called directly below, so the loop never compiles again
    traced = run.train_step.trace(status.latest.state, first[0])
    lowered = traced.lower()
    compiled = lowered.compile()
    peak = perf.peak_flops(jax.devices()[0].device_kind, cfg.dtype, cfg.peak_tflops)
    # the cost analysis only where MFU can be reported (1.5 s even for a tiny model on a CPU)
    meter = perf.Throughput(cfg.global_batch, perf.step_flops(traced, lowered) if peak else None,
                            peak, status.latest.step)
    val_every = cfg.eval_every_epochs * run.steps_per_epoch
    with perf.ProfileWindow(run.workdir / "profile", profile_steps,
                            status.latest.step) as profile:
        for batch, position in itertools.chain([first], batches):
            status.latest = _Step(status.latest.step + 1,
                                  *compiled(status.latest.state, batch), position)
            step_no = status.latest.step
            writer.advance()
            profile.after_step(step_no, status.latest.state)
            last = step_no == run.total_steps
            if last or step_no % cfg.log_every == 0 or step_no % cfg.checkpoint_every == 0:
                host = _host_metrics(status, checkpoints)  # waits for the step
                writer.write({"kind": "train", "step": step_no,
                              "epoch": step_no / run.steps_per_epoch, **host,
                              **meter.measure(step_no)})
            if step_no % cfg.checkpoint_every == 0 and not last:
                _save(run, status, checkpoints)
                meter.restart(step_no)
            if run.val_source is not None and step_no % val_every == 0:
                report = _validate(run, status.latest.state)
                mean_f1 = float(report["mean_f1"] or 0.0)
                writer.write({"kind": "val", "step": step_no, "mean_f1": mean_f1,
                              "f1": report["f1"]})
                checkpoints.save_best(step_no, status.latest.state, mean_f1)
                meter.restart(step_no)
            if last:
                return
            if stop.requested:  # Ctrl-C or SIGTERM: stop here, between steps
                raise KeyboardInterrupt


def _host_metrics(status: _Status, checkpoints: RunCheckpoints) -> dict[str, float]:
    """The latest step's metrics as floats; ``TrainingError`` if any is NaN or infinite."""
    host = {k: float(x) for k, x in status.latest.metrics.items()}
    if not all(math.isfinite(x) for x in host.values()):
        raise TrainingError(
            f"loss became {host['loss']} at step {status.latest.step}; stopped. The last good "
            f"checkpoint is step {status.saved} in {checkpoints.directory} (resume with "
            "--resume, perhaps with a lower lr)")
    return host


def _save(run: _Run, status: _Status, checkpoints: RunCheckpoints) -> None:
    """Checkpoint the latest step with the data position after its batch."""
    latest = status.latest
    checkpoints.save(latest.step, latest.state, latest.position,
                     latest.step // run.steps_per_epoch)
    status.saved = latest.step


def _validate(run: _Run, state: dict[str, Any]) -> dict[str, Any]:
    """Validation metrics of ``state``'s model (inference mode, upstream's protocol): mean F1
    and the F1 of each of the model's classes."""

    from segface_jax.models.layers import set_training
    from segface_jax.runtime import LoadedModel
    from segface_jax.train import metrics
    from segface_jax.train.evaluate import evaluate

    v = run.variant
    module = _module(run, state)
    set_training(module, False)
    cm, _, _ = evaluate(LoadedModel(v, module, {}), run.val_source,
                        data.source_dataset(run.val_source), run.cfg.global_batch, 0,
                        progress=False, mapping=run.mapping)
    return metrics.summarize(cm, v.classes, v.data.merged_f1)


def _final_save(run: _Run, status: _Status, checkpoints: RunCheckpoints,
                interrupted: bool) -> None:
    """Checkpoint the last completed step unless it is saved; after an interruption only if its
    loss is finite, as far as possible, and saying which step the checkpoint holds."""
    if not interrupted:
        if status.latest.step > status.saved:
            _save(run, status, checkpoints)
        _export_model(run, status.latest)
        return
    try:
        if status.latest.step > status.saved and math.isfinite(
                float(status.latest.metrics["loss"])):
            _save(run, status, checkpoints)
    except Exception as e:  # noqa: BLE001 - e.g. arrays donated to an interrupted call
        print(f"\ncould not save at the interruption ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"\ninterrupted: checkpoint saved at step {status.saved}; continue with --resume",
          file=sys.stderr)


def _module(run: _Run, state: dict[str, Any]):
    """The network with ``state``'s parameters and BatchNorm statistics."""
    from flax import nnx

    return nnx.merge(run.graphdef, state["params"], state["rest"])


def _export_model(run: _Run, latest: _Step) -> None:
    """Write the trained model as a converted checkpoint, ``<workdir>/model``, which
    ``predict``, ``eval`` and ``export`` take as ``--weights`` (its classes come with it)."""

    from segface_jax.checkpoint import flat_state, save_checkpoint

    if jax.process_index() != 0:
        return
    if "://" in str(run.workdir):
        print(f"the trained model stays in {run.workdir / 'checkpoints'} (writing "
              f"{run.workdir / 'model'} needs a local work directory)")
        return
    module = _module(run, latest.state)
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat_state(module).items()}
    v = run.variant
    meta = {"variant": v.name, "trained": {"recipe": run.cfg.variant, "step": latest.step}}
    if not v.released:
        meta["model"] = v.to_json()
    out = save_checkpoint(run.workdir / "model", arrays, meta, overwrite=True, local=True)
    print(f"trained model in {out} (use it as --weights)")


def _summary(run: _Run, status: _Status, interrupted: bool) -> dict[str, Any]:
    """The step reached, the last checkpoint, the trained model and a parameter digest."""

    state = status.latest.state
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state["params"]):
        digest.update(np.asarray(jax.device_get(leaf)).tobytes())
    return {"step": status.latest.step, "interrupted": interrupted,
            "last_checkpoint": status.saved,
            "model": _module(run, state),
            "digest": digest.hexdigest()[:16]}


class _StopRequest:
    """Inside the block, Ctrl-C (SIGINT) and a scheduler's SIGTERM ask the loop to stop after
    the step in progress, which it then saves. The request is a flag the loop reads between
    steps, so it never lands inside a library (where a KeyboardInterrupt raised in a finalizer
    would be swallowed); a second Ctrl-C interrupts at once. Only the main thread can handle
    signals: elsewhere the block changes nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle)
                              for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def run_train(args: argparse.Namespace) -> int:
    """The ``train`` command."""
    if args.num_processes and args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    peak = [f"peak_tflops={args.peak_tflops}"] if args.peak_tflops else []
    cfg = load_config(args.config, [*(args.set or []), *peak])
    workdir = epath.Path(args.workdir or f"runs/{cfg.variant}")
    summary = train(cfg, workdir, resume=args.resume, progress=not args.quiet,
                    profile_steps=args.profile)
    print(f"process {jax.process_index()}: parameter digest {summary['digest']}")
    if jax.process_index() == 0:
        state = "interrupted" if summary["interrupted"] else "finished"
        print(f"{state} at step {summary['step']}; checkpoints in {workdir / 'checkpoints'}, "
              f"metrics in {workdir / 'metrics.jsonl'}")
    return 130 if summary["interrupted"] else 0
