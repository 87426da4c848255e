"""Shared pieces of the training-stack tests: the toy config, task, iterators and state setup."""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import toy as toy_config  # noqa: E402
from vllama_jax import sharding  # noqa: E402
from vllama_jax.train import optimizer, partition, schedules, toy  # noqa: E402
from vllama_jax.train import step as train_step  # noqa: E402


def toy_config_dict(**train_overrides):
    """configs/toy.py with quiet logging and any `train.*` overrides."""
    c = toy_config.get_config()
    c.train.progress = False
    c.train.tensorboard = False
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


def toy_task(preset="tiny", **overrides) -> toy.ToyTask:
    return toy.ToyTask(toy.ToyConfig.preset(preset, **overrides))


def toy_batches(n, batch_size=16, seq_len=8, vocab=32, seed=0):
    it = iter(toy.toy_dataset(batch_size=batch_size, seq_len=seq_len, vocab=vocab, seed=seed))
    return [next(it) for _ in range(n)]


@functools.lru_cache(maxsize=8)
def _init_params_host(task, seed):
    return to_numpy(jax.jit(task.init_params)(jax.random.PRNGKey(seed)))


def init_params(task, seed=0):
    """The task's init as fresh device arrays; compiled once per (task, seed) per session."""
    return jax.tree.map(jnp.asarray, _init_params_host(task, seed))


def setup_state(task, patterns=("head/.*",), *, mesh=None, lr=1e-2, grad_clip=None, seed=0):
    """(state, frozen, tx, schedule, paths), placed on `mesh` if given."""
    boxed = task.abstract_params()
    paths = partition.trainable_paths(boxed, patterns)
    b_train, b_frozen = partition.split(boxed, paths)
    sched = schedules.constant(lr)
    tx = optimizer.adamw(sched, b_train, grad_clip_norm=grad_clip)
    trainable, frozen = partition.split(init_params(task, seed), paths)
    state = jax.jit(train_step.init_state, static_argnums=1)(trainable, tx, jax.random.PRNGKey(seed + 1))
    if mesh is not None:
        state = jax.device_put(state, train_step.state_shardings(b_train, tx, mesh))
        frozen = jax.device_put(frozen, sharding.param_shardings(b_frozen, mesh))
    return state, frozen, tx, sched, paths


class CountingIterator:
    """A minimal non-grain data iterator: batch i is a pure function of i; state is {'i': i}."""

    def __init__(self, batch_fn):
        self.batch_fn = batch_fn
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_fn(self.i)
        self.i += 1
        return batch

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def trees_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(to_numpy(a)), jax.tree.leaves(to_numpy(b))
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))
