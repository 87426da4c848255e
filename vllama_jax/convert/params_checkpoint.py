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
Writing and reading stream: a leaf may be a `LazyArray` (shape and dtype up front, the data made
when it is written), and `save_params` writes one leaf at a time, so host memory holds one tensor
(plus orbax/tensorstore's write buffer for it) rather than the model; `lazy_params` is the
reading counterpart, each leaf restored only when asked for. `vllama-convert` imports and
exports through these (benchmarks/convert_rss.py measures the peak RSS).
`load_params` reads it, and also the trainer's own checkpoints (`vllama_jax.checkpoint` layout): a
workdir (the latest or a given step's trainable params, plus `frozen/` when it was saved) or a bare
orbax params directory such as `<workdir>/frozen`.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

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


# ------------------------------------------------------------------------------------------ lazy leaves

class LazyArray:
    """A host tensor made only when it is needed: `shape` and `dtype` up front, `np.asarray(x)`
    (or `x.load()`) calls `load` and returns a fresh array the caller owns.

    A params tree of these is what the streaming import builds (each leaf reads its tensor from a
    safetensors shard) and what `lazy_params` returns (each leaf restores one param); `x[i]` is the
    lazy slice along the first axis (loading the whole array, then copying the slice out).
    """

    def __init__(self, shape, dtype, load: Callable[[], np.ndarray], name: str = "",
                 blocks: Callable[[], Callable[[tuple], np.ndarray] | None] | None = None):
        self.shape, self.dtype, self.name = tuple(int(d) for d in shape), np.dtype(dtype), name
        self._load = load
        self._blocks = blocks

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        out = np.asarray(self._load())
        if out.shape != self.shape or out.dtype != self.dtype:
            raise CheckpointError(f"{self.name or 'lazy tensor'}: loaded {out.shape} {out.dtype}, "
                                  f"expected {self.shape} {self.dtype}")
        return out

    def block_reader(self) -> Callable[[tuple], np.ndarray] | None:
        """A function reading one block (a tuple of slices) of the tensor without loading the rest,
        or None when the source cannot (the caller then loads the whole tensor)."""
        return self._blocks() if self._blocks is not None else None

    def __array__(self, dtype=None, copy=None):
        out = self.load()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, i: int) -> "LazyArray":
        if not isinstance(i, (int, np.integer)) or not self.shape or not -self.shape[0] <= i < self.shape[0]:
            raise IndexError(f"{self.name or 'lazy tensor'} {self.shape}: index {i!r}")
        return LazyArray(self.shape[1:], self.dtype, lambda: self.load()[i].copy(), f"{self.name}[{i}]")

    def __repr__(self) -> str:
        return f"LazyArray({self.name!r}, {self.shape}, {self.dtype})"


def trim_host_memory(collect: bool = False) -> None:
    """Hands the heap memory freed so far back to the OS (glibc's `malloc_trim`; a no-op elsewhere);
    with `collect`, runs the garbage collector first (~0.15 s with jax, orbax and torch loaded).

    tensorstore encodes and decodes in its own threads' malloc arenas, which glibc does not shrink
    by itself: without this, each tensor written or read leaves up to its size of freed but still
    resident heap (measured: a 7B-width import's RSS stayed one 262 MB tensor higher after the
    embedding, its peak 3x the largest tensor instead of 2x; benchmarks/convert_rss.py).
    """
    global _MALLOC_TRIM
    if collect:
        gc.collect()
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


# Stored arrays are split into chunks of at most this many bytes, so that a reader can fetch a
# block of a tensor (`LazyArray.block_reader`: the HF export) decoding only the chunks it touches,
# instead of the whole stored tensor next to its restored copy (2x the tensor, the old peak).
CHUNK_BYTES = 4 << 20
# The import writes a tensor this many bytes (rounded to whole chunk rows) at a time.
SLAB_BYTES = 16 << 20
# orbax's tensorstore context caches up to 100 MB of OCDBT B-tree nodes, which a model's worth of
# writes or reads fills: the host peak grew with depth (7B width: +105 MB from 8 to 32 layers,
# import over the bound at 32; benchmarks/convert_rss.py). Converting visits each node about once.
OCDBT_CACHE_BYTES = 8 << 20


def _ts_context():
    import tensorstore as ts
    return ts.Context({"file_io_concurrency": {"limit": 128},
                       "cache_pool#ocdbt": {"total_bytes_limit": OCDBT_CACHE_BYTES}})


def _chunked(arg, ocp):
    if arg is None:
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES)
    if getattr(arg, "chunk_byte_size", None) is None:
        return dataclasses.replace(arg, chunk_byte_size=CHUNK_BYTES)
    return arg


