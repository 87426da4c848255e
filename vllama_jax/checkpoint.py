"""Checkpoints: orbax `CheckpointManager` over the train state and the data iterator state.

Layout under `workdir`:

  checkpoints/<step>/state   trainable params, optimizer state, step, rng   (orbax StandardSave)
  checkpoints/<step>/data    the data iterator's state, one file per process (grain handler:
                             `process_<i>-of-<n>.json`)
  checkpoints/<step>/meta    step, the trainable param paths (to refuse a mismatched resume) and
                             the process count that wrote `data`

The state is any object with `step`, `to_dict()` and a `from_dict` classmethod (the trainer's
`train.step.TrainState`); this module does not import the trainer, the trainer imports it.

Elastic resume. The arrays are restored onto the abstract state's shardings, so a checkpoint
written on one mesh (say data 2 x fsdp 4 on 8 devices) restores onto any other mesh whose axes
divide the shapes (data 4, one device...). The data iterator's state is where the process count
matters: grain's handler writes `process_<i>-of-<n>.json` and on restore reads only the file
named by the *current* index and count, so after a change of process count it finds no file
(`ValueError: File ... does not exist`); it guarantees nothing about re-splitting a position
across another count, and a sharded grain pipeline's per-process position (an index into that
process' own slice of the shuffled data) has no meaning under another split. So `restore`:
- same count: grain's handler, as written;
- another count, iterator with `state_is_global = True` (its state is one position in the
  global example order, equal on every process, each process deriving its own rows from it:
  `train.toy`, the ArrayRecord loader's `GlobalPositionLoader`, the feature cache's iterator):
  every written file must hold the same state, which is set on each new process;
- another count, any other iterator (packed batches): refused (`ProcessCountChangeError`, a
  UserError) naming both counts and the way out (resume with the old count).

  frozen/                    the frozen params, written once if asked (they normally come from
                             their pretrained source and are never re-saved)

Saves are asynchronous: `save` returns after the arrays are copied off the device, so the next
(donating) train step may run while files are written. The iterator state is read at `save`
time (a snapshot), not when a background thread gets to it. Old steps beyond `max_to_keep` are
deleted; a step directory only appears once complete, so a run killed mid-save resumes from the
previous complete step.

Faults a real run meets (`restore_newest`, `remove_interrupted_saves`, `WorkdirLock`):
- a damaged step (a truncated array file, an emptied `_METADATA`: a full disk, a copy cut short)
  is reported in one log line (step, file, what is wrong) and the newest step that does restore
  is used; the damaged steps newer than it are renamed `<step>.damaged-<time>` (kept, never
  deleted). If no step restores, nothing is renamed and the error names the newest step's file.
- the temp directories (`*.orbax-checkpoint-tmp*`) of a save cut short are removed at start.
- a lock file in the workdir (holder's host, pid, start time) refuses a second run there; a lock
  left by a dead process on the same host is taken over.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import Any

import grain
import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath

from vllama_jax.cli_errors import UserError

log = logging.getLogger(__name__)

TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_MARKER = ".damaged-"
LOCK_NAME = "vllama.lock"


class CheckpointDamagedError(RuntimeError):
    """No checkpoint step in the workdir restores (each one's problem is in the message)."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _local(path: str) -> bool:
    return "://" not in path


# ------------------------------------------------------------------------------ damage reports

_JSON_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding", "metadata")


def _damaged_json(step_dir: str) -> tuple[str, str] | None:
    """(file, problem) of the first JSON metadata file in the step that is empty or unparsable."""
    for root, _, files in sorted(os.walk(step_dir)):
        for name in sorted(files):
            if not (name in _JSON_FILES or name.endswith(".json") or os.path.basename(root) == "array_metadatas"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    text = f.read()
            except OSError as e:
                return path, f"unreadable ({e.strerror})"
            if not text.strip():
                return path, "empty file"
            try:
                json.loads(text)
            except ValueError as e:
                return path, f"not valid JSON ({e})"
    return None


def _exception_chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def describe_damage(step_dir: str, error: BaseException) -> str:
    """'<file>: <what is wrong>' for a step that failed to restore with `error`."""
    found = _damaged_json(step_dir) if _local(step_dir) else None
    if found:
        return f"{found[0]}: {found[1]}"
    for e in _exception_chain(error):
        text = " ".join(str(e).split())
        m = re.search(r'Error reading "([^"]+)".*?Requested byte range (\S+ \S+) is not valid for value of '
                      r'size (\d+)', text)
        if m:
            key, span, size = m.groups()
            files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
                     if os.path.getsize(os.path.join(r, f)) == int(size)] if _local(step_dir) else []
            where = (files[0] if len(files) == 1 else f"one of {', '.join(sorted(files)[:3])}" if files
                     else os.path.join(step_dir, "state"))
            return (f"{where}: truncated: array {key!r} needs bytes {span} but the file has {size}")
        if isinstance(e, FileNotFoundError) and e.filename:
            return f"{e.filename}: missing"
        if re.search(r"OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|JSONDecodeError|Expecting value", text):
            return f"{step_dir}: {type(e).__name__}: {text[:300]}"
    return f"{step_dir}: {type(error).__name__}: {' '.join(str(error).split())[:300]}"


def set_aside(step_dir: str) -> str:
    """Renames a damaged step dir to `<step>.damaged-<utc time>`; returns the new path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    new = f"{step_dir.rstrip('/')}{DAMAGED_MARKER}{stamp}"
    n = 1
    while os.path.exists(new):
        new, n = f"{step_dir.rstrip('/')}{DAMAGED_MARKER}{stamp}-{n}", n + 1
    os.rename(step_dir, new)
    return new


def remove_interrupted_saves(workdir: str) -> list[str]:
    """Deletes the `*.orbax-checkpoint-tmp*` directories a save cut short left in `workdir` and
    its `checkpoints/` (call only while holding the workdir lock); returns what it removed."""
    if not _local(workdir) or jax.process_index() != 0:
        return []
    removed = []
    for d in (workdir, os.path.join(workdir, "checkpoints")):
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if TMP_MARKER in name:
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)
                removed.append(os.path.join(d, name))
    if removed:
        log.warning("removed %d half-written checkpoint dir(s) left by an interrupted save: %s",
                    len(removed), ", ".join(removed))
    return removed


# ------------------------------------------------------------------------------ workdir lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """`<workdir>/vllama.lock` holding {host, pid, start}: one training run per workdir.

    Created atomically (written to a temp file, then hard-linked into place), so a reader never
    sees a half-written lock. A lock whose holder is a dead process on this host is taken over;
    one from another host is refused (this host cannot tell whether it lives). Only process 0
    of a multi-host run takes it; URL workdirs (gs://) are not locked.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.held = False
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _try_create(self) -> bool:
        tmp = f"{self.path}.{self.info['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def acquire(self) -> "WorkdirLock":
        if not _local(self.workdir) or jax.process_index() != 0:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:
                continue   # released meanwhile
            host, pid = holder.get("host"), holder.get("pid")
            same_host = host == self.info["host"]
            if same_host and isinstance(pid, int) and not _pid_alive(pid):
                log.warning("taking over the stale lock %s of a run that is gone (host %s, pid %s, "
                            "started %s)", self.path, host, pid, holder.get("start"))
                os.unlink(self.path)
                continue
            if not holder:
                raise WorkdirLockedError(f"workdir {self.workdir} has an unreadable lock file {self.path}; "
                                         "if no run uses this workdir, delete it")
            hint = ("" if same_host else "; this host cannot check a process on another host: if that run "
                    f"is over, delete {self.path}")
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another run (host {host}, pid {pid}, started "
                f"{holder.get('start')}; lock {self.path}){hint}; use another --workdir or stop that run")
        raise WorkdirLockedError(f"could not take the lock {self.path} (it keeps changing hands)")

    def release(self):
        if self.held and self._read() == self.info:
            os.unlink(self.path)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class _IteratorSnapshot:
    """A frozen copy of an iterator's state in the form grain's handler writes for non-dataset
    iterators (`get_state()` bytes). Dataset iterators and plain test objects with dict states
    are stored as JSON text, exactly what grain writes for a `DatasetIterator`."""

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        if isinstance(state, bytes):
            self._bytes = state
        else:
            try:
                self._bytes = json.dumps(state, indent=4).encode()
            except TypeError as e:
                raise TypeError(f"data iterator state must be bytes or JSON-serialisable, got "
                                f"{type(state).__name__}: {e}") from None

    def get_state(self) -> bytes:
        return self._bytes


class _IteratorRestorer:
    """Receives the state grain's handler reads back and hands it to the real iterator."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    def set_state(self, state: bytes):
        if isinstance(self.iterator, grain.DataLoaderIterator):
            self.iterator.set_state(state)
        else:
            self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self):
        if hasattr(self.iterator, "start_prefetch"):
            self.iterator.start_prefetch()


def _check_iterator(it: Any):
    if not (callable(getattr(it, "get_state", None)) and callable(getattr(it, "set_state", None))):
        raise TypeError(f"data iterator {type(it).__name__} has no get_state/set_state; "
                        "checkpointing needs a grain DatasetIterator or an object with both")


class _TrainableSetMismatch(ValueError, UserError):
    """The checkpoint holds another trainable set: a config change, not damage."""


class ProcessCountChangeError(ValueError, UserError):
    """The data state was written by another process count and the iterator cannot re-split it."""


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def _data_files(step_dir: str) -> dict[int, epath.Path]:
    """{process index: file} of a step's data item, all of one process count (checked)."""
    d = epath.Path(step_dir) / "data"
    found, counts = {}, set()
    for f in (d.iterdir() if d.is_dir() else ()):
        m = _DATA_FILE.match(f.name)
        if m:
            found[int(m.group(1))] = f
            counts.add(int(m.group(2)))
    if len(counts) > 1:
        raise ValueError(f"{d}: data state files of several process counts {sorted(counts)}")
    if counts and sorted(found) != list(range(counts.pop())):
        raise ValueError(f"{d}: data state files missing, have processes {sorted(found)}")
    return found


class Checkpointer:
    """Periodic train-state checkpoints plus a one-time frozen-params checkpoint."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        # gs:// (any URL) workdirs go to orbax as they are: it writes them through etils.epath.
        self.workdir = workdir if "://" in workdir else os.path.abspath(workdir)
        self.frozen_dir = os.path.join(self.workdir, "frozen")
        self.manager = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    # -- train state ------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: Any, data_iter: Any = None, *, trainable_paths=(),
             wait: bool = False) -> int:
        """Saves `state` (with `.step`, `.to_dict()`) at `state.step`; returns that step."""
        step = int(jax.device_get(state.step))
        items = {"state": ocp.args.StandardSave(state.to_dict()),
                 "meta": ocp.args.JsonSave({"step": step, "trainable_paths": sorted(trainable_paths),
                                            "process_count": jax.process_count()})}
        if data_iter is not None:
            _check_iterator(data_iter)
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()
        return step

    def step_dir(self, step: int) -> str:
        return os.path.join(os.fspath(self.manager.directory), str(step))

    def restore_newest(self, abstract: Any, data_iter: Any = None, *,
                       trainable_paths=None) -> tuple[Any, int | None]:
        """(state, step) of the newest step that restores, or (None, None) with no checkpoint.

        A step that fails to restore is reported (step, file, problem) and the next older one is
        tried; once one restores, the failed newer ones are renamed aside (`set_aside`). If none
        restores, nothing is renamed and CheckpointDamagedError names each step's problem. A
        checkpoint of a different trainable set, a data state this iterator cannot re-split across
        a changed process count or cannot read at all (any `UserError` its `set_state` raises, e.g.
        `loader.LoaderStateError`) is not damage: those errors pass through.
        """
        steps = sorted(self.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                state = self.restore(abstract, data_iter, step=step, trainable_paths=trainable_paths)
            except UserError:
                raise   # another trainable set, process count or data position: not damage
            except Exception as e:  # noqa: BLE001 - any failure of a step's files is damage to report
                problem = describe_damage(self.step_dir(step), e)
                log.error("checkpoint step %d is damaged and cannot be restored: %s", step, problem)
                failed.append((step, problem))
                continue
            for bad, problem in failed:
                if jax.process_index() == 0 and _local(self.step_dir(bad)):
                    moved = set_aside(self.step_dir(bad))
                    log.warning("falling back to checkpoint step %d; damaged step %d kept aside as %s",
                                step, bad, moved)
            if failed:
                self.manager.reload()
            return state, step
        if failed:
            detail = "; ".join(f"step {s}: {p}" for s, p in failed)
            raise CheckpointDamagedError(
                f"no checkpoint in {self.manager.directory} restores ({detail}); nothing was moved: "
                f"move the step dirs aside to start over")
        return None, None

    def restore(self, abstract: Any, data_iter: Any = None, *, step: int | None = None,
                trainable_paths=None) -> Any:
        """Restores the latest (or given) step into arrays shaped and sharded like `abstract`
        (returned as `type(abstract).from_dict(...)`); sets `data_iter`'s state from the same
        step, across a change of process count when the iterator allows it (module doc)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if trainable_paths is not None and sorted(trainable_paths) != meta["trainable_paths"]:
            want, have = set(trainable_paths), set(meta["trainable_paths"])
            raise _TrainableSetMismatch(
                f"checkpoint step {step} in {self.workdir} was trained with a different trainable set: "
                f"missing there {sorted(want - have)[:5]}, extra there {sorted(have - want)[:5]}")
        items = {"state": ocp.args.StandardRestore(abstract.to_dict())}
        global_state = None
        if data_iter is not None:
            _check_iterator(data_iter)
            files = _data_files(self.step_dir(step))
            if not files or len(files) == jax.process_count():
                items["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iter))
            else:
                global_state = self._global_data_state(step, files, data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if global_state is not None:
            restorer = _IteratorRestorer(data_iter)
            restorer.set_state(global_state)
            restorer.start_prefetch()
        return type(abstract).from_dict(restored["state"])

    def _global_data_state(self, step: int, files: dict, data_iter: Any) -> bytes:
        """The one data state that `len(files)` processes wrote, for a run with another count."""
        was, now = len(files), jax.process_count()
        if not getattr(data_iter, "state_is_global", False):
            raise ProcessCountChangeError(
                f"checkpoint step {step} in {self.workdir} was written by {was} process(es) and this run "
                f"has {now}: the data iterator ({type(data_iter).__name__}) keeps a per-process position "
                f"in its own shard of the data, which cannot be re-split over {now} process(es) without "
                f"repeating or skipping examples; resume with {was} process(es) (the mesh may differ)")
        states = {i: f.read_bytes() for i, f in sorted(files.items())}
        first = states[0]
        differ = [i for i, s in states.items() if json.loads(s) != json.loads(first)]
        if differ:
            raise ProcessCountChangeError(
                f"checkpoint step {step} in {self.workdir}: the {was} processes wrote different data "
                f"positions (process 0 vs {differ}), so no one global position exists to resume on {now}")
        log.info("checkpoint step %d: data position written by %d process(es) resumed on %d",
                 step, was, now)
        return first

    # -- frozen params ----------------------------------------------------------------------

    def has_frozen(self) -> bool:
        return epath.Path(self.frozen_dir).is_dir()

    def save_frozen(self, frozen: Any) -> bool:
        """Writes the frozen params once; returns False if they are already there."""
        if self.has_frozen():
            return False
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.frozen_dir, frozen)
            ckptr.wait_until_finished()
        return True

    def restore_frozen(self, abstract: Any) -> Any:
        try:
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(self.frozen_dir, abstract)
        except Exception as e:  # noqa: BLE001 - written once, so there is nothing older to fall back to
            raise CheckpointDamagedError(
                f"the frozen params of {self.workdir} do not restore: {describe_damage(self.frozen_dir, e)}") from e

    # -- lifecycle --------------------------------------------------------------------------

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
