"""Test set-up: 8 host devices and full-precision matmuls, set before JAX is imported; under
pytest-xdist, each worker on its own share of the CPU cores."""

import atexit
import ctypes
import gc
import os
import resource
import shutil
import tempfile


def _pin_xdist_worker() -> int | None:
    """Under ``pytest -n N``, give worker k the cores k, k + N, ... (threads sized before JAX and
    torch start): XLA's and torch's thread pools, one per core in every worker, would otherwise
    compete for the same cores (two unpinned workers once took 8271 CPU-seconds for the suite,
    one process 5760, in separate runs). The CLI processes a test starts inherit the worker's
    cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return None
    os.environ["SEGFACE_TESTS_ALL_CORES"] = ",".join(map(str, cores))  # multi-process tests
    mine = cores[int(worker[2:]) % count::count]
    os.sched_setaffinity(0, mine)
    return len(mine)


_PINNED_CORES = _pin_xdist_worker()
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
# Converted weights go to a per-process folder, never to the user's ~/.cache. JAX's persistent
# compilation cache is one folder for the whole run (made by the first process, which under
# xdist is the controller, and inherited by the workers), shared with the CLI processes the
# tests start: a train step or forward pass that several tests, runs or workers compile is
# compiled once. A size limit turns on its file lock, so concurrent writers are safe.
# segface-jax's own cache switch stays off; the test of it uses its own cache folder.
os.environ["SEGFACE_JAX_CACHE"] = tempfile.mkdtemp(prefix="segface-cache-")
atexit.register(shutil.rmtree, os.environ["SEGFACE_JAX_CACHE"], ignore_errors=True)
os.environ["SEGFACE_JAX_COMPILATION_CACHE"] = "0"
if "SEGFACE_TESTS_XLA_CACHE" not in os.environ:
    os.environ["SEGFACE_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="segface-xla-")
    atexit.register(shutil.rmtree, os.environ["SEGFACE_TESTS_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SEGFACE_TESTS_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(64 << 30)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

# The converter extra's packages. Without them a test module that imports one is reported as
# skipped, with the reason, by ``-ra``; in CI (``CI`` set) their absence is an error instead.
_EXTRAS = ("torch", "torchvision", "segment_anything")

try:
    import segment_anything  # noqa: F401
    import torch
    import torchvision  # noqa: F401

    if _PINNED_CORES:
        torch.set_num_threads(_PINNED_CORES)  # this worker's cores (see above)
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


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(autouse=True, scope="module")
def _free_memory_after_each_module():
    """After a module: drop JAX's compiled executables, collect cycles and trim the heap, so
    that one pytest process does not grow by every full-size model it has compiled."""
    yield
    jax.clear_caches()
    gc.collect()
    _trim_heap()


@pytest.fixture(autouse=True)
def _trim_heap_after_each_test():
    """After each test: trim the heap (~5 ms). A conversion or a full-size model leaves GBs of
    freed pages that glibc would otherwise keep until the module ends, and the next test's
    peak stacks on them: test_parser.py alone ended its tests at up to 5.7 GiB resident without
    this, 3.0-3.6 GiB with it."""
    yield
    _trim_heap()


@pytest.fixture(autouse=True)
def _quick_compile(request, monkeypatch):
    """Tests marked ``quick_compile`` compile tiny models for a few steps, where XLA's
    optimization passes cost far more than they save: they compile with most of them off
    (``jax_disable_most_optimizations``: LLVM at -O0 without its expensive passes; XLA's HLO
    passes stay) and with XLA:CPU's older loop emitters instead of its MLIR fusion emitters
    (``xla_cpu_use_fusion_emitters=false``), and so do the CLI processes they start. Float32
    results move by rounding only: a tiny Swin's loss after 5 steps by 1.3e-6 relative.
    Measured on this 2-core EPYC, one core, a small MobileNetV3's train step (tests/
    small_models.py, 40 px, batch 4) compiled in 43 s with every optimization, 38 s at -O0
    and 13 s at -O0 with the older emitters, and its eager initialisation took 22 s, 22 s and
    9 s; the step then ran in 0.4-0.6 s each way. (At full optimization the older emitters
    save nothing: 54 s against 63 s for that step, 66 s against 35 s for the initialisation.)
    Full-size models keep every optimization and the default emitters: their programs run 60%
    slower without.

    These tests also put every program in the persistent cache, however quick to compile:
    the eager initialisation compiles one small program per parameter shape, the same in
    every training process a test starts. (Suite-wide, the many tiny programs of eager tests
    would cost more to write than to compile.)"""
    marker = request.node.get_closest_marker("quick_compile")
    if marker is None:
        yield
        return
    flags = {"jax_disable_most_optimizations": True,
             "jax_persistent_cache_min_compile_time_secs": 0.0}
    before = {name: jax.config.values[name] for name in flags}
    for name, value in flags.items():
        monkeypatch.setenv(name.upper(), str(int(value)))
        jax.config.update(name, value)
    monkeypatch.setenv("XLA_FLAGS", " ".join([os.environ.get("XLA_FLAGS", ""), *(
        f"--{name}={str(value).lower()}" for name, value in _LOOP_EMITTERS.items())]))
    _compile_in_process_with(monkeypatch, _LOOP_EMITTERS)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


_LOOP_EMITTERS = {"xla_cpu_use_fusion_emitters": False}  # XLA debug options


def _compile_in_process_with(monkeypatch, options: dict) -> None:
    """Add XLA debug ``options`` to every compilation of this process (XLA_FLAGS are read
    once, when the backend starts), through the hook behind ``jit(compiler_options=...)``.
    A JAX without it compiles as before: slower, with the same results."""
    try:
        from jax._src import compiler
        original = compiler.get_compile_options
    except (ImportError, AttributeError):
        return

    def get_compile_options(*args, env_options_overrides=None, **kwargs):
        return original(*args, env_options_overrides={**options, **(env_options_overrides or {})},
                        **kwargs)

    monkeypatch.setattr(compiler, "get_compile_options", get_compile_options)


def pytest_pycollect_makemodule(module_path, parent):
    """Collect every test module through ``_TestModule``."""
    return _TestModule.from_parent(parent, path=module_path)


@pytest.fixture(autouse=True)
def _peak_memory(request):
    """After each test: this process's peak RSS so far, for the summary below (the suite's
    memory budget is its largest process). (Child processes are left out: the RSS the kernel
    reports for them starts at their parent's, as a fork shares its pages.)"""
    yield
    request.node.user_properties.append(("peak_rss_kib", (
        os.environ.get("PYTEST_XDIST_WORKER", "main"),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))


_PEAKS: dict[str, tuple[int, str]] = {}  # process -> (peak RSS in KiB, the test that set it)


def pytest_runtest_logreport(report):
    """Note the test at which each process's peak RSS rose (reports from xdist workers too)."""
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == "peak_rss_kib":
            who, kib = value
            if kib > _PEAKS.get(who, (0, ""))[0]:
                _PEAKS[who] = (kib, report.nodeid)


def pytest_terminal_summary(terminalreporter):
    """Each process's peak RSS and the test during which it was reached."""
    if _PEAKS and not os.environ.get("PYTEST_XDIST_WORKER"):
        terminalreporter.section("peak memory (RSS)")
        for who, (kib, nodeid) in sorted(_PEAKS.items(), key=lambda kv: -kv[1][0]):
            terminalreporter.write_line(f"{kib / 2**20:5.2f} GiB  {who}, reached in {nodeid}")
