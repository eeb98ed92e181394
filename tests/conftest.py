"""Test set-up: 8 host devices and full-precision matmuls, set before JAX is imported."""

import atexit
import ctypes
import gc
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
# Converted weights go to a per-session folder, never to the user's ~/.cache. JAX's persistent
# compilation cache is one per-session folder too, shared by this process and the CLI
# subprocesses it starts: a train step or forward pass that several tests (or several runs of
# one test) compile is compiled once. segface-jax's own cache switch stays off; the test of it
# runs the CLI with its own cache folder.
os.environ["SEGFACE_JAX_CACHE"] = tempfile.mkdtemp(prefix="segface-cache-")
atexit.register(shutil.rmtree, os.environ["SEGFACE_JAX_CACHE"], ignore_errors=True)
os.environ["SEGFACE_JAX_COMPILATION_CACHE"] = "0"
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["SEGFACE_JAX_CACHE"], "xla-tests")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

# The converter extra's packages. Without them a test module that imports one is reported as
# skipped, with the reason, by ``-ra``; in CI (``CI`` set) their absence is an error instead.
_EXTRAS = ("torch", "torchvision", "segment_anything")

try:
    import segment_anything  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError as _e:
    if os.environ.get("CI"):  # parity tests are never skipped in CI: a missing torch fails
        raise RuntimeError(f"CI must run the parity tests, but {_e.name} is missing") from _e


class _TestModule(pytest.Module):
    """A test module that skips visibly when it needs a missing converter-extra package."""

    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as e:
            cause = e.__cause__
            if (isinstance(cause, ModuleNotFoundError) and cause.name in _EXTRAS
                    and not os.environ.get("CI")):
                pytest.skip(f"{self.path.name} needs {cause.name}: pip install -e '.[convert]'"
                            " (or '.[test]')", allow_module_level=True)
            raise


@pytest.fixture(autouse=True, scope="module")
def _free_memory_after_each_module():
    """After a module: drop JAX's compiled executables, collect cycles and hand the C heap's
    free pages back, so that one pytest process does not grow by every full-size model it has
    compiled."""
    yield
    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pytest_pycollect_makemodule(module_path, parent):
    """Collect every test module through ``_TestModule``."""
    return _TestModule.from_parent(parent, path=module_path)

