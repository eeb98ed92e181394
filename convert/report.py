"""What a parity run reports: the bar, the verdict and the per-stage deltas, shared by
``segface-jax parity`` (``parity.py``, with torch) and ``parity --golden`` (``golden.py``,
without)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# The project's parity bar, the same as the native-resolution tests': max |delta logit| / max
# |reference logit| against torch float32, and argmax agreement. The reference's own float32
# distance from float64 is 1.3e-6 to 2e-6 on CelebAMask-HQ and Helen variants, while common
# porting mistakes (a transposed weight, a wrong eps, a lost shift) move logits by 2e-5 or more.
REL_BAR = 2e-5
ARGMAX_BAR = 0.9999
# LaPa's alignment grids are ill-conditioned (torch float32 is ~1e-4 from its own float64 run),
# so there a float64 run of the reference is the referee: ours may be at most this many times
# as far from it as torch float32 is (measured 0.69x to 0.92x at 224 to 512 px on the astronaut,
# 0.90x to 1.30x on parity's three default faces).
REFEREE_RATIO = 1.5
MATMUL_PRECISIONS = {"highest": "highest", "default": "default", "tf32": "tensorfloat32"}


@dataclasses.dataclass
class ParityResult:
    """How far the JAX logits are from the PyTorch reference's."""

    max_abs_diff: float
    ref_max_abs: float
    argmax_agreement: float

    @property
    def relative(self) -> float:
        """max |delta| / max |reference logit|."""
        return self.max_abs_diff / self.ref_max_abs


def compare(jax_logits: np.ndarray, torch_logits_nhwc: np.ndarray) -> ParityResult:
    """Parity figures for two (N, H, W, C) logit arrays."""
    diff = float(np.abs(jax_logits - torch_logits_nhwc).max())
    agree = float((jax_logits.argmax(-1) == torch_logits_nhwc.argmax(-1)).mean())
    return ParityResult(diff, float(np.abs(torch_logits_nhwc).max()), agree)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """PASS or FAIL against the parity bar, with the bar and the reason."""

    passed: bool
    reason: str
    bar: str
    precision: str

    def line(self) -> str:
        """One line for the terminal or a CI log."""
        return (f"{'PASS' if self.passed else 'FAIL'}: {self.reason} [bar: {self.bar}; "
                f"matmul precision {self.precision}]")


def verdict_against_torch(result: ParityResult, precision: str = "highest") -> Verdict:
    """The verdict of a float32 comparison with torch float32 (every non-LaPa variant)."""
    bar = f"relative <= {REL_BAR:.0e} and argmax agreement >= {100 * ARGMAX_BAR:.2f}%"
    misses = []
    if not result.relative <= REL_BAR:  # NaN fails too
        misses.append(f"relative {result.relative:.2e} > {REL_BAR:.0e}")
    if not result.argmax_agreement >= ARGMAX_BAR:
        misses.append(f"argmax agreement {100 * result.argmax_agreement:.4f}% < "
                      f"{100 * ARGMAX_BAR:.2f}%")
    reason = ("; ".join(misses) if misses else
              f"relative {result.relative:.2e}, argmax agreement "
              f"{100 * result.argmax_agreement:.4f}%")
    return Verdict(not misses, reason, bar, precision)


def verdict_against_referee(ours: ParityResult, torch32: ParityResult, agreement: ParityResult,
                            precision: str = "highest") -> Verdict:
    """The verdict with a float64 referee: ``ours`` and ``torch32`` are each compared with the
    float64 reference's logits; ``agreement`` is ours against torch float32 (argmax)."""
    bar = (f"ours at most {REFEREE_RATIO}x as far from float64 as torch float32 is, argmax "
           f"agreement with torch float32 >= {100 * ARGMAX_BAR:.2f}%")
    misses = []
    if not ours.relative <= REFEREE_RATIO * torch32.relative:
        misses.append(f"ours {ours.relative:.2e} from float64, torch float32 "
                      f"{torch32.relative:.2e}")
    if not agreement.argmax_agreement >= ARGMAX_BAR:
        misses.append(f"argmax agreement {100 * agreement.argmax_agreement:.4f}% < "
                      f"{100 * ARGMAX_BAR:.2f}%")
    reason = ("; ".join(misses) if misses else
              f"ours {ours.relative:.2e} from float64, torch float32 {torch32.relative:.2e}")
    return Verdict(not misses, reason, bar, precision)


@dataclasses.dataclass(frozen=True)
class StageDelta:
    """How far one intermediate result of ours is from the reference's."""

    name: str
    max_abs: float
    scale: float  # max |reference| at this stage
    torch_relative: float | None  # float64 referee: torch float32's own distance
    allowance: float  # this stage's share of the bar, relative to its scale

    @property
    def relative(self) -> float:
        """max |delta| / scale."""
        return self.max_abs / self.scale if self.scale else float(self.max_abs > 0)

    @property
    def over(self) -> bool:
        """Whether the stage exceeds its share of the bar (NaN does)."""
        return not self.relative <= self.allowance


