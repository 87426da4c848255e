"""Hugging Face LLaMA checkpoints <-> `vllama_jax.models.llama` params.

Import reads a local HF directory (`config.json` + `model.safetensors`, a sharded
`model.safetensors.index.json`, `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json`)
one tensor at a time, so a 7B model never needs twice its size in RAM. Export writes `config.json` +
safetensors that `transformers.LlamaForCausalLM.from_pretrained` loads.

Key map (HF key → Flax path under `params`; `.weight` of a Linear is `[out, in]`, Flax `kernel` is
`[in, out]`, so those are transposed):

  model.embed_tokens.weight                       embed_tokens/embedding               (as is)
  model.layers.{i}.self_attn.q_proj.weight        layers_{i}/self_attn/q_proj/kernel   (T)
  model.layers.{i}.self_attn.k_proj.weight        layers_{i}/self_attn/k_proj/kernel   (T)
  model.layers.{i}.self_attn.v_proj.weight        layers_{i}/self_attn/v_proj/kernel   (T)
  model.layers.{i}.self_attn.o_proj.weight        layers_{i}/self_attn/o_proj/kernel   (T)
  model.layers.{i}.mlp.gate_proj.weight           layers_{i}/mlp/gate_proj/kernel      (T)
  model.layers.{i}.mlp.up_proj.weight             layers_{i}/mlp/up_proj/kernel        (T)
  model.layers.{i}.mlp.down_proj.weight           layers_{i}/mlp/down_proj/kernel      (T)
  model.layers.{i}.input_layernorm.weight         layers_{i}/input_layernorm/scale     (as is)
  model.layers.{i}.post_attention_layernorm.weight layers_{i}/post_attention_layernorm/scale
  model.norm.weight                               norm/scale                           (as is)
  lm_head.weight                                  lm_head/kernel                       (T; absent when tied)

Ignored on import: `*.rotary_emb.inv_freq` (a buffer recomputed from the config) and, for tied
embeddings, a redundant `lm_head.weight` (logged). Any other unmatched key is an error
(`strict=True`) or a warning listing it (`strict=False`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax import tree_paths
from vllama_jax.convert.common import (CheckpointError, atomic_dir, get_path as _get, progress_bar,
                                       tensor_to_numpy, torch_load)
from vllama_jax.models import scan as layer_scan
from vllama_jax.models.llama import LlamaConfig, RopeScaling

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# safetensors dtype tags <-> numpy dtypes (bf16 via ml_dtypes, which jnp.dtype resolves).
_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(jnp.bfloat16)}
_ST_TAGS = {v: k for k, v in _ST_DTYPES.items()}
_TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                      np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float64): "float64"}


# ------------------------------------------------------------------------------------------ config

def config_from_hf(src: str | os.PathLike | Mapping[str, Any], **overrides) -> LlamaConfig:
    """`LlamaConfig` from an HF checkpoint directory, a `config.json` path or its dict.

    Reads both the legacy (`rope_theta` + `rope_scaling`) and the transformers-5 (`rope_parameters`)
    RoPE fields. `overrides` replace fields afterwards (e.g. `dtype=jnp.bfloat16, remat=True`).
    """
    hf, where = _read_config(src)
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{where}: model_type is {model_type!r}, expected 'llama'")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != want:
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported (expected {want!r})")

    def need(key):
        if key not in hf:
            raise CheckpointError(f"{where}: missing required field {key!r}")
        return hf[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    max_pos = int(hf.get("max_position_embeddings", 2048))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        try:
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]),
                                  int(rope.get("original_max_position_embeddings", max_pos)))
        except KeyError as e:
            raise CheckpointError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None
    else:
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (default or llama3 only)")
    eos = hf.get("eos_token_id", 2)
    kwargs = dict(
        vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_pos, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id", 1), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), initializer_range=float(hf.get("initializer_range", 0.02)))
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def config_to_hf(config: LlamaConfig, dtype: Any = None) -> dict[str, Any]:
    """config.json dict for `config` (legacy rope fields, which transformers 4.x and 5.x both read)."""
    s = config.rope_scaling
    rope_scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings}
    eos = config.eos_token_id
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id, "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id, "use_cache": True,
    }
    if dtype is not None:
        out["torch_dtype"] = _TORCH_DTYPE_NAMES[np.dtype(dtype)]
    return out


def _read_config(src) -> tuple[dict, str]:
    if isinstance(src, Mapping):
        return dict(src), "config dict"
    path = Path(src)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        parent = path.parent
        if not parent.exists():
            raise FileNotFoundError(f"HF LLaMA checkpoint directory {parent} does not exist")
        raise FileNotFoundError(f"{parent}: no {CONFIG_NAME} (expected an HF LLaMA checkpoint directory "
                                f"holding config.json and *.safetensors or pytorch_model*.bin)")
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------- key map

@dataclasses.dataclass(frozen=True)
class KeySpec:
    path: tuple[str, ...]          # Flax path under `params`
    hf_shape: tuple[int, ...]      # shape of the HF tensor
    transpose: bool                # Flax array = HF tensor.T


def key_map(config: LlamaConfig) -> dict[str, KeySpec]:
    """HF key → `KeySpec` for every tensor a LLaMA of `config` has, in HF's order."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": KeySpec(("embed_tokens", "embedding"),
                                                (c.vocab_size, c.hidden_size), False)}
    for i in range(c.num_layers):
        hf, fx = f"model.layers.{i}.", f"layers_{i}"
        for name, shape in (("q_proj", (q, c.hidden_size)), ("k_proj", (kv, c.hidden_size)),
                            ("v_proj", (kv, c.hidden_size)), ("o_proj", (c.hidden_size, q))):
            out[f"{hf}self_attn.{name}.weight"] = KeySpec((fx, "self_attn", name, "kernel"), shape, True)
        for name, shape in (("gate_proj", (c.intermediate_size, c.hidden_size)),
                            ("up_proj", (c.intermediate_size, c.hidden_size)),
                            ("down_proj", (c.hidden_size, c.intermediate_size))):
            out[f"{hf}mlp.{name}.weight"] = KeySpec((fx, "mlp", name, "kernel"), shape, True)
        for name in ("input_layernorm", "post_attention_layernorm"):
            out[f"{hf}{name}.weight"] = KeySpec((fx, name, "scale"), (c.hidden_size,), False)
    out["model.norm.weight"] = KeySpec(("norm", "scale"), (c.hidden_size,), False)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = KeySpec(("lm_head", "kernel"), (c.vocab_size, c.hidden_size), True)
    return out


