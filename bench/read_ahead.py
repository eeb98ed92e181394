"""grain's default read-ahead against segface-jax's, side by side: a tiny training run's time.

Runs the same tiny CLI training run (a small MobileNetV3 BatchNorm recipe at 40 px, 8 steps, a
checkpoint every 2; tests/test_train_loop.py's) alternately with grain's default read options
(16 threads, 500 elements) and with ``train/pipeline.py``'s, after one warm-up run that fills a
shared compilation cache, and prints the wall time of each process. Compiled as the tests
compile tiny models (tests/conftest.py, ``quick_compile``).

    python bench/read_ahead.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The training CLI, with grain's default read options when asked to.
_RUN = ("import os, sys, grain\n"
        "import segface_jax.train.pipeline as p\n"
        "if os.environ['READ_AHEAD'] == 'grain default':\n"
        "    p._read_ahead = lambda elements: grain.ReadOptions()\n"
        "from segface_jax.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n")


def _run(config: Path, workdir: Path, env: dict[str, str], read_ahead: str) -> float:
    """Wall time of one training process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _RUN, "train", "--config", str(config), "--workdir",
                    str(workdir), "--quiet", "--set", "max_steps=8"], check=True, cwd=ROOT,
                   env={**env, "READ_AHEAD": read_ahead}, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    """Warm up, alternate the two read-ahead settings, print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.test_train_loop import _bn_config

    with tempfile.TemporaryDirectory(prefix="segface-bench-") as tmp:
        tmp = Path(tmp)
        config = _bn_config(tmp)
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "SEGFACE_JAX_COMPILATION_CACHE": "0",
               "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"}
        _run(config, tmp / "warm-up", env, "segface-jax")
        times: dict[str, list[float]] = {"grain default": [], "segface-jax": []}
        for i in range(args.repeats):
            for setting, seen in times.items():
                seen.append(_run(config, tmp / f"{setting}-{i}", env, setting))
                print(f"{setting}: {seen[-1]:.1f} s", flush=True)
    print("\n| read-ahead | seconds per run (median) | runs |\n|---|---:|---:|")
    for setting, seen in times.items():
        print(f"| {setting} | {statistics.median(seen):.1f} | {len(seen)} |")
    ratio = statistics.median(times["grain default"]) / statistics.median(times["segface-jax"])
    print(f"\nsegface-jax's read-ahead: {ratio:.2f}x faster than grain's default")


if __name__ == "__main__":
    main()
