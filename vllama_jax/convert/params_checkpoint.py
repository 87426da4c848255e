"""Converted weights as an orbax checkpoint: what `vllama-convert import` writes, and what the trainer,
the chat and `vllama-convert export` read.

A params checkpoint is a directory:

  params/         orbax `StandardCheckpointer` tree in the `VideoLlama` params layout, holding only the
                  subtrees that were imported, e.g. {"llama": ..., "image_encoder": {...},
                  "video_qformer": ..., "video_frame_position_embedding": ..., "llama_proj": ...}
  manifest.json   {"format": "vllama_jax.params", "version": 1, "preset": <VideoLlamaConfig preset>,
                   "llama_config": <HF config.json dict of the LLaMA, or null>,
                   "subtrees": {name: {"source": file, "kind": importer}},
                   "reports": {file: {"loaded", "ignored", "unmatched", "notes"}}}

It is written to a temporary sibling and renamed into place, so a failed import leaves nothing.
`load_params` reads it, and also the trainer's own checkpoints (`vllama_jax.checkpoint` layout): a
workdir (the latest or a given step's trainable params, plus `frozen/` when it was saved) or a bare
orbax params directory such as `<workdir>/frozen`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from vllama_jax import tree_paths
from vllama_jax.convert.common import CheckpointError, CheckpointNotFoundError, atomic_dir

FORMAT = "vllama_jax.params"
VERSION = 1
MANIFEST = "manifest.json"
PARAMS_ITEM = "params"


def _ocp():
    import orbax.checkpoint as ocp  # deferred: importing orbax is slow and only needed here
    return ocp


# ------------------------------------------------------------------------------------------ write

def save_params(path, params: Mapping, manifest: Mapping | None = None, overwrite: bool = False) -> Path:
    """Writes `params` (nested dict of numpy / jax arrays) and a manifest as a params checkpoint."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"params must be a non-empty nested dict, got {type(params).__name__}")
    ocp = _ocp()
    meta = {"format": FORMAT, "version": VERSION, **dict(manifest or {})}
    meta["format"], meta["version"] = FORMAT, VERSION
    path = Path(path).absolute()   # orbax refuses relative paths
    with atomic_dir(path, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_ITEM, dict(params))
            ckptr.wait_until_finished()
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, default=str))
    return path


# ------------------------------------------------------------------------------------------ read

