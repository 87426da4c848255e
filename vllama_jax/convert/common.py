"""What every PyTorch <-> Flax converter shares: key-map entries, the generic import/export loops,
safe `.pth` reading and atomic writing.

A converter describes a checkpoint as a list of `Entry`s: one torch tensor (key + shape) feeding one
or more Flax arrays (paths under a params tree) through a pair of pure functions. `import_entries`
and `export_entries` run such a list in either direction; both are reshapes/transposes only, so a
round trip is bit exact.

Files are read with `torch.load(weights_only=True)` (memory-mapped where the format allows, so a
tensor is only paged in when a converter touches it). A file that needs arbitrary unpickling is
refused with an `UnsafeCheckpointError` saying which global it asked for. Writers go through a
temporary sibling that is renamed over the destination at the end, so an interrupted or failed
conversion leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from vllama_jax import tree_paths

StateDict = Mapping[str, np.ndarray]
Params = dict[str, Any]
Path_ = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint does not fit the configured model (missing keys, wrong shapes, unreadable file)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file or directory does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The file can only be loaded by unpickling arbitrary objects, which we refuse to do."""


# ------------------------------------------------------------------------------------------ report

@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What an import did with every checkpoint key it looked at."""
    loaded: tuple[str, ...] = ()
    ignored: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why
    unmatched: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def merge(self, *others: "ConversionReport") -> "ConversionReport":
        out = self
        for o in others:
            out = ConversionReport(out.loaded + o.loaded, {**out.ignored, **o.ignored},
                                   out.unmatched + o.unmatched, out.notes + o.notes)
        return out

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} keys, ignored {len(self.ignored)}, unmatched {len(self.unmatched)}"]
        reasons: dict[str, int] = {}
        for why in self.ignored.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  ignored ({n}): {why}" for why, n in sorted(reasons.items())]
        lines += [f"  unmatched: {k}" for k in self.unmatched]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"loaded": list(self.loaded), "ignored": dict(self.ignored),
                "unmatched": list(self.unmatched), "notes": list(self.notes)}


def check_strict(report: ConversionReport, strict: bool, where) -> ConversionReport:
    """With `strict`, any unmatched key is an error listing them all."""
    if strict and report.unmatched:
        raise CheckpointError(f"{where}: {len(report.unmatched)} unexpected key(s): {', '.join(report.unmatched)}")
    return report


# ------------------------------------------------------------------------------------------ key map

def _identity(a: np.ndarray) -> tuple[np.ndarray, ...]:
    return (a,)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor <-> one or more Flax arrays.

    `to_flax(torch_array) -> tuple of arrays` (one per path) and `to_torch(*flax_arrays) -> array`
    must be exact inverses made of reshapes, transposes, splits and concatenations.
    """
    key: str                           # full torch key
    shape: tuple[int, ...]             # torch shape
    paths: tuple[Path_, ...]           # Flax paths it feeds
    to_flax: Callable[[np.ndarray], tuple[np.ndarray, ...]] = _identity
    to_torch: Callable[..., np.ndarray] = lambda a: a

    def moved(self, key_prefix: str = "", path_prefix: Path_ = ()) -> "Entry":
        """The same mapping for a tower nested in a bigger model: torch key and Flax paths prefixed."""
        return dataclasses.replace(self, key=key_prefix + self.key,
                                   paths=tuple(tuple(path_prefix) + p for p in self.paths))


def copy_entry(key: str, shape, path: Path_) -> Entry:
    return Entry(key, tuple(shape), (tuple(path),))


def transposed_entry(key: str, shape, path: Path_) -> Entry:
    """A torch `Linear.weight [out, in]` <-> Flax `kernel [in, out]`."""
    return Entry(key, tuple(shape), (tuple(path),), lambda a: (a.T,), lambda a: a.T)


def linear_entries(key: str, path: Path_, n_in: int, n_out: int, bias: bool = True) -> list[Entry]:
    """`{key}.weight`/`.bias` of a torch Linear <-> `{path}/kernel`/`bias` of a Flax Dense."""
    out = [transposed_entry(f"{key}.weight", (n_out, n_in), tuple(path) + ("kernel",))]
    if bias:
        out.append(copy_entry(f"{key}.bias", (n_out,), tuple(path) + ("bias",)))
    return out


def norm_entries(key: str, path: Path_, d: int) -> list[Entry]:
    """`{key}.weight`/`.bias` of a torch LayerNorm <-> `{path}/scale`/`bias`."""
    return [copy_entry(f"{key}.weight", (d,), tuple(path) + ("scale",)),
            copy_entry(f"{key}.bias", (d,), tuple(path) + ("bias",))]


