"""``segface-jax train``: a tiny recipe end to end, NaN stop, SIGKILL-and-resume, two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segface_jax.train.trainer import TrainingError, load_config, train
from tests import datasets

TINY = '''
from segface_jax.train.trainer import TrainConfig


def get_config():
    return TrainConfig(variant="swinb_lapa_224", data_root={root!r}, init="scratch",
                       resolution=32, global_batch=8, dice_group=4, workers=0, lr=1e-3,
                       weight_decay=1e-5, epochs=300, milestones=(80, 200), gamma=0.1,
                       log_every=1, checkpoint_every=2, eval_every_epochs=0, max_steps={steps},
                       encoder_overrides=(("embed_dim", 16), ("num_heads", (1, 1, 1, 1)),
                                          ("depths", (1, 1, 1, 1)),
                                          ("stochastic_depth_prob", 0.2)))
'''


@pytest.fixture(scope="module")
def lapa_root(tmp_path_factory):
    return datasets.write_lapa(tmp_path_factory.mktemp("lapa"), {"train": 16, "val": 2})


def _config(tmp_path: Path, root: Path, steps: int) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY.format(root=str(root), steps=steps))
    return path


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The model parameters stored in checkpoint ``step`` of a work directory."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(workdir / "checkpoints" / str(step) / "state")
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk(tree, "")
    return {k: v for k, v in flat.items() if k.startswith("params.")}


def test_tiny_recipe_trains_logs_and_refuses_nan(tmp_path, lapa_root):
    cfg = load_config(_config(tmp_path, lapa_root, 4), ["eval_every_epochs=1"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["step"] == 4 and summary["last_checkpoint"] == 4
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
               .splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["lr"] == pytest.approx(1e-3) for r in train_rows)
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]  # 2 steps per epoch
    assert list((tmp_path / "run/tensorboard").iterdir())
    assert (tmp_path / "run/loss_curve.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path / "run/checkpoints")) == ["2", "4"]
    assert len(os.listdir(tmp_path / "run/best")) == 1
    with pytest.raises(TrainingError, match="already has checkpoints"):
        train(cfg, tmp_path / "run", progress=False)

    # an exploding learning rate: the run stops at the first non-finite loss, keeping step 1
    bad = cfg.replace(lr=1e30, checkpoint_every=1, eval_every_epochs=0, max_steps=20)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*last good checkpoint is "
                                            r"step \d+") as err:
        train(bad, str(tmp_path / "nan"), progress=False)  # a workdir given as text
    good = int(str(err.value).split("last good checkpoint is step ")[1].split()[0])
    assert sorted(map(int, os.listdir(tmp_path / "nan/checkpoints")))[-1] == good
    assert all(np.isfinite(a).all() for a in _params(tmp_path / "nan", good).values())


def test_profile_trace_and_throughput_records(tmp_path, lapa_root):
    """``profile_steps=1`` leaves a profiler trace in WORKDIR/profile; train records carry
    images/s, the compiled step's FLOPs and, given a peak, model FLOPs utilisation."""
    import jax
    from etils import epath

    cfg = load_config(_config(tmp_path, lapa_root, 3), ["peak_tflops=0.001"])
    summary = train(cfg, epath.Path(tmp_path / "run"), progress=False, profile_steps=1)
    assert summary["step"] == 3
    assert list((tmp_path / "run/profile").rglob("*.xplane.pb"))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["images_per_s"] > 0 and r["flops_per_step"] > 0
        # MFU: FLOPs per step x steps/s (images/s over the global batch of 8) over the summed
        # peak of the devices, 1 GFLOP/s each (float rounding only: rel 1e-9)
        assert r["mfu"] == pytest.approx(r["flops_per_step"] * r["images_per_s"] / 8
                                         / (jax.device_count() * 1e9), rel=1e-9)


def test_config_checks_remat_and_accumulation(tmp_path, lapa_root):
    config = _config(tmp_path, lapa_root, 1)  # global_batch 8, dice_group 4
    cfg = load_config(config, ["remat=block", "global_batch=16", "accum_steps=2"])
    assert (cfg.remat, cfg.accum_steps) == ("block", 2)
    for bad, match in [(["remat=all"], "remat must be one of none, block, encoder"),
                       (["accum_steps=0"], "accum_steps must be a whole number"),
                       (["accum_steps=3"], r"multiple of accum_steps 3 x \d+ devices"),
                       (["global_batch=16", "accum_steps=2", "dice_group=null"],
                        "micro-batches of whole Dice groups")]:
        with pytest.raises(TrainingError, match=match):
            load_config(config, bad)


def test_the_recipe_file_states_upstreams_recipe_for_every_variant():
    """configs/segface.py:VARIANT gives upstream's hyper-parameters (AdamW lr 1e-4, weight decay
    1e-5, betas 0.9/0.999, eps 1e-8; MultiStepLR (80, 200) x0.1; 300 epochs; 8 GPUs x 4 images,
    Dice per GPU; ImageNet encoder), and its docstring's table agrees with the variant registry."""
    from segface_jax.variants import VARIANTS

    recipe = Path(__file__).resolve().parents[1] / "configs" / "segface.py"
    table = recipe.read_text()
    for name, v in VARIANTS.items():
        cfg = load_config(f"{recipe}:{name}", [])
        assert (cfg.variant, cfg.epochs, cfg.global_batch, cfg.dice_group, cfg.lr,
                cfg.weight_decay, cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, cfg.milestones,
                cfg.gamma, cfg.init) == (name, 300, 32, 4, 1e-4, 1e-5, 0.9, 0.999, 1e-8,
                                         (80, 200), 0.1, "imagenet")
        assert cfg.resolution is None  # the variant's own
        f1 = "-" if v.mean_f1 is None else f"{v.mean_f1:.2f}"
        row = [c.strip() for c in next(line for line in table.splitlines()
                                        if line.startswith(f"| {name} ")).split("|")[1:-1]]
        assert row == [name, v.backbone, v.dataset, str(v.resolution), f1]
    for bad in (f"{recipe}", f"{recipe}:swinb_celeba_1024"):
        with pytest.raises(TrainingError, match="name the variant to train"):
            load_config(bad, [])
    with pytest.raises(TrainingError, match="no such config file"):
        load_config(f"{recipe.parent / 'missing.py'}:swinb_celeba_512", [])


