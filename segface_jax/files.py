"""File-system safety: temp-and-rename writes, directory swaps, locks, writability checks, hashing.

Every output segface-jax writes (converted checkpoints, predictions, reports, exports, downloads)
goes through ``atomic_write`` or ``atomic_directory``, so an interrupted or failed command never
leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


class OutputError(Exception):
    """An output location that cannot be written; the message names it and the fix."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        raise OutputError(f"{out_dir} already exists and is not empty; choose another output "
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
