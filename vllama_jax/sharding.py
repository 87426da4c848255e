"""Device mesh, the one logical-axis rules table, and shardings for params and batches.

Every parameter and activation in `vllama_jax.models` is annotated with *logical* axis names
(`nn.with_logical_partitioning` / `nn.with_logical_constraint`). `LOGICAL_RULES` maps them onto the
three mesh axes:

  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params, grads and optimizer state sharded (ZeRO-3 style)
  tensor  Megatron-style tensor parallelism over heads / mlp / vocab

Flax assigns mesh axes to the dims of one array in rule order and never uses a mesh axis twice in
one array, so `embed` is fsdp-sharded on a weight but falls back to replicated on an activation
whose `batch` dim already took `fsdp`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used across the models, in priority order. Names not listed are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("encoder_embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("kv_length", None),
    ("frames", None),
    ("query", None),
    ("patch", None),
    ("channels", None),
    ("layers", None),
)

# A batch is sharded over both data-parallel axes on its leading dim.
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axis types (GSPMD propagation).

    One entry of `shape` may be -1 and is inferred from the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)} may contain at most one -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"{len(devices)} devices cannot fill mesh shape {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, got {len(devices)}")
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axis names {tuple(axis_names)}")
    return jax.make_mesh(tuple(shape), tuple(axis_names),
                         axis_types=(AxisType.Auto,) * len(axis_names), devices=devices)


def logical_to_mesh_spec(logical_axes: Sequence[str | None],
                         rules=LOGICAL_RULES) -> P:
    """PartitionSpec for one array from its logical axis names."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def param_shardings(abstract_variables: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a params tree from its boxed (logically partitioned) abstract value.

    `abstract_variables` is what `jax.eval_shape(model.init, ...)` returns (still boxed with
    `nn.LogicallyPartitioned`); the result has the same structure as the *unboxed* tree.
    Leaves without annotations are replicated.
    """
    specs = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                     rules=LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes, rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """A tree of NamedShardings matching `batch` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)), batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host-local batch onto the mesh as global arrays, one process' rows each.

    On one process this is a device_put; on several, each process passes its own rows and
    `jax.make_array_from_process_local_data` builds the global array.
    """
    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def with_rules(fn: Callable) -> Callable:
    """`fn` traced with the project's logical rules active (for `nn.with_logical_constraint`).

    Activation constraints only bind when a mesh is in context too: jit the result and call it
    inside `use_mesh(mesh)` (`MeshJit` does both).
    """
    @functools.wraps(fn)   # keeps the signature, so jit's static_argnames still resolve
    def wrapped(*args, **kwargs):
        with nn.logical_axis_rules(LOGICAL_RULES):
            return fn(*args, **kwargs)
    return wrapped


def use_mesh(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing for None (unsharded callers share the code path)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def jit_with_rules(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit` of `fn` traced with the logical rules; run it inside `use_mesh` for the models'
    `constrain(...)` calls to become real sharding constraints."""
    return jax.jit(with_rules(fn), **jit_kwargs)


class MeshJit:
    """A jitted function that is traced and run with `mesh` set and the logical rules active."""

    def __init__(self, fn: Callable, mesh: Mesh, **jit_kwargs):
        self.mesh = mesh
        self._jitted = jit_with_rules(fn, **jit_kwargs)

    def __call__(self, *args):
        with use_mesh(self.mesh):
            return self._jitted(*args)

    def lower(self, *args):
        with use_mesh(self.mesh):
            return self._jitted.lower(*args)
