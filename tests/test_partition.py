"""Trainable/frozen split: bookkeeping, untouched frozen leaves, no optimizer state or
weight-gradient work for frozen towers (XLA cost analysis)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_utils import setup_state, toy_batches, toy_task, trees_equal, to_numpy
from vllama_jax.train import partition
from vllama_jax.train import step as train_step


def _params():
    return {"tower": {"embedding": jnp.ones((4, 3)), "block_0": {"Dense_0": {"kernel": jnp.ones((3, 3)),
                                                                         "bias": jnp.zeros(3)}}},
            "head": {"Dense_0": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.zeros(2)}}}


def test_split_merge_roundtrip_and_disjoint():
    params = _params()
    trainable, frozen = partition.split(params, [r"head/.*", r"tower/embedding"])
    assert set(partition.flatten(trainable)) == {"head/Dense_0/kernel", "head/Dense_0/bias",
                                                  "tower/embedding"}
    assert set(partition.flatten(frozen)) == {"tower/block_0/Dense_0/kernel", "tower/block_0/Dense_0/bias"}
    assert trees_equal(partition.merge(trainable, frozen), params)
    with pytest.raises(ValueError, match="overlap"):
        partition.merge(trainable, trainable)


def test_bad_patterns_are_errors():
    with pytest.raises(ValueError, match=r"'heads/\.\*' matches no parameter"):
        partition.split(_params(), [r"head/.*", r"heads/.*"])
    with pytest.raises(ValueError, match="not a valid regex"):
        partition.split(_params(), [r"head/("])
    with pytest.raises(ValueError, match="unknown trainable preset"):
        partition.resolve_patterns("stage3")
    # fullmatch: a bare module name does not silently match everything under it
    with pytest.raises(ValueError, match="matches no parameter"):
        partition.split(_params(), [r"head"])


def test_presets_and_cast():
    assert partition.resolve_patterns("toy_head", ["extra/.*"]) == ("head/.*", "extra/.*")
    _, frozen = partition.split(_params(), ["head/.*"])
    cast = partition.cast_floating({**frozen, "ids": jnp.arange(3)}, jnp.bfloat16)
    assert cast["tower"]["embedding"].dtype == jnp.bfloat16 and cast["ids"].dtype == jnp.int32


def test_step_changes_only_trainable_and_opt_state_covers_only_trainable():
    task = toy_task()
    state, frozen, tx, sched, paths = setup_state(task)
    before_state, before_frozen = to_numpy(state), to_numpy(frozen)
    step = jax.jit(train_step.make_train_step(task, tx, sched))
    for batch in toy_batches(2):
        state, _ = step(state, frozen, batch)
    # every trainable leaf moved, every frozen leaf is bit-identical
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before_state.params, state.params)
    assert all(jax.tree.leaves(moved))
    assert trees_equal(frozen, before_frozen)
    # optimizer moments exist for exactly the trainable paths
    mu = state.opt_state[0].mu
    assert set(partition.flatten(mu)) == set(paths)
    assert all(p.startswith("head/") for p in paths)
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt == 2 * partition.count(state.params) + 2  # mu, nu, two step counters


def test_frozen_bf16_storage_trains_and_keeps_fp32_master():
    task = toy_task(dropout=0.0)
    state, frozen, tx, sched, _ = setup_state(task)
    frozen16 = partition.cast_floating(frozen, jnp.bfloat16)
    step = jax.jit(train_step.make_train_step(task, tx, sched))
    batch = toy_batches(1)[0]
    s32, m32 = step(state, frozen, batch)
    s16, m16 = step(state, frozen16, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2
    assert np.isfinite(float(m16["grad_norm"]))


def test_frozen_tower_costs_no_weight_gradients():
    """Step FLOPs with the big tower frozen ~ forward + the head's backward; trainable ~ 3x forward."""
    task = toy_task("big_tower", dropout=0.0)
    batch = toy_batches(1, batch_size=8, seq_len=16)[0]
    frozen_setup = setup_state(task, patterns=("head/.*",))
    all_setup = setup_state(task, patterns=(".*",))
    r_frozen = train_step.step_flops_report(task, frozen_setup[2], frozen_setup[0], frozen_setup[1], batch)
    r_all = train_step.step_flops_report(task, all_setup[2], all_setup[0], all_setup[1], batch)
    print(f"\nfrozen tower: {r_frozen}\nall trainable: {r_all}")
    # Same forward either way.
    assert r_frozen["forward_flops"] == pytest.approx(r_all["forward_flops"], rel=1e-3)
    # The head is ~1% of the model: freezing the tower leaves little beyond the forward pass...
    assert r_frozen["ratio"] < 1.2
    # ...while training it costs forward + input grads + weight grads.
    assert r_all["ratio"] > 2.7
