"""One process of a localhost `jax.distributed` run of the toy config (driven by test_multiprocess.py).

  python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
      --process-id 0 --local-devices 2 --workdir DIR --out DIR/params_0.npz

Trains through the real `vllama_jax.train.loop.train` (orbax checkpoints included) on a global
mesh spanning every process. Each process feeds only the rows of the global batch that live on
its own devices: the toy builder makes only this process' examples (checked here against the
mesh's row layout); `sharding.shard_batch` turns them into global arrays with
`jax.make_array_from_process_local_data`. `--save-every` / `--tokens-out` serve the elastic-resume
test (a checkpoint of this run is resumed by one process). At the end every process gathers the (sharded) trainable
params and writes them, with the logged losses, to `--out`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--coordinator", required=True, help="host:port of process 0's coordinator")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--local-devices", type=int, default=2, help="fake CPU devices in this process")
    p.add_argument("--mesh", default="1,2,2", help="global (data, fsdp, tensor) mesh shape")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save-every", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.monotonic()
    # Before jax is imported: this process' own device count, CPU only.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    # CPU collectives across processes go through gloo (jax's default since 0.4.3x; set it
    # explicitly so an older default of 'none' cannot turn the run into a hang).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
    print(f"jax.distributed up after {time.monotonic() - t0:.1f}s", flush=True)
    try:
        run(args, t0)
    finally:
        jax.distributed.shutdown()
    print(f"done after {time.monotonic() - t0:.1f}s", flush=True)
    return 0


def run(args, t0):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_utils import toy_config_dict  # noqa: E402 (also puts the repo on sys.path)
    from elastic_phase import Recorder  # noqa: E402 (the elastic tests' pass-through recorder)
    from vllama_jax import sharding
    from vllama_jax.train import loop, partition, toy

    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_device_count()
    config = toy_config_dict(total_steps=args.steps, log_every=1, save_every=args.save_every)
    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = sharding.make_mesh(shape)
    rows = local_rows(mesh, int(config.train.batch_size))
    print(f"process {jax.process_index()}: devices {[d.id for d in jax.local_devices()]}, "
          f"batch rows {rows.start}:{rows.stop}", flush=True)
    task = toy.build_task(config)
    own = toy.process_rows(int(config.train.batch_size), jax.process_index(), jax.process_count())
    assert own == rows, f"toy feeds rows {own}, the mesh puts this process' devices on rows {rows}"
    train_iter = Recorder(toy.build_train_iter(config))
    result = loop.train(config, task, train_iter, workdir=args.workdir, mesh=mesh)
    print(f"trained after {time.monotonic() - t0:.1f}s", flush=True)
    params = multihost_utils.process_allgather(result.state.params, tiled=True)
    flat = {k: np.asarray(v) for k, v in partition.flatten(params).items()}
    losses = np.asarray([h["loss"] for h in result.history], np.float64)
    np.savez(args.out, losses=losses, step=result.step, tokens=np.stack(train_iter.tokens),
             **{f"param/{k}": v for k, v in flat.items()})


def local_rows(mesh, global_batch: int) -> slice:
    """The contiguous rows of a [global_batch, ...] batch that this process' devices hold."""
    import jax
    from vllama_jax import sharding

    index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].indices(global_batch)[0] for idx in index_map.values()})
    stops = sorted({idx[0].indices(global_batch)[1] for idx in index_map.values()})
    rows = slice(starts[0], stops[-1])
    per_device = global_batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    if (rows.stop - rows.start) != per_device * len(starts):
        raise ValueError(f"process {jax.process_index()}'s batch rows are not contiguous: {index_map}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
