"""A training run's Orbax checkpoints: the last K by step and the best by validation mean F1.

A checkpoint in ``<workdir>/checkpoints/<step>`` holds the train state (parameters, BatchNorm
statistics, optimizer state, step, seed) and every process's data position (the global step
its next batch belongs to: the same on every process, and valid for any process count).
``<workdir>/best`` keeps the state with the best validation mean F1. Paths are
``etils.epath`` paths, as Orbax's own, so the work directory may be on ``gs://``.
"""

from __future__ import annotations

import base64
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from segface_jax.train.config import TrainingError

# Replica-parallel saving splits every replicated array over its replicas, one slicing program
# per shape: hundreds of compilations on the first save (36 s for a small Swin on 8 CPU
# devices). Worth it only for arrays large enough that writing 1/R of them saves time.
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


def _array_handler() -> None:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)


class RunCheckpoints:
    """The checkpoint managers of one work directory; use as a context manager."""

    def __init__(self, workdir: epath.Path, keep: int) -> None:
        _array_handler()
        self.directory = workdir / "checkpoints"
        self._latest = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))
        self._best = ocp.CheckpointManager(workdir / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["mean_f1"], best_mode="max", create=True,
            enable_async_checkpointing=False))

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self._latest.close()
        self._best.close()

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint, or None in a fresh work directory."""
        return self._latest.latest_step()

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """(train state shaped and placed like ``like``, the data position) of checkpoint
        ``step``. Any number of processes can resume it: the state is replicated and the data
        position is the global step, the same for every process that wrote it."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        positions = {base64.b64decode(p) for p in restored["data"]["iterators"]}
        if len(positions) != 1:
            raise TrainingError(f"checkpoint step {step}: its processes recorded different "
                                "data positions; it was not written by this version")
        return restored["state"], positions.pop()

    def save(self, step: int, state: dict[str, Any], position: bytes, epoch: int) -> None:
        """Write checkpoint ``step``: ``state`` and every process's ``position`` (a collective:
        every process calls it)."""
        positions = [base64.b64encode(p).decode() for p in _gather_bytes(position)]
        self._latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterators": positions, "epoch": epoch})), force=True)
        self._latest.wait_until_finished()

    def save_best(self, step: int, state: dict[str, Any], mean_f1: float) -> None:
        """Keep ``state`` in ``best/`` if ``mean_f1`` beats the stored one."""
        self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                        metrics={"mean_f1": mean_f1}, force=True)
        self._best.wait_until_finished()


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
