"""The training loop: setup (mesh, split, shardings, init or resume), steps, logging, eval,
checkpoints, preemption and divergence handling.

Host syncs: the loop dispatches steps without waiting for them; it fetches metrics only every
`log_every` steps, and before a checkpoint (so a diverged state is never saved).
SIGTERM (preemption) sets a flag; at the next step boundary the loop saves, waits for the write
and returns with `preempted=True`. A NaN/inf loss or grad norm raises `NonFiniteLossError`
after pending saves finish, leaving the last good checkpoint as the newest one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from vllama_jax import sharding
from vllama_jax.checkpoint import Checkpointer, WorkdirLock, remove_interrupted_saves
from vllama_jax.train import metrics
from vllama_jax.train import optimizer
from vllama_jax.train import config_lib, partition, schedules
from vllama_jax.train import step as train_step
from vllama_jax.train.task import (Task, check_provided, check_task, initial_params, run_keys,
                                   trainable_patterns)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; nothing from that point on was saved."""

    def __init__(self, step: int, recent_losses: list[float], last_good_checkpoint: int | None):
        self.step = step
        self.recent_losses = recent_losses
        self.last_good_checkpoint = last_good_checkpoint
        super().__init__(
            f"non-finite loss or gradient at step {step}; last losses {recent_losses}; "
            f"stopped without saving, last good checkpoint: "
            f"{'none' if last_good_checkpoint is None else f'step {last_good_checkpoint}'}")


@dataclasses.dataclass
class TrainResult:
    step: int                     # optimizer steps done
    preempted: bool               # stopped early on SIGTERM (state saved)
    history: list[dict]           # logged train summaries, one per log window
    eval_history: list[dict]      # eval summaries
    state: train_step.TrainState
    frozen: Any


