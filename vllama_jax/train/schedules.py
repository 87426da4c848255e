"""Learning-rate schedules as optax schedules of the global optimizer step.

Two linear-warmup cosine schedules, both from the reference code:

* `lavis_warmup_cosine` — LAVIS `lavis/common/optims.py:LinearWarmupCosineLRScheduler`: the
  scheduler is stepped with (epoch, step-in-epoch). Epoch 0 warms up linearly from `warmup_lr`
  to `init_lr` over `warmup_steps` (capped at `init_lr`); every later epoch has one constant lr,
  the cosine from `init_lr` to `min_lr` evaluated at `epoch / max_epoch`.
* `per_step_warmup_cosine` — Video-LLaMA's own `video_llama/common/optims.py`, which is what its
  train configs ran: warmup while the global step is below `warmup_steps`, then a per-step cosine
  at `global_step / (max_epoch * iters_per_epoch)`. Its warmup uses the step *within the epoch*
  (as the reference does), which only differs from the global step if warmup outlasts an epoch.

`step` counts optimizer updates (with gradient accumulation, one update per accumulated batch),
so `iters_per_epoch` is in optimizer steps.
"""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def _check(init_lr: float, min_lr: float, warmup_steps: int, iters_per_epoch: int, max_epoch: int):
    if iters_per_epoch <= 0:
        raise ValueError(f"iters_per_epoch must be positive, got {iters_per_epoch}")
    if max_epoch <= 0:
        raise ValueError(f"max_epoch must be positive, got {max_epoch}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if init_lr < 0 or min_lr < 0:
        raise ValueError(f"learning rates must be >= 0, got init_lr={init_lr}, min_lr={min_lr}")


def _start_lr(warmup_lr: float, init_lr: float) -> float:
    # LAVIS: `warmup_start_lr if warmup_start_lr >= 0 else init_lr`.
    return warmup_lr if warmup_lr >= 0 else init_lr


def _warmup(step_in_epoch, warmup_lr: float, init_lr: float, warmup_steps: int):
    frac = step_in_epoch.astype(jnp.float32) / max(warmup_steps, 1)
    return jnp.minimum(init_lr, warmup_lr + (init_lr - warmup_lr) * frac)


def _cosine(progress, init_lr: float, min_lr: float):
    return (init_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress)) + min_lr


def lavis_warmup_cosine(init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                        iters_per_epoch: int, max_epoch: int) -> Schedule:
    """LAVIS LinearWarmupCosineLRScheduler: warmup in epoch 0, then cosine by epoch."""
    _check(init_lr, min_lr, warmup_steps, iters_per_epoch, max_epoch)
    start = _start_lr(warmup_lr, init_lr)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        epoch = step // iters_per_epoch
        warm = _warmup(step % iters_per_epoch, start, init_lr, warmup_steps)
        cos = _cosine(epoch.astype(jnp.float32) / max_epoch, init_lr, min_lr)
        return jnp.where(epoch == 0, warm, cos)

    return schedule


def per_step_warmup_cosine(init_lr: float, min_lr: float, warmup_lr: float, warmup_steps: int,
                           iters_per_epoch: int, max_epoch: int) -> Schedule:
    """Video-LLaMA LinearWarmupCosineLRScheduler: warmup by step, then cosine over all steps."""
    _check(init_lr, min_lr, warmup_steps, iters_per_epoch, max_epoch)
    start = _start_lr(warmup_lr, init_lr)
    total = max_epoch * iters_per_epoch

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        warm = _warmup(step % iters_per_epoch, start, init_lr, warmup_steps)
        cos = _cosine(step.astype(jnp.float32) / total, init_lr, min_lr)
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def constant(init_lr: float, **_) -> Schedule:
    return lambda step: jnp.full((), init_lr, jnp.float32)


SCHEDULES = {
    # Names as in the reference yaml `lr_sched`.
    "linear_warmup_cosine_lr": per_step_warmup_cosine,
    "lavis_linear_warmup_cosine_lr": lavis_warmup_cosine,
    "constant_lr": constant,
}


def make_schedule(optim_config) -> Schedule:
    """Schedule from an `optim` config section (ml_collections or any attribute holder)."""
    name = optim_config.lr_sched
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_sched {name!r}; known: {sorted(SCHEDULES)}")
    if name == "constant_lr":
        return constant(float(optim_config.init_lr))
    return SCHEDULES[name](
        init_lr=float(optim_config.init_lr), min_lr=float(optim_config.min_lr),
        warmup_lr=float(optim_config.warmup_lr), warmup_steps=int(optim_config.warmup_steps),
        iters_per_epoch=int(optim_config.iters_per_epoch), max_epoch=int(optim_config.max_epoch))
