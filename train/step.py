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

from segface_jax.models.layers import set_training
from segface_jax.train.losses import segface_loss
from segface_jax.train.mesh import normalize_on_device


def split_for_training(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """Put ``model`` in training mode and split it into (graphdef, {"params", "rest"})."""
    set_training(model, True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # copies: the step donates its state, which must not delete the caller's model arrays
    params, rest = jax.tree.map(lambda a: a.copy(), (params, rest))
    return graphdef, {"params": params, "rest": rest}


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0):
    """(graphdef, initial state) for ``train_step``.

    Stochastic depth draws from ``fold_in(key(seed), step)``: the random stream is a function
    of the seed and the step, so a resumed run makes exactly the same draws.
    """
    graphdef, parts = split_for_training(model)
    return graphdef, {**parts, "opt": tx.init(parts["params"]),
                      "step": jnp.zeros((), jnp.int32), "seed": jnp.asarray(seed, jnp.uint32)}


def loss_and_grads(graphdef: nnx.GraphDef, state: dict, batch: dict, dice_group: int | None,
                   needs_landmarks: bool):
    """(loss, parts, new rest, grads) of one batch: the differentiable core of the step."""
    x = normalize_on_device(batch["image"])
    labels = batch["label"].astype(jnp.int32)
    lm = batch["landmarks"] if needs_landmarks else None

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


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, *, dice_group: int | None,
                    needs_landmarks: bool, lr_schedule: optax.Schedule | None = None):
    """jit(state, batch) -> (state, metrics): batch sharded on ``data``, state replicated and
    donated."""
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    @functools.partial(jax.jit, donate_argnums=0,
                       in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    def step(state: dict, batch: dict) -> tuple[dict, dict[str, Any]]:
        loss, parts, rest, grads = loss_and_grads(graphdef, state, batch, dice_group,
                                                  needs_landmarks)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        new = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1,
               "seed": state["seed"]}
        return new, metrics

    return step
