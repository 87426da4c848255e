"""The toy task (frozen tower + trainable head, vllama_jax.train.toy): exercises the whole
training stack on CPU in seconds, e.g.

  python -m vllama_jax.train.cli --config configs/toy.py --workdir /tmp/toy
"""
from vllama_jax.train import config_lib


def get_config():
    c = config_lib.base_config()
    c.task.builder = "vllama_jax.train.toy:build_task"
    c.data.train_builder = "vllama_jax.train.toy:build_train_iter"
    c.data.eval_builder = "vllama_jax.train.toy:build_eval_iter"
    c.data.seq_len = 8
    c.data.delay_s = 0.0          # per-batch sleep, for preemption tests
    c.data.eval_examples = 64
    c.model.preset = "tiny"
    c.model.dropout = 0.1
    c.freeze.preset = "toy_head"
    c.optim.init_lr, c.optim.min_lr, c.optim.warmup_lr = 1e-2, 1e-3, 1e-4
    c.optim.warmup_steps, c.optim.iters_per_epoch, c.optim.max_epoch = 5, 20, 2
    c.train.batch_size = 16
    c.train.seed = 0
    c.train.log_every, c.train.save_every, c.train.eval_every = 5, 10, 20
    c.train.compute_dtype, c.train.frozen_dtype = "float32", ""
    c.checkpoint.save_frozen = False   # the tower is a deterministic random init
    c.mesh.shape = (-1, 1, 1)
    return c
