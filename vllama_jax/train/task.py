"""The contract between a model and the training machinery.

The trainer knows nothing about Video-LLaMA: it drives any object that satisfies `Task`.

* `init_params(rng) -> params` — the full *unboxed* params tree (nested dict of arrays), random
  init. Must be traceable: the trainer runs it under `jax.jit` with the param shardings as
  `out_shardings`, so a 7B tower is born sharded instead of on one device.
* `abstract_params() -> boxed tree` — `jax.eval_shape` of the init, still boxed with
  `nn.LogicallyPartitioned`, from which `sharding.param_shardings` derives the shardings.
* `loss_fn(params, batch, rng, deterministic) -> (loss, aux)` — `params` is the merged
  trainable + frozen tree; `loss` a float32 scalar; `aux` a flat dict of scalars. Keys starting
  with `num_` are counts, summed over micro-batches (`num_tokens` feeds tokens/s); the other aux
  values are averaged.

Optional:

* `load_pretrained(params) -> params` — host-side hook run once on a fresh start (and on resume
  when no `frozen/` checkpoint exists) to overwrite the random init with pretrained weights read
  from local files. May return host numpy arrays; the trainer places them with the shardings.
* `trainable_patterns() -> tuple[str, ...]` — regexes over '/'-joined param paths of what the
  task trains (`vllama_jax.train.partition`); `config.freeze.preset` / `.patterns` add to them.
* `pretrained_subtrees() -> tuple[str, ...]` — the top-level params subtrees `load_pretrained`
  fills in whole. They are left out of the random init (`init_unprovided`), so the trainer never
  compiles the init of towers it is about to overwrite; `load_pretrained` then receives the
  params without them and must add them.

Builders named in configs (`task.builder`, `data.train_builder`, `data.eval_builder`) are
'module:function' strings, imported lazily, so configs can name code that lands later.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import jax

Params = Any
Batch = Any


@runtime_checkable
class Task(Protocol):
    def init_params(self, rng: jax.Array) -> Params: ...

    def abstract_params(self) -> Params: ...

    def loss_fn(self, params: Params, batch: Batch, rng: jax.Array,
                deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def check_task(task: Any) -> Task:
    missing = [m for m in ("init_params", "abstract_params", "loss_fn")
               if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(f"{type(task).__name__} is not a Task: missing method(s) {missing}")
    return task


def init_unprovided(task: Task, rng: jax.Array, also_provided: Iterable[str] = (), out_shardings=None) -> dict:
    """`jax.jit(task.init_params)(rng)` without the top-level subtrees that `task.pretrained_subtrees()`
    and `also_provided` name: XLA compiles only the random init of what no file provides (the
    values of the rest are those of the full init, Flax keys each param by its path).
    `out_shardings`: the shardings of the full tree (the kept subtrees' are used)."""
    provided = set(also_provided) | set(getattr(task, "pretrained_subtrees", lambda: ())())
    if not provided:
        return jax.jit(task.init_params, out_shardings=out_shardings)(rng)
    names = [k for k in jax.eval_shape(task.init_params, rng) if k not in provided]
    if not names:
        return {}
    keep = lambda tree: {k: tree[k] for k in names}  # noqa: E731
    sh = None if out_shardings is None else keep(out_shardings)
    return jax.jit(lambda r: keep(task.init_params(r)), out_shardings=sh)(rng)


def trainable_patterns(config, task: Task) -> tuple[str, ...]:
    """What a run trains: the task's own declaration plus `config.freeze`'s preset and patterns."""
    from vllama_jax.train import partition

    own = tuple(getattr(task, "trainable_patterns", lambda: ())())
    return partition.resolve_patterns(config.freeze.get("preset"), own + tuple(config.freeze.get("patterns", ()) or ()))


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(params init key, train-state key) of a run with `train.seed = seed`. Whoever rebuilds a
    run's starting params (the feature cache's towers, inference without a `frozen/` checkpoint)
    goes through `initial_params`, so their random towers are the trainer's."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(int(seed)))
    return init_key, state_key


def initial_params(task: Task, seed: int, also_provided: Iterable[str] = (), out_shardings=None) -> dict:
    """The params a fresh run of `task` with `train.seed = seed` starts from: the random init of
    what no file provides (`init_unprovided`), then the task's pretrained files (host arrays
    where it loads them; the caller places them)."""
    params = init_unprovided(task, run_keys(seed)[0], also_provided, out_shardings)
    hook = getattr(task, "load_pretrained", None)
    return hook(params) if callable(hook) else params


def check_provided(task: Task, params: dict, full: dict) -> None:
    """After `load_pretrained`: every top-level subtree of the full tree `full` is there."""
    missing = sorted(set(full) - set(params))
    if missing:
        raise ValueError(f"{type(task).__name__}.load_pretrained did not add the subtrees {missing} that its "
                         f"pretrained_subtrees() promised")


def import_string(spec: str) -> Callable:
    """'package.module:attribute' -> the attribute."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} named by {spec!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})") from None


def build_task(config) -> Task:
    """The task named by `config.task.builder`, called with the whole config."""
    return check_task(import_string(config.task.builder)(config))