def test_prefetch_position_counts_the_batches_handed_out():
    """With one batch in flight, the position reported with batch k is the iterator's state
    after k batches, not after the look-ahead one: the position a checkpoint must keep."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segface_jax.train.mesh import data_mesh, prefetch_to_device

    class Counting:
        def __init__(self):
            self.drawn = 0

        def __next__(self):
            self.drawn += 1
            return {"x": np.full((8,), self.drawn, np.int32)}

        def get_state(self) -> bytes:
            return str(self.drawn).encode()

    it = Counting()
    batches = prefetch_to_device(it, NamedSharding(data_mesh(), P("data")), ["x"])
    for k in range(1, 4):
        batch, position = next(batches)
        assert int(jax.device_get(batch["x"])[0]) == k
        assert position == str(k).encode() and it.drawn == k + 1


def _cli(config: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segface_jax.cli", "train", "--config", str(config),
            "--workdir", str(workdir), "--quiet", *extra]


def test_sigkill_then_resume_is_bit_identical(tmp_path, lapa_root):
    """Run A trains 24 steps; run B is killed with SIGKILL after its first checkpoint and
    resumed: its final parameters equal A's bit for bit (data order, augmentation, stochastic
    depth and optimizer state all restored)."""
    config = _config(tmp_path, lapa_root, 24)
    env = {**os.environ, "XLA_FLAGS": "", "SEGFACE_JAX_COMPILATION_CACHE": "0"}
    a = subprocess.run(_cli(config, tmp_path / "a"), env=env, capture_output=True, text=True,
                       timeout=600)
    assert a.returncode == 0, a.stderr[-2000:]
    proc = subprocess.Popen(_cli(config, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpts = tmp_path / "b" / "checkpoints"
    while time.time() < deadline and not (ckpts.is_dir() and any(
            p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert done and done[-1] < 24, done  # killed mid-run
    b = subprocess.run(_cli(config, tmp_path / "b", "--resume"), env=env, capture_output=True,
                       text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-2000:]
    assert f"resumed from step {done[-1]}" in b.stdout
    pa, pb = _params(tmp_path / "a", 24), _params(tmp_path / "b", 24)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def test_two_processes_train_together(tmp_path, lapa_root):
    """Two processes on 127.0.0.1 (jax.distributed, CPU collectives through gloo), one device
    each, share the global batch and end with identical parameters."""
    config = _config(tmp_path, lapa_root, 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "", "SEGFACE_JAX_COMPILATION_CACHE": "0",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [subprocess.Popen(
        _cli(config, tmp_path / "run", "--num-processes", "2", "--process-id", str(i),
             "--coordinator", f"127.0.0.1:{port}"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    digests = [line.split("parameter digest ")[1].strip() for out, _ in outs
               for line in out.splitlines() if "parameter digest" in line]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "finished at step 4" in outs[0][0]


def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path, lapa_root):
    config = _config(tmp_path, lapa_root, 400)
    env = {**os.environ, "XLA_FLAGS": "", "SEGFACE_JAX_COMPILATION_CACHE": "0"}
    proc = subprocess.Popen(_cli(config, tmp_path / "run", "--set", "checkpoint_every=1000"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    saved = int(err.split("checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= saved < 400 and "continue with --resume" in err
    assert (tmp_path / "run" / "checkpoints" / str(saved)).is_dir()


def test_initialisation_from_imagenet_encoder_and_segface_checkpoints(tmp_path, lapa_root):
    import dataclasses

    from segface_jax.checkpoint import flat_state, save_checkpoint
    from segface_jax.train.trainer import build_model

    cfg = load_config(_config(tmp_path, lapa_root, 4), [])
    scratch = build_model(cfg)
    # a `convert-backbone`-style directory for this (tiny) encoder, with other values
    encoder = {k: np.asarray(v) + 1.0 for k, v in flat_state(scratch.backbone).items()}
    save_checkpoint(tmp_path / "enc", encoder, {"kind": "backbone", "arch": "swin_b"})
    model = build_model(dataclasses.replace(cfg, init="imagenet", init_path=str(tmp_path / "enc")))
    got = flat_state(model)
    for k, v in encoder.items():
        np.testing.assert_array_equal(got[f"backbone.{k}"], v)
    for k, v in flat_state(scratch).items():  # the decoder keeps its initialisation
        if not k.startswith("backbone."):
            np.testing.assert_array_equal(got[k], v)
    # fine-tuning from a converted SegFace checkpoint: every parameter comes from it
    from tests import release

    full = dataclasses.replace(cfg, init="segface", encoder_overrides=(),
                               init_path=str(release.converted("swinb_lapa_224")))
    model = build_model(full)
    stored = flat_state(__import__("segface_jax").load(full.init_path).module)
    for k, v in flat_state(model).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(stored[k]))
    with pytest.raises(TrainingError, match="needs init_path"):
        build_model(dataclasses.replace(cfg, init="imagenet"))