def _streaming_registry():
    """orbax type handlers that write numpy and `LazyArray` leaves one at a time.

    orbax's own NumpyHandler deep-copies every host array (the whole model twice) and writes them
    all concurrently; this one writes them in order, making each `LazyArray` just before its write
    and dropping it after. tensorstore writes from the array without copying it
    (`can_reference_source_data_indefinitely`, as NumpyHandler) and may keep it referenced until
    the next write: at most two tensors alive at once. The files and metadata are NumpyHandler's
    ('np.ndarray'): a plain orbax restore reads them back.
    """
    ocp = _ocp()
    from orbax.checkpoint._src.multihost import multihost
    from orbax.checkpoint._src.serialization import ocdbt_utils, tensorstore_utils as ts_utils

    class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)

        async def _open_and_write(self, value, tspec, ts_context):
            # In slabs of whole chunks, each committed before the next: written at once, a chunked
            # array is copied into all its chunk buffers before any is flushed (a second tensor).
            import tensorstore as ts
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            if value.ndim == 0:
                await t.write(value)
                return
            rows = int(t.chunk_layout.write_chunk.shape[0] or value.shape[0])
            row_bytes = max(1, value[:1].nbytes)
            step = max(1, SLAB_BYTES // (rows * row_bytes)) * rows
            n = value.shape[0]
            for i in range(0, n, step):
                await t[i:min(i + step, n)].write(value[i:min(i + step, n)])

        async def _background_serialize(self, values, infos, args=None):
            args = args or [None] * len(values)
            context = _ts_context()
            for value, info, arg in zip(values, infos, args):
                arg = _chunked(arg, ocp)
                await info.await_path_creation()
                if multihost.process_index() != 0:
                    continue
                spec = ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(
                        use_ocdbt=info.is_ocdbt_checkpoint, override_ocdbt_process_id=self._override_ocdbt_process_id),
                    metadata_key=self._metadata_key)
                array = value.load() if isinstance(value, LazyArray) else value
                await self._open_and_write(array, spec.json, context)
                del array
                trim_host_memory()

    handler = StreamingNumpyHandler()
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (np.ndarray, handler), (LazyArray, handler), (jax.Array, th.get_type_handler(jax.Array)),
        (np.number, th.get_type_handler(np.number)), (int, th.get_type_handler(int)),
        (float, th.get_type_handler(float)))


# ------------------------------------------------------------------------------------------ write

