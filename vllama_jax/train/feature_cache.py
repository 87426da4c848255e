"""Frozen-feature cache: run a model's frozen towers once per example, then train on their outputs.

A frozen tower fed a deterministic view of an example (eval transforms, no dropout) returns the
same output at every step, so with a big tower in front of a small trainable part most of each
step recomputes a constant. The cache computes those outputs once and replays them during
training, without any change to the model code:

* `CachedOutput(path, key)` names a submodule by its Flax path (e.g. `('image_encoder',)`) whose
  `__call__` result is stored in the batch under `key`, grouped per example as `[B, k, ...]`
  (a submodule called on `B*k` flattened rows, such as frames of clips, returns `B*k` rows).
* `capture(...)` runs a model method once (Flax `capture_intermediates`) and returns those
  outputs; `build_feature_dataset` does it over a finite stream of host batches.
* `replaying(batch, outputs)` is a context (Flax `nn.intercept_methods`) under which each named
  submodule returns its stored output instead of running; the arguments it receives are
  ignored, so callers pass tiny stand-ins for the raw media (`stub_video_llama_media`).
* `CachedFeatureTask(task, outputs, stub)` wraps any `vllama_jax.train.task.Task`: its loss is
  the wrapped task's loss under `replaying`. The cached towers' params leave the param tree
  (Flax looks params up only when a submodule runs, and these never run), so the trainer neither
  holds nor checkpoints them.
* `FeatureDataset` holds the cached arrays; `save`/`load` use a directory of `.npy` files that
  load memory-mapped, so a cache larger than RAM pages in as batches read it. Its `iterator`
  yields shuffled batches with `get_state`/`set_state`, so the trainer checkpoints and resumes it.

From a training config (`config.feature_cache`, see `vllama_jax.train.config_lib`): with
`enabled`, `vllama-train` calls `from_config(config, task)`, which loads the cache at `path` or
builds it there first (one pass over the training shards with eval transforms, frozen params
initialised and loaded exactly as the trainer does), and trains on it.

What the cache gives up: each example has one fixed view of its media (no random crops, no
random frame sampling, no dropout inside the frozen towers, which the reference never runs
anyway since they are in eval mode).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax import tree_paths
from vllama_jax.cli_errors import UserError
from vllama_jax.models.video_llama import FROZEN_TOWERS
from vllama_jax.progress import progress_bar

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class CachedOutput:
    """A submodule (Flax path below the top module) whose `__call__` output is cached under `key`."""
    path: tuple[str, ...]
    key: str

    def __post_init__(self):
        if isinstance(self.path, str):
            object.__setattr__(self, "path", tuple(self.path.split("/")))
        if not self.path or not all(isinstance(p, str) and p for p in self.path):
            raise ValueError(f"CachedOutput.path must be a non-empty tuple of module names, got {self.path!r}")


# The frozen towers of `vllama_jax.models.video_llama.VideoLlama`, by medium, as its branches
# declare them: image_features [B, T, Q_img, D_img], audio_features [B, M, E],
# audio_vision_features [B, T, E].
_OUTPUT_OF_MEDIUM = {m: CachedOutput((t.module,), t.cache_key) for m, t in FROZEN_TOWERS.items()}
VIDEO_LLAMA_OUTPUTS = tuple(_OUTPUT_OF_MEDIUM.values())


def outputs_for_media(media: Sequence[str]) -> tuple[CachedOutput, ...]:
    """The VideoLlama towers a loss over `media` runs (e.g. ('video',) -> the BLIP-2 image encoder)."""
    unknown = [m for m in media if m not in _OUTPUT_OF_MEDIUM]
    if unknown:
        raise ValueError(f"feature cache: unknown media {unknown}; expected some of {sorted(_OUTPUT_OF_MEDIUM)}")
    return tuple(dict.fromkeys(_OUTPUT_OF_MEDIUM[m] for m in media))


def _lookup(tree: Mapping, path: Sequence[str], what: str):
    i = tree_paths.missing_at(tree, path)
    if i is not None:
        node = tree_paths.get(tree, path[:i])
        raise KeyError(f"{what}: submodule {'/'.join(path)!r} was not called (nothing recorded under "
                       f"{'/'.join(path[:i + 1])!r}; recorded: "
                       f"{sorted(node) if isinstance(node, Mapping) else node!r})")
    return tree_paths.get(tree, path)


def capture(module: nn.Module, variables: Any, outputs: Sequence[CachedOutput], batch_size: int,
            *args, method: Callable | str | None = None, **kwargs) -> dict[str, jax.Array]:
    """Runs `module.apply(variables, *args, method=method, **kwargs)` and returns each cached
    submodule's output as `[batch_size, k, ...]`, keyed by `CachedOutput.key`.

    Every listed submodule must be called exactly once by the method, on a multiple of
    `batch_size` rows.
    """
    paths = {o.path for o in outputs}

    def keep(mdl, method_name):
        return method_name == "__call__" and mdl.path in paths

    _, state = module.apply(variables, *args, method=method, capture_intermediates=keep,
                            mutable=["intermediates"], **kwargs)
    found = state.get("intermediates", {})
    result = {}
    for o in outputs:
        calls = _lookup(found, o.path, "feature cache capture").get("__call__", ())
        if len(calls) != 1:
            raise ValueError(f"feature cache: submodule {'/'.join(o.path)!r} was called {len(calls)} times, "
                             f"expected once")
        out = calls[0]
        if not isinstance(out, jax.Array) or out.ndim < 1 or out.shape[0] % batch_size:
            raise ValueError(f"feature cache: {'/'.join(o.path)!r} returned {getattr(out, 'shape', type(out))}; "
                             f"expected one array with a leading dim divisible by batch_size={batch_size}")
        result[o.key] = out.reshape(batch_size, out.shape[0] // batch_size, *out.shape[1:])
    return result


@contextlib.contextmanager
def replaying(batch: Mapping[str, Any], outputs: Sequence[CachedOutput]):
    """Within this context, each `outputs` submodule returns `batch[key]` (flattened back to
    `[B*k, ...]`) instead of running. A missing key is an error only when the submodule is called."""
    table = {o.path: o for o in outputs}

    def interceptor(next_fun, args, kwargs, context):
        spec = table.get(context.module.path) if context.method_name == "__call__" else None
        if spec is None:
            return next_fun(*args, **kwargs)
        if spec.key not in batch:
            raise KeyError(f"feature cache: {'/'.join(spec.path)!r} was called but the batch has no "
                           f"cached {spec.key!r} (batch keys: {sorted(batch)})")
        cached = jnp.asarray(batch[spec.key])
        flat = cached.reshape(cached.shape[0] * cached.shape[1], *cached.shape[2:])
        rows = getattr(args[0], "shape", (None,))[0] if args else None
        if rows is not None and rows != flat.shape[0]:
            raise ValueError(f"feature cache: {'/'.join(spec.path)!r} called on {rows} rows but "
                             f"{spec.key!r} holds {cached.shape[0]}x{cached.shape[1]} = {flat.shape[0]}")
        return flat

    with nn.intercept_methods(interceptor):
        yield


def stub_video_llama_media(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch with `frames` / `audio` replaced by zero stand-ins of shape `[B, T, 1, 1, 3]` /
    `[B, M, 1, 1, 1]` derived from the cached features (VideoLlama reshapes them before calling
    its towers, which `replaying` then short-circuits)."""
    out = dict(batch)
    video = batch.get("image_features", batch.get("audio_vision_features"))
    if video is not None:
        out["frames"] = jnp.zeros((video.shape[0], video.shape[1], 1, 1, 3), jnp.float32)
    if "audio_features" in batch:
        a = batch["audio_features"]
        out["audio"] = jnp.zeros((a.shape[0], a.shape[1], 1, 1, 1), jnp.float32)
    return out


