"""The train state, the train/eval step functions and their sharded `jax.jit`.

One step: split the global batch into `accum_steps` micro-batches and `lax.scan` over them,
accumulating float32 gradients of the trainable params only (frozen params enter through
`stop_gradient` and are a separate, non-donated argument), then one optimizer update.
Scanning keeps one micro-batch of activations live instead of the whole batch (the params pass
an optimization barrier with each micro-batch so XLA cannot hoist their all-gathers out of the
loop, see `_accumulate`); with `accum_steps=1` there is no scan.

Mixed precision: trainable params are float32 master weights; with `compute_dtype` set, the
trainable and frozen params are cast to it inside the loss (the cast's gradient lands back in
float32). The model's own `dtype` config must match to get bf16 activations.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vllama_jax import sharding
from vllama_jax.models.common import constrain
from vllama_jax.train import partition
from vllama_jax.train.task import Task

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer updates applied so far
    params: Any            # trainable params only (float32 master weights)
    opt_state: Any         # optimizer state over `params` only
    rng: jax.Array         # raw uint32[2] key, split once per step

    def to_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jnp.asarray(rng, jnp.uint32))


def state_shardings(boxed_trainable: Any, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings for a TrainState: params and their moments by the logical rules, the rest
    (step, rng, optimizer counters) replicated."""
    replicated = NamedSharding(mesh, P())
    param_sh = sharding.param_shardings(boxed_trainable, mesh)
    abstract_opt = jax.eval_shape(tx.init, nn.meta.unbox(boxed_trainable))
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def abstract_state(boxed_trainable: Any, tx: optax.GradientTransformation,
                   shardings: TrainState | None = None) -> TrainState:
    """ShapeDtypeStructs of the TrainState (with shardings if given), e.g. as a restore target."""
    params = nn.meta.unbox(boxed_trainable)
    state = jax.eval_shape(lambda p: init_state(p, tx, jnp.zeros((2,), jnp.uint32)), params)
    if shardings is None:
        return state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


# ---------------------------------------------------------------------------------------------
# Pure step functions


def _merged_params(trainable, frozen, compute_dtype):
    frozen = jax.lax.stop_gradient(frozen)
    return partition.merge(partition.cast_floating(trainable, compute_dtype),
                           partition.cast_floating(frozen, compute_dtype))


def _check_aux(aux: dict) -> dict:
    if not isinstance(aux, dict):
        raise TypeError(f"loss_fn must return (loss, dict), got aux of type {type(aux).__name__}")
    for k, v in aux.items():
        if jnp.ndim(v) != 0:
            raise ValueError(f"loss_fn aux[{k!r}] must be a scalar, got shape {jnp.shape(v)}")
    return {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


def _grad_fn(task: Task, compute_dtype) -> Callable:
    def loss_of(trainable, frozen, batch, rng):
        loss, aux = task.loss_fn(_merged_params(trainable, frozen, compute_dtype), batch, rng,
                                 deterministic=False)
        if jnp.ndim(loss) != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
        return loss.astype(jnp.float32), _check_aux(aux)

    return jax.value_and_grad(loss_of, has_aux=True)


def split_microbatches(batch: Any, n: int) -> Any:
    """[B, ...] -> [n, B/n, ...]; micro-batch j holds rows j, j+n, ...

    Taking every n-th row keeps each device's rows inside its own shard of every micro-batch,
    so the split moves no data between devices.
    """
    def one(path, x):
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has shape {x.shape}: its "
                             f"leading dim must be divisible by accum_steps={n}")
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree_util.tree_map_with_path(one, batch)


def _reduce_aux(aux_sum: dict, n: int) -> dict:
    # Counts add up over micro-batches; everything else is a per-micro-batch mean.
    return {k: v if k.startswith("num_") else v / n for k, v in aux_sum.items()}