class _PreemptionFlag:
    """SIGTERM sets `requested`; installed only from the main thread (signals need it)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def total_steps(config) -> int:
    """`train.total_steps`, or max_epoch * iters_per_epoch when it is 0."""
    n = int(config.train.total_steps) or int(config.optim.max_epoch) * int(config.optim.iters_per_epoch)
    if n <= 0:
        raise ValueError("set train.total_steps or optim.max_epoch and optim.iters_per_epoch")
    return n


@dataclasses.dataclass
class _Setup:
    mesh: Any
    paths: frozenset
    tx: Any
    schedule: Callable
    state_sh: train_step.TrainState
    frozen_sh: Any
    abstract_state: train_step.TrainState
    abstract_frozen: Any


def _setup(config, task: Task, mesh) -> _Setup:
    boxed = task.abstract_params()
    paths = partition.trainable_paths(boxed, trainable_patterns(config, task))
    b_train, b_frozen = partition.split(boxed, paths)
    b_frozen = partition.cast_floating(b_frozen, config_lib.dtype_of(config.train.get("frozen_dtype")))
    schedule = schedules.make_schedule(config.optim)
    tx = optimizer.make_optimizer(config.optim, schedule, b_train)
    state_sh = train_step.state_shardings(b_train, tx, mesh)
    frozen_sh = sharding.param_shardings(b_frozen, mesh)
    abstract_frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   nn.meta.unbox(b_frozen), frozen_sh)
    return _Setup(mesh, paths, tx, schedule, state_sh, frozen_sh,
                  train_step.abstract_state(b_train, tx, state_sh), abstract_frozen)


def _fresh_params(task: Task, full_sh, seed: int):
    """Random init born sharded (only of what no pretrained file provides), then the task's
    pretrained weights if it loads any."""
    params = initial_params(task, seed, out_shardings=full_sh)
    if callable(getattr(task, "load_pretrained", None)):
        check_provided(task, params, full_sh)
        params = jax.device_put(params, full_sh)
    return params


def _initial_state(config, task: Task, su: _Setup, ckpt: Checkpointer, train_iter, logger):
    """(state, frozen, start_step): resumed from the latest checkpoint, or freshly initialised."""
    seed = int(config.train.seed)
    state_rng = run_keys(seed)[1]
    # The newest step that restores (a damaged newer one is reported and set aside).
    state, latest = ckpt.restore_newest(su.abstract_state, train_iter, trainable_paths=su.paths)
    frozen = None
    if latest is not None and ckpt.has_frozen():
        frozen = ckpt.restore_frozen(su.abstract_frozen)
    if latest is None or frozen is None:
        full_sh = sharding.param_shardings(task.abstract_params(), su.mesh)
        params = _fresh_params(task, full_sh, seed)
        trainable, frozen = partition.split(params, su.paths)
        frozen = jax.jit(lambda f: partition.cast_floating(f, config_lib.dtype_of(config.train.get("frozen_dtype"))),
                         out_shardings=su.frozen_sh)(frozen)
        logger.write(partition.describe(trainable, frozen))
    if latest is not None:
        logger.write(f"resumed from checkpoint step {latest} in {ckpt.workdir}")
        return state, frozen, latest
    init = jax.jit(lambda p, r: train_step.init_state(p, su.tx, r), out_shardings=su.state_sh)
    state = init(trainable, state_rng)
    if config.checkpoint.get("save_frozen", False):
        ckpt.save_frozen(frozen)
    return state, frozen, 0


def evaluate(eval_step, state: train_step.TrainState, frozen: Any, batches: Iterable, mesh) -> dict[str, float]:
    """Mean eval metrics over a finite iterable of host batches."""
    results = [eval_step(state.params, frozen, sharding.shard_batch(b, mesh)) for b in batches]
    return metrics.mean_over_batches(jax.device_get(results))


class _EvalRunner:
    def __init__(self, task, su: _Setup, compute_dtype):
        self.fn = train_step.make_eval_step(task, compute_dtype=compute_dtype)
        self.su = su
        self.jitted = None

    def __call__(self, state, frozen, batches):
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            raise ValueError("the eval iterator yielded no batches")
        if self.jitted is None:
            self.jitted = train_step.jit_eval_step(self.fn, self.su.mesh, self.su.state_sh.params,
                                                   self.su.frozen_sh, sharding.batch_shardings(first, self.su.mesh))
        return evaluate(self.jitted, state, frozen, _chain(first, batches), self.su.mesh)


def _chain(first, rest):
    yield first
    yield from rest


def _global_batch_size(host_batch) -> int:
    # Each process passes its own rows; packed rows (data.pack) hold example_mask.sum() examples
    # (this process' count, taken as every process').
    if isinstance(host_batch, dict) and "example_mask" in host_batch:
        return int(np.sum(host_batch["example_mask"])) * jax.process_count()
    return int(np.shape(jax.tree.leaves(host_batch)[0])[0]) * jax.process_count()


def _agree(flag: bool) -> bool:
    """Every process sees the flag if any one raised it (SIGTERM may reach one host first)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def train(config, task: Task, train_iter: Iterator, *, workdir: str,
          eval_iter_fn: Callable[[], Iterable] | None = None, mesh=None,
          check_batch: Callable[[Any], None] | None = None) -> TrainResult:
    """Runs (or resumes) training to `total_steps(config)`; see the module doc for the contract.
    `check_batch(host_batch)`, if given, vets the first batch before anything compiles."""
    check_task(task)
    t = config.train
    mesh = sharding.make_mesh(tuple(config.mesh.shape)) if mesh is None else mesh
    compute_dtype = config_lib.dtype_of(t.get("compute_dtype"))
    n_steps = total_steps(config)
    log_every, save_every = int(t.log_every), int(t.save_every)
    eval_every = int(t.get("eval_every", 0))

    su = _setup(config, task, mesh)
    lock = WorkdirLock(workdir if "://" in workdir else os.path.abspath(workdir)).acquire()
    try:
        remove_interrupted_saves(lock.workdir)
        ckpt = Checkpointer(workdir, max_to_keep=int(config.checkpoint.max_to_keep),
                            async_save=bool(config.checkpoint.get("async_save", True)))
    except BaseException:
        lock.release()
        raise
    logger = metrics.MetricsLogger(os.path.join(workdir, "tb") if t.get("tensorboard", True) else None,
                                   total_steps=n_steps, progress=bool(t.get("progress", True)))
    try:
        state, frozen, step = _initial_state(config, task, su, ckpt, train_iter, logger)
        logger.bar.n = step
        logger.bar.refresh()
        run = _Run(config, task, su, ckpt, logger, train_iter, eval_iter_fn, compute_dtype)
        run.check_batch = check_batch
        return run.loop(state, frozen, step, n_steps, log_every, save_every, eval_every)
    finally:
        logger.close()
        ckpt.close()
        lock.release()