@dataclasses.dataclass(frozen=True)
class CachedFeatureTask:
    """A Task that trains `task` on cached frozen-tower outputs (see the module docstring).

    The params of the cached submodules are left out of every tree it returns: nothing reads
    them, and a trainer then neither places nor checkpoints a tower it never runs.
    """
    task: Any
    outputs: tuple[CachedOutput, ...] = VIDEO_LLAMA_OUTPUTS
    stub: Callable[[Mapping[str, Any]], Mapping[str, Any]] = stub_video_llama_media

    def _drop(self, params):
        return tree_paths.without(params, [o.path for o in self.outputs])

    def init_params(self, rng):
        return self._drop(self.task.init_params(rng))

    def abstract_params(self):
        return self._drop(self.task.abstract_params())

    def trainable_patterns(self) -> tuple[str, ...]:
        return tuple(getattr(self.task, "trainable_patterns", lambda: ())())

    def pretrained_subtrees(self) -> tuple[str, ...]:
        return tuple(getattr(self.task, "pretrained_subtrees", lambda: ())())

    def load_pretrained(self, params):
        hook = getattr(self.task, "load_pretrained", None)
        return self._drop(hook(params)) if callable(hook) else params

    def loss_fn(self, params, batch, rng, deterministic):
        with replaying(batch, self.outputs):
            return self.task.loss_fn(params, self.stub(batch), rng, deterministic)


