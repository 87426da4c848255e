"""Trainable / frozen split of a params tree by regex patterns over '/'-joined param paths.

A params tree is a nested dict (the contents of Flax's 'params' collection, or any nesting the
task uses). `split` returns two *disjoint* nested dicts holding only their own leaves, so the
optimizer state, gradients and checkpoints of the trainable part never contain frozen leaves;
`merge` puts them back together for the model.

Patterns are matched with `re.fullmatch` against paths such as `video_qformer/layer_0/query/kernel`.
A pattern that matches no param is an error: a typo must not silently freeze a whole branch.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict

Params = Any

# Model-independent presets; a task declares its own trainable params (`Task.trainable_patterns`,
# e.g. Video-LLaMA's branches in `vllama_jax.models.video_llama.BRANCHES`).
TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "all": (r".*",),
    # The toy task of vllama_jax.train.toy: frozen tower, trainable head.
    "toy_head": (r"head/.*",),
}


def resolve_patterns(preset: str | None, patterns: Sequence[str] = ()) -> tuple[str, ...]:
    """Patterns from a preset name and/or an explicit list (both may be given; they add up)."""
    out: list[str] = []
    if preset:
        if preset not in TRAINABLE_PRESETS:
            raise ValueError(f"unknown trainable preset {preset!r}; known: {sorted(TRAINABLE_PRESETS)}")
        out.extend(TRAINABLE_PRESETS[preset])
    out.extend(patterns or ())
    if not out:
        raise ValueError("no trainable patterns: give a preset name or a list of regexes")
    return tuple(out)


def _as_dict(tree: Params) -> dict:
    if isinstance(tree, FrozenDict):
        tree = tree.unfreeze()
    if not isinstance(tree, Mapping):
        raise TypeError(f"params must be a nested dict, got {type(tree).__name__}")
    return tree


def flatten(tree: Params) -> dict[str, Any]:
    """'/'-joined path -> leaf. Boxed (LogicallyPartitioned) values count as leaves."""
    return traverse_util.flatten_dict(_as_dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def trainable_paths(tree: Params, patterns: Iterable[str]) -> frozenset[str]:
    """The param paths that any pattern fully matches; every pattern must match something."""
    paths = list(flatten(tree))
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"trainable pattern {p!r} is not a valid regex: {e}") from None
    selected = set()
    for rx in compiled:
        hits = {path for path in paths if rx.fullmatch(path)}
        if not hits:
            sample = ", ".join(paths[:8])
            raise ValueError(f"trainable pattern {rx.pattern!r} matches no parameter "
                             f"(paths look like: {sample}{', ...' if len(paths) > 8 else ''})")
        selected |= hits
    return frozenset(selected)


def split(tree: Params, patterns_or_paths: Iterable[str] | frozenset[str]) -> tuple[dict, dict]:
    """(trainable, frozen) as disjoint nested dicts. Accepts regex patterns or a path set."""
    flat = flatten(tree)
    selected = (patterns_or_paths if isinstance(patterns_or_paths, frozenset)
                else trainable_paths(tree, patterns_or_paths))
    unknown = selected - flat.keys()
    if unknown:
        raise KeyError(f"trainable paths not in the params tree: {sorted(unknown)[:5]}")
    trainable = {k: v for k, v in flat.items() if k in selected}
    if not trainable:
        raise ValueError("nothing to train: the trainable set is empty")
    frozen = {k: v for k, v in flat.items() if k not in selected}
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: Params, frozen: Params) -> dict:
    """The full tree back from its two halves; a path present in both is an error."""
    a, b = flatten(trainable), flatten(frozen)
    overlap = a.keys() & b.keys()
    if overlap:
        raise ValueError(f"trainable and frozen params overlap at {sorted(overlap)[:5]}")
    return unflatten({**b, **a})


def cast_floating(tree: Params, dtype: Any) -> Params:
    """Casts floating leaves (arrays or ShapeDtypeStructs) to `dtype`; ints/keys stay as they are."""
    if dtype is None:
        return tree

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


def count(tree: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def describe(trainable: Params, frozen: Params) -> str:
    """One line for the log: how many params train and which top-level modules they are in."""
    n_t, n_f = count(trainable), count(frozen)
    tops = sorted({k.split("/", 1)[0] for k in flatten(trainable)})
    return (f"trainable {n_t:,} params ({100.0 * n_t / max(n_t + n_f, 1):.2f}%) in {tops}; "
            f"frozen {n_f:,}")
