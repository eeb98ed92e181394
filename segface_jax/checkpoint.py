"""Converted checkpoints on disk (Orbax + a metadata file) and the ``load`` API."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.variants import Variant, get_variant

METADATA_FILE = "segface.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model, with the fix in the message."""


def abstract_model(cfg: SegFaceConfig, dtype: Any = None) -> SegFace:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no random numbers drawn."""
    return nnx.eval_shape(lambda: SegFace(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


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


def _partial_prefix(out_dir: Path) -> str:
    """Name prefix of ``atomic_directory``'s temporary siblings of ``out_dir``."""
    return f".{out_dir.name}.partial-"


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out_dir`` only if the block succeeds.

    Any exception, including KeyboardInterrupt, removes the temporary directory, so an
    interrupted or failed write never leaves anything at ``out_dir``.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists and is not empty; choose another output "
                              "directory or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{_partial_prefix(out_dir)}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: Callable[[], None] | None = None
              ) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block; if another
    process holds it, call ``waiting()`` once and wait. A no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent runs may both do the work
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_partials(out_dir: str | os.PathLike) -> int:
    """Delete the temporary siblings ``atomic_directory`` left for ``out_dir`` when killed; call
    it only while holding ``out_dir``'s lock. Returns how many were removed."""
    out_dir = Path(out_dir).absolute()
    stale = list(out_dir.parent.glob(f"{_partial_prefix(out_dir)}*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


class OutputError(Exception):
    """An output location that cannot be written; the message names it and the fix."""


def ensure_writable(directory: str | os.PathLike, label: str) -> None:
    """Create ``directory`` if needed and check that a file can be written in it, so a command
    refuses an unwritable output before its work rather than after (``OutputError``)."""
    import tempfile

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".segface-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {label} {directory}: {e.strerror or e}; choose a "
                          "writable location") from None


def _umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a unique temporary sibling of ``path``, then rename it to ``path``.

    A failure or interruption removes the temporary file, so ``path`` is either the complete
    new file or untouched. The file gets the mode a plain ``open(path, "w")`` would (0666 less
    the umask), and the temporary name is shortened where ``path``'s own name is near the file
    system's limit.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    # mkstemp adds 8 random characters between prefix and suffix
    stem = path.name[:max(1, name_max - len("..") - 8 - len(".partial"))]
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_checkpoint(out_dir: str | os.PathLike, params: Mapping[str, np.ndarray],
                    metadata: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write ``params`` (flat dotted keys) as Orbax + ``segface.json``, atomically."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    with atomic_directory(out_dir, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
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
        raise CheckpointError(f"cannot read parameters from {path / PARAMS_DIR}: "
                              f"{type(e).__name__}: {e}. Convert the checkpoint again.") from None
    return fill_module(module, _flatten(restored))


@dataclasses.dataclass
class LoadedModel:
    """A converted SegFace model ready to run: ``model(images[, landmarks=])`` -> logits."""

    variant: Variant
    module: SegFace
    metadata: dict[str, Any]

    def __post_init__(self):
        graphdef, state = nnx.split(self.module)
        self._state = state
        self._forward = jax.jit(functools.partial(_forward, graphdef))

    @property
    def resolution(self) -> int:
        """Input and output side length in pixels."""
        return self.variant.resolution

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the logit channels."""
        return self.variant.classes

    def __call__(self, images: Any, landmarks: Any = None) -> jax.Array:
        """(N, R, R, 3) float32 ImageNet-normalised RGB -> (N, R, R, C) float32 logits.

        LaPa variants need ``landmarks`` (N, 5, 2): pixel (x, y) of the eye centres, nose tip
        and mouth corners at resolution R.
        """
        images = jnp.asarray(images, jnp.float32)
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"{self.variant.name} expects images of shape (N, {r}, {r}, 3), "
                             f"got {tuple(images.shape)}")
        if self.variant.needs_landmarks:
            if landmarks is None:
                raise ValueError(f"{self.variant.name} aligns faces: pass landmarks=(N, 5, 2) "
                                 "pixel coordinates (x, y) at the model resolution")
            landmarks = jnp.asarray(landmarks, jnp.float32)
            if landmarks.shape != (images.shape[0], 5, 2):
                raise ValueError(f"landmarks must have shape ({images.shape[0]}, 5, 2), "
                                 f"got {tuple(landmarks.shape)}")
        else:
            landmarks = None
        return self._forward(self._state, images, landmarks)


def _forward(graphdef, state, images, landmarks):
    return nnx.merge(graphdef, state)(images, landmarks)


def load(path: str | os.PathLike, dtype: Any = None) -> LoadedModel:
    """Load a checkpoint directory written by ``segface-jax convert``; the variant comes from it.

    ``dtype`` sets the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """
    dtype = jnp.dtype(dtype) if dtype is not None else None
    meta = read_metadata(path)
    try:
        variant = get_variant(meta["variant"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / METADATA_FILE}: {e}") from None
    module = abstract_model(SegFaceConfig.from_variant(variant), dtype)
    return LoadedModel(variant, restore_params(path, module), meta)