def conv_kernel_entry(key: str, torch_shape, path: Path_) -> Entry:
    """torch conv weight `[out, in, *window]` <-> Flax `[*window, in, out]`."""
    nd = len(torch_shape)
    fwd = tuple(range(2, nd)) + (1, 0)
    inv = tuple(int(i) for i in np.argsort(fwd))
    return Entry(key, tuple(torch_shape), (tuple(path),), lambda a: (a.transpose(fwd),),
                 lambda a: a.transpose(inv))


def moved(entries: Iterable[Entry], key_prefix: str = "", path_prefix: Path_ = ()) -> list[Entry]:
    """`Entry.moved` over a list (a tower's key map inside a composite model)."""
    return [e.moved(key_prefix, path_prefix) for e in entries]


def expected_keys(entries: Iterable[Entry]) -> dict[str, tuple[int, ...]]:
    """Torch key -> torch shape of a key map (for checks and docs)."""
    return {e.key: e.shape for e in entries}


# ------------------------------------------------------------------------------------------ trees

def get_path(tree: Mapping, path: Path_):
    """`tree_paths.get` with the converters' error: a CheckpointError naming the missing entry."""
    i = tree_paths.missing_at(tree, path)
    if i is not None:
        raise CheckpointError(f"params have no entry {'/'.join(path[:i + 1])}"
                              + (f" (needed for {'/'.join(path)})" if i + 1 < len(path) else ""))
    return tree_paths.get(tree, path)


def np_dtype(dtype) -> np.dtype | None:
    """numpy dtype of a name / numpy / jax dtype (bfloat16 via ml_dtypes); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _cast(a: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return a if dtype is None else a.astype(dtype, copy=False)


# ------------------------------------------------------------------------------------------ import / export

def import_entries(sd: StateDict, entries: list[Entry], what: str, dtype=None,
                   on_tensor: Callable[[str], None] | None = None) -> Params:
    """Params from the tensors `entries` name. Missing keys and wrong shapes raise, naming them.

    Each result is a fresh C-ordered array (no view into a memory-mapped file survives).
    `dtype` casts (None keeps the stored dtype); `on_tensor(key)` is called per tensor (progress).
    """
    missing = [e for e in entries if e.key not in sd]
    if missing:
        shown = ", ".join(f"{e.key} {e.shape}" for e in missing[:20])
        more = f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
        raise CheckpointError(f"{what}: checkpoint is missing {len(missing)} key(s): {shown}{more}")
    dtype = np_dtype(dtype)
    params: Params = {}
    for e in entries:
        a = sd[e.key]
        if tuple(np.shape(a)) != e.shape:
            raise CheckpointError(f"{what}: checkpoint key {e.key!r} has shape {tuple(np.shape(a))}, "
                                  f"expected {e.shape}")
        for path, part in zip(e.paths, e.to_flax(np.asarray(a))):
            tree_paths.set_in(params, path, np.array(_cast(part, dtype), order="C"))
        if on_tensor is not None:
            on_tensor(e.key)
    return params


def export_entries(params: Mapping, entries: list[Entry], dtype=None,
                   on_tensor: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Torch-named, torch-laid-out numpy arrays from `params` (inverse of `import_entries`)."""
    dtype = np_dtype(dtype)
    out = {}
    for e in entries:
        arrays = [np.asarray(get_path(params, p)) for p in e.paths]
        a = np.array(e.to_torch(*arrays), order="C")
        if tuple(a.shape) != e.shape:
            raise CheckpointError(f"params for {e.key} ({', '.join('/'.join(p) for p in e.paths)}) give "
                                  f"shape {tuple(a.shape)}, expected {e.shape}")
        out[e.key] = _cast(a, dtype)
        if on_tensor is not None:
            on_tensor(e.key)
    return out


def sort_rest(sd: StateDict, used: Iterable[str], in_scope: Callable[[str], bool],
              why_ignored: Callable[[str], str | None]) -> tuple[dict[str, str], tuple[str, ...]]:
    """(ignored key -> why, unmatched keys) among the in-scope keys no entry used."""
    used = set(used)
    ignored, unmatched = {}, []
    for key in sd:
        if key in used or not in_scope(key):
            continue
        why = why_ignored(key)
        if why is None:
            unmatched.append(key)
        else:
            ignored[key] = why
    return ignored, tuple(unmatched)


def ignore_rules(rules: Iterable[tuple[str, str]], prefix: str = "") -> Callable[[str], str | None]:
    """`why_ignored` from (regex, reason) pairs matched at the start of a key after `prefix`."""
    compiled = [(re.compile(re.escape(prefix) + r), why) for r, why in rules]
    return lambda key: next((why for r, why in compiled if r.match(key)), None)


