"""Converted checkpoints on disk: Orbax parameters plus a ``segface.json`` metadata file."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segface_jax.files import atomic_directory
from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.models.layers import abstract

METADATA_FILE = "segface.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model, with the fix in the message."""


def abstract_model(cfg: SegFaceConfig, dtype: Any = None) -> SegFace:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no random numbers drawn."""
    try:
        hash((cfg, dtype))
    except TypeError:  # a config holding lists: traced every time
        graphdef, state = _abstract_parts.__wrapped__(cfg, dtype)
    else:
        graphdef, state = _abstract_parts(cfg, dtype)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))  # fresh Variables


@functools.lru_cache(maxsize=8)
def _abstract_parts(cfg: SegFaceConfig, dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """``abstract_model``'s parts, traced once per process and config: converting then loading
    a checkpoint needs the structure twice, and tracing a released model costs 0.5-2.4 s."""
    return nnx.split(abstract(lambda rngs: SegFace(cfg, dtype=dtype, rngs=rngs)))


def flat_state(module: nnx.Module) -> dict[str, Any]:
    """{'backbone.stages.0.blocks.1.attn.qkv.kernel': leaf, ...} for every variable of a module."""
    return {".".join(map(str, path)): var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(module))}


def fill_module(module: nnx.Module, arrays: Mapping[str, Any]) -> nnx.Module:
    """A concrete module with every variable of ``module`` (abstract or not) taken from ``arrays``.

    Keys are the dotted paths of ``flat_state``; a missing key or a shape mismatch raises.
    Values are cast to each variable's dtype.
    """
    graphdef, state = nnx.split(module)
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if key not in arrays:
            raise CheckpointError(f"checkpoint lacks parameter {key}")
        value = arrays[key]
        want = var.get_value()
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(f"parameter {key}: checkpoint shape {tuple(value.shape)}, "
                                  f"model expects {tuple(want.shape)}")
        var.set_value(jnp.array(value, dtype=want.dtype))  # a copy: never alias the caller's
    return nnx.merge(graphdef, state)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    # {'a.b.c': x} -> {'a': {'b': {'c': x}}}: Orbax stores nested dicts with string keys.
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_checkpoint(out_dir: str | os.PathLike, params: Mapping[str, np.ndarray],
                    metadata: Mapping[str, Any], overwrite: bool = False,
                    local: bool = False) -> Path:
    """Write ``params`` (flat dotted keys) as Orbax + ``segface.json``, atomically; ``local``:
    this process alone writes (no barrier with the others of a multi-process run)."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = (ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
               if local and jax.process_count() > 1 else ocp.options.MultiprocessingOptions())
    out_dir = Path(out_dir).absolute()
    with atomic_directory(out_dir, overwrite) as tmp:
        with ocp.StandardCheckpointer(multiprocessing_options=options) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, _nest({k: np.asarray(v) for k, v in params.items()}))
            ckptr.wait_until_finished()
        meta = {"format_version": FORMAT_VERSION, **metadata}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a converted checkpoint directory, with a clear error when it is not one."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not path.is_dir() or not meta_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(
            f"{path} is not a segface-jax checkpoint directory (expected {METADATA_FILE} and "
            f"{PARAMS_DIR}/ inside); create one with `segface-jax convert MODEL.pt {path}`")
    try:
        return json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{meta_file} is unreadable ({e}); convert the checkpoint again") from None


def restore_params(path: str | os.PathLike, module: nnx.Module) -> nnx.Module:
    """Fill ``module`` (usually abstract) with the parameters stored under ``path``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    target = _nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                    for k, v in flat_state(module).items()})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / PARAMS_DIR, target)
    except Exception as e:  # Orbax raises many types; the user needs the path and the fix
        _ignore_reads_finishing_after_failure()
        raise CheckpointError(f"cannot read parameters from {path / PARAMS_DIR}: "
                              f"{type(e).__name__}: {e}. Convert the checkpoint again.") from None
    return fill_module(module, _flatten(restored))


def _ignore_reads_finishing_after_failure() -> None:
    """After a failed restore, drop the "Event loop is closed" errors of the reads still in
    flight: Orbax's event loop closes on the first failure, and each read that finishes later
    fails to report back, which Python would print as a stray traceback after our message."""
    previous = sys.unraisablehook
    if getattr(previous, "_segface_closed_loop_filter", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._segface_closed_loop_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
