"""`vllama-train`: train from an ml_collections config file with command-line overrides.

  vllama-train --config configs/stage1_vicuna7b.py --workdir /ckpt/run1 \
      --config.optim.init_lr=1e-4 --config.mesh.shape="(1,8,1)"
  python -m vllama_jax.train.cli --config configs/toy.py --workdir /tmp/toy

The config names the task and data builders ('module:function' strings); a run resumes from
the newest checkpoint in `--workdir` automatically. Exit status: 0 when done or preempted
(SIGTERM, after saving), 1 when the loss diverged (NaN/inf; nothing bad was saved).
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

_FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "config file (python, defines get_config)",
                                flag_values=_FLAGS, lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs", flag_values=_FLAGS)
flags.DEFINE_bool("jax_distributed", False, "call jax.distributed.initialize() (multi-host)",
                  flag_values=_FLAGS)


def parse(argv: Sequence[str]):
    """(config, workdir, distributed) from argv (argv[0] is the program name)."""
    _FLAGS.unparse_flags()
    _FLAGS(list(argv))
    if _FLAGS.config is None:
        raise app.UsageError("--config is required (e.g. --config configs/stage1_vicuna7b.py)")
    if not _FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    return _FLAGS.config, _FLAGS.workdir, _FLAGS.jax_distributed


def run(config, workdir: str):
    """Builds the task and data from the config and trains; returns the TrainResult."""
    from vllama_jax.train import loop
    from vllama_jax.train.task import build_task, import_string

    task = build_task(config)
    train_iter = import_string(config.data.train_builder)(config)
    eval_iter_fn = None
    if config.data.get("eval_builder"):
        builder = import_string(config.data.eval_builder)
        eval_iter_fn = lambda: builder(config)  # noqa: E731
    return loop.train(config, task, train_iter, workdir=workdir, eval_iter_fn=eval_iter_fn)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`vllama-train = vllama_jax.train.cli:main`)."""
    argv = sys.argv if argv is None else argv
    try:
        config, workdir, distributed = parse(argv)
    except (flags.Error, app.UsageError) as e:
        print(f"vllama-train: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jax
    if distributed:
        jax.distributed.initialize()
    from vllama_jax.train.loop import NonFiniteLossError
    try:
        result = run(config, workdir)
    except NonFiniteLossError as e:
        print(f"vllama-train: {e}", file=sys.stderr)
        return 1
    print(f"vllama-train: {'preempted' if result.preempted else 'finished'} at step {result.step}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