def _accumulate(grad_fn, params, frozen, batch, rng, n: int):
    micro = split_microbatches(batch, n)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, aux_shape), _ = jax.eval_shape(grad_fn, params, frozen, first, rng)

    def body(carry, xs):
        g_acc, l_acc, a_acc = carry
        mb, i = xs
        # The params are loop-invariant, so XLA's while-loop invariant code motion would hoist their
        # FSDP all-gathers (and casts) out of the loop: every layer's gathered weights alive at once
        # for the whole loop (vllama-plan, 7B stage 1 on v4-32: 41.0 GiB at accum 2 vs 14.4 at 1).
        # Passing them through one optimization barrier with this micro-batch makes them
        # loop-variant, so each layer is gathered inside the body, when it is used, as without a loop.
        p_i, f_i, mb = jax.lax.optimization_barrier((params, frozen, mb))
        (loss, aux), g = grad_fn(p_i, f_i, mb, jax.random.fold_in(rng, i))
        g_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)
        a_acc = {k: a_acc[k] + aux[k] for k in a_acc}
        return (g_acc, l_acc + loss, a_acc), None

    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32),
            {k: jnp.zeros((), jnp.float32) for k in aux_shape})
    (g, loss, aux), _ = jax.lax.scan(body, init, (micro, jnp.arange(n)))
    grads = jax.tree.map(lambda a, p: (a / n).astype(p.dtype), g, params)
    return loss / n, _reduce_aux(aux, n), grads


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: Callable, *,
                    accum_steps: int = 1, compute_dtype: Any = None) -> Callable:
    """`step(state, frozen, batch) -> (state, metrics)`; pure, jit it with `jit_train_step`."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    grad_fn = _grad_fn(task, compute_dtype)

    def step(state: TrainState, frozen: Any, batch: Any) -> tuple[TrainState, Metrics]:
        rng, step_rng = jax.random.split(state.rng)
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, frozen, batch, step_rng)
        else:
            loss, aux, grads = _accumulate(grad_fn, state.params, frozen, batch, step_rng, accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32), **aux}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step


def make_eval_step(task: Task, *, compute_dtype: Any = None) -> Callable:
    """`eval_step(trainable, frozen, batch) -> metrics` with dropout off."""
    def eval_step(trainable, frozen, batch):
        params = _merged_params(trainable, frozen, compute_dtype)
        loss, aux = task.loss_fn(params, batch, jax.random.PRNGKey(0), deterministic=True)
        return {"loss": loss.astype(jnp.float32), **_check_aux(aux)}

    return eval_step


def make_forward_loss(task: Task, *, compute_dtype: Any = None) -> Callable:
    """`loss(trainable, frozen, batch)` in train mode without gradients (for FLOP comparisons)."""
    def forward(trainable, frozen, batch, rng):
        params = _merged_params(trainable, frozen, compute_dtype)
        return task.loss_fn(params, batch, rng, deterministic=False)[0]

    return forward


# ---------------------------------------------------------------------------------------------
# Sharded jit


def jit_train_step(step_fn: Callable, mesh: Mesh, state_sh: TrainState, frozen_sh: Any,
                   batch_sh: Any) -> sharding.MeshJit:
    """The train step as one jit: explicit in/out shardings, the train state donated."""
    replicated = NamedSharding(mesh, P())
    return sharding.MeshJit(step_fn, mesh, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))


def jit_eval_step(eval_fn: Callable, mesh: Mesh, params_sh: Any, frozen_sh: Any,
                  batch_sh: Any) -> sharding.MeshJit:
    return sharding.MeshJit(eval_fn, mesh, in_shardings=(params_sh, frozen_sh, batch_sh),
                   out_shardings=NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------------
# Cost report


def compiled_flops(lowered) -> float:
    """FLOPs XLA's cost analysis assigns to a lowered computation (per device).

    A `while`/`scan` body is counted once, not per trip: compare steps with `accum_steps=1`.
    """
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA cost analysis has no 'flops' entry: {cost!r}")
    return float(cost["flops"])


def step_flops_report(task: Task, tx: optax.GradientTransformation, state: TrainState,
                      frozen: Any, batch: Any, *, compute_dtype: Any = None) -> dict[str, float]:
    """Compiled FLOPs of one train step vs one forward pass of the same batch.

    With only a small head trainable behind a big frozen tower, `step / forward` stays near 1
    (forward + the head's backward); a fully trainable model costs about 3x its forward.
    """
    step = jax.jit(make_train_step(task, tx, lambda s: 0.0, compute_dtype=compute_dtype))
    fwd = jax.jit(make_forward_loss(task, compute_dtype=compute_dtype))
    step_flops = compiled_flops(step.lower(state, frozen, batch))
    fwd_flops = compiled_flops(fwd.lower(state.params, frozen, batch, state.rng))
    return {"step_flops": step_flops, "forward_flops": fwd_flops, "ratio": step_flops / fwd_flops}
