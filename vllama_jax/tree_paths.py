"""Paths into nested dicts of params (`('image_encoder', 'qformer', 'query_tokens')`): the one
owner of walking, reading, writing and dropping by path, so converters, the feature cache and
checkpoint readers agree on what "has this path" means (every level a Mapping).

`'/'.join(path)` is the written form (`train.partition.flatten` keys, error messages).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

Path = Sequence[str]


def missing_at(tree: Any, path: Path) -> int | None:
    """The index in `path` of the first name `tree` lacks (or whose parent is not a Mapping);
    None when the whole path is there."""
    node = tree
    for i, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            return i
        node = node[name]
    return None


def has(tree: Any, path: Path) -> bool:
    return missing_at(tree, path) is None


def get(tree: Any, path: Path) -> Any:
    """The value at `path`; KeyError naming the first missing level ('a/b' of 'a/b/c')."""
    i = missing_at(tree, path)
    if i is not None:
        raise KeyError("/".join(path[:i + 1]))
    for name in path:
        tree = tree[name]
    return tree


def set_in(tree: dict, path: Path, value: Any) -> None:
    """Writes `value` at `path` in place, creating the missing dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def replaced(tree: Mapping, path: Path, value: Any) -> dict:
    """A copy of `tree` (shallow, along `path` only, missing levels created) with `value` at `path`."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else replaced(tree.get(path[0], {}), path[1:], value)
    return out


def without(tree: Mapping, paths: Iterable[Path]) -> dict:
    """A copy of `tree` (shallow, along each path only) without the subtrees at `paths`; absent
    ones are skipped."""
    out = dict(tree)
    for path in paths:
        node = out
        for name in path[:-1]:
            if not isinstance(node.get(name), Mapping):
                break
            node[name] = dict(node[name])
            node = node[name]
        else:
            node.pop(path[-1], None)
    return out


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """path tuple -> leaf, every non-Mapping value a leaf (empty dicts vanish)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out