# ---------------------------------------------------------------------------------------------
# In-memory cached dataset


class FeatureDataset:
    """Named arrays sharing a leading example dim, with save/load and a resumable batch iterator."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in arrays.items()}
        if not arrays:
            raise ValueError("FeatureDataset needs at least one array")
        sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"FeatureDataset arrays must share their leading (example) dim, got {sizes}")
        self.arrays = arrays

    def __len__(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def take(self, index: np.ndarray, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        keys = self.arrays if keys is None else keys
        # Sorted reads are sequential on a memory-mapped cache; the batch keeps `index`'s order.
        order = np.argsort(index)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {k: np.asarray(self.arrays[k][index[order]])[inverse] for k in keys}

    def save(self, path: str) -> str:
        """Writes the directory `path` (`<key>.npy` per array + `meta.json`) atomically: a crash
        leaves no half cache. bfloat16 arrays are stored as float32 (exact) and cast back on load."""
        tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        dtypes = {}
        for k, v in self.arrays.items():
            if not k.isidentifier():
                raise ValueError(f"FeatureDataset key {k!r} must be a plain identifier (it names a file)")
            dtypes[k] = str(v.dtype)
            np.save(os.path.join(tmp, f"{k}.npy"), v if v.dtype.isnative and v.dtype.kind != "V"
                    and v.dtype.name != "bfloat16" else v.astype(np.float32))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"dtypes": dtypes, "size": len(self)}, f)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> "FeatureDataset":
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"feature cache {path!r} does not exist (no meta.json in it)")
        with open(meta_path) as f:
            meta = json.load(f)
        arrays = {}
        for k, dtype in meta["dtypes"].items():
            try:
                a = np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r" if mmap else None)
            except (OSError, ValueError) as e:
                raise ValueError(f"feature cache {path!r}: array {k!r} is unreadable: {e}") from e
            # bfloat16 was stored widened; everything else loads (memory-mapped) as saved.
            arrays[k] = a.astype(jnp.dtype(dtype)) if str(a.dtype) != dtype else a
        return cls(arrays)

    def iterator(self, batch_size: int, seed: int = 0, shuffle: bool = True,
                 keys: Iterable[str] | None = None,
                 transform: Callable[[dict, np.random.Generator], dict] | None = None,
                 process_index: int = 0, process_count: int = 1) -> "BatchIterator":
        return BatchIterator(self, batch_size, seed, shuffle, tuple(keys or self.arrays), transform,
                             process_index, process_count)


class BatchIterator:
    """Endless batches over a `FeatureDataset`, reshuffled every epoch; the last partial global
    batch of an epoch is dropped. Global batch i (`batch_size * process_count` examples) is a pure
    function of (seed, i), and this process takes its `batch_size` rows of it, so `get_state()`
    (`{'step': i, 'global_batch_size': G}`) restored with `set_state` replays the same stream on
    any process count with the same G (`state_is_global`, when the dataset is the whole cache in
    global order: `GlobalFeatures`). `transform(batch, rng)` may add per-batch randomness (rng
    seeded by (seed, i))."""

    def __init__(self, data, batch_size: int, seed: int, shuffle: bool,
                 keys: tuple[str, ...], transform=None, process_index: int = 0, process_count: int = 1):
        global_batch = batch_size * process_count
        if not 1 <= global_batch <= len(data):
            raise ValueError(f"batch_size must be in [1, {len(data)}] (the dataset size) over all processes, got "
                             f"{batch_size} x {process_count} processes")
        missing = [k for k in keys if k not in data.arrays]
        if missing:
            raise KeyError(f"FeatureDataset has no arrays {missing}; it has {sorted(data.arrays)}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.keys, self.transform = keys, transform
        self.process_index, self.global_batch_size = process_index, global_batch
        self.per_epoch = len(data) // global_batch
        self.state_is_global = process_count == 1 or isinstance(data, GlobalFeatures)
        self.step = 0

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, k = divmod(self.step, self.per_epoch)
        start = k * self.global_batch_size + self.process_index * self.batch_size
        index = self._order(epoch)[start:start + self.batch_size]
        batch = self.data.take(index, self.keys)
        if self.transform is not None:
            batch = self.transform(batch, np.random.default_rng([self.seed, 1, self.step]))
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step, "global_batch_size": self.global_batch_size}

    def set_state(self, state: Mapping[str, Any]):
        if not isinstance(state, Mapping) or "step" not in state:
            raise CacheStateError(f"feature-cache iterator state {state!r} has no 'step'")
        # States written before the global batch was recorded are per-process steps of this same
        # batch size (they only resume on the process count that wrote them).
        g = int(state.get("global_batch_size", self.global_batch_size))
        if g != self.global_batch_size:
            raise CacheStateError(
                f"feature-cache position was saved with a global batch of {g} examples, this run's is "
                f"{self.global_batch_size}: keep config.train.batch_size to resume at the same example")
        self.step = int(state["step"])


class CacheStateError(ValueError, UserError):
    """A feature-cache position this iterator cannot resume from (not damage: passed through)."""


class GlobalFeatures:
    """The per-process parts of a feature cache (each process caches its rows of the data) seen as
    one dataset in global example order, by the `global_index` each part stores: what every
    process trains from, whatever the count that built the cache. The parts stay memory-mapped;
    `take` gathers rows from them."""

    def __init__(self, parts: Sequence[FeatureDataset], where: str = "feature cache"):
        keys = [k for k in parts[0].arrays if k != GLOBAL_INDEX]
        for i, part in enumerate(parts):
            if GLOBAL_INDEX not in part.arrays or sorted(k for k in part.arrays if k != GLOBAL_INDEX) != sorted(keys):
                raise ValueError(f"{where}: part {i} holds {sorted(part.arrays)}, expected {sorted(keys + [GLOBAL_INDEX])}")
        index = np.concatenate([np.asarray(p[GLOBAL_INDEX], np.int64) for p in parts])
        n = len(index)
        if sorted(index.tolist()) != list(range(n)):
            have = set(index.tolist())
            gaps = [i for i in range(n) if i not in have][:5]
            raise ValueError(f"{where}: the parts' examples are not global examples 0..{n - 1} exactly once "
                             f"(missing e.g. {gaps}); a part is missing or stale: delete the cache to rebuild")
        self.parts = list(parts)
        self._part = np.empty(n, np.int32)
        self._row = np.empty(n, np.int64)
        for i, part in enumerate(parts):
            gi = np.asarray(part[GLOBAL_INDEX], np.int64)
            self._part[gi], self._row[gi] = i, np.arange(len(gi))
        self.arrays = {k: parts[0].arrays[k] for k in keys}   # for key checks and dtypes

    def __len__(self) -> int:
        return len(self._part)

    def take(self, index: np.ndarray, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        keys = tuple(self.arrays if keys is None else keys)
        index = np.asarray(index)
        part, row = self._part[index], self._row[index]
        out = {}
        for k in keys:
            first = self.parts[0][k]
            out[k] = np.empty((len(index),) + first.shape[1:], first.dtype)
        for i, p in enumerate(self.parts):
            sel = np.nonzero(part == i)[0]
            if len(sel):
                got = p.take(row[sel], keys)
                for k in keys:
                    out[k][sel] = got[k]
        return out

    def iterator(self, batch_size: int, seed: int = 0, shuffle: bool = True, keys: Iterable[str] | None = None,
                 transform=None, process_index: int = 0, process_count: int = 1) -> BatchIterator:
        return BatchIterator(self, batch_size, seed, shuffle, tuple(keys or self.arrays), transform,
                             process_index, process_count)


def build_feature_dataset(module: nn.Module, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                          outputs: Sequence[CachedOutput], *, method: Callable | str | None = None,
                          method_args: tuple = (), keep: Sequence[str] | None = (),
                          drop: Sequence[str] = (), progress: bool = False) -> FeatureDataset:
    """Runs the frozen towers once over `batches` (host dicts of equal batch size but possibly a
    shorter last one) and returns their cached outputs plus the batch arrays named in `keep`
    (`keep=None`: every batch array except those named in `drop`, e.g. the raw media).

    `method(module, batch, *method_args)` must call every cached submodule (e.g.
    `VideoLlama.encode_media` with the media of the outputs); it runs jitted and deterministic.
    """
    fn = _jitted_capture(module, tuple(outputs), method, tuple(method_args))
    parts: dict[str, list[np.ndarray]] = {}
    size = None
    for batch in progress_bar(batches, desc="caching frozen-tower features", unit="batch", disable=not progress):
        batch = {k: np.asarray(v) for k, v in batch.items()}
        n = next(iter(batch.values())).shape[0]
        size = size or n
        # Pads a short last batch to the common size so the towers compile once; ids stay on the host.
        device_batch = {k: _pad_rows(v, size) for k, v in batch.items()
                        if v.dtype.kind in "biuf" and k != GLOBAL_INDEX}
        feats = jax.device_get(fn(variables, device_batch))
        for k, v in feats.items():
            parts.setdefault(k, []).append(np.asarray(v)[:n])
        for k in (tuple(k for k in batch if k not in drop) if keep is None else keep):
            if k not in batch:
                raise KeyError(f"build_feature_dataset: keep={k!r} is not a batch key ({sorted(batch)})")
            parts.setdefault(k, []).append(batch[k])
    if not parts:
        raise ValueError("build_feature_dataset: the batch stream was empty")
    return FeatureDataset({k: np.concatenate(v) for k, v in parts.items()})


@functools.lru_cache(maxsize=16)
def _jitted_capture(module, outputs, method, method_args):
    # One jitted function per (model, outputs, method): repeated builds reuse its compilations.
    def run(variables, batch):
        n = next(iter(batch.values())).shape[0]
        return capture(module, variables, outputs, n, batch, *method_args, method=method)

    return jax.jit(run)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    if x.shape[0] > size:
        raise ValueError(f"batch of {x.shape[0]} rows after batches of {size}: only the last may be shorter")
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


# ---------------------------------------------------------------------------------------------
# From a training config


RAW_MEDIA_KEYS = ("frames", "audio")
# Each cached example's position in the global example order (`data_pipelines.loader.ProcessRows`).
GLOBAL_INDEX = "global_index"
_PART = re.compile(r"process_(\d{3})-of-(\d{3})$")


def cache_dir(path: str) -> str:
    """This process' part of the cache under `path` (each process caches its rows of the data)."""
    return os.path.join(path, f"process_{jax.process_index():03d}-of-{jax.process_count():03d}")


