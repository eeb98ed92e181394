"""Demo and test aids, kept apart from the production path: seeded stand-in weights.

``segface-jax predict --allow-random-weights`` (the README's first command) must run on a
machine that cannot reach the Hugging Face hub. There, and only when asked, a release-format
checkpoint with seeded random weights stands in for the release; everything downstream labels
the output as meaningless (``Weights.random``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from segface_jax import hub
from segface_jax.variants import Variant


def seeded_weights(variant: Variant, seed: int = 0, quiet: bool = False) -> hub.Weights:
    """A seeded random release-format ``.pt`` of ``variant``, written once into the cache and
    converted once, as ``Weights(random=True)``. Needs PyTorch (the converter extra)."""
    try:
        from segface_jax.convert import seeded_release
    except ModuleNotFoundError as e:
        raise hub.WeightsUnavailableError(
            f"seeded stand-in weights need PyTorch ({e.name} is missing): pip install "
            "'segface-jax[convert]'") from None
    directory = hub.cache_dir() / "seeded"
    path = directory / f"{variant.name}_seed{seed}.pt"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".seeded-", dir=directory))
        try:
            os.replace(seeded_release(variant, tmp, seed), path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return hub.Weights(variant, hub.converted_checkpoint(path, variant, quiet=quiet),
                       random=True, source=path)


def release_or_seeded(variant: Variant, revision: str | None = None,
                      quiet: bool = False) -> hub.Weights:
    """The variant's release weights if the hub (or its local cache) has them, else, said
    loudly, ``seeded_weights``."""
    try:
        return hub.resolve(variant, None, revision, quiet=quiet)
    except hub.WeightsUnavailableError as e:
        reason = e.reason or str(e)
    try:
        from segface_jax.convert import seeded_release  # noqa: F401
    except ModuleNotFoundError as e:
        raise hub.WeightsUnavailableError(
            f"the hub is unreachable ({reason}) and the seeded fallback needs PyTorch ({e.name} "
            "is missing): pip install 'segface-jax[convert]'") from None
    print(f"Hugging Face hub unreachable ({reason}); using a seeded release-format checkpoint "
          "with RANDOM weights instead (--allow-random-weights): the masks are meaningless")
    return seeded_weights(variant, quiet=quiet)
