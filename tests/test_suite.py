"""The test suite's own promises: without the converter extra, torch-dependent modules are
reported as skipped with a reason, never silently left out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A Python that cannot import the converter extra, as on a machine without it.
_NO_TORCH = ("import sys; sys.modules.update(torch=None, torchvision=None, segment_anything=None);"
             " import pytest; raise SystemExit(pytest.main(sys.argv[1:]))")


def test_modules_needing_torch_are_visible_skips_without_it():
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, "--collect-only", "-q", "-rs", "-p",
         "no:cacheprovider", "tests/test_modules.py", "tests/test_training_families.py",
         "tests/test_inputs.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for name in ("test_modules.py", "test_training_families.py"):
        assert f"{name} needs torch: pip install -e '.[convert]'" in out, out
    assert "test_inputs.py::" in out  # modules without torch still run
    assert "error" not in out.lower(), out


def test_ci_refuses_to_run_without_torch():
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_inputs.py"], cwd=ROOT, env={**os.environ, "CI": "true"},
        capture_output=True, text=True)
    assert proc.returncode != 0
    assert "CI must run the parity tests" in proc.stdout + proc.stderr
