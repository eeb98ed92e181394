"""grain input pipelines over a raw-folder or TFDS source: shuffled, sharded, resumable.

Training: ``GlobalOrder`` decides which record fills each row of each global batch from the
step alone (a seeded permutation per epoch); every process decodes and augments its own rows
(in ``worker_count`` processes), so the data depend on neither the process count nor the
worker count, and the checkpointed position is the global step: a resumed run continues with
the same batches on any number of processes. Evaluation: each record exactly once, in order, in
batches padded to a fixed size (padding labels are 255, ignored by the metrics), with the same
number of batches on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from segface_jax.datasets import Dataset, get_dataset
from segface_jax.labels import LabelMapping
from segface_jax.train import data


# How far grain reads ahead of the consumer. Its default (16 threads, 500 elements) decodes
# hundreds of batches ahead into host memory, and its threads hold the GIL against the training
# loop all the while. Side by side in one run (`python bench/read_ahead.py`, 2-core AMD EPYC,
# AVX2, 2026-11-30), a tiny MobileNetV3 training run of 8 steps took 65.3 s with the default and
# 35.8 s with this, 1.82x faster (medians of 2 runs each, alternating); in single runs its step
# traced in 22 s against 5.6 s, and its first Orbax save took 15.6 s against 1.6 s. So the
# threads are the cores this process may use (2 to 16) and the buffer holds as many elements
# as there are threads: every thread decodes at once when the consumer is fast, and all of
# them rest when it is slow.
def _read_threads() -> int:
    """grain's reading threads: the cores this process may use, from 2 to 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, min(16, cores))


_READ_THREADS = _read_threads()


def _read_ahead(elements: int) -> grain.ReadOptions:
    """grain's read options: ``elements`` decoded ahead by ``_READ_THREADS`` threads."""
    return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=elements)


@dataclasses.dataclass(frozen=True)
class Prepare(grain.transforms.Map):
    """Raw record -> model example without randomness (evaluation, and CelebA/Helen training)."""

    dataset: Dataset
    resolution: int
    mapping: LabelMapping | None = None  # labels into another label set

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return data.prepare(record, self.dataset, self.resolution, mapping=self.mapping)


def _flags_parsed() -> None:
    # grain's worker processes read absl flags; a program that never ran absl.app (a script,
    # a notebook, pytest) has to declare them parsed, with their defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(shard_index: int | None, shard_count: int | None, drop_remainder: bool):
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    return grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=drop_remainder)


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
    """Which record fills each row of each global batch: a function of the step alone.

    Epoch e is the records in the permutation seeded by (seed, e), cut into
    ``steps_per_epoch`` global batches of ``global_batch`` rows (the remainder is dropped, as
    upstream's loader drops the last partial batch). Process p of P reads rows
    ``[p * b, (p + 1) * b)`` of every global batch, b = global_batch / P, so the global batch
    (processes' rows in process order) and its augmentation (seeded by the global position)
    are the same whatever the number of processes or workers: a run can resume from any step
    on another number of processes.
    """

    num_records: int
    global_batch: int
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        return self.num_records // self.global_batch

    def record(self, position: int) -> int:
        """The record at global position ``step * global_batch + row``."""
        step, row = divmod(position, self.global_batch)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        return int(self._permutation(epoch)[step_in_epoch * self.global_batch + row])

    def _permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.num_records, self.seed, epoch)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """Local element k of process p -> its model example (grain maps it, in worker processes)."""

    source: Any
    order: GlobalOrder
    dataset: Dataset
    resolution: int
    rows: int  # this process's rows per global batch
    process_index: int
    augment: bool
    mapping: LabelMapping | None = None

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        step, row = divmod(int(k), self.rows)
        position = step * self.order.global_batch + self.process_index * self.rows + row
        record = self.source[self.order.record(position)]
        rng = (np.random.default_rng([self.order.seed, position])
               if self.augment and self.dataset.affine_augment else None)
        return data.prepare(record, self.dataset, self.resolution, rng, self.mapping)


