"""Faults a real run meets: a damaged newest checkpoint (truncated array file, emptied _METADATA),
half-written temp dirs, two runs in one workdir, a stale lock; and the one-line CLI errors
(unknown / mistyped config keys, missing config file, bad values, --help)."""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import pytest

from train_utils import REPO, toy_config_dict, trees_equal
from vllama_jax import checkpoint
from vllama_jax.train import cli, loop, toy


def _train(workdir, total_steps):
    config = toy_config_dict(total_steps=total_steps, save_every=3, log_every=3, eval_every=0)
    return loop.train(config, toy.build_task(config), toy.build_train_iter(config), workdir=str(workdir))


def _steps(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped at step 6 (checkpoints 3, 6) and the uninterrupted run to step 9."""
    base = tmp_path_factory.mktemp("runs")
    _train(base / "at6", 6)
    straight = _train(base / "straight", 9)
    return base / "at6", straight.state


def _array_files(step_dir):
    """The OCDBT data files of a step (which of them a restore reads first is orbax's business)."""
    return [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if os.path.basename(r) == "d"]


@pytest.mark.parametrize("damage", ["truncated_array_file", "emptied_metadata"])
def test_damaged_newest_step_falls_back_and_is_kept_aside(tmp_path, runs, damage, caplog):
    at6, straight = runs
    workdir = tmp_path / "run"
    shutil.copytree(at6, workdir)
    step6 = workdir / "checkpoints" / "6"
    if damage == "truncated_array_file":
        for bad in _array_files(step6):
            with open(bad, "r+b") as f:
                f.truncate(os.path.getsize(bad) // 2)
        want = [os.sep + "d" + os.sep, "truncated"]
    else:
        bad = step6 / "state" / "_METADATA"
        bad.write_text("")
        want = ["_METADATA", "empty file"]
    with caplog.at_level(logging.INFO):
        result = _train(workdir, 9)
    report = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(report) == 1 and "step 6" in report[0] and all(w in report[0] for w in want), report
    assert any("falling back to checkpoint step 3" in r.getMessage() for r in caplog.records)
    # Nothing lost: the damaged step is kept aside, byte for byte; the run redid steps 4-9.
    aside = [n for n in _steps(workdir) if n.startswith("6" + checkpoint.DAMAGED_MARKER)]
    assert len(aside) == 1, _steps(workdir)
    kept = workdir / "checkpoints" / aside[0]
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == sorted(p.relative_to(at6 / "checkpoints" / "6")
                                                                         for p in (at6 / "checkpoints" / "6").rglob("*"))
    assert result.step == 9 and trees_equal(result.state.params, straight.params)
    assert trees_equal(result.state.opt_state, straight.opt_state)


def test_no_step_restores_names_each_and_moves_nothing(tmp_path, runs):
    workdir = tmp_path / "run"
    shutil.copytree(runs[0], workdir)
    for step in ("3", "6"):
        (workdir / "checkpoints" / step / "state" / "_METADATA").write_text("{not json")
    before = _steps(workdir)
    with pytest.raises(checkpoint.CheckpointDamagedError, match=r"step 6: .*_METADATA: not valid JSON.*step 3: "):
        _train(workdir, 9)
    assert _steps(workdir) == before


def test_interrupted_save_temp_dirs_are_removed_with_a_log_line(tmp_path, runs, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(runs[0], workdir)
    tmp = workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        _train(workdir, 9)
    assert not tmp.exists()
    assert any("half-written" in r.getMessage() and str(tmp) in r.getMessage() for r in caplog.records)
    assert {"3", "6", "9"} <= set(_steps(workdir))


def test_damaged_frozen_params_are_named(tmp_path):
    import numpy as np

    frozen = {"tower": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    with checkpoint.Checkpointer(str(tmp_path)) as ck:
        ck.save_frozen(frozen)
        (tmp_path / "frozen" / "_METADATA").write_text("")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        with pytest.raises(checkpoint.CheckpointDamagedError,
                           match=r"frozen params .* do not restore: .*frozen/_METADATA: empty file"):
            ck.restore_frozen(abstract)


def _holder(lock_dir):
    """A live process holding the workdir lock (as a second run would see it)."""
    code = ("import sys, time; from vllama_jax.checkpoint import WorkdirLock; "
            f"WorkdirLock({str(lock_dir)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _cli_args(workdir, *extra):
    return ["vllama-train", "--config", os.path.join(REPO, "configs", "toy.py"), "--workdir", str(workdir),
            "--config.train.total_steps=3", "--config.train.progress=False",
            "--config.train.tensorboard=False", *extra]


def test_second_run_in_a_workdir_is_refused_naming_the_holder(tmp_path, capsys):
    workdir = tmp_path / "run"
    proc = _holder(workdir)
    try:
        assert cli.main(_cli_args(workdir)) == 2
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "in use by another run" in err[0] and f"pid {proc.pid}" in err[0] and socket.gethostname() in err[0]
    assert not (workdir / "checkpoints").exists()   # the refused run wrote nothing


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    workdir = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    workdir.mkdir()
    (workdir / checkpoint.LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "start": "2026-01-01T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING):
        assert _train(workdir, 3).step == 3
    assert any("stale lock" in r.getMessage() and dead.stdout.strip() in r.getMessage() for r in caplog.records)
    assert not (workdir / checkpoint.LOCK_NAME).exists()   # released at the end


def test_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / checkpoint.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "then"}))
    with pytest.raises(checkpoint.WorkdirLockedError,
                       match="host elsewhere, pid 1.*cannot check a process on another host"):
        checkpoint.WorkdirLock(str(tmp_path)).acquire()


# ------------------------------------------------------------------------------ CLI errors

@pytest.mark.parametrize("extra, message", [
    (["--config.train.nosuchkey=3"], "--config.train.nosuchkey=3: config.train has no key 'nosuchkey'"),
    (["--config.train.totl_steps=3"], "config.train has no key 'totl_steps' (did you mean 'total_steps'?)"),
    (["--config.trian.seed=3"], "config has no key 'trian' (did you mean 'train'?)"),
    (["--config.train.total_steps=abc"], "--config.train.total_steps=abc: invalid literal for int()"),
    (["--nosuchflag"], "Unknown command line flag 'nosuchflag'"),
])
def test_train_cli_bad_overrides_are_one_line_exit_2(tmp_path, capsys, extra, message):
    assert cli.main(_cli_args(tmp_path / "w", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vllama-train: error: ") and message in err[0], err


def test_train_cli_missing_config_file_and_help(tmp_path, capsys):
    assert cli.main(["vllama-train", "--config", "no/such/config.py", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vllama-train: error: config file 'no/such/config.py' does not exist"
    assert cli.main(["vllama-train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config" in out and "--debug" in out


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="nosuchkey"):
        cli.main(_cli_args(tmp_path / "w", "--config.train.nosuchkey=3", "--debug"))


@pytest.mark.slow
@pytest.mark.ci
def test_fault_injection_kills_and_restarts_end_bit_equal(tmp_path, capsys):
    """benchmarks/fault_injection.py: SIGKILL during steps / during a checkpoint write and SIGTERM at
    random moments, restarts, and the final state bit-equal to the uninterrupted run."""
    sys.path.insert(0, REPO)
    from benchmarks import fault_injection

    assert fault_injection.main(["--faults", "3", "--seed", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "every final state bit-equal to the uninterrupted run: True" in out
    assert "faults survived:" in out