class _Run:
    """The mutable bits of one training run (pending metrics, last saved step...)."""

    def __init__(self, config, task, su, ckpt, logger, train_iter, eval_iter_fn, compute_dtype):
        self.su, self.ckpt, self.logger = su, ckpt, logger
        self.train_iter, self.eval_iter_fn = train_iter, eval_iter_fn
        self.step_fn = train_step.make_train_step(task, su.tx, su.schedule,
                                                  accum_steps=int(config.train.get("accum_steps", 1)),
                                                  compute_dtype=compute_dtype)
        self.evaluator = _EvalRunner(task, su, compute_dtype)
        self.jitted = None
        self.pending: list[dict] = []       # device metrics since the last fetch
        self.window: list[dict] = []        # fetched metrics since the last log line
        self.recent_losses: list[float] = []
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.examples_in_window = 0
        self.last_saved = ckpt.latest_step()
        self.throughput = metrics.Throughput()
        self.check_batch = None

    def _compile(self, batch):
        batch_sh = sharding.batch_shardings(batch, self.su.mesh)
        self.jitted = train_step.jit_train_step(self.step_fn, self.su.mesh, self.su.state_sh,
                                                self.su.frozen_sh, batch_sh)

    def _fetch(self, step: int):
        """Pulls pending metrics to the host and stops on a non-finite value."""
        if not self.pending:
            return
        fetched = jax.device_get(self.pending)
        first_step = step - len(fetched) + 1
        self.pending = []
        for i, m in enumerate(fetched):
            self.recent_losses = (self.recent_losses + [float(m["loss"])])[-8:]
            if metrics.first_nonfinite([m]) is not None:
                self.ckpt.wait()
                raise NonFiniteLossError(first_step + i, list(self.recent_losses),
                                         self.ckpt.latest_step())
        self.window.extend(fetched)

    def _log(self, step: int):
        self._fetch(step)
        if not self.window:
            return
        summary = metrics.summarize(self.window)
        summary.update(self.throughput.rates(self.examples_in_window, summary.get("num_tokens")))
        self.logger.log(step, summary)
        self.history.append({"step": step, **summary})
        self.window, self.examples_in_window = [], 0

    def _save(self, state, step: int, *, wait: bool = False):
        if self.last_saved == step:
            return
        self._fetch(step)
        self.ckpt.save(state, self.train_iter, trainable_paths=self.su.paths, wait=wait)
        self.last_saved = step

    def _eval(self, state, frozen, step: int):
        if self.eval_iter_fn is None:
            return
        summary = self.evaluator(state, frozen, self.eval_iter_fn())
        self.logger.log(step, summary, prefix="eval")
        self.eval_history.append({"step": step, **summary})
        self.throughput.reset()

    def loop(self, state, frozen, step, n_steps, log_every, save_every, eval_every) -> TrainResult:
        preempted = False
        with _PreemptionFlag() as flag:
            while step < n_steps:
                try:
                    batch = next(self.train_iter)
                except StopIteration:
                    self.logger.write(f"train iterator exhausted at step {step}")
                    break
                if self.jitted is None:
                    if self.check_batch is not None:
                        self.check_batch(batch)
                    self._compile(batch)
                state, m = self.jitted(state, frozen, sharding.shard_batch(batch, self.su.mesh))
                step += 1
                self.pending.append(m)
                self.examples_in_window += _global_batch_size(batch)
                self.logger.advance()
                at_log = step % log_every == 0 or step == n_steps
                if at_log:
                    self._log(step)
                if save_every and step % save_every == 0:
                    self._save(state, step)
                if eval_every and step % eval_every == 0:
                    self._eval(state, frozen, step)
                # On several hosts the flag is agreed on at log steps only (a collective).
                if (flag.requested if jax.process_count() == 1 else at_log and _agree(flag.requested)):
                    self._log(step)
                    self._save(state, step, wait=True)
                    self.logger.write(f"SIGTERM: saved checkpoint at step {step}; exiting")
                    preempted = True
                    break
            if not preempted:
                self._log(step)
                self._save(state, step, wait=True)
                if eval_every and step % eval_every:
                    self._eval(state, frozen, step)
        self.ckpt.wait()
        return TrainResult(step=step, preempted=preempted, history=self.history,
                           eval_history=self.eval_history, state=state, frozen=frozen)