class TrainBatches:
    """This process's rows of every global batch, from a step on; its state is that step."""

    def __init__(self, example: _TrainExample, worker_count: int, step: int = 0):
        self._example, self._workers = example, worker_count
        self.set_state(json.dumps({"step": step}).encode())

    def _iterator(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        b = self._example.rows
        ds = grain.MapDataset.range(step * b, _MAX_STEPS * b).map(self._example)
        ds = ds.batch(b, drop_remainder=True).to_iter_dataset(_read_ahead(_READ_THREADS))
        if self._workers:
            _flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        return iter(ds)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> bytes:
        """The position: the global step whose batch comes next."""
        return json.dumps({"step": self.step}).encode()

    def set_state(self, state: bytes) -> None:
        """Continue from the global step ``state`` names."""
        try:
            step = json.loads(state)["step"]
        except (ValueError, KeyError, TypeError):
            raise data.DataError("the checkpoint's data position is not a segface-jax global "
                                 "step (written by an older version?)") from None
        self.step = int(step)
        self._it = self._iterator(self.step)


_MAX_STEPS = 1 << 40  # an endless stream: training stops at its own step count


def train_loader(source, dataset: Dataset | str, resolution: int, global_batch: int, *,
                 seed: int = 0, worker_count: int = 0, process_index: int | None = None,
                 process_count: int | None = None, augment: bool = True,
                 mapping: LabelMapping | None = None) -> TrainBatches:
    """This process's rows of each global batch in ``GlobalOrder``, augmented, decoded in
    ``worker_count`` processes (the batches are the same for any worker count); ``mapping``
    turns the labels into another label set."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                         "processes")
    order = GlobalOrder(len(source), global_batch, seed)
    if order.steps_per_epoch == 0:
        raise ValueError(f"{len(source)} records cannot fill one global batch of "
                         f"{global_batch}")
    rows = global_batch // process_count
    return TrainBatches(_TrainExample(source, order, get_dataset(dataset), resolution, rows,
                                      process_index, augment, mapping), worker_count)


def eval_batches(source, dataset: Dataset | str, resolution: int, batch_size: int, *,
                 worker_count: int = 0, shard_index: int | None = None,
                 shard_count: int | None = None, mapping: LabelMapping | None = None,
                 ) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of batches, iterator): this process's records once each, padded batches.

    Every process gets the same number of batches (``ceil(ceil(N / P) / B)``); padding rows
    have zero images, label 255 and ``valid`` False.
    """
    sharding = _shard(shard_index, shard_count, False)
    _flags_parsed()
    # Records i, i + P, i + 2P, ... for process i: shards differ by at most one record. (grain's
    # own sharding floors N / P, which would skip the remainder: wrong for an evaluation.)
    mine = Subset(source, range(sharding.shard_index, len(source), sharding.shard_count))
    steps = math.ceil(math.ceil(len(source) / sharding.shard_count) / batch_size)
    sampler = grain.samplers.IndexSampler(num_records=len(mine), shuffle=False, num_epochs=1)
    loader = grain.DataLoader(
        data_source=mine, sampler=sampler, worker_count=worker_count,
        read_options=_read_ahead(max(_READ_THREADS, 2 * batch_size)),  # records
        operations=[Prepare(get_dataset(dataset), resolution, mapping),
                    grain.transforms.Batch(batch_size, drop_remainder=False)])

    def padded() -> Iterator[dict[str, np.ndarray]]:
        done = 0
        for batch in loader:
            yield _pad(batch, batch_size, resolution)
            done += 1
        if worker_count:
            # The workers' batches live in shared memory, which each array unlinks when it is
            # freed; grain's iterator keeps them in a reference cycle, so without a collection
            # here they would be freed only at interpreter exit, too late to unlink (and
            # Python's resource tracker would warn of leaked shared_memory objects).
            batch = None  # noqa: F841  (the last batch: drop it before collecting)
            gc.collect()
            await_shared_memory_release()
        for _ in range(steps - done):
            yield _pad(None, batch_size, resolution)

    return steps, padded()


def await_shared_memory_release() -> None:
    """Wait until every freed shared-memory batch of grain's workers is unlinked.

    grain's multiprocess prefetch frees a batch's shared memory on a background thread (one
    thread, tasks in order); a process that exits before that thread is done leaves the blocks
    in /dev/shm (and Python's resource tracker warns of leaked shared_memory objects). A no-op
    queued behind those deletions returns when they are all done.
    """
    from grain._src.python.ipc import shared_memory_array

    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        pool.apply(int)


@dataclasses.dataclass(frozen=True)
class Subset:
    """The records of ``source`` at ``indices``, as a random-access source."""

    source: Any
    indices: range

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.source[self.indices[i]]


def _pad(batch: dict[str, np.ndarray] | None, size: int, r: int) -> dict[str, np.ndarray]:
    n = 0 if batch is None else len(batch["image"])
    out = {"image": np.zeros((size, r, r, 3), np.uint8),
           "label": np.full((size, r, r), 255, np.uint8),
           "landmarks": np.zeros((size, 5, 2), np.float32),
           "valid": np.arange(size) < n}
    if batch is not None:
        for key in ("image", "label", "landmarks"):
            out[key][:n] = batch[key]
    # padding rows get the standard landmarks so the alignment's fit stays well-posed
    from segface_jax.align import standard_landmarks

    out["landmarks"][n:] = standard_landmarks(r)
    return out
