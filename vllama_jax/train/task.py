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

Builders named in configs (`task.builder`, `data.train_builder`, `data.eval_builder`) are
'module:function' strings, imported lazily, so configs can name code that lands later.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, runtime_checkable

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
