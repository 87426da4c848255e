"""Elastic resume: a toy checkpoint written on one mesh / process count continues on another with
the state, the next losses and the data position of an uninterrupted run.

Paths: (data 2, fsdp 4) on 8 devices -> (data 4) on 4 devices -> 1 device as separate processes
that really have 8, 4 and 1 devices (slow), and 8 -> 1 in this process on subsets of its 8 fake
devices (default suite); and 2 `jax.distributed` processes -> 1 process (slow, test_multiprocess.py's
workers). The data check: the tokens fed across the phases are exactly the uninterrupted run's,
batch for batch (no example repeated or skipped).
"""
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from elastic_phase import run_phase
from test_multiprocess import _start_workers, _wait_workers
from train_utils import toy_config_dict
from vllama_jax.checkpoint import Checkpointer, ProcessCountChangeError

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = (((2, 4, 1), 8, 3), ((4, 1, 1), 4, 5), ((1, 1, 1), 1, 7))   # (mesh, devices, train to step)
ATOL = 1e-6


def _check_phases(phases: list[dict], reference: dict):
    """Each phase restored exactly the previous one's final state; together they are the
    reference run (losses, tokens fed, final state)."""
    for prev, cur in zip(phases, phases[1:]):
        keys = sorted(k[len("final/"):] for k in prev if k.startswith("final/"))
        assert keys == sorted(k[len("restored/"):] for k in cur if k.startswith("restored/"))
        for k in keys:   # params, optimizer state, step and rng: bit for bit
            np.testing.assert_array_equal(cur[f"restored/{k}"], prev[f"final/{k}"], err_msg=k)
    losses = np.concatenate([p["losses"] for p in phases])
    np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=ATOL)
    tokens = np.concatenate([p["tokens"] for p in phases])
    np.testing.assert_array_equal(tokens, reference["tokens"])
    worst = max(float(np.abs(phases[-1][k] - v).max()) for k, v in reference.items() if k.startswith("final/"))
    assert worst <= ATOL, f"final state differs from the uninterrupted run's by {worst}"
    assert reference["losses"][-1] < reference["losses"][0] - 0.03, reference["losses"]   # it trained
    return worst


def test_resume_across_meshes_in_process(tmp_path):
    """(data 2, fsdp 4) on 8 devices -> 1 device (the slow test adds the 4-device step; each
    phase here is one more compile on the default suite's clock)."""
    phases = (PHASES[0], PHASES[-1])
    reference = run_phase((1, 1, 1), phases[-1][2], str(tmp_path / "reference"))
    _check_phases([run_phase(mesh, steps, str(tmp_path / "elastic")) for mesh, _, steps in phases], reference)


@pytest.mark.slow
def test_resume_across_device_counts_in_subprocesses(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    t0 = time.monotonic()
    phases = []
    for i, (mesh, devices, steps) in enumerate(PHASES):
        out = tmp_path / f"phase_{i}.npz"
        subprocess.run([sys.executable, os.path.join(HERE, "elastic_worker.py"), "--devices", str(devices),
                        "--mesh", ",".join(map(str, mesh)), "--steps", str(steps),
                        "--workdir", str(tmp_path / "elastic"), "--out", str(out)],
                       env=env, check=True, timeout=300)
        phases.append(dict(np.load(out)))
    reference = run_phase((1, 1, 1), PHASES[-1][2], str(tmp_path / "reference"))
    worst = _check_phases(phases, reference)
    print(f"8 -> 4 -> 1 devices in {time.monotonic() - t0:.1f}s, max |state diff| = {worst:.3g}")


@pytest.mark.slow
def test_resume_two_processes_on_one(tmp_path):
    """2 processes (2 devices each, mesh (1,2,2)) train 3 steps; this one process resumes on a
    (4,1,1) mesh to step 6."""
    t0 = time.monotonic()
    procs, logs = _start_workers(tmp_path, steps=3)
    _wait_workers(procs, logs, deadline=t0 + 240)
    w0, w1 = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
    data = sorted(p.name for p in (tmp_path / "workdir" / "checkpoints" / "3" / "data").glob("process_*"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"], data
    resumed = run_phase((4, 1, 1), 6, str(tmp_path / "workdir"))
    reference = run_phase((1, 1, 1), 6, str(tmp_path / "reference"))
    for k in (k for k in w0.files if k.startswith("param/")):
        np.testing.assert_array_equal(resumed[f"restored/params/{k[len('param/'):]}"], w0[k], err_msg=k)
    first = {"losses": w0["losses"], "tokens": np.concatenate([w0["tokens"], w1["tokens"]], axis=1)}
    np.testing.assert_allclose(np.concatenate([w0["losses"], resumed["losses"]]), reference["losses"],
                               rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.concatenate([first["tokens"], resumed["tokens"]]), reference["tokens"])
    worst = max(float(np.abs(resumed[k] - v).max()) for k, v in reference.items() if k.startswith("final/"))
    assert worst <= ATOL, worst
    print(f"2 processes -> 1 in {time.monotonic() - t0:.1f}s, max |state diff| = {worst:.3g}")


# ---------------------------------------------------------------------------------------------
# The data state across a process-count change, without the processes (default suite).

class _Iter:
    def __init__(self, state, state_is_global):
        self.state, self.state_is_global = state, state_is_global

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


def _as_if_written_by(ck, step, states):
    """Rewrites step's data item as if len(states) processes had written it."""
    d = os.path.join(ck.step_dir(step), "data")
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    for i, s in enumerate(states):
        with open(os.path.join(d, f"process_{i}-of-{len(states)}.json"), "w") as f:
            f.write(s)


def test_data_state_across_process_counts(tmp_path):
    from train_utils import setup_state, toy_task
    state, _, _, _, paths = setup_state(toy_task())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with Checkpointer(str(tmp_path), async_save=False) as ck:
        ck.save(state, _Iter({"next_index": 3}, True), trainable_paths=paths)
        _as_if_written_by(ck, 0, ['{"next_index": 3}'] * 2)
        # A global position resumes on this one process.
        it = _Iter(None, True)
        ck.restore(abstract, it)
        assert it.state == {"next_index": 3}
        # A per-process (sharded) position is refused, naming both counts and the way out.
        with pytest.raises(ProcessCountChangeError, match=r"written by 2 process\(es\) and this run has 1.*"
                                                          r"resume with 2 process"):
            ck.restore_newest(abstract, _Iter(None, False))
        # Processes that disagree have no one global position.
        _as_if_written_by(ck, 0, ['{"next_index": 3}', '{"next_index": 4}'])
        with pytest.raises(ProcessCountChangeError, match="different data positions"):
            ck.restore(abstract, _Iter(None, True))
        assert ck.all_steps() == [0]   # refused, not set aside as damage


def test_toy_processes_feed_disjoint_rows_of_one_global_batch():
    from vllama_jax.train import toy
    config = toy_config_dict()
    kw = dict(batch_size=16, seq_len=8, vocab=32, seed=0)
    whole = [next(it) for it in [iter(toy.toy_dataset(**kw))] for _ in range(3)]
    for count in (2, 4):
        its = [iter(toy.toy_dataset(**kw, rows=toy.process_rows(16, i, count))) for i in range(count)]
        for step in range(3):
            parts = [next(it)["tokens"] for it in its]
            np.testing.assert_array_equal(np.concatenate(parts), whole[step]["tokens"])
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        toy.process_rows(int(config.train.batch_size), 0, 3)
