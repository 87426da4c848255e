"""Checkpointing: round trip with shardings and iterator state, keep-last-K, frozen-once,
clear errors, and kill -9 / restart giving bitwise the uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train_utils import REPO, CountingIterator, setup_state, toy_config_dict, toy_task, trees_equal
from vllama_jax import sharding
from vllama_jax.checkpoint import Checkpointer
from vllama_jax.train import loop, partition, toy
from vllama_jax.train import step as train_step


@pytest.fixture
def sharded_state():
    task = toy_task()
    mesh = sharding.make_mesh((2, 2, 2))
    state, frozen, tx, _, paths = setup_state(task, mesh=mesh)
    b_train, _ = partition.split(task.abstract_params(), paths)
    abstract = train_step.abstract_state(b_train, tx, train_step.state_shardings(b_train, tx, mesh))
    return state, frozen, paths, abstract


def test_roundtrip_state_shardings_and_iterators(tmp_path, sharded_state):
    state, frozen, paths, abstract = sharded_state
    grain_it = iter(toy.toy_dataset(batch_size=4, seq_len=8, vocab=32))
    for _ in range(3):
        next(grain_it)
    plain_it = CountingIterator(lambda i: i)
    plain_it.i = 7
    with Checkpointer(str(tmp_path / "a")) as ck:
        ck.save(state, grain_it, trainable_paths=paths)
        expected_next = next(grain_it)   # the saved state is the one at save() time
        ck.wait()
        fresh = iter(toy.toy_dataset(batch_size=4, seq_len=8, vocab=32))
        restored = ck.restore(abstract, fresh, trainable_paths=paths)
        assert trees_equal(restored, state)
        spec = restored.params["head"]["Dense_0"]["kernel"].sharding.spec
        assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        np.testing.assert_array_equal(next(fresh)["tokens"], expected_next["tokens"])
    with Checkpointer(str(tmp_path / "b")) as ck:   # any get_state/set_state object works
        ck.save(state, plain_it, trainable_paths=paths, wait=True)
        other = CountingIterator(lambda i: i)
        ck.restore(abstract, other)
        assert other.i == 7


def test_keep_last_k_frozen_once_and_errors(tmp_path, sharded_state):
    state, frozen, paths, abstract = sharded_state
    with Checkpointer(str(tmp_path), max_to_keep=2) as ck:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ck.restore(abstract)
        for step in (1, 2, 3):
            ck.save(state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)), trainable_paths=paths)
        ck.wait()
        assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
        assert ck.save_frozen(frozen) and not ck.save_frozen(frozen)   # written once only
        abstract_frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        assert trees_equal(ck.restore_frozen(abstract_frozen), frozen)
        with pytest.raises(ValueError, match="different trainable set"):
            ck.restore(abstract, trainable_paths=paths | {"tower/embedding"})
        with pytest.raises(TypeError, match="no get_state/set_state"):
            ck.save(state, iter([1, 2]), trainable_paths=paths)
    # the frozen params are not part of the periodic checkpoints
    with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(str(tmp_path / "checkpoints" / "3" / "state")).item_metadata
    assert set(saved["params"].keys()) == {"head"}


def _cli(workdir, *overrides):
    return [sys.executable, "-m", "vllama_jax.train.cli", "--config", os.path.join(REPO, "configs", "toy.py"),
            "--workdir", str(workdir), "--config.train.total_steps=12", "--config.train.save_every=3",
            "--config.train.log_every=3", "--config.train.eval_every=0", "--config.train.progress=False",
            "--config.train.tensorboard=False", *overrides]


def _complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_kill9_then_restart_equals_uninterrupted_run(tmp_path):
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "float32",
           # the restart reuses the first process' compiled programs
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run_dir = tmp_path / "run"
    log_path = tmp_path / "first_run.log"
    with open(log_path, "w") as log:   # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(_cli(run_dir, "--config.data.delay_s=0.25"), env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not _complete_steps(run_dir):
            assert proc.poll() is None, f"training exited early:\n{log_path.read_text()}"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _complete_steps(run_dir)
    assert killed_at and max(killed_at) < 12, f"the run finished before the kill: {killed_at}"

    restart = subprocess.run(_cli(run_dir), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    output = restart.stdout + restart.stderr
    assert f"resumed from checkpoint step {max(killed_at)}" in output
    assert "finished at step 12" in output

    # The same run without interruption, in this process.
    config = toy_config_dict(total_steps=12, save_every=3, log_every=3, eval_every=0)
    straight = loop.train(config, toy.build_task(config), toy.build_train_iter(config),
                          workdir=str(tmp_path / "straight"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            straight.state)
    with Checkpointer(str(run_dir)) as ck:
        resumed = ck.restore(abstract)
    assert int(resumed.step) == 12
    assert trees_equal(resumed.params, straight.state.params), "params differ from the uninterrupted run"
    assert trees_equal(resumed.opt_state, straight.state.opt_state)
    assert trees_equal(resumed.rng, straight.state.rng)
