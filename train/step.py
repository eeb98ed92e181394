"""The jitted training step: batch sharded over a ``("data",)`` mesh, state replicated, donated.

The state is a pytree ``{"params", "rest", "opt", "step", "seed"}``: ``params`` are the
trainable ``nnx.Param`` leaves (float32 whatever the compute dtype), ``rest`` the BatchNorm
statistics, ``opt`` the optax state; stochastic depth draws from (seed, step). Batches arrive
as uint8 images, uint8 labels and float32 landmarks; normalisation happens on the device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from segface_jax.models.layers import kernels_for, set_training
from segface_jax.train.losses import segface_loss
from segface_jax.train.mesh import normalize_on_device


def split_for_training(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """Put ``model`` in training mode and split it into (graphdef, {"params", "rest"})."""
    set_training(model, True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # copies: the step donates its state, which must not delete the caller's model arrays
    params, rest = jax.tree.map(lambda a: a.copy(), (params, rest))
    return graphdef, {"params": params, "rest": rest}


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None):
    """(graphdef, initial state) for ``train_step``, replicated on ``mesh`` when given.

    Stochastic depth draws from ``fold_in(key(seed), step)``: the random stream is a function
    of the seed and the step, so a resumed run makes exactly the same draws. A state placed
    where the step puts its output is what every later step receives: given one that is not
    (arrays on the default device), the first step would be traced and compiled for it and the
    second once more.
    """
    graphdef, parts = split_for_training(model)
    state = _with_optimizer(parts, tx, seed)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, P()))
    return graphdef, state


def abstract_state(model: nnx.Module, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh):
    """``init_state``'s (graphdef, state) for a model that is only a structure
    (``abstract_model``): ShapeDtypeStructs replicated on ``mesh``. A resumed run restores its
    checkpoint into it, with no weights initialised only to be overwritten."""
    set_training(model, True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shapes = jax.eval_shape(lambda parts: _with_optimizer(parts, tx, 0),
                            {"params": params, "rest": rest})
    replicated = NamedSharding(mesh, P())
    return graphdef, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def _with_optimizer(parts: dict, tx: optax.GradientTransformation, seed: int) -> dict:
    """The train state of model ``parts``: optimizer state, step 0 and the stochastic-depth
    seed added."""
    return {**parts, "opt": tx.init(parts["params"]), "step": jnp.zeros((), jnp.int32),
            "seed": jnp.asarray(seed, jnp.uint32)}


def loss_and_grads(graphdef: nnx.GraphDef, state: dict, batch: dict, dice_group: int | None,
                   needs_landmarks: bool, key: jax.Array | None = None):
    """(loss, parts, new rest, grads) of one batch: the differentiable core of the step.

    ``key`` drives stochastic depth; by default ``fold_in(key(seed), step)``.
    """
    x = normalize_on_device(batch["image"])
    labels = batch["label"].astype(jnp.int32)
    lm = batch["landmarks"] if needs_landmarks else None
    if key is None:
        key = jax.random.fold_in(jax.random.key(state["seed"]), state["step"])

    def loss_fn(params, rest):
        model = nnx.merge(graphdef, params, rest)
        set_training(model, True, nnx.Rngs(dropout=key))  # a stream made inside the trace
        logits = model(x, lm)
        set_training(model, True)  # detach it again: the state keeps no random stream
        loss, parts = segface_loss(logits, labels, dice_group)
        return loss, (parts, nnx.state(model, nnx.Not(nnx.Param)))

    # ``rest`` (BatchNorm statistics, updated in the forward pass) must enter the same trace
    # as the parameters to be mutated there: it is differentiated too, and its gradient,
    # never used, is removed by XLA.
    (loss, (parts, rest)), (grads, _) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                           has_aux=True)(state["params"],
                                                                         state["rest"])
    return loss, parts, rest, grads


def micro_batches(batch: dict, accum_steps: int, dice_group: int) -> dict:
    """Split a batch into ``accum_steps`` micro-batches of whole Dice groups:
    (N, ...) -> (accum_steps, N / accum_steps, ...).

    Micro-batch a takes Dice groups a, a + accum_steps, a + 2 accum_steps, ...: each device's
    contiguous shard of the batch then holds its share of every micro-batch, so the split
    moves no data between devices (when each shard holds a multiple of ``accum_steps`` groups).
    """
    def split(a):
        n = a.shape[0]
        groups = a.reshape(n // (dice_group * accum_steps), accum_steps, dice_group,
                           *a.shape[1:])
        return jnp.swapaxes(groups, 0, 1).reshape(accum_steps, n // accum_steps, *a.shape[1:])

    return jax.tree.map(split, batch)


def accumulated_loss_and_grads(graphdef: nnx.GraphDef, state: dict, batch: dict,
                               dice_group: int | None, needs_landmarks: bool,
                               accum_steps: int = 1):
    """``loss_and_grads`` of a batch computed in ``accum_steps`` sequential micro-batches.

    The loss is 0.5 CE (a mean over pixels) + 0.5 Dice (a mean over Dice groups); micro-batches
    of equal size made of whole groups make it, and so its gradient, the mean of the
    micro-batches' values: the same step as one pass over the batch, with the activation
    memory of one micro-batch. BatchNorm (batch statistics, in the forward pass) is the
    exception: each micro-batch normalises with its own statistics and updates the running
    averages in turn, as torch's gradient accumulation does.
    """
    if accum_steps == 1:
        return loss_and_grads(graphdef, state, batch, dice_group, needs_landmarks)
    n = batch["image"].shape[0]
    if not dice_group or n % (dice_group * accum_steps):
        raise ValueError(f"accum_steps {accum_steps} needs the batch ({n}) split into whole Dice "
                         f"groups (dice_group {dice_group}): batch % (dice_group * accum_steps)"
                         " must be 0")
    key = jax.random.fold_in(jax.random.key(state["seed"]), state["step"])
    zeros = jax.tree.map(jnp.zeros_like, state["params"])

    def one(carry, xs):
        loss_sum, parts_sum, rest, grad_sum = carry
        micro, index = xs
        loss, parts, rest, grads = loss_and_grads(
            graphdef, {**state, "rest": rest}, micro, dice_group, needs_landmarks,
            key=jax.random.fold_in(key, index))
        add = functools.partial(jax.tree.map, jnp.add)
        return (loss_sum + loss, add(parts_sum, parts), rest, add(grad_sum, grads)), None

    parts0 = {"ce": jnp.zeros(()), "dice": jnp.zeros(())}
    (loss, parts, rest, grads), _ = jax.lax.scan(
        one, (jnp.zeros(()), parts0, state["rest"], zeros),
        (micro_batches(batch, accum_steps, dice_group), jnp.arange(accum_steps)))
    mean = functools.partial(jax.tree.map, lambda a: a / accum_steps)
    return loss / accum_steps, mean(parts), rest, mean(grads)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, dice_group: int | None,
                    needs_landmarks: bool, lr_schedule: optax.Schedule | None = None,
                    accum_steps: int = 1):
    """jit(state, batch) -> (state, metrics): batch sharded on ``data``, state replicated and
    donated; ``accum_steps`` > 1 accumulates gradients over that many micro-batches."""
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    platform = mesh.devices.flat[0].platform  # the kernels to trace (layers.kernels_for)

    @functools.partial(jax.jit, donate_argnums=0,
                       in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    def step(state: dict, batch: dict) -> tuple[dict, dict[str, Any]]:
        with kernels_for(platform):
            loss, parts, rest, grads = accumulated_loss_and_grads(
                graphdef, state, batch, dice_group, needs_landmarks, accum_steps)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        new = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1,
               "seed": state["seed"]}
        return new, metrics

    return step
