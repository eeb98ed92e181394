"""Test set-up: 8 host devices and full-precision matmuls, set before JAX is imported."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
# Converted weights go to a per-session folder, never to the user's ~/.cache; the persistent
# compilation cache stays off in-process (tests that check it run the CLI in a subprocess).
os.environ["SEGFACE_JAX_CACHE"] = tempfile.mkdtemp(prefix="segface-cache-")
atexit.register(shutil.rmtree, os.environ["SEGFACE_JAX_CACHE"], ignore_errors=True)
os.environ["SEGFACE_JAX_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# Test files that need the converter extra (torch, torchvision, segment-anything).
_TORCH_TESTS = ["test_modules.py", "test_modules_v3.py", "test_converter.py",
                "test_parity_native.py", "test_cli.py", "test_convert_backbone.py",
                "test_parser.py", "test_predict_cli.py", "test_export.py", "test_data.py",
                "test_training.py", "test_train_loop.py"]

try:
    import segment_anything  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError as _e:
    if os.environ.get("CI"):  # parity tests are never skipped in CI: a missing torch fails
        raise RuntimeError(f"CI must run the parity tests, but {_e.name} is missing") from _e
    collect_ignore = _TORCH_TESTS
    print(f"segface-jax tests: {_e.name} missing, skipping {', '.join(_TORCH_TESTS)}")
