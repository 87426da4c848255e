"""Checkpoints: orbax `CheckpointManager` over the train state and the data iterator state.

Layout under `workdir`:

  checkpoints/<step>/state   trainable params, optimizer state, step, rng   (orbax StandardSave)
  checkpoints/<step>/data    the data iterator's state, one file per process (grain handler)
  checkpoints/<step>/meta    step and the trainable param paths, to refuse a mismatched resume
  frozen/                    the frozen params, written once if asked (they normally come from
                             their pretrained source and are never re-saved)

Saves are asynchronous: `save` returns after the arrays are copied off the device, so the next
(donating) train step may run while files are written. The iterator state is read at `save`
time (a snapshot), not when a background thread gets to it. Old steps beyond `max_to_keep` are
deleted; a step directory only appears once complete, so a run killed mid-save resumes from the
previous complete step.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath

from vllama_jax.train.step import TrainState

log = logging.getLogger(__name__)


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

    def save(self, state: TrainState, data_iter: Any = None, *, trainable_paths=(),
             wait: bool = False) -> int:
        """Saves `state` at `state.step`; returns that step."""
        step = int(jax.device_get(state.step))
        items = {"state": ocp.args.StandardSave(state.to_dict()),
                 "meta": ocp.args.JsonSave({"step": step, "trainable_paths": sorted(trainable_paths)})}
        if data_iter is not None:
            _check_iterator(data_iter)
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()
        return step

    def restore(self, abstract: TrainState, data_iter: Any = None, *, step: int | None = None,
                trainable_paths=None) -> TrainState:
        """Restores the latest (or given) step into arrays shaped and sharded like `abstract`;
        sets `data_iter`'s state from the same step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if trainable_paths is not None and sorted(trainable_paths) != meta["trainable_paths"]:
            want, have = set(trainable_paths), set(meta["trainable_paths"])
            raise ValueError(
                f"checkpoint step {step} in {self.workdir} was trained with a different trainable set: "
                f"missing there {sorted(want - have)[:5]}, extra there {sorted(have - want)[:5]}")
        items = {"state": ocp.args.StandardRestore(abstract.to_dict())}
        if data_iter is not None:
            _check_iterator(data_iter)
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iter))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState.from_dict(restored["state"])

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
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(self.frozen_dir, abstract)

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
