"""Fault injection: kill a tiny training run at random moments, restart it, and check that the
final state is bit-equal to an uninterrupted run.

    python -m benchmarks.fault_injection --faults 8 --seed 0      # from the repository root
    python benchmarks/fault_injection.py --faults 8                # or from anywhere

The run is `vllama-train` on configs/toy.py (a few seconds per start once compiled; the restarts
share a JAX compilation cache). Each fault is one of, chosen at random:
  step    SIGKILL at a random moment while steps run
  save    SIGKILL while a checkpoint is being written (a `*.orbax-checkpoint-tmp*` directory exists)
  term    SIGTERM (preemption: the run saves and exits 0)
then the run is restarted (taking over the dead run's lock, cleaning its half-written checkpoint)
until it finishes. The final checkpoint's params, optimizer state, step and rng are compared
bit for bit with a run to the same step that was never interrupted. Exit status 0 when every
faulted run ended bit-equal, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARKER = ".orbax-checkpoint-tmp"
KINDS = ("step", "save", "term")


def _cli(workdir: str, total_steps: int, delay_s: float) -> list[str]:
    return [sys.executable, "-m", "vllama_jax.train.cli", "--config", os.path.join(ROOT, "configs", "toy.py"),
            "--workdir", workdir, f"--config.train.total_steps={total_steps}", "--config.train.save_every=4",
            "--config.train.log_every=4", "--config.train.eval_every=0", "--config.train.progress=False",
            "--config.train.tensorboard=False", f"--config.data.delay_s={delay_s}"]


def _env(cache: str) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "float32",
            "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _saving(workdir: str) -> bool:
    d = os.path.join(workdir, "checkpoints")
    try:
        return any(TMP_MARKER in n for n in os.listdir(d))
    except FileNotFoundError:
        return False


def _started_steps(log_path: str) -> bool:
    """The run is past setup (it printed its param split or resumed)."""
    try:
        text = open(log_path).read()
    except FileNotFoundError:
        return False
    return "trainable" in text or "resumed from" in text


def inject(workdir: str, kind: str, rng: random.Random, args, env: dict, log_path: str) -> str:
    """Starts the run and faults it as `kind` says; returns what happened."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cli(workdir, args.steps, args.delay), env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + args.timeout
        while not _started_steps(log_path):
            if proc.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.01)
        if kind == "save":
            for _ in range(rng.randrange(3)):   # let 0-2 saves through, then kill inside the next one
                while proc.poll() is None and not _saving(workdir) and time.time() < deadline:
                    time.sleep(0.002)
                while proc.poll() is None and _saving(workdir) and time.time() < deadline:
                    time.sleep(0.002)
            while proc.poll() is None and not _saving(workdir) and time.time() < deadline:
                time.sleep(0.002)
            if proc.poll() is None and _saving(workdir):
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return "killed during a checkpoint write"
        else:
            time.sleep(rng.uniform(0.0, args.steps * args.delay))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if kind == "step" else signal.SIGTERM)
                proc.wait(timeout=120)
                return "killed during steps" if kind == "step" else f"SIGTERM (exit {proc.returncode})"
        proc.wait(timeout=args.timeout)
        return f"missed: the run ended first (exit {proc.returncode})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(workdir: str, args, env: dict, log_path: str) -> None:
    with open(log_path, "w") as log:
        rc = subprocess.run(_cli(workdir, args.steps, 0.0), env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    if rc != 0:
        raise RuntimeError(f"the restarted run failed (exit {rc}):\n{open(log_path).read()[-3000:]}")


def final_state(workdir: str):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from vllama_jax.checkpoint import Checkpointer
    from vllama_jax.train import loop, toy

    sys.path.insert(0, ROOT)
    from configs import toy as toy_config

    config = toy_config.get_config()
    task = toy.build_task(config)
    su = loop._setup(config, task, __import__("vllama_jax.sharding", fromlist=["x"]).make_mesh(tuple(config.mesh.shape)))
    with Checkpointer(workdir) as ck:
        state, step = ck.restore_newest(su.abstract_state)
    return step, jax.tree.map(np.asarray, state.to_dict())


def bit_equal(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and
            all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                for x, y in zip(la, lb)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=8, help="faulted runs (each: one fault, then restarts to the end)")
    p.add_argument("--faults-per-run", type=int, default=2, help="faults before a run is let finish")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of the tiny run")
    p.add_argument("--delay", type=float, default=0.08, help="seconds per batch (room to land a kill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import tempfile
    base = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="vllama_faults_"))
    os.makedirs(base, exist_ok=True)
    env = _env(os.path.join(base, "jax_cache"))
    rng = random.Random(args.seed)
    reference = os.path.join(base, "uninterrupted")
    finish(reference, args, env, os.path.join(base, "uninterrupted.log"))
    ref_step, ref = final_state(reference)
    print(f"uninterrupted run: step {ref_step}", flush=True)

    results, survived = [], 0
    for run in range(args.faults):
        workdir = os.path.join(base, f"run{run}")
        events = []
        for k in range(args.faults_per_run):
            kind = rng.choice(KINDS)
            events.append(inject(workdir, kind, rng, args, env, os.path.join(base, f"run{run}.fault{k}.log")))
        finish(workdir, args, env, os.path.join(base, f"run{run}.finish.log"))
        step, state = final_state(workdir)
        equal = step == ref_step and bit_equal(state, ref)
        faults = sum(not e.startswith("missed") for e in events)
        survived += faults if equal else 0
        results.append({"run": run, "events": events, "final_step": step, "bit_equal": equal})
        print(f"run {run}: {'; '.join(events)} -> step {step}, bit-equal: {equal}", flush=True)
    ok = all(r["bit_equal"] for r in results)
    total = sum(sum(not e.startswith("missed") for e in r["events"]) for r in results)
    by_kind = {k: sum(e.startswith(p) for r in results for e in r["events"])
               for k, p in (("during steps", "killed during steps"), ("during a checkpoint write", "killed during a"),
                            ("SIGTERM", "SIGTERM"), ("missed", "missed"))}
    print(f"faults survived: {survived} of {total} ({', '.join(f'{v} {k}' for k, v in by_kind.items())}); "
          f"every final state bit-equal to the uninterrupted run: {ok}")
    from benchmarks.common import write_json
    write_json(args.json, {"survived": survived, "faults": total, "by_kind": by_kind, "all_bit_equal": ok,
                           "runs": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