# -------------------------------------------------------------------------------- tensor sources

class _SafetensorsFile:
    """Header-first reader of one .safetensors file; tensors come out as memory-mapped numpy views
    (numpy's safetensors backend cannot return bf16)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: broken safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: broken safetensors file (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: broken safetensors header: {e}") from None
        header.pop("__metadata__", None)
        self.entries, self.data_start = header, 8 + n
        for key, e in header.items():
            begin, end = e["data_offsets"]
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: tensor {key} runs past the end of the file (truncated?)")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e["shape"]) for k, e in self.entries.items()}

    def read_into(self, key: str, out: np.ndarray, transpose: bool, block_bytes: int = 16 << 20) -> None:
        """Tensor `key` (transposed if asked, cast to `out.dtype`) into `out`, read in row blocks of
        about `block_bytes`: host memory is `out` plus one block, not a second copy of the tensor
        (a memory map of the whole tensor would count in the RSS as it is read)."""
        e = self.entries[key]
        if e["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {e['dtype']}")
        dt, shape = _ST_DTYPES[e["dtype"]], tuple(e["shape"])
        if (shape[::-1] if transpose else shape) != out.shape:
            raise CheckpointError(f"{self.path}: tensor {key} {shape} does not fit {out.shape}")
        if not out.size:
            return
        rows = shape[0] if shape else 1
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64))) * dt.itemsize
        step = max(1, block_bytes // row_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + e["data_offsets"][0])
            for i in range(0, rows, step):
                n = min(step, rows - i)
                block = np.frombuffer(f.read(n * row_bytes), dt).reshape((n,) + shape[1:] if shape else ())
                if transpose:
                    out[:, i:i + n] = block.T
                elif shape:
                    out[i:i + n] = block
                else:
                    out[...] = block

    def get(self, key: str) -> np.ndarray:
        e = self.entries[key]
        if e["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {e['dtype']}")
        begin, _ = e["data_offsets"]
        shape = tuple(e["shape"])
        if not int(np.prod(shape)):
            return np.zeros(shape, _ST_DTYPES[e["dtype"]])
        return np.memmap(self.path, dtype=_ST_DTYPES[e["dtype"]], mode="r",
                         offset=self.data_start + begin, shape=shape)


def _torch_load(path: Path) -> dict:
    state = torch_load(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


class _Checkpoint:
    """The weight files of one HF directory: shapes up front, tensors streamed file by file."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files, self.kind = self._discover(directory)

    @staticmethod
    def _discover(d: Path) -> tuple[list[Path], str]:
        for index_name, single, kind in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"),
                                         (BIN_INDEX, BIN_SINGLE, "bin")):
            if (d / index_name).is_file():
                try:
                    weight_map = json.loads((d / index_name).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{d / index_name}: broken index ({e!r})") from None
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (d / f).is_file()]
                if missing:
                    raise CheckpointError(f"{d / index_name} names shard files that are missing: {missing}")
                return [d / f for f in files], kind
            if (d / single).is_file():
                return [d / single], kind
        raise FileNotFoundError(f"{d}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                                f"{BIN_SINGLE} or {BIN_INDEX})")

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Path]]:
        out = {}
        for path in self.files:
            if self.kind == "safetensors":
                shapes = _SafetensorsFile(path).shapes()
            else:
                shapes = {k: tuple(v.shape) for k, v in _torch_load(path).items()}
            for k, s in shapes.items():
                if k in out:
                    raise CheckpointError(f"tensor {k} appears in both {out[k][1].name} and {path.name}")
                out[k] = (s, path)
        return out

    def tensor(self, key: str, path: Path) -> np.ndarray:
        """One tensor of file `path` (a view into the file for safetensors: copy it, then drop it)."""
        if self.kind == "safetensors":
            return _SafetensorsFile(path).get(key)
        return tensor_to_numpy(_torch_load(path)[key])   # memory-mapped: only this tensor is read

    def tensors(self, keys: set[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(key, array) for `keys`, one file open at a time; arrays may be views into the file."""
        for path in self.files:
            if self.kind == "safetensors":
                f = _SafetensorsFile(path)
                for k in f.entries:
                    if k in keys:
                        yield k, f.get(k)
            else:
                state = _torch_load(path)
                for k in list(state):
                    if k in keys:
                        yield k, tensor_to_numpy(state.pop(k))
                del state


# ------------------------------------------------------------------------------------------ import

def load_hf(path: str | os.PathLike, *, config: LlamaConfig | None = None, dtype: Any = None,
            strict: bool = True, shardings: Any = None, progress: bool = True,
            ) -> tuple[LlamaConfig, dict]:
    """Loads an HF LLaMA directory; returns `(config, params)` for `Llama(config).apply({'params': params}, ...)`.

    config: use this instead of config.json (shapes are still validated against the files).
    dtype: cast every tensor to it as it is read (e.g. `jnp.bfloat16`); None keeps the stored dtype.
    strict: unexpected tensors raise (True) or are listed in a warning (False).
    shardings: optional tree like `params` of `jax.sharding.Sharding`s (e.g.
      `sharding.param_shardings(abstract, mesh)['params']`); each tensor then goes straight onto the
      devices and host memory holds one tensor at a time. Without it the leaves are numpy arrays.
    With `config.scan_layers` the layers come back stacked (`layers/...` [num_layers, ...], as
    `Llama` then expects them); the per-layer weights are gathered on the host before placing.
    """
    directory, config, expected, ckpt, found = _open_checked(path, config, strict)

    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    put = _placer(shardings)
    params: dict = {}
    stacked: dict = {}
    bar = progress_bar(len(expected), f"loading {directory.name}", progress)
    for key, array in ckpt.tensors(set(expected)):
        spec = expected[key]
        src = array.T if spec.transpose else array
        layer = _layer_index(spec.path) if config.scan_layers else None
        if layer is None:
            # One fresh C-ordered copy does cast + transpose and detaches the result from the file map.
            out = np.empty(src.shape, src.dtype if target is None else target)
            np.copyto(out, src, casting="unsafe")
            tree_paths.set_in(params, spec.path, put(spec.path, out))
        else:
            # scan_layers: each layer's tensor goes into its slot of one [num_layers, ...] host array.
            rest = spec.path[1:]
            if rest not in stacked:
                stacked[rest] = np.empty((config.num_layers,) + src.shape, src.dtype if target is None else target)
            np.copyto(stacked[rest][layer], src, casting="unsafe")
        del array, src
        bar.update(1)
    bar.close()
    for rest, out in stacked.items():
        tree_paths.set_in(params, ("layers",) + rest, put(("layers",) + rest, out))
    return config, params


def _open_checked(path, config: LlamaConfig | None, strict: bool):
    """An HF LLaMA directory opened and its tensor names and shapes checked against `config`
    (default: its config.json) before anything is read: `(directory, config, key map, checkpoint,
    found shapes)`."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"HF LLaMA checkpoint directory {directory} does not exist")
    config = config_from_hf(directory) if config is None else config
    expected = key_map(config)
    ckpt = _Checkpoint(directory)
    found = ckpt.shapes()
    _validate(expected, found, config, directory, strict)
    return directory, config, expected, ckpt, found


def lazy_hf(path: str | os.PathLike, *, config: LlamaConfig | None = None, dtype: Any = None,
            strict: bool = True) -> tuple[LlamaConfig, dict]:
    """`load_hf` without reading any weights yet: `(config, params)` whose leaves are
    `params_checkpoint.LazyArray`s, each reading, transposing and casting its one tensor from its
    file when loaded (with `config.scan_layers`, a stacked leaf gathers its `num_layers` tensors).
    `params_checkpoint.save_params` writes such a tree one tensor at a time, so an import's host
    memory is about one tensor, not the model. Names, shapes and extra keys are checked here, up front.
    """
    from vllama_jax.convert.params_checkpoint import LazyArray

    directory, config, expected, ckpt, found = _open_checked(path, config, strict)
    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    dtypes = _stored_dtypes(ckpt, found, expected)

    def one(key: str, out: np.ndarray | None = None) -> np.ndarray:
        spec = expected[key]
        if out is None:
            shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
            out = np.empty(shape, dtypes[key] if target is None else target)
        if ckpt.kind == "safetensors":
            _SafetensorsFile(found[key][1]).read_into(key, out, spec.transpose)
        else:
            array = ckpt.tensor(key, found[key][1])
            np.copyto(out, array.T if spec.transpose else array, casting="unsafe")
        return out

    params: dict = {}
    stacked: dict = {}
    for key, spec in expected.items():
        shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
        dt = dtypes[key] if target is None else target
        layer = _layer_index(spec.path) if config.scan_layers else None
        if layer is None:
            tree_paths.set_in(params, spec.path, LazyArray(shape, dt, functools.partial(one, key), "/".join(spec.path)))
        else:
            stacked.setdefault(spec.path[1:], [shape, dt, {}])[2][layer] = key
    for rest, (shape, dt, keys) in stacked.items():
        def gather(keys=keys, shape=shape, dt=dt):
            out = np.empty((config.num_layers,) + shape, dt)
            for layer, key in keys.items():
                one(key, out[layer])
            return out
        tree_paths.set_in(params, ("layers",) + rest,
             LazyArray((config.num_layers,) + shape, dt, gather, "/".join(("layers",) + rest)))
    return config, params


def _stored_dtypes(ckpt: _Checkpoint, found: dict, expected: dict) -> dict[str, np.dtype]:
    """Each expected tensor's stored dtype, from the safetensors headers (a .bin shard is opened
    memory-mapped to see them)."""
    out = {}
    for path in ckpt.files:
        if ckpt.kind == "safetensors":
            f = _SafetensorsFile(path)
            for k, e in f.entries.items():
                if k in expected:
                    if e["dtype"] not in _ST_DTYPES:
                        raise CheckpointError(f"{path}: tensor {k} has unsupported dtype {e['dtype']}")
                    out[k] = _ST_DTYPES[e["dtype"]]
        else:
            state = _torch_load(path)
            for k, v in state.items():
                if k in expected:
                    if str(v.dtype) not in _TORCH_NP:
                        raise CheckpointError(f"{path}: tensor {k} has unsupported dtype {v.dtype}")
                    out[k] = np.dtype(_TORCH_NP[str(v.dtype)])
            del state
    return out


_TORCH_NP = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.bfloat16": jnp.bfloat16,
             "torch.float64": np.float64}


def _layer_index(path: tuple[str, ...]) -> int | None:
    m = re.fullmatch(r"layers_(\d+)", path[0])
    return int(m.group(1)) if m else None


def _validate(expected: dict[str, KeySpec], found: dict, config: LlamaConfig, directory: Path,
              strict: bool) -> None:
    missing = [k for k in expected if k not in found]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise CheckpointError(f"{directory}: missing tensors for {_describe(config)}: {shown}")
    bad = [f"{k}: expected {expected[k].hf_shape}, found {found[k][0]} (in {found[k][1].name})"
           for k in expected if tuple(found[k][0]) != expected[k].hf_shape]
    if bad:
        raise CheckpointError(f"{directory}: wrong tensor shapes for {_describe(config)}:\n  "
                              + "\n  ".join(bad))
    extra = sorted(k for k in found if k not in expected and not _IGNORED.match(k))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
        log.info("%s: tied embeddings, ignoring the stored lm_head.weight", directory)
    if extra:
        msg = f"{directory}: unexpected tensors for {_describe(config)}: {', '.join(extra)}"
        if strict:
            raise CheckpointError(msg + " (pass strict=False to load anyway)")
        warnings.warn(msg)


def _describe(c: LlamaConfig) -> str:
    return (f"LlamaConfig(vocab={c.vocab_size}, hidden={c.hidden_size}, inter={c.intermediate_size}, "
            f"layers={c.num_layers}, heads={c.num_heads}, kv_heads={c.num_kv_heads}, "
            f"head_dim={c.head_dim}, tied={c.tie_word_embeddings})")


def _placer(shardings) -> Callable[[tuple[str, ...], np.ndarray], Any]:
    if shardings is None:
        return lambda path, a: a

    def put(path, a):
        node = shardings
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise KeyError(f"shardings has no entry for param {'/'.join(path)}")
            node = node[p]
        return jax.device_put(a, node)
    return put


# ------------------------------------------------------------------------------------------ export

def save_hf(params: Mapping, config: LlamaConfig, out_dir: str | os.PathLike, *, dtype: Any = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Writes `config.json` + safetensors loadable by `transformers.LlamaForCausalLM.from_pretrained`.

    params: the tree under 'params' (a `{'params': ...}` variables dict is accepted too); numpy or
      fully addressable jax arrays, fetched one tensor at a time (scan_layers' stacked `layers` are
      fetched whole and written per layer).
    dtype: stored dtype (float32 / float16 / bfloat16); None keeps each array's dtype.
    max_shard_size: bytes or a string like "5GB" / "500MB" / "2GiB"; above it the weights are split
      into `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    The files are written to a temporary sibling directory that is renamed to `out_dir` at the end.
    """
    if set(params) == {"params"}:
        params = params["params"]
    if layer_scan.is_stacked(params, "layers"):
        # scan_layers params: HF files are per layer (slices of the stacked arrays are views on the host).
        params = layer_scan.unstack_layers(jax.device_get(params), "layers")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    spec = key_map(config)
    plan = _plan_tensors(params, spec, config, dtype)
    shards = _split_shards(plan, _parse_size(max_shard_size))

    with atomic_dir(out_dir, overwrite=True) as tmp:
        bar = progress_bar(len(plan), f"saving {out_dir.name}", progress)
        names = ([SAFE_SINGLE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for name, shard in zip(names, shards):
            _write_safetensors(tmp / name, shard, params, spec, bar)
            weight_map.update({key: name for key, _, _ in shard})
        bar.close()
        if len(shards) > 1:
            total = sum(_nbytes(shape, dt) for _, shape, dt in plan)
            (tmp / SAFE_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        stored = {dt for _, _, dt in plan}
        (tmp / CONFIG_NAME).write_text(json.dumps(
            config_to_hf(config, stored.pop() if len(stored) == 1 else None), indent=2))
    return out_dir


def _plan_tensors(params, spec: dict[str, KeySpec], config: LlamaConfig,
                  dtype) -> list[tuple[str, tuple, np.dtype]]:
    """(HF key, HF shape, stored dtype) for every tensor, after checking the params tree."""
    flat = tree_paths.flatten(params)
    expected = {s.path for s in spec.values()}
    extra = sorted("/".join(p) for p in flat if p not in expected)
    if extra:
        raise CheckpointError(f"params hold entries {_describe(config)} does not have: {extra}")
    plan = []
    for key, s in spec.items():
        if s.path not in flat:
            raise CheckpointError(f"params lack {'/'.join(s.path)} (for HF {key})")
        leaf = flat[s.path]
        want = s.hf_shape[::-1] if s.transpose else s.hf_shape
        if tuple(leaf.shape) != want:
            raise CheckpointError(f"param {'/'.join(s.path)} has shape {tuple(leaf.shape)}, expected {want}")
        dt = np.dtype(jnp.dtype(dtype if dtype is not None else leaf.dtype))
        if dt not in _ST_TAGS:
            raise CheckpointError(f"cannot store {'/'.join(s.path)} as {dt} (float16/32/64 or bfloat16)")
        plan.append((key, s.hf_shape, dt))
    return plan


def _nbytes(shape, dt: np.dtype) -> int:
    return int(np.prod(shape)) * dt.itemsize


def _split_shards(plan, max_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for item in plan:
        n = _nbytes(item[1], item[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    shards.append(current)
    return shards


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base ** power)


def _write_rows(f, array: np.ndarray, block_bytes: int = 16 << 20) -> None:
    """`array`'s C-order bytes, copied out (a transposed view) a block of rows at a time: host
    memory holds the array plus one block, not a second contiguous copy."""
    if array.ndim == 0 or array.flags.c_contiguous:
        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        return
    row_bytes = max(1, array[0].nbytes)
    step = max(1, block_bytes // row_bytes)
    for i in range(0, array.shape[0], step):
        f.write(np.ascontiguousarray(array[i:i + step]).reshape(-1).view(np.uint8).data)


def _write_safetensors(path: Path, shard, params, spec: dict[str, KeySpec], bar) -> None:
    """Writes the header first, then each tensor's bytes as it is fetched (one in memory at a time,
    or one block of it when the params checkpoint can be read in blocks)."""
    from vllama_jax.convert.params_checkpoint import LazyArray
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dt in shard:
        n = _nbytes(shape, dt)
        header[key] = {"dtype": _ST_TAGS[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dt in shard:
            s = spec[key]
            leaf = _get(params, s.path)
            read = leaf.block_reader() if isinstance(leaf, LazyArray) else None
            if read is not None:
                _write_blocks(f, read, shape, dt, s.transpose)
            else:
                array = np.asarray(jax.device_get(leaf)).astype(dt, copy=False)
                _write_rows(f, array.T if s.transpose else array)
                del array
            bar.update(1)


def _write_blocks(f, read, hf_shape: tuple, dt: np.dtype, transpose: bool, block_bytes: int = 16 << 20) -> None:
    """Writes a stored tensor in blocks of HF rows, each read on its own (`LazyArray.block_reader`):
    host memory holds one block, not the tensor. A transposed (HF [out, in]) tensor's row block is
    a column block of ours ([in, out])."""
    row_bytes = max(1, int(np.prod(hf_shape[1:], dtype=np.int64)) * dt.itemsize)
    step = max(1, block_bytes // row_bytes)
    for i in range(0, hf_shape[0], step):
        rows = slice(i, min(i + step, hf_shape[0]))
        part = read((slice(None), rows)).T if transpose else read((rows,))
        f.write(np.ascontiguousarray(part, dtype=dt).reshape(-1).view(np.uint8).data)
        del part

