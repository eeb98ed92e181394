"""``segface-jax train``: a tiny recipe end to end, NaN stop, SIGKILL-and-resume, two processes."""

from __future__ import annotations

import json
import os
import shutil
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

pytestmark = pytest.mark.quick_compile  # tiny models, a few steps (tests/conftest.py)

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


def _state(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Everything checkpoint ``step`` of a work directory holds, flat: the train state
    (``params.*``, BatchNorm statistics ``rest.*``, optimizer state ``opt.*``, ``step``,
    ``seed``) and the data position of every process (``data.*``)."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:  # as host arrays, whatever devices wrote them
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                ckptr.metadata(path).item_metadata.tree)
        tree = ckptr.restore(path, restore_args=as_numpy)
    data = json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict | list | tuple):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk(tree, "")
    walk({"data": data}, "")
    return flat


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The model parameters stored in checkpoint ``step`` of a work directory."""
    return {k: v for k, v in _state(workdir, step).items() if k.startswith("params.")}


@pytest.mark.slow
def test_tiny_recipe_trains_logs_and_refuses_nan(tmp_path, lapa_root):
    cfg = load_config(_config(tmp_path, lapa_root, 4), ["eval_every_epochs=1"])
    # --resume in a fresh work directory starts from step 0, initialised as usual
    summary = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert summary["step"] == 4 and summary["last_checkpoint"] == 4
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
               .splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["lr"] == pytest.approx(1e-3) for r in train_rows)
    # no peak known for a CPU: no FLOPs counted, no MFU (test_profile_trace_and_... gives one)
    assert all(r["images_per_s"] > 0 and "flops_per_step" not in r and "mfu" not in r
               for r in train_rows)
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


@pytest.mark.slow
def test_profile_trace_and_throughput_records(tmp_path, lapa_root):
    """``profile_steps=1`` leaves a profiler trace in WORKDIR/profile; train records carry
    images/s, the step's FLOPs and, given a peak, model FLOPs utilisation."""
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


