"""The torch-free library: imports, checkpoint I/O, ``load`` errors and input validation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import segface_jax
from segface_jax import checkpoint, datasets, files, variants
from segface_jax.checkpoint import CheckpointError, abstract_model, fill_module
from segface_jax.models import SegFace, SegFaceConfig
from segface_jax.models.layers import abstract
from segface_jax.models.swin import SwinConfig
from segface_jax.runtime import LoadedModel

# Small models, compiled once or twice each: compiling is most of their cost (tests/conftest.py).
pytestmark = pytest.mark.quick_compile

SMALL = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2))


def test_library_imports_and_runs_without_torch():
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'segment_anything'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "import segface_jax, segface_jax.cli, segface_jax.models, segface_jax.align\n"
        "import segface_jax.files, segface_jax.runtime, segface_jax.convert  # entry point only\n"
        "sys.exit(segface_jax.cli.main(['variants']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "swinb_celeba_512" in proc.stdout and "88.96" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1 + 14


def test_variants_table_is_complete():
    assert len(variants.VARIANTS) == 14
    for v in variants.VARIANTS.values():
        assert len(v.palette) == v.num_classes == len(set(v.classes))
    assert variants.get_variant("swinb_lapa_512").needs_landmarks
    assert not variants.get_variant("swinb_helen_512").needs_landmarks
    with pytest.raises(variants.UnknownVariantError, match="released variants are"):
        variants.get_variant("swinb_celeba_1024")


def _small_model(align: bool = False) -> SegFace:
    names = datasets.LAPA_CLASSES if align else datasets.CELEBAMASK_HQ_CLASSES
    return SegFace(SegFaceConfig("swin_b", names, align, SMALL), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_checkpoint_round_trip(tmp_path):
    model = _small_model()
    params = {k: np.asarray(v) for k, v in checkpoint.flat_state(model).items()}
    out = checkpoint.save_checkpoint(tmp_path / "ck", params, {"variant": "swinb_celeba_224"})
    restored = checkpoint.restore_params(out, abstract_model(model.cfg))
    for key, value in checkpoint.flat_state(restored).items():
        np.testing.assert_array_equal(np.asarray(value), params[key])
    assert json.loads((out / checkpoint.METADATA_FILE).read_text())["format_version"] == 1


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), files.atomic_directory(tmp_path / "x") as tmp:
        (tmp / "half").write_text("...")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_respects_the_umask(tmp_path, umask):
    """Outputs get open()'s mode, 0666 less the umask (mkstemp alone would give 0600)."""
    old = os.umask(umask)
    try:
        out = files.atomic_write(tmp_path / "out.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_fits_names_near_the_file_system_limit(tmp_path):
    """A 255-character name is valid; its temporary sibling must be too."""
    name = "n" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".png"
    out = files.atomic_write(tmp_path / name, lambda p: p.write_bytes(b"png"))
    assert out.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("setup", ["missing", "empty", "bad_json", "unknown_variant", "no_params"])
def test_load_errors_name_the_path_and_the_fix(tmp_path, setup):
    path = tmp_path / "ckpt"
    if setup != "missing":
        path.mkdir()
    if setup in ("bad_json", "unknown_variant", "no_params"):
        (path / checkpoint.METADATA_FILE).write_text(
            "{" if setup == "bad_json" else json.dumps({"variant": "swinb_celeba_9"}))
        if setup != "no_params":
            (path / checkpoint.PARAMS_DIR).mkdir()
    with pytest.raises(CheckpointError) as e:
        segface_jax.load(path)
    message = str(e.value)
    assert str(path) in message
    assert any(fix in message for fix in ("segface-jax convert", "convert the checkpoint",
                                          "released variants"))


def test_corrupt_parameters_give_one_clear_error(tmp_path):
    model = _small_model()
    params = {k: np.asarray(v) for k, v in checkpoint.flat_state(model).items()}
    out = checkpoint.save_checkpoint(tmp_path / "ck", params, {"variant": "swinb_celeba_224"})
    for f in (out / checkpoint.PARAMS_DIR).rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="Convert the checkpoint again"):
        segface_jax.load(out)


