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

from absl import flags

from vllama_jax import cli_errors, config_loader


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_loader.define_flag(fv, argv)
    flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs", flag_values=fv)
    flags.DEFINE_bool("jax_distributed", False, "call jax.distributed.initialize() (multi-host)",
                      flag_values=fv)
    return fv


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _help(fv: flags.FlagValues) -> str:
    return (f"{__doc__}\nflags:\n{fv.get_help()}\n  --debug: show tracebacks\n"
            "  --config.<a>.<b>=<value>: override a config field (see vllama_jax/train/config_lib.py)")


def parse(argv: Sequence[str]):
    """(config, workdir, distributed) from argv (argv[0] is the program name); UserError on bad
    input (a missing config file, an unknown config key, a bad value)."""
    fv = _flag_values(argv)
    config = config_loader.parse_flags(fv, argv, _config_arg(argv))
    if config is None:
        raise cli_errors.UserError("--config is required (e.g. --config configs/stage1_vicuna7b.py)")
    if not fv.workdir:
        raise cli_errors.UserError("--workdir is required")
    return config, fv.workdir, fv.jax_distributed


def run(config, workdir: str):
    """Builds the task and data from the config and trains; returns the TrainResult."""
    from vllama_jax.train import loop
    from vllama_jax.train.task import build_task, import_string

    task = build_task(config)
    check_batch = None
    video_llama = hasattr(getattr(task, "config", None), "llama")
    if video_llama:   # mismatched inputs: one line now, not a traceback or a NaN later
        from vllama_jax.train import preflight
        preflight.check_config(config, task)
        check_batch = lambda batch: preflight.check_batch(batch, task, config)  # noqa: E731
    if config.get("feature_cache") is not None and config.feature_cache.get("enabled"):
        from vllama_jax.train import feature_cache
        task, train_iter = feature_cache.from_config(config, task)
        check_batch = None   # its batches are tower features
    else:
        train_iter = import_string(config.data.train_builder)(config)
    eval_iter_fn = None
    if config.data.get("eval_builder"):
        builder = import_string(config.data.eval_builder)
        eval_iter_fn = lambda: builder(config)  # noqa: E731
    return loop.train(config, task, train_iter, workdir=workdir, eval_iter_fn=eval_iter_fn,
                      check_batch=check_batch)


@cli_errors.entry_point("vllama-train")
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`vllama-train = vllama_jax.train.cli:main`)."""
    argv = list(sys.argv if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(_help(_flag_values(argv[:1])))
        return 0
    config, workdir, distributed = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)   # orbax logs every file operation at INFO
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