def read_manifest(path) -> dict | None:
    """The manifest of a params checkpoint directory, or None when `path` is not one."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: broken manifest ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a {FORMAT} manifest (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{f}: version {meta['version']} is newer than this reader ({VERSION})")
    return meta


def _is_orbax_item(d: Path) -> bool:
    return d.is_dir() and any((d / n).exists() for n in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"))


def _latest_step(checkpoints: Path) -> int | None:
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    return max(steps) if steps else None


def locate(path, step: int | None = None) -> list[tuple[Path, tuple[str, ...]]]:
    """The orbax items holding params under `path`: (item dir, key path of the params inside it)."""
    # Absolute: orbax reads a relative item path's metadata as missing (paths.ckpt = "run/stage1").
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: checkpoint directory does not exist")
    if read_manifest(path) is not None:
        return [(path / PARAMS_ITEM, ())]
    if (path / "checkpoints").is_dir():  # a trainer workdir
        ckpts = path / "checkpoints"
        step = _latest_step(ckpts) if step is None else step
        if step is None:
            raise CheckpointNotFoundError(f"{ckpts}: no complete training step to read")
        if not (ckpts / str(step) / "state").is_dir():
            raise CheckpointNotFoundError(f"no checkpoint for step {step} under {ckpts} "
                                          f"(steps there: {sorted(_steps(ckpts))})")
        items = [(ckpts / str(step) / "state", ("params",))]
        if _is_orbax_item(path / "frozen"):
            items.append((path / "frozen", ()))
        return items
    if (path / "state").is_dir():  # one step directory of a trainer workdir
        return [(path / "state", ("params",))]
    if _is_orbax_item(path):
        return [(path, ())]
    raise CheckpointError(f"{path}: neither a params checkpoint ({MANIFEST} + {PARAMS_ITEM}/), a training "
                          f"workdir (checkpoints/<step>/state) nor an orbax params directory")


def _steps(ckpts: Path) -> list[int]:
    return [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]


def _item_tree(item: Path) -> Any:
    ocp = _ocp()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.metadata(item).item_metadata.tree
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax reports a broken item in many ways
        raise CheckpointError(f"{item}: cannot read the orbax checkpoint metadata ({type(e).__name__}: {e})") from None


def _subtree(tree: Any, keys: tuple[str, ...], where) -> Any:
    if not tree_paths.has(tree, keys):
        raise CheckpointError(f"{where}: has no {'/'.join(keys)} entry")
    return tree_paths.get(tree, keys)


def params_metadata(path, step: int | None = None) -> dict:
    """Nested dict of `jax.ShapeDtypeStruct`s of every param under `path` (nothing is read but metadata)."""
    out: dict = {}
    for item, keys in locate(path, step):
        tree = _subtree(_item_tree(item), keys, item)
        out.update(jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree),
                                is_leaf=_is_array_meta))
    return out


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def load_params(path, *, abstract: Mapping | None = None, subtrees: Iterable[str] | None = None,
                step: int | None = None) -> dict:
    """Params from a params checkpoint, a trainer workdir / step dir or an orbax params directory.

    abstract: optional nested dict of `jax.ShapeDtypeStruct`s (with `sharding`s) for the subtrees to
      read, e.g. the full `eval_shape` tree or a part of it: each array is restored straight onto its
      devices in the abstract's dtype. Without it the leaves are host numpy arrays in the stored dtype.
    subtrees: top-level names to read (default: those of `abstract`, or everything).
    Shapes are checked against the stored metadata first; a mismatch names the param.
    """
    ocp = _ocp()
    want = set(subtrees) if subtrees is not None else (set(abstract) if abstract is not None else None)
    out: dict = {}
    found: set[str] = set()
    for item, keys in locate(path, step):
        tree = _subtree(_item_tree(item), keys, item)
        names = [n for n in tree if want is None or n in want]
        if not names:
            continue
        found.update(names)
        target = {n: tree[n] for n in names}
        if abstract is not None:
            sub = {n: abstract[n] for n in names if n in abstract}
            _check_shapes(sub, target, item)
            restore_item = sub
            restore_args = ocp.checkpoint_utils.construct_restore_args(sub)
        else:
            restore_item = jax.tree.map(lambda m: 0, target, is_leaf=_is_array_meta)
            restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), target,
                                        is_leaf=_is_array_meta)
        for k in reversed(keys):
            restore_item, restore_args = {k: restore_item}, {k: restore_args}
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
                item=restore_item, restore_args=restore_args, partial_restore=True))
        out.update(_subtree(restored, keys, item))
    if want is not None and want - found:
        raise CheckpointError(f"{path}: has no {sorted(want - found)} (it holds {sorted(found) or 'nothing requested'}"
                              f"; all: {sorted(params_metadata(path, step))})")
    if not out:
        raise CheckpointError(f"{path}: holds no params")
    return out


def _check_shapes(abstract: Mapping, stored: Mapping, where) -> None:
    a, s = tree_paths.flatten(abstract), tree_paths.flatten(dict(stored))
    missing = sorted("/".join(p) for p in a if p not in s)
    if missing:
        raise CheckpointError(f"{where}: lacks param(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    bad = [f"{'/'.join(p)}: stored {tuple(s[p].shape)}, expected {tuple(x.shape)}"
           for p, x in a.items() if tuple(s[p].shape) != tuple(x.shape)]
    if bad:
        raise CheckpointError(f"{where}: shape mismatch:\n  " + "\n  ".join(bad))


def describe(path, step: int | None = None) -> str:
    """A short listing: subtrees, their parameter counts and dtypes."""
    meta = params_metadata(path, step)
    lines = []
    for name, sub in meta.items():
        leaves = jax.tree.leaves(sub)
        count = sum(int(np.prod(x.shape)) for x in leaves)
        dtypes = sorted({str(x.dtype) for x in leaves})
        lines.append(f"  {name}: {len(leaves)} arrays, {count:,} params, {'/'.join(dtypes)}")
    return f"{os.fspath(path)}:\n" + "\n".join(lines)
