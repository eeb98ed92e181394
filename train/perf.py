"""How fast a training run goes: images/s, FLOPs per step, model FLOPs utilisation (MFU), and
a ``jax.profiler`` trace of a few steps.

FLOPs per step are those of the global step (the program before partitioning, so the same on
any mesh): XLA's cost analysis of the lowered program where it reports them (CPU), else 2 per
multiply-add of the step's matmuls and convolutions, counted in its jaxpr. XLA:GPU reports
none (JAX 0.11.2 on an H200), and the compiled program's analysis misses the matmuls handed to
cuBLAS (1.1 of Swin-B 512's 9.3 TFLOP per step), so a GPU counts from the jaxpr. The two agree
within a few percent: the jaxpr count leaves out elementwise work (Swin-B 224's step: 0.971
of XLA's count) and counts every convolution tap, padding included, as torch's FLOP counter
does. MFU is FLOPs per step times steps/s against the peak of all devices.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.extend
from etils import epath

# Dense (no sparsity) peak FLOP/s of one device by ``jax.devices()[0].device_kind``, for the
# compute dtype. GPUs: NVIDIA's H100/H200 and A100 datasheets (Tensor Core, dense). Under
# JAX's default matmul precision float32 matmuls and convolutions run on TF32 Tensor Cores
# there, so the float32 entry is the TF32 peak. TPUs: Google Cloud's TPU system-architecture
# pages (bf16 per chip); at default precision a float32 matmul is one bf16 pass, same peak.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4e12, "float32": 494.7e12},  # H100 SXM
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H200": {"bfloat16": 989.4e12, "float32": 494.7e12},  # H200 SXM
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
}


def peak_flops(device_kind: str, dtype: str, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``peak_tflops`` if given, else ``PEAK_FLOPS``' entry;
    None for devices the table does not know (CPUs among them)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    return PEAK_FLOPS.get(device_kind, {}).get(dtype)


def step_flops(traced: jax.stages.Traced, lowered: jax.stages.Lowered) -> float:
    """FLOPs of one global step: XLA's count of the ``lowered`` program if it gives one,
    else the matmul and convolution FLOPs of the ``traced`` step (``jaxpr_flops``)."""
    flops = (lowered.cost_analysis() or {}).get("flops")
    return float(flops) if flops else float(jaxpr_flops(traced.jaxpr.jaxpr))


def jaxpr_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
    """2 per multiply-add of every ``dot_general`` and ``conv_general_dilated`` in ``jaxpr``
    and the jaxprs it calls (a ``scan``'s body once per iteration, a ``cond``'s costliest
    branch)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs = eqn.invars[0].aval.shape
            (contracting, _), _ = eqn.params["dimension_numbers"]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[d] for d in contracting)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            inner = [jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
            if name == "cond":
                total += max(inner, default=0)
            else:
                total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def _conv_flops(eqn: jax.extend.core.JaxprEqn) -> int:
    """2 per multiply-add of a ``conv_general_dilated``, counted as torch's FLOP counter
    counts: every tap, padding included, and a strided convolution's input gradient (an
    input-dilated convolution) as many as the convolution it differentiates."""
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    dims = eqn.params["dimension_numbers"]
    taps = math.prod(rhs[d] for d in dims.rhs_spec[2:])
    if any(d != 1 for d in eqn.params["lhs_dilation"]):
        # each input element meets every tap of each output feature of its group
        per_group = rhs[dims.rhs_spec[0]] // eqn.params["feature_group_count"]
        return 2 * math.prod(lhs) * taps * per_group
    # each output element sums the kernel's input features (per group) x its taps
    return 2 * math.prod(eqn.outvars[0].aval.shape) * taps * rhs[dims.rhs_spec[1]]


def _sub_jaxprs(params: dict[str, Any]) -> list[jax.extend.core.Jaxpr]:
    """The jaxprs among an equation's parameters (``pjit``'s, a ``custom_jvp``'s, ``cond``'s
    branches...)."""
    found = []
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                found.append(v)
    return found


class Throughput:
    """images/s, FLOPs per step and MFU over the steps since the last ``measure`` or
    ``restart`` (one ``Throughput`` per run, started when the step is compiled)."""

    def __init__(self, global_batch: int, flops_per_step: float | None,
                 peak_per_device: float | None, step: int) -> None:
        self._batch = global_batch
        self._flops = flops_per_step
        self._peak = peak_per_device * jax.device_count() if peak_per_device else None
        self.restart(step)

    def restart(self, step: int) -> None:
        """Count from ``step``, now (after a checkpoint or validation, which are not steps)."""
        self._step, self._time = step, time.perf_counter()

    def measure(self, step: int) -> dict[str, float]:
        """The rates up to ``step``; call it once the step's results are on the host, so the
        time covers the device's work."""
        steps_per_s = (step - self._step) / (time.perf_counter() - self._time)
        self.restart(step)
        record = {"images_per_s": steps_per_s * self._batch}
        if self._flops:
            record["flops_per_step"] = self._flops
            if self._peak:
                record["mfu"] = self._flops * steps_per_s / self._peak
        return record


class ProfileWindow:
    """A ``jax.profiler`` trace of ``steps`` steps into ``logdir``, from the step after
    ``start + 1`` (the run's first step, which warms up, stays out)."""

    def __init__(self, logdir: epath.Path, steps: int, start: int) -> None:
        self._logdir, self._steps = logdir, steps
        self._first, self._last = start + 1, start + 1 + steps
        self._tracing = False

    def __enter__(self) -> ProfileWindow:
        return self

    def __exit__(self, *exc) -> None:
        if self._tracing:
            self._stop()

    def after_step(self, step: int, outputs: Any) -> None:
        """Start or stop the trace once step ``step`` (whose ``outputs`` these are) is done."""
        if not self._steps:
            return
        if step == self._first:
            jax.block_until_ready(outputs)
            self._logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self._logdir))
            self._tracing = True
            print(f"profiling steps {self._first + 1}-{self._last} into {self._logdir} "
                  "(open with TensorBoard's profile plugin or xprof)")
        elif step == self._last and self._tracing:
            jax.block_until_ready(outputs)
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self._tracing = False
        print(f"profile written to {self._logdir}")