def cache_parts(path: str) -> tuple[int, list[str]]:
    """(process count that built the cache, its complete parts) under `path`."""
    found: dict[int, dict[int, str]] = {}
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            m = _PART.match(name)
            if m and os.path.isfile(os.path.join(path, name, "meta.json")):
                found.setdefault(int(m.group(2)), {})[int(m.group(1))] = os.path.join(path, name)
    if len(found) > 1:
        raise ValueError(f"feature cache {path!r} holds parts of builds by {sorted(found)} processes; "
                         f"delete it to rebuild")
    if not found:
        return 0, []
    (count, parts), = found.items()
    return count, [parts[i] for i in sorted(parts)]


def loader_source(config) -> Iterable[dict]:
    """One pass over the training shards of `config.data` with eval transforms (uniform frames,
    plain resize, the first prompt): the fixed view of each example the cache stores, this
    process' rows of it, each with its `global_index` (datasets one after another)."""
    from data_pipelines import loader

    cfg = dataclasses.replace(loader.loader_config_from(config, train=False), shuffle=False, num_epochs=1,
                              drop_remainder=False)
    encoder = loader._encoder_from(config)
    index, count = jax.process_index(), jax.process_count()
    offset = 0
    for spec in loader._dataset_specs(config.data):
        rows = loader._process_rows([spec], cfg, encoder, index, count)
        j = 0
        for batch in loader.make_loader(spec, cfg, encoder, index, count):
            n = len(batch["input_ids"])
            batch[GLOBAL_INDEX] = offset + np.array([rows.global_index(i) for i in range(j, j + n)], np.int64)
            j += n
            yield batch
        offset += len(rows.examples)


