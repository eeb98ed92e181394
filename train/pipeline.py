"""grain input pipelines over a raw-folder or TFDS source: shuffled, sharded, resumable.

Training: every process reads its own shard (``jax.process_index()`` of
``jax.process_count()``), shuffles it with a seed (a new order each epoch), decodes and
augments in ``worker_count`` processes, and batches; the iterator's state (a few bytes) goes
into the checkpoint so a resumed run continues with the same batches. Evaluation: each record
exactly once, in order, in batches padded to a fixed size (padding labels are 255, ignored by
the metrics), with the same number of batches on every process.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from segface_jax.datasets import DATASETS
from segface_jax.train import data


@dataclasses.dataclass(frozen=True)
class Prepare(grain.transforms.Map):
    """Raw record -> model example without randomness (evaluation, and CelebA/Helen training)."""

    dataset: str
    resolution: int

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return data.prepare(record, self.dataset, self.resolution)


@dataclasses.dataclass(frozen=True)
class PrepareAugmented(grain.transforms.RandomMap):
    """Raw record -> model example with upstream's training augmentation (LaPa's affine)."""

    dataset: str
    resolution: int

    def random_map(self, record: dict[str, Any], rng: np.random.Generator):
        return data.prepare(record, self.dataset, self.resolution, rng)


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


def train_loader(source, dataset: str, resolution: int, batch_size: int, *, seed: int = 0,
                 num_epochs: int | None = None, worker_count: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None,
                 augment: bool = True) -> grain.DataLoader:
    """Shuffled, augmented, per-process batches of ``batch_size`` (the remainder dropped)."""
    transform = PrepareAugmented if augment and DATASETS[dataset].affine_augment else Prepare
    _flags_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=_shard(shard_index, shard_count, True),
        shuffle=True, num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(
        data_source=source, sampler=sampler, worker_count=worker_count,
        operations=[transform(dataset, resolution),
                    grain.transforms.Batch(batch_size, drop_remainder=True)])


def eval_batches(source, dataset: str, resolution: int, batch_size: int, *,
                 worker_count: int = 0, shard_index: int | None = None,
                 shard_count: int | None = None) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
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
        operations=[Prepare(dataset, resolution),
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
        for _ in range(steps - done):
            yield _pad(None, batch_size, resolution)

    return steps, padded()


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