def save_params(path, params: Mapping, manifest: Mapping | None = None, overwrite: bool = False) -> Path:
    """Writes `params` (nested dict of numpy / jax arrays / `LazyArray`s) and a manifest as a params
    checkpoint. Host leaves are written one at a time (`_streaming_registry`): with `LazyArray`
    leaves the host holds one tensor at a time, not the model."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"params must be a non-empty nested dict, got {type(params).__name__}")
    ocp = _ocp()
    meta = {"format": FORMAT, "version": VERSION, **dict(manifest or {})}
    meta["format"], meta["version"] = FORMAT, VERSION
    path = Path(path).absolute()   # orbax refuses relative paths
    with atomic_dir(path, overwrite) as tmp:
        # Uncompressed: reading a zstd-compressed array back holds its compressed bytes, the decoded
        # chunk and the output at once (3x the tensor, measured), a raw one 2x. The price is disk:
        # zstd-1 saved 13.5 % on random gaussian fp16 / bf16 weights.
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_streaming_registry(), use_compression=False)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(tmp / PARAMS_ITEM, args=ocp.args.PyTreeSave(dict(params)))
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


def lazy_params(path, *, subtrees: Iterable[str] | None = None, step: int | None = None) -> dict:
    """Like `load_params` without `abstract`, but every leaf is a `LazyArray` that restores just that
    param (as a host numpy array in its stored dtype) when it is loaded: the streaming export reads
    and writes one tensor at a time. Nothing but metadata is read here."""
    want = set(subtrees) if subtrees is not None else None
    out: dict = {}
    for item, keys in locate(path, step):
        tree = _subtree(_item_tree(item), keys, item)
        for name in tree:
            if want is None or name in want:
                out[name] = jax.tree_util.tree_map_with_path(
                    lambda p, m, item=item, keys=keys, name=name: _lazy_leaf(item, keys + (name,) + _names(p), m),
                    tree[name], is_leaf=_is_array_meta)
    if want is not None and want - set(out):
        raise CheckpointError(f"{path}: has no {sorted(want - set(out))} (it holds {sorted(out) or 'nothing requested'})")
    if not out:
        raise CheckpointError(f"{path}: holds no params")
    return out


def _names(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


# Tensors from this size on collect the garbage before they are read (see `_lazy_leaf`); below it a
# full collection (~0.15 s, seconds in a big test process) would cost more than the bytes it frees.
COLLECT_ABOVE_BYTES = 16 << 20


def _lazy_leaf(item: Path, keys: tuple[str, ...], meta) -> LazyArray:
    nbytes = int(np.prod(meta.shape, dtype=np.int64)) * np.dtype(meta.dtype).itemsize

    def load():
        ocp = _ocp()
        # An orbax restore leaves reference cycles that hold its result: collect the previous
        # tensors' before reading a big one (else two big ones are alive at once now and then).
        trim_host_memory(collect=nbytes >= COLLECT_ABOVE_BYTES)
        restore_item: Any = 0
        restore_args: Any = ocp.RestoreArgs(restore_type=np.ndarray)
        for k in reversed(keys):
            restore_item, restore_args = {k: restore_item}, {k: restore_args}
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
                item=restore_item, restore_args=restore_args, partial_restore=True))
        trim_host_memory()   # tensorstore's freed read buffers
        return _subtree(restored, keys, item)
    return LazyArray(tuple(meta.shape), meta.dtype, load, "/".join(keys),
                     blocks=lambda: _block_reader(item, keys, tuple(meta.shape), np.dtype(meta.dtype)))


def _block_reader(item: Path, keys: tuple[str, ...], shape: tuple[int, ...], dtype: np.dtype):
    """Reads blocks of one stored array straight from its tensorstore (orbax names an array by its
    key path joined with '.'), or None when that array is stored as a single chunk (a checkpoint
    written before `CHUNK_BYTES`: every block would decode the whole tensor) or cannot be opened
    this way (then the caller restores the whole tensor through orbax)."""
    if len(shape) < 2 or any("." in k for k in keys):
        return None
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    store = None
    for zarr3 in (False, True):
        spec = ts_utils.ArrayReadSpec(os.fspath(item), ".".join(keys), use_zarr3=zarr3, use_ocdbt=True).json
        try:
            store = ts.open(spec, context=_ts_context(), open=True).result()
            break
        except Exception:  # noqa: BLE001 - not this layout: try the other, then fall back
            continue
    if store is None or tuple(store.shape) != shape or np.dtype(store.dtype.numpy_dtype) != dtype:
        return None
    chunk = tuple(store.chunk_layout.read_chunk.shape or shape)
    if chunk == shape:
        return None

    def read(index: tuple) -> np.ndarray:
        return np.asarray(store[index].read().result())
    return read


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
