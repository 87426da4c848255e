"""One process of a data-position resume across process counts (driven by test_elastic_data.py).

  python tests/elastic_data_worker.py --num-processes N --process-id I [--coordinator HOST:PORT] \
      --shards GLOB --tokenizer DIR --global-batch G --batches K --workdir DIR --out OUT.npz

Under `jax.distributed` when N > 1 (CPU, one device per process). Restores the newest checkpoint
of `--workdir` if there is one (the toy train state and the ArrayRecord loader's position, written
by any process count), takes K batches of this process' rows, records their example ids and
pixel sums, and saves the checkpoint K steps later.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--coordinator", default="")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=60)
    try:
        run(args)
    finally:
        if args.num_processes > 1:
            jax.distributed.shutdown()
    return 0


def run(args):
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_utils import toy_config_dict

    from data_pipelines import loader
    from data_pipelines.tokenizer import TextEncoder, load_tokenizer
    from vllama_jax import sharding
    from vllama_jax.checkpoint import Checkpointer
    from vllama_jax.train import loop, partition, toy
    from vllama_jax.train import step as train_step
    from vllama_jax.train.task import run_keys

    assert jax.process_count() == args.num_processes
    cfg = dataclasses.replace(loader.LoaderConfig.preset("tiny"), keep_ids=True, seq_len=160,
                              batch_size=args.global_batch // jax.process_count())
    it = loader.make_loader(loader.DatasetSpec((args.shards,)), cfg,
                            TextEncoder(load_tokenizer(args.tokenizer)))   # shard from jax's process index
    # The toy trainer's state, made as the trainer makes it (born sharded over both processes).
    config = toy_config_dict()
    task = toy.build_task(config)
    su = loop._setup(config, task, sharding.make_mesh((-1, 1, 1)))
    params = loop._fresh_params(task, sharding.param_shardings(task.abstract_params(), su.mesh), 0)
    trainable, _ = partition.split(params, su.paths)
    state = jax.jit(lambda p, r: train_step.init_state(p, su.tx, r), out_shardings=su.state_sh)(
        trainable, run_keys(0)[1])
    with Checkpointer(args.workdir, async_save=False) as ck:
        start = 0
        if ck.latest_step() is not None:
            state = ck.restore(su.abstract_state, it, trainable_paths=su.paths)
            start = int(jax.device_get(state.step))
        batches = [next(it) for _ in range(args.batches)]
        state = jax.jit(lambda st: st.replace(step=st.step + args.batches), out_shardings=su.state_sh)(state)
        ck.save(state, it, trainable_paths=su.paths, wait=True)
    np.savez(args.out, ids=np.array([[str(x) for x in b["example_id"]] for b in batches]),
             pixels=np.array([b["frames"].reshape(len(b["frames"]), -1).sum(1) for b in batches]),
             start=start)


if __name__ == "__main__":
    sys.exit(main())