# ------------------------------------------------------------------------------------------ torch files

TORCH_EXTRA_HINT = "install the [torch] extra: pip install -e '.[torch]' (torch==2.13.0, CPU is enough)"


def import_torch():
    """`torch`, or a CheckpointError saying how to get it (it is an optional extra)."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise CheckpointError(f"reading or writing PyTorch .pth files needs PyTorch, which is not installed: "
                              f"{TORCH_EXTRA_HINT} (.safetensors files need no torch)") from None
    return torch


def tensor_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy, sharing memory where it can; bf16 stays bf16 (ml_dtypes)."""
    torch = import_torch()
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_tensor(a) -> Any:
    torch = import_torch()
    a = np.asarray(a)
    if not (a.flags.c_contiguous and a.flags.writeable):  # (np.ascontiguousarray would make 0-d arrays 1-d)
        a = a.copy(order="C")
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


def torch_load(path) -> Any:
    """`torch.load(path, weights_only=True)`, memory-mapped when the file format allows.

    Raises `CheckpointNotFoundError`, `UnsafeCheckpointError` (the pickle asks for a global that
    weights-only loading blocks, i.e. arbitrary code) or `CheckpointError` (truncated, corrupt or
    not a torch file), each naming the file.
    """
    torch = import_torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: checkpoint file does not exist")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # Legacy (pre-zip) files and non-torch files cannot be memory-mapped; read them fully.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a broken or unsafe file
        msg = str(e)
        m = _GLOBAL.search(msg)
        if m:
            raise UnsafeCheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling (the pickle asks for GLOBAL "
                f"{m.group(1)}, which could run any code). Only "
                "tensors, containers and plain numbers are accepted (torch.load weights_only=True). If you "
                "trust the file, re-save its state dict in a separate environment with "
                "`torch.save(torch.load(p, weights_only=False)['model'], out)`.") from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weights file (truncated or corrupt?): "
                              f"{type(e).__name__}: {first}") from None


def state_dict_of(obj: Any, where) -> Mapping:
    """The state dict inside a loaded `.pth`: the object itself or its `"model"` entry."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state dict (or {{'model': state_dict}}), "
                              f"got {type(obj).__name__}")
    return obj


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A PyTorch `.pth` as `{key: numpy array}`; a `{"model": state_dict, ...}` wrapper is unwrapped.

    Loads with `weights_only=True` (no arbitrary unpickling), memory-mapped where possible, so the
    arrays are views into the file until a converter copies them; bf16 stays bf16 (ml_dtypes).
    A `.safetensors` file (same keys, flat) is read without torch.
    """
    if os.fspath(path).endswith(".safetensors"):
        return _read_safetensors(path)
    torch = import_torch()
    sd = state_dict_of(torch_load(path), path)
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is a {type(key).__name__}, expected str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        out[key] = tensor_to_numpy(value)
    return out


def _read_safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: checkpoint file does not exist")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a broken file
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def save_torch(path, obj: Any, overwrite: bool = True) -> Path:
    """`torch.save(obj)` to a temporary sibling, renamed to `path` once complete."""
    torch = import_torch()
    path = _destination(path, overwrite)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return path


def _destination(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    return path


def save_state_dict(path, sd: Mapping[str, np.ndarray], wrap: bool = False, extra: Mapping | None = None,
                    overwrite: bool = True) -> Path:
    """Writes numpy arrays as torch tensors; `wrap` puts them under `"model"` (LAVIS / Video-LLaMA).

    A `.safetensors` path writes the same keys flat without torch (no wrapper, no `extra`), which
    `read_state_dict` reads back: the torch-free form of the same file (e.g. for `vllama-demo`).
    """
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.numpy import save_file
        path = _destination(path, overwrite)
        with atomic_file(path) as tmp:
            # (np.ascontiguousarray would make 0-d arrays 1-d)
            save_file({k: np.asarray(v).copy(order="C") for k, v in sd.items()}, str(tmp))
        return path
    tensors = {k: numpy_to_tensor(v) for k, v in sd.items()}
    obj = {"model": tensors, **(extra or {})} if wrap else tensors
    return save_torch(path, obj, overwrite)


# ------------------------------------------------------------------------------------------ atomic writes

@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; renamed to `path` on success, removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise survive the rename
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `path`; it replaces `path` on success only.

    Refuses a non-empty existing `path` unless `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise survive the rename
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Renames `src` to `dst`, moving an existing `dst` aside first and deleting it afterwards."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(src, dst)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(src, dst)


# ------------------------------------------------------------------------------------------ progress

def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar counting tensors (disabled: a no-op bar with the same interface)."""
    from vllama_jax.progress import progress_bar as bar

    return bar(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