def jax_stages(module, images: np.ndarray, landmarks: np.ndarray | None) -> dict[str, np.ndarray]:
    """Our model's intermediate results under the reference's stage names (``SegFaceReference.
    stages``): NHWC maps, (B, T, C) class tokens; the last is the model's output."""
    return {k: np.asarray(v) for k, v in _stages_fn()(module, images, landmarks).items()}


@functools.cache
def _stages_fn():
    """``jax_stages``' jitted core, made once: models of one structure share its compilations."""
    import jax.numpy as jnp
    from flax import nnx

    from segface_jax import align

    @nnx.jit
    def run(m, x, lm):
        out, orig_hw = {}, x.shape[1:3]
        if m.cfg.align_faces:
            x, matrix = align.align_faces(x.astype(jnp.float32), lm)
            out["aligned input"] = x
        feats = m.backbone(x)
        out.update({f"encoder tap {i + 1}": f for i, f in enumerate(feats)})
        fused = out["fused features"] = m.fusion(feats)
        pe = m.pe_layer(*fused.shape[1:3])
        b, h, w, c = fused.shape
        decoder = m.face_decoder
        tokens = jnp.broadcast_to(decoder.tokens(), (b, len(decoder.class_names), c))
        out["class tokens after the transformer"], _ = decoder.transformer(
            fused.reshape(b, h * w, c), pe.reshape(1, h * w, c), tokens)
        logits = out["logits"] = decoder(fused, pe)
        if m.cfg.align_faces:
            out["logits after the inverse warp"] = align.unalign_logits(logits, matrix, orig_hw)
        return out

    return run


def stage_deltas(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                 torch32: dict[str, np.ndarray] | None = None) -> list[StageDelta]:
    """Stage by stage, ours against ``ref``. Each stage's share of the bar is the float32 bar
    relative to the stage's own scale (a faithful port stays at float32 rounding everywhere,
    ~1e-6); with a float64 ``ref`` and torch float32's stages as ``torch32``, a stage may also
    be up to ``REFEREE_RATIO`` times as far as torch float32's own (LaPa's warped input)."""
    rows = []
    for name, want in ref.items():
        scale = float(np.abs(want).max())
        mine = np.abs(ours[name].astype(np.float64) - want).max()
        torch_rel = None
        allowance = REL_BAR
        if torch32 is not None:
            torch_rel = float(np.abs(torch32[name].astype(np.float64) - want).max()) / scale
            allowance = max(REL_BAR, REFEREE_RATIO * torch_rel)
        rows.append(StageDelta(name, float(mine), scale, torch_rel, allowance))
    return rows


def stage_report(rows: list[StageDelta]) -> str:
    """The per-stage table, naming the first stage over its share of the bar."""
    f64 = rows[0].torch_relative is not None
    head = f"  {'stage':<36} {'max |delta|':>11} {'scale':>9} {'relative':>9}"
    lines = [head + (f" {'torch f32':>9}" if f64 else "") + f" {'share':>8}"]
    for row in rows:
        line = (f"  {row.name:<36} {row.max_abs:>11.2e} {row.scale:>9.2e} {row.relative:>9.2e}"
                + (f" {row.torch_relative:>9.2e}" if f64 else "") + f" {row.allowance:>8.0e}")
        lines.append(line + ("  <- over" if row.over else ""))
    first = _first_over(rows)
    lines.append(f"  first stage over its share of the bar: {first}" if first else
                 "  every stage within its share of the bar")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """``judge``'s answer: the verdict, the report above it and the figures behind them."""

    verdict: Verdict
    text: str
    referee_distances: tuple[float, float] | None  # float64 referee: (ours, torch float32)
    first_stage_over: str | None


def judge(ours: np.ndarray, ours_stages: dict[str, np.ndarray], stages32: dict[str, np.ndarray],
          stages64: dict[str, np.ndarray] | None, precision: str) -> Judgement:
    """The verdict on our logits and the report above it (the float64 referee's distances, the
    per-stage table), given the reference's float32 stages and, as referee, its float64 ones."""
    ref32 = list(stages32.values())[-1]
    result = compare(ours, ref32)
    if stages64 is None:
        rows = stage_deltas(ours_stages, stages32)
        return Judgement(verdict_against_torch(result, precision),
                         f"per-stage deltas against torch float32:\n{stage_report(rows)}", None,
                         _first_over(rows))
    ref64 = list(stages64.values())[-1]
    ours64, torch64 = compare(ours, ref64), compare(ref32, ref64)
    rows = stage_deltas(ours_stages, stages64, stages32)
    return Judgement(
        verdict_against_referee(ours64, torch64, result, precision),
        f"  float64 referee: ours {ours64.relative:.3e} relative, torch float32 "
        f"{torch64.relative:.3e} relative\nper-stage deltas against torch float64:\n"
        f"{stage_report(rows)}", (ours64.relative, torch64.relative), _first_over(rows))


def _first_over(rows: list[StageDelta]) -> str | None:
    return next((row.name for row in rows if row.over), None)
