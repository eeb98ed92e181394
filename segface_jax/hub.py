"""Released weights on demand: download from the Hugging Face hub, convert once, cache by sha256.

Downloads go through ``huggingface_hub`` (so HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE all apply). Converted Orbax checkpoints live under the segface-jax cache
(``$SEGFACE_JAX_CACHE``, else ``$XDG_CACHE_HOME/segface-jax``, else ``~/.cache/segface-jax``)
in ``converted/<sha256 of the .pt>-<variant>/``, so the same file is converted only once,
whichever path or revision it came from.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from segface_jax.checkpoint import METADATA_FILE, CheckpointError, read_metadata
from segface_jax.files import file_lock, remove_stale_partials, sha256_file
from segface_jax.runtime import LoadedModel, load
from segface_jax.variants import HUB_REPO, Variant, checkpoint_variant, get_variant


class WeightsUnavailableError(CheckpointError):
    """The release file is neither cached nor downloadable; the message says what to fetch."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def cache_dir() -> Path:
    """Root of segface-jax's own cache (converted checkpoints, compiled programs)."""
    if os.environ.get("SEGFACE_JAX_CACHE"):
        return Path(os.environ["SEGFACE_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "segface-jax"


def is_converted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``segface-jax convert``."""
    return (Path(path) / METADATA_FILE).is_file()


def release_url(variant: Variant, revision: str | None = None) -> str:
    """Browser URL of a variant's release file on the hub."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{HUB_REPO}/resolve/{revision or 'main'}/{variant.hub_filename}"


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the hub's endpoint (HF_ENDPOINT honoured) accepts a connection, and why not.

    A quick probe, so an offline machine learns in seconds, not after the client's retries.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{url.hostname}: {e.strerror or type(e).__name__}"


def cached_release(variant: Variant, revision: str | None = None) -> Path | None:
    """Local path of ``<variant>/model_299.pt`` in the Hugging Face hub cache, or None (not
    there, or no huggingface_hub); never touches the network."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HUB_REPO, variant.hub_filename, revision=revision,
                                    local_files_only=True))
    except Exception:  # no huggingface_hub, or not in the local hub cache
        return None


def download_release(variant: Variant, revision: str | None = None) -> Path:
    """Local path of ``<variant>/model_299.pt``: from the hub cache, else downloaded."""
    try:
        from huggingface_hub import hf_hub_download
    except ModuleNotFoundError:
        raise WeightsUnavailableError(
            "downloading released weights needs huggingface_hub: pip install "
            f"'segface-jax[convert]', or download {release_url(variant, revision)} yourself "
            "and pass it as weights") from None

    if (cached := cached_release(variant, revision)) is not None:
        return cached
    reachable, why = hub_reachable()
    if reachable:
        try:
            return Path(hf_hub_download(HUB_REPO, variant.hub_filename, revision=revision))
        except Exception as e:  # HTTP errors, a revision that does not exist, a broken transfer
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    raise WeightsUnavailableError(
        f"cannot get the weights of {variant.name} ({why}). Download "
        f"{release_url(variant, revision)} on a machine with access and either pass it with "
        f"--weights (weights= in Python) or put it in this machine's hub cache with "
        f"`huggingface-cli download {HUB_REPO} {variant.hub_filename}`", reason=why) from None


def converted_checkpoint(pt_file: str | os.PathLike, variant: Variant,
                         quiet: bool = False, replace: bool = False) -> Path:
    """The Orbax directory for a release ``.pt``: from the cache, or converted into it once
    (``replace``: converted again, over a cache entry found damaged)."""
    pt_file = Path(pt_file)
    if not pt_file.is_file():
        raise CheckpointError(f"{pt_file}: no such file; pass a release model_299.pt or a "
                              "directory written by `segface-jax convert`")
    out = _cache_entry(sha256_file(pt_file), variant)
    if is_converted(out) and not replace:
        return out
    try:
        from segface_jax.convert import convert_checkpoint
    except ModuleNotFoundError as e:
        raise CheckpointError(
            f"{pt_file} must be converted once, which needs PyTorch ({e.name} is missing): "
            "pip install 'segface-jax[convert]', or convert it elsewhere with `segface-jax "
            "convert` and pass the output directory") from None
    def waiting() -> None:
        if not quiet:
            print(f"waiting for another process converting {pt_file.name} into {out}")

    # One conversion at a time per cache entry: concurrent first runs wait for it, and a
    # conversion killed earlier (its partial directory left behind) is cleaned up.
    with file_lock(out.parent / f".{out.name}.lock", waiting):
        if is_converted(out) and not replace:  # done by the process we waited for
            return out
        if remove_stale_partials(out) and not quiet:
            print(f"removed the remains of an interrupted conversion into {out}")
        if not quiet:
            print(f"converting {pt_file.name} ({variant.name}) into {out} (once)")
        convert_checkpoint(pt_file, out, variant.name, overwrite=True)
    return out


def _cache_entry(sha256: str, variant: Variant) -> Path:
    """Where the conversion of the release file with this sha256 lives in the cache."""
    return cache_dir() / "converted" / f"{sha256}-{variant.name}"


def cached_conversion(sha256: str, variant: Variant) -> Path | None:
    """The cache's conversion of the release file with this sha256, if there is one."""
    out = _cache_entry(sha256, variant)
    return out if is_converted(out) else None


@dataclasses.dataclass(frozen=True)
class Weights:
    """A variant and the converted checkpoint holding its weights, resolved once at the edge."""

    variant: Variant
    checkpoint: Path  # an Orbax directory written by the converter
    random: bool = False  # seeded stand-in weights (``segface_jax.demo``), not a release
    source: Path | None = None  # the release-format .pt it was converted from, if known


def resolve(variant: str | Variant | None, weights: str | os.PathLike | None = None,
            revision: str | None = None, quiet: bool = False) -> Weights:
    """Turn a variant name and a weights argument into ``Weights``, checking once that they fit.

    ``weights`` may be a converted directory (its variant is read from it), a release ``.pt``
    (converted once into the cache; its variant inferred from its keys when not given) or None
    (the variant's release file from the hub, downloaded and converted once).
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    if weights is None:
        if v is None:
            raise CheckpointError("pass a released variant name, or weights (a release .pt or "
                                  "a `segface-jax convert` directory)")
        pt_file = download_release(v, revision)
        return Weights(v, converted_checkpoint(pt_file, v, quiet=quiet), source=pt_file)
    path = Path(weights)
    if is_converted(path):
        try:
            stored = checkpoint_variant(read_metadata(path))
        except ValueError as e:
            raise CheckpointError(f"{path / METADATA_FILE}: {e}") from None
        if v is not None and stored.name != v.name:
            raise CheckpointError(f"{path} holds variant {stored.name!r}, not {v.name!r}; pass "
                                  "the matching variant or weights")
        return Weights(stored, path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory but not a segface-jax checkpoint "
                              f"({METADATA_FILE} missing); pass a release model_299.pt or a "
                              "`segface-jax convert` output")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    v = v or _infer_variant(path)
    return Weights(v, converted_checkpoint(path, v, quiet=quiet), source=path)


NAME_A_MODEL = ("pass --variant (a released variant) or --weights (a converted or trained model "
                "directory, or a release .pt)")


def named_model(variant: str | None, weights: str | os.PathLike | None,
                revision: str | None = None) -> tuple[Variant, Weights | None]:
    """(the model a command's ``--variant`` / ``--weights`` name, its weights if resolved).

    A converted or trained directory is resolved at once (its metadata names the model, and a
    ``variant`` given must match it); a released variant's weights are left to the caller to
    resolve (download, convert) after its own checks; a ``.pt`` alone is resolved to learn its
    variant.
    """
    if weights is not None and is_converted(weights):
        resolved = resolve(variant, weights, revision)
        return resolved.variant, resolved
    if variant is not None:
        return get_variant(variant), None
    if weights is not None:
        resolved = resolve(None, weights, revision)
        return resolved.variant, resolved
    raise CheckpointError(NAME_A_MODEL)


def _infer_variant(path: Path) -> Variant:
    # A release .pt given without a variant: the converter infers it from the keys if it can.
    try:
        from segface_jax.convert import infer_variant, load_state_dict
    except ModuleNotFoundError as e:
        raise CheckpointError(f"{path} must be converted once, which needs PyTorch ({e.name} "
                              "is missing): pip install 'segface-jax[convert]'") from None
    return infer_variant(load_state_dict(path), None, path)


def load_weights(weights: Weights, dtype: Any = None, quiet: bool = False) -> LoadedModel:
    """``runtime.load`` of resolved weights; a cache entry found damaged (a truncated or
    deleted file) is converted again from its source ``.pt``, said in one line."""
    try:
        return load(weights.checkpoint, dtype=dtype)
    except CheckpointError as e:
        cached = weights.checkpoint.parent == cache_dir() / "converted"
        if not cached or weights.source is None or not weights.source.is_file():
            raise
        reason = str(e).removeprefix(f"cannot read parameters from {weights.checkpoint}")
        reason = reason.strip(" /:").split(" in OCDBT")[0][:120]
        print(f"the cached conversion of {weights.source.name} ({weights.variant.name}) is "
              f"damaged ({reason}); converting it again")
        converted_checkpoint(weights.source, weights.variant, quiet=True, replace=True)
    return load(weights.checkpoint, dtype=dtype)