def test_tensorboard_event_file_reads_back_with_tensorboardX(tmp_path):
    """MetricWriter's TensorBoard file, read with tensorboardX's own CRC and protocol buffers:
    every record's checksums hold, the first event names the file version, and each record's
    scalars come back under their tags (per-class F1s as val/f1/<class>) at their step, as
    float32 (the field's type)."""
    import struct

    from etils import epath
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    from segface_jax.train.writer import MetricWriter

    records = [{"kind": "train", "step": 1, "epoch": 0.5, "loss": 1.25, "lr": 1e-4},
               {"kind": "train", "step": 300, "epoch": 150.0, "loss": 0.1, "lr": 1e-6},
               {"kind": "val", "step": 300, "mean_f1": 71.5, "f1": {"skin": 90.25, "hair": None,
                                                                    "l_eye": 60.0}}]
    with MetricWriter(epath.Path(tmp_path), total_steps=300, initial_step=0, desc="t",
                      progress=False) as writer:
        for r in records:
            writer.write(r)
    (path,) = (tmp_path / "tensorboard").iterdir()
    assert path.name.startswith("events.out.tfevents.")
    data, events = path.read_bytes(), []
    while data:
        header, data = data[:12], data[12:]
        (length,) = struct.unpack("<Q", header[:8])
        assert struct.unpack("<I", header[8:])[0] == masked_crc32c(header[:8])
        body, crc, data = data[:length], data[length:length + 4], data[length + 4:]
        assert struct.unpack("<I", crc)[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert got == [(1, {"train/loss": 1.25, "train/lr": f32(1e-4)}),
                   (300, {"train/loss": f32(0.1), "train/lr": f32(1e-6)}),
                   (300, {"val/mean_f1": 71.5, "val/f1/skin": 90.25, "val/f1/l_eye": 60.0})]
    # a resumed run in the same second and process writes a file of its own beside it
    first = path.read_bytes()
    with MetricWriter(epath.Path(tmp_path), total_steps=300, initial_step=300, desc="t",
                      progress=False) as writer:
        writer.write(records[0])
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2 and path.read_bytes() == first


def test_step_flops_counts_the_global_matmuls_of_a_sharded_step():
    """MFU's FLOPs are the global step's: a (64, 128) x (128, 256) product whose rows are
    split over 8 devices is 2*64*128*256 FLOPs per step, not one device's share, both from
    XLA's analysis of the lowered program (CPU) and from the jaxpr, the count used where XLA
    reports none (XLA:GPU, emulated here by a lowered program without a count; README's H200
    figures). Bar: exact integers; XLA may add the sum's 64*256 additions and nothing more."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segface_jax.train import perf

    class NoCount:  # what XLA:GPU's lowered program gives
        def cost_analysis(self):
            return None

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    traced = jax.jit(lambda x, w: (x @ w).sum()).trace(x, w)
    matmul = 2 * 64 * 128 * 256
    assert matmul <= perf.step_flops(traced, traced.lower()) <= matmul + 64 * 256
    assert perf.step_flops(traced, NoCount()) == matmul


def test_jaxpr_flops_counts_convolutions_and_their_gradients_as_torch_does():
    """The jaxpr count of a strided, grouped convolution's forward and backward pass is three
    times its forward's multiply-adds (x2), as torch's FLOP counter counts: the input gradient,
    an input-dilated convolution, as many as the forward, not one per tap of the dilated input
    (4x as many here). A matmul inside a ``scan`` counts once per iteration, a ``cond`` its
    costliest branch. Bar: exact integers, computed by hand from the shapes."""
    import jax
    import jax.numpy as jnp

    from segface_jax.train import perf

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", feature_group_count=4,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, k = jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 4, 8))  # 16 -> 8 channels, 4 groups
    forward = 2 * (2 * 16 * 16 * 8) * (3 * 3 * 4)  # each output: 3x3 taps x 4 inputs
    count = perf.jaxpr_flops
    assert count(jax.make_jaxpr(conv)(x, k).jaxpr) == forward

    def loss(x, k):
        return (conv(x, k) ** 2).sum()

    # value_and_grad: the forward, the input gradient and the kernel gradient
    assert count(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(x, k).jaxpr) == 3 * forward

    a, b = jnp.ones((5, 8, 16)), jnp.ones((16, 4))
    scanned = jax.make_jaxpr(lambda a, b: jax.lax.scan(lambda c, r: (c, r @ b), 0, a))(a, b)
    assert count(scanned.jaxpr) == 5 * 2 * 8 * 16 * 4
    branches = jax.make_jaxpr(lambda p, a, b: jax.lax.cond(p, lambda: a[0] @ b,
                                                           lambda: a[0, :, :4] @ b[:4]))
    assert count(branches(True, a, b).jaxpr) == 2 * 8 * 16 * 4


@pytest.mark.slow
def test_frozen_encoder_checkpoints_and_resumes(tmp_path, lapa_root, monkeypatch):
    """freeze=encoder through the trainer: its optimizer state (no moments for the encoder)
    checkpoints and restores; after two resumed steps the encoder equals the one in the step-2
    checkpoint bit for bit while the decoder moved, and the optimizer state holds no moments
    for the encoder. The resumed run restores into the model's structure: it initialises no
    weights."""
    from etils import epath

    from segface_jax.train import trainer

    config = _config(tmp_path, lapa_root, 2)
    work = epath.Path(tmp_path / "run")
    train(load_config(config, ["freeze=encoder"]), work, progress=False)

    def no_initialisation(*args):
        raise AssertionError("a resumed run initialised the model")

    monkeypatch.setattr(trainer, "build_model", no_initialisation)
    train(load_config(config, ["freeze=encoder", "max_steps=4"]), work, resume=True,
          progress=False)
    first, last = _state(tmp_path / "run", 2), _state(tmp_path / "run", 4)
    encoder = [k for k in first if k.startswith("params.backbone.")]
    decoder = [k for k in first if k.startswith("params.face_decoder.")]
    assert encoder and decoder
    assert all(np.array_equal(first[k], last[k]) for k in encoder)
    assert any(not np.array_equal(first[k], last[k]) for k in decoder)
    assert not [k for k in last if k.startswith("opt.") and ".backbone." in k
                and np.asarray(last[k]).size > 1]


def test_config_checks_remat_and_accumulation(tmp_path, lapa_root):
    config = _config(tmp_path, lapa_root, 1)  # global_batch 8, dice_group 4
    cfg = load_config(config, ["remat=block", "global_batch=16", "accum_steps=2",
                               "freeze=encoder+fusion"])
    assert (cfg.remat, cfg.accum_steps, cfg.freeze) == ("block", 2, "encoder+fusion")
    for bad, match in [(["remat=all"], "remat must be one of none, block, encoder"),
                       (["freeze=decoder"], "freeze must be one of none, encoder, encoder"),
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


def _env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: this one's, with ``devices`` host devices; XLA_FLAGS'
    other flags (those of the quick_compile marker) are kept."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A small MobileNetV3 (BatchNorm) recipe: run A trains 4 steps; run B is killed with
    SIGKILL after its first checkpoint and resumed: its final state equals A's bit for bit,
    everything the checkpoint holds (parameters, BatchNorm statistics, optimizer state, step,
    seed, data position). (A resumed run's stochastic-depth draws are checked in
    test_processes_share_the_global_batch_and_resume_on_another_count, bit for bit too.)"""
    config = _bn_config(tmp_path)
    work = tmp_path
    env = _env()
    steps = ("--set", "max_steps=4")
    a = subprocess.run(_cli(config, work / "a", *steps), env=env, capture_output=True,
                       text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-2000:]
    proc = subprocess.Popen(_cli(config, work / "b", *steps), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    ckpts = work / "b" / "checkpoints"
    while time.time() < deadline and not (ckpts.is_dir() and any(
            p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert done and done[-1] < 4, done  # killed mid-run
    b = subprocess.run(_cli(config, work / "b", *steps, "--resume"), env=env,
                       capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-2000:]
    assert f"resumed from step {done[-1]}" in b.stdout
    a, b = _state(work / "a", 4), _state(work / "b", 4)
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} >= {
        "params", "rest", "opt", "step", "seed", "data"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _bn_config(directory: Path) -> Path:
    """A config file for BN_RECIPE over a small CelebAMask-HQ folder, both in ``directory``."""
    from dataclasses import asdict

    from tests import datasets
    from tests.small_models import jax_config

    root = datasets.write_celeba(directory / "celeba", extra_train=16)
    config = directory / "bn.py"
    config.write_text(BN_RECIPE.format(root=str(root), encoder=tuple(
        asdict(jax_config("mobilenet_v3_large")).items())))
    return config


BN_RECIPE = '''
from segface_jax.train.trainer import TrainConfig


def get_config():
    return TrainConfig(variant="mobilenet_celeba_512", data_root={root!r}, init="scratch",
                       resolution=40, global_batch=8, dice_group=4, workers=0, lr=1e-3,
                       weight_decay=1e-5, adam_eps=1e-3, epochs=300, milestones=(80, 200),
                       gamma=0.1, log_every=1, checkpoint_every=2, eval_every_epochs=0,
                       max_steps=4, encoder_overrides={encoder!r})
'''


def _all_cores() -> set[int]:
    """Every core this session may use, the other xdist workers' too (conftest pins each
    worker to its share and lists them all)."""
    listed = os.environ.get("SEGFACE_TESTS_ALL_CORES")
    return {int(c) for c in listed.split(",")} if listed else os.sched_getaffinity(0)


def _run_processes(config: Path, workdir: Path, processes: int, *extra: str) -> list[str]:
    """``segface-jax train`` on 2 CPU devices: one process with both, or 2 processes with one
    each (meeting through jax.distributed on 127.0.0.1, gloo collectives); their stdout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 2 devices in all: one process with two, or two processes with one each
    env = _env(2 if processes == 1 else 1, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    multi = lambda i: (["--num-processes", str(processes), "--process-id", str(i),  # noqa: E731
                        "--coordinator", f"127.0.0.1:{port}"] if processes > 1 else [])
    # every run sees all the machine's cores, as a user's would (see the test's docstring):
    # children inherit the starting thread's affinity, widened for the moment of the start
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _all_cores())
    try:
        procs = [subprocess.Popen(_cli(config, workdir, *multi(i), *extra), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(processes)]
    finally:
        os.sched_setaffinity(0, mine)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def _differences(got: dict, want: dict, what: str, bound: float, lr: float = 1e-3) -> float:
    """Largest float difference over the tensors of two checkpoints, each relative to its
    tensor's scale plus ``lr``; integer leaves and data positions must be equal."""
    assert got.keys() == want.keys(), what
    worst = 0.0
    for k, w in want.items():
        if w.dtype.kind in "fc":
            worst = max(worst, float(np.abs(got[k] - w).max() / (np.abs(w).max() + lr)))
        else:
            np.testing.assert_array_equal(got[k], w, err_msg=f"{what}: {k}")
    assert worst <= bound, (what, worst)
    return worst


def _one_position(state: dict) -> dict:
    """``state`` with its processes' data positions (all equal: the global step) as one."""
    positions = {str(v) for k, v in state.items() if k.startswith("data.iterators.")}
    assert len(positions) == 1, positions
    rest = {k: v for k, v in state.items() if not k.startswith("data.iterators.")}
    return {**rest, "data.position": np.asarray(positions.pop())}


@pytest.mark.slow
def test_processes_share_the_global_batch_and_resume_on_another_count(tmp_path, lapa_root):
    """The tiny recipe (global batch 8, stochastic depth on) on 1 and 2 processes.

    * 2 processes train the same steps as 1 process: each reads its own rows of each global
      batch (test_every_process_count_reads_the_same_global_batches checks that they are
      disjoint, cover the epoch and together make the one-process batch), so after 2 steps the
      whole state (parameters, optimizer moments, step, seed, data position) equals the
      one-process run's.
    * A run resumed on another process count continues from the same global position: 2
      processes for steps 1-2 then 1 process for 3-4, and 1 then 2, both end where the
      one-process run does.

    Every run has 2 devices (one process with two, or two with one each), so every step is the
    same partitioned program; only the collectives' implementation differs (in-process or
    gloo), and a sum of two operands does not depend on its order. So the state must agree to
    float32 rounding at most: every tensor within 1e-6 of its scale plus the largest move an
    update makes (lr 1e-3, for entries whose exact gradient is 0); measured: 0, bit for bit,
    in all three comparisons, with every process free to use both of this machine's cores.
    (With all of them confined to one core, as an xdist worker is, the 2-process run ends
    3.6e-6 from the 1-process one: XLA:CPU then splits its work otherwise; the runs are given
    all cores.) (On 1 device instead of 2
    the reductions run in another order, and this tiny model's ReLUs in the decoder turn that
    rounding into 5e-7 absolute differences in one tiny-scale bias after 2 steps, 4.5e-4 of its
    scale: test_same_step_on_one_and_eight_devices checks that case in float64, where no ReLU
    input is within rounding of its kink.) Adam's eps is 1e-3 for the reason given there.
    Integer leaves and data positions must be equal. Wrong or repeated rows, other
    stochastic-depth draws, a lost optimizer state or a data position that restarts the epoch
    move the state by far more (an update is ~lr per step).
    """
    config, bound = _config(tmp_path, lapa_root, 4), 1e-6
    eps = ("--set", "adam_eps=0.001")
    _run_processes(config, tmp_path / "one", 1, *eps)  # the reference: checkpoints at 2 and 4
    _run_processes(config, tmp_path / "two_then_one", 2, *eps, "--set", "max_steps=2")
    one = {s: _one_position(_state(tmp_path / "one", s)) for s in (2, 4)}
    worst = {"2 processes, step 2": _differences(
        _one_position(_state(tmp_path / "two_then_one", 2)), one[2], "2 processes", bound)}
    out = _run_processes(config, tmp_path / "two_then_one", 1, *eps, "--resume")[0]
    assert "resumed from step 2" in out
    worst["2 then 1"] = _differences(_one_position(_state(tmp_path / "two_then_one", 4)),
                                     one[4], "2 processes then 1", bound)
    shutil.copytree(tmp_path / "one", tmp_path / "one_then_two")  # 1 process to step 2, then 2
    shutil.rmtree(tmp_path / "one_then_two" / "checkpoints" / "4")
    outs = _run_processes(config, tmp_path / "one_then_two", 2, *eps, "--resume")
    assert all("resumed from step 2" in o for o in outs)
    worst["1 then 2"] = _differences(_one_position(_state(tmp_path / "one_then_two", 4)),
                                     one[4], "1 process then 2", bound)
    print("\nlargest differences from the one-process run:", worst)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path, lapa_root):
    config = _config(tmp_path, lapa_root, 100_000)  # far more than it can run before the signal
    env = _env(SEGFACE_JAX_COMPILATION_CACHE="0")
    proc = subprocess.Popen(_cli(config, tmp_path / "run", "--set", "checkpoint_every=1000"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    saved = int(err.split("checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= saved < 100_000 and "continue with --resume" in err, err[-2000:]
    assert (tmp_path / "run" / "checkpoints" / str(saved)).is_dir()


@pytest.mark.slow
def test_initialisation_from_imagenet_encoder_and_segface_checkpoints(tmp_path, lapa_root):
    import dataclasses

    from segface_jax.checkpoint import flat_state, save_checkpoint
    from segface_jax.train.trainer import build_model
    from segface_jax.variants import get_variant

    cfg = load_config(_config(tmp_path, lapa_root, 4), [])
    lapa = get_variant(cfg.variant)
    tiny = lapa.retrained("tiny", lapa.data, cfg.resolution, cfg.encoder_overrides)
    scratch = build_model(cfg, tiny)
    # a `convert-backbone`-style directory for this (tiny) encoder, with other values
    encoder = {k: np.asarray(v) + 1.0 for k, v in flat_state(scratch.backbone).items()}
    save_checkpoint(tmp_path / "enc", encoder, {"kind": "backbone", "arch": "swin_b"})
    model = build_model(dataclasses.replace(cfg, init="imagenet", init_path=str(tmp_path / "enc")),
                        tiny)
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
    model = build_model(full, lapa)
    stored = flat_state(__import__("segface_jax").load(full.init_path).module)
    for k, v in flat_state(model).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(stored[k]))
    with pytest.raises(TrainingError, match="needs init_path"):
        build_model(dataclasses.replace(cfg, init="imagenet"), tiny)
