"""Layer stacks as one `nn.scan` (compile once, not per layer), remat policies, and the param
layout conversion between per-layer (`layers_{i}/...`) and stacked (`layers/...` with a leading
`'layers'` axis) trees.

A tower with `scan_layers=True` traces and compiles its block once: XLA's compile time stops
growing with depth (32 LLaMA layers, 39 EVA ViT blocks). Its params then hold every block's
weights stacked on a leading axis named `'layers'` (replicated by `sharding.LOGICAL_RULES`).
Checkpoint converters read and write the per-layer layout; `stack_layers` / `unstack_layers`
move a tree between the two, exactly (no arithmetic).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

LAYER_AXIS = "layers"

# What a rematerialised block keeps from its forward pass for the backward pass.
REMAT_POLICIES = {
    # Nothing: the whole block is recomputed (least memory).
    "full": None,
    # Matmul outputs without batch dims (projections, MLP): only elementwise work is recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul output, attention logits included.
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}


def remat(block: type[nn.Module], policy: str = "full", static_argnums: tuple[int, ...] = (),
          prevent_cse: bool = True) -> type[nn.Module]:
    """`nn.remat(block)` with a named policy from `REMAT_POLICIES`.

    Inside `scan` pass `prevent_cse=False`: the loop already keeps XLA from merging the
    recomputation with the forward, and the CSE barriers would only slow the body down.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(REMAT_POLICIES)}")
    return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=static_argnums,
                    prevent_cse=prevent_cse)


def scan(block: type[nn.Module], length: int, in_axes: Sequence[Any]) -> type[nn.Module]:
    """`block` applied `length` times in sequence as one `nn.scan`.

    The block's `__call__(carry, *args)` must return `(carry, ys)`; `in_axes` gives, per extra
    argument, `nn.broadcast` (same value every layer) or an axis to slice per layer. Params (and
    dropout rngs) differ per layer; params get the leading `'layers'` logical axis.
    """
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=tuple(in_axes), length=length,
                   metadata_params={nn.PARTITION_NAME: LAYER_AXIS})


def _check_unboxed(tree: Mapping, what: str) -> None:
    boxed = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
             if isinstance(x, nn.meta.AxisMetadata)]
    if boxed:
        raise TypeError(f"{what}: params must be unboxed arrays (nn.meta.unbox), got {type(boxed[0]).__name__} "
                        f"leaves whose axis names would not gain the '{LAYER_AXIS}' axis")


def _numbered(tree: Mapping, prefix: str) -> dict[int, Any]:
    rx = re.compile(re.escape(prefix) + r"_(\d+)")
    return {int(m.group(1)): v for k, v in tree.items() if (m := rx.fullmatch(k))}


def stack_layers(tree: Mapping, prefix: str, name: str | None = None) -> dict:
    """`{prefix_0: t0, prefix_1: t1, ...}` entries of `tree` -> one `{name: stack(t0, t1, ...)}`.

    `name` defaults to `prefix` (LLaMA: `layers_{i}` -> `layers`; EVA ViT: `blocks_{i}` -> `blocks`).
    Works on numpy and jax leaves (numpy stays numpy). The numbering must run 0..n-1 and every
    layer must have the same structure and shapes.
    """
    _check_unboxed(tree, "stack_layers")
    name = prefix if name is None else name
    layers = _numbered(tree, prefix)
    if not layers:
        raise KeyError(f"stack_layers: no '{prefix}_<i>' entries in a tree with keys {sorted(tree)[:8]}")
    if sorted(layers) != list(range(len(layers))):
        raise KeyError(f"stack_layers: '{prefix}_<i>' numbering must be 0..{len(layers) - 1}, "
                       f"got {sorted(layers)}")
    if name in tree:
        raise KeyError(f"stack_layers: the tree already has an entry {name!r}")
    first = jax.tree.structure(layers[0])
    for i, t in layers.items():
        if jax.tree.structure(t) != first:
            raise ValueError(f"stack_layers: {prefix}_{i} differs in structure from {prefix}_0")

    def stack(*xs):
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"stack_layers: per-layer shapes differ: {sorted(shapes)}")
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jax.numpy.stack(xs)

    out = {k: v for k, v in tree.items() if k not in {f"{prefix}_{i}" for i in layers}}
    out[name] = jax.tree.map(stack, *[layers[i] for i in range(len(layers))])
    return out


def unstack_layers(tree: Mapping, prefix: str, name: str | None = None) -> dict:
    """Inverse of `stack_layers`: `{name: stacked}` -> `{prefix_0: ..., prefix_{n-1}: ...}`."""
    _check_unboxed(tree, "unstack_layers")
    name = prefix if name is None else name
    if name not in tree:
        raise KeyError(f"unstack_layers: no stacked entry {name!r} in a tree with keys {sorted(tree)[:8]}")
    stacked = tree[name]
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"unstack_layers: leaves of {name!r} disagree on the leading layer axis: {sizes}")
    n = sizes.pop()
    out = {k: v for k, v in tree.items() if k != name}
    for i in range(n):
        out[f"{prefix}_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return out


def is_stacked(tree: Mapping, prefix: str) -> bool:
    """Whether `tree` holds the stacked `prefix` entry rather than `prefix_{i}` ones."""
    return isinstance(tree, Mapping) and prefix in tree