def test_loaded_model_validates_inputs():
    variant = variants.get_variant("swinb_lapa_224")
    model = LoadedModel(variant, _small_model(align=True), {})
    with pytest.raises(ValueError, match=r"\(N, 224, 224, 3\)"):
        model(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="landmarks"):
        model(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 5, 2\)"):
        model(np.zeros((2, 224, 224, 3), np.float32), landmarks=np.zeros((2, 68, 2)))
    lm = np.tile(((variants_std() + 1) * 223 / 2)[None], (2, 1, 1))
    out = model(np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32), landmarks=lm)
    assert out.shape == (2, 224, 224, 11) and out.dtype == jnp.float32


def variants_std():
    from segface_jax.align import STANDARD_FACE_POINTS

    return STANDARD_FACE_POINTS


def test_bfloat16_keeps_float32_parameters():
    model = SegFace(SegFaceConfig("swin_b", datasets.CELEBAMASK_HQ_CLASSES, False, SMALL),
                    dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {np.dtype(v.dtype) for v in checkpoint.flat_state(model).values()} == {
        np.dtype(np.float32)}
    out = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((1, 64, 64, 3)))
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_abstract_structure_is_the_eagerly_built_models():
    """``layers.abstract`` (behind ``abstract_model``, the backbone converter and MTCNN) gives
    the graph and the leaves (path, variable type, shape, dtype) of the model built eagerly,
    stochastic depth, alignment and bfloat16 compute included; every leaf abstract."""

    def leaves(module: nnx.Module) -> dict:
        return {path: (type(v), v.get_value().shape, v.get_value().dtype)
                for path, v in nnx.to_flat_state(nnx.state(module))}

    cfg = SegFaceConfig("swin_b", datasets.LAPA_CLASSES, True,
                        dataclasses.replace(SMALL, stochastic_depth_prob=0.1))
    for dtype in (None, jnp.bfloat16):
        eager = SegFace(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        lazy = abstract(lambda rngs: SegFace(cfg, dtype=dtype, rngs=rngs))  # noqa: B023
        assert nnx.graphdef(lazy) == nnx.graphdef(eager)
        assert leaves(lazy) == leaves(eager)
        assert {type(v) for v in checkpoint.flat_state(lazy).values()} == {jax.ShapeDtypeStruct}


def test_fill_module_rejects_wrong_shapes():
    abstract = abstract_model(SegFaceConfig("swin_b", datasets.CELEBAMASK_HQ_CLASSES, False, SMALL))
    arrays = {k: np.zeros(v.shape, np.float32) for k, v in checkpoint.flat_state(abstract).items()}
    key = "fusion.linear_fuse.kernel"
    arrays[key] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match=key):
        fill_module(abstract, arrays)


def test_abstract_model_is_traced_once_and_never_shared():
    """The structure is traced once per config and dtype; every call returns its own module, so
    filling one (``fill_module`` sets the given module's variables) leaves the next abstract.
    A config that cannot be hashed (a list field) is traced each time."""
    cfg = SegFaceConfig("swin_b", datasets.CELEBAMASK_HQ_CLASSES, False, SMALL)
    first = abstract_model(cfg)
    hits = checkpoint._abstract_parts.cache_info().hits
    fill_module(first, {k: np.zeros(v.shape, np.float32)
                        for k, v in checkpoint.flat_state(first).items()})
    second = abstract_model(cfg)
    assert checkpoint._abstract_parts.cache_info().hits == hits + 1
    assert {type(v) for v in checkpoint.flat_state(second).values()} == {jax.ShapeDtypeStruct}
    listed = dataclasses.replace(cfg, class_names=list(cfg.class_names))
    assert checkpoint.flat_state(abstract_model(listed)).keys() == checkpoint.flat_state(
        second).keys()


@pytest.mark.slow
def test_model_is_jittable_and_batched():
    model = _small_model(align=True)
    x = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    lm = jnp.tile(jnp.asarray((variants_std() + 1) * 63 / 2)[None], (3, 1, 1))
    batched = nnx.jit(lambda m, a, b: m(a, b))(model, x, lm)
    single = nnx.jit(lambda m, a, b: m(a, b))(model, x[1:2], lm[1:2])
    np.testing.assert_allclose(np.asarray(batched[1:2]), np.asarray(single), rtol=0, atol=1e-5)


def test_a_failed_restore_silences_only_its_late_reads(monkeypatch):
    """Reads still in flight when Orbax's event loop closes on a failed restore report "Event
    loop is closed" as unraisable errors; after a failure exactly those are dropped, once."""
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._ignore_reads_finishing_after_failure()
    checkpoint._ignore_reads_finishing_after_failure()  # a second failure adds no second layer
    late = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(late)
    sys.unraisablehook(other)
    assert seen == [other]