def trainer_tower_params(config, task, outputs: Sequence[CachedOutput]) -> dict:
    """The params the trainer would start from (same seed split, pretrained hook and dtypes),
    without the LLM, which the towers do not read."""
    from vllama_jax.train import config_lib, partition

    from vllama_jax.train.task import initial_params, trainable_patterns

    t = config.train
    trainable = partition.trainable_paths(task.abstract_params(), trainable_patterns(config, task))
    cached = ["/".join(o.path) for o in outputs]
    clash = sorted(p for p in trainable if any(p == c or p.startswith(c + "/") for c in cached))
    if clash:
        raise ValueError(f"feature cache: cached towers must be frozen, but config.freeze trains {clash[:4]}")
    if getattr(task, "pretrained", None) is not None and hasattr(task.pretrained, "llama_model"):
        task = dataclasses.replace(task, pretrained=dataclasses.replace(task.pretrained, llama_model=""))
    params = tree_paths.without(initial_params(task, int(t.seed), also_provided=("llama",)), [("llama",)])

    # The towers are frozen: stored in frozen_dtype, computed in compute_dtype, as in the step.
    params = partition.cast_floating(params, config_lib.dtype_of(t.get("frozen_dtype")))
    return partition.cast_floating(params, config_lib.dtype_of(t.get("compute_dtype")))


