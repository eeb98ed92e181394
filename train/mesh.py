"""The data-parallel mesh and the way batches reach it (training, evaluation, benchmarks).

Every device of every process sits on one ``("data",)`` axis; batches travel from the host as
uint8 and are sharded along it, normalised inside jit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from segface_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D ``("data",)`` mesh over all devices of all processes (automatic sharding: XLA
    propagates the batch sharding through the model)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def normalize_on_device(images: jnp.ndarray) -> jnp.ndarray:
    """(..., 3) uint8 -> float32 ImageNet-normalised, inside jit (batches travel as uint8)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def prefetch_to_device(it: Iterator, sharding: jax.sharding.Sharding,
                       keys: Sequence[str]) -> Iterator[tuple[dict[str, jax.Array], bytes]]:
    """Yield (global batch on the mesh, ``it``'s position after it), one batch ahead.

    ``it`` yields this process's rows of each global batch and has a ``get_state()``
    (``pipeline.TrainBatches``: the global step). When batch k is handed out, batch k+1 is
    already on its way to the devices (double buffering, like
    ``flax.jax_utils.prefetch_to_device`` but for jit shardings). The position is read before
    the look-ahead batch is drawn, so it counts exactly the batches yielded so far: the one a
    checkpoint after batch k must store.
    """
    def place(local: dict) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in keys}

    ahead = place(next(it))
    while True:
        position = it.get_state()
        current, ahead = ahead, place(next(it))
        yield current, position
