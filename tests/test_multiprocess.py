"""Two `jax.distributed` processes on localhost train the toy config to the same params as one process.

Each worker (tests/multiprocess_worker.py) has 2 fake CPU devices; together they form a
(data=1, fsdp=2, tensor=2) mesh, so the batch is split across the processes along fsdp and the
head's kernels are sharded across them too. The reference is this pytest process running the same
trainer on 4 of its 8 fake devices with the same mesh shape and the whole global batch.

Slow: three jax processes compiling the same step cost ~40 s of CPU (70 s on the shared 2 cores).
"""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train_utils import toy_batches, toy_config_dict, to_numpy
from vllama_jax import sharding
from vllama_jax.train import loop, partition, toy

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
MESH = (1, 2, 2)
STEPS = 5
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(tmp_path, num_processes=2, local_devices=2, steps=STEPS):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs, logs = [], []
    try:
        for i in range(num_processes):
            logs.append(open(tmp_path / f"worker_{i}.log", "w+"))
            cmd = [sys.executable, WORKER, "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", str(num_processes), "--process-id", str(i),
                   "--local-devices", str(local_devices), "--mesh", ",".join(map(str, MESH)),
                   "--steps", str(steps), "--workdir", str(tmp_path / "workdir"),
                   "--out", str(tmp_path / f"params_{i}.npz")]
            procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
    except BaseException:
        _stop(procs)
        raise
    return procs, logs


def _stop(procs):
    # One failed or hung worker would leave the other waiting in a collective forever.
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _wait_workers(procs, logs, deadline):
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        _stop(procs)
    out = ""
    for i, log in enumerate(logs):
        log.seek(0)
        out += f"--- worker {i} (exit {procs[i].returncode}) ---\n{log.read()[-4000:]}\n"
        log.close()
    assert all(p.returncode == 0 for p in procs), f"workers failed or timed out:\n{out}"
    return out


def _single_process(tmp_path):
    config = toy_config_dict(total_steps=STEPS, log_every=1, save_every=0)
    mesh = sharding.make_mesh(MESH, devices=jax.devices()[:int(np.prod(MESH))])
    result = loop.train(config, toy.build_task(config), toy.build_train_iter(config),
                        workdir=str(tmp_path / "single"), mesh=mesh)
    params = {f"param/{k}": v for k, v in partition.flatten(to_numpy(result.state.params)).items()}
    return params, np.asarray([h["loss"] for h in result.history])


@pytest.mark.slow
@pytest.mark.ci
def test_two_processes_match_one_process(tmp_path):
    t0 = time.monotonic()
    procs, logs = _start_workers(tmp_path)
    try:   # the reference runs while the workers start up
        ref_params, ref_losses = _single_process(tmp_path)
    except BaseException:
        _stop(procs)
        raise
    out = _wait_workers(procs, logs, deadline=t0 + TIMEOUT_S)
    wall = time.monotonic() - t0
    p0, p1 = (np.load(tmp_path / f"params_{i}.npz") for i in range(2))
    # Each process really fed only its own half of the batch: disjoint examples that together are
    # the one-process run's global batches.
    assert "batch rows 0:8" in out and "batch rows 8:16" in out, out
    t0_rows = {r.tobytes() for r in p0["tokens"].reshape(-1, p0["tokens"].shape[-1])}
    t1_rows = {r.tobytes() for r in p1["tokens"].reshape(-1, p1["tokens"].shape[-1])}
    assert len(t0_rows) == STEPS * 8 and not t0_rows & t1_rows
    np.testing.assert_array_equal(np.concatenate([p0["tokens"], p1["tokens"]], axis=1),
                                  np.stack([b["tokens"] for b in toy_batches(STEPS)]))
    assert int(p0["step"]) == STEPS
    np.testing.assert_allclose(p0["losses"], ref_losses, rtol=0, atol=1e-6)
    assert set(k for k in p0.files if k.startswith("param/")) == set(ref_params)
    worst = 0.0
    for k, ref in ref_params.items():
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=f"{k}: the two processes disagree")
        worst = max(worst, float(np.abs(p0[k] - ref).max()))
    assert worst <= 1e-6, f"params differ from the single-process run by {worst}"
    # Training moved the params: equality is not the trivial "nothing happened" kind.
    assert ref_losses[-1] < ref_losses[0] - 0.03, ref_losses
    print(f"2-process run {wall:.1f}s, max |param diff| vs 1 process = {worst:.3g}")
    # A checkpoint was written jointly by both processes (one data-iterator file each).
    step_dir = tmp_path / "workdir" / "checkpoints" / str(STEPS)
    assert step_dir.is_dir(), sorted(os.listdir(tmp_path / "workdir" / "checkpoints"))
    assert sorted(p.name for p in (step_dir / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