def build_from_config(config, task, outputs: Sequence[CachedOutput], path: str) -> FeatureDataset:
    from vllama_jax.models.video_llama import VideoLlama
    from vllama_jax.train.task import import_string

    fc = config.feature_cache
    source = import_string(fc.get("source_builder") or f"{__name__}:loader_source")(config)
    params = trainer_tower_params(config, task, outputs)
    data = build_feature_dataset(task.model, {"params": params}, source, outputs,
                                 method=VideoLlama.encode_media, method_args=(tuple(task.media),),
                                 keep=None, drop=RAW_MEDIA_KEYS, progress=True)
    data.save(path)
    log.info("feature cache: %d examples written to %s", len(data), path)
    return data


def from_config(config, task) -> tuple[CachedFeatureTask, BatchIterator]:
    """(cached task, resumable train iterator) for `config.feature_cache`; builds this process'
    part of the cache first when `config.feature_cache.path` holds none.

    Every process then reads all parts (a file system all hosts mount, as for checkpoints) in
    global example order and takes its rows of each global batch, so the iterator's position
    resumes on any process count. A cache written before parts stored `global_index` is read
    per process as it was written, and only on the process count that built it."""
    fc = config.feature_cache
    if not fc.get("path"):
        raise ValueError("config.feature_cache.path must name the cache directory (built there if absent)")
    if config.data.get("pack", False):
        raise ValueError("config.data.pack: the feature cache's iterator batches one example per row; "
                         "train from the cache with pack=False (or packed without the cache)")
    outputs = outputs_for_media(tuple(task.media))
    root = str(fc.path)
    count, parts = cache_parts(root)
    if not count:
        build_from_config(config, task, outputs, cache_dir(root))
        count, parts = _await_parts(root, jax.process_count())
    data = _open_cache(root, count, parts)
    missing = [o.key for o in outputs if o.key not in data.arrays]
    if missing:
        raise ValueError(f"feature cache {root!r} lacks {missing} for media {tuple(task.media)}; it holds "
                         f"{sorted(data.arrays)} (delete it to rebuild)")
    batch_size = int(config.train.batch_size) // jax.process_count()
    if isinstance(data, GlobalFeatures):
        it = data.iterator(batch_size, seed=int(config.train.seed), process_index=jax.process_index(),
                           process_count=jax.process_count())
    else:
        it = data.iterator(batch_size, seed=int(config.train.seed))
        it.state_is_global = False
    return CachedFeatureTask(task, outputs), it


def _open_cache(root: str, count: int, parts: list[str]):
    if len(parts) != count:
        raise ValueError(f"feature cache {root!r}: {len(parts)} of the {count} parts its build wrote are here "
                         f"({[os.path.basename(p) for p in parts]}); every process reads all parts, so they must "
                         f"be on a file system all hosts mount (or delete the cache to rebuild)")
    loaded = [FeatureDataset.load(p) for p in parts]
    if all(GLOBAL_INDEX in d.arrays for d in loaded):
        data = GlobalFeatures(loaded, f"feature cache {root!r}")
        log.info("feature cache: %d examples in %d part(s) from %s", len(data), count, root)
        return data
    if count != jax.process_count():
        raise ValueError(f"feature cache {root!r} was built per process by {count} process(es) before caches "
                         f"recorded each example's global position; this run has {jax.process_count()}: delete "
                         f"it to rebuild, or train with {count} process(es)")
    data = loaded[jax.process_index()]
    log.info("feature cache: %d examples from %s (per-process cache)", len(data), parts[jax.process_index()])
    return data


def _await_parts(root: str, count: int, timeout_s: float = 3600.0) -> tuple[int, list[str]]:
    """Waits until every process' part of a fresh build is visible (they build concurrently)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found, parts = cache_parts(root)
        if found == count and len(parts) == count:
            return found, parts
        if time.monotonic() > deadline:
            raise TimeoutError(f"feature cache {root!r}: after {timeout_s:.0f} s only {len(parts)} of {count} "
                               f"process parts are visible here; is the path on a file system all hosts mount?")
        time.sleep(1.0)
