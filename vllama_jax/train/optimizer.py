"""AdamW as the reference runner builds it, over the trainable params only.

LAVIS / Video-LLaMA `RunnerBase.optimizer`: two param groups, weight decay `weight_decay` for
params with ndim >= 2, none for params with ndim < 2 or whose name marks a bias or a norm
(the reference tests `"bias" in n or "ln" in n or "bn" in n` on torch names; on Flax paths a
substring "ln" would hit every `kernel`, so names are matched per path component instead).
`torch.optim.AdamW(betas=(0.9, beta2), eps=1e-8)` is decoupled weight decay applied as
`p -= lr * wd * p`, which is what `optax.adamw` does with a mask.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import optax

from vllama_jax.train import partition

# A path component that names a bias or a norm layer (ln_vision, ln_1, layer_norm, LayerNorm_0, bn).
NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"(.*/)?bias",
    r"(.*/)?(ln|bn)(_[^/]*)?/.*",
    r"(?i)(.*/)?[^/]*norm[^/]*/.*",
)


def decay_mask(params: Any, no_decay_patterns: Sequence[str] = NO_DECAY_PATTERNS) -> dict:
    """Nested dict of bools: True where weight decay applies (ndim >= 2 and not bias/norm)."""
    rxs = [re.compile(p) for p in no_decay_patterns]
    flat = partition.flatten(params)
    return partition.unflatten({
        path: len(leaf.shape) >= 2 and not any(rx.fullmatch(path) for rx in rxs)
        for path, leaf in flat.items()})


def adamw(learning_rate: optax.ScalarOrSchedule, params: Any, *, weight_decay: float = 0.05,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          grad_clip_norm: float | None = None,
          no_decay_patterns: Sequence[str] = NO_DECAY_PATTERNS) -> optax.GradientTransformation:
    """AdamW over `params` (the trainable tree, arrays or ShapeDtypeStructs, used for the mask).

    The decay mask is computed once from shapes and stored as a static tree, so the optimizer
    can be initialised on abstract values (for shardings) and on real ones alike.
    `grad_clip_norm` (None or <= 0: off) clips by global norm before Adam; the reference does
    not clip.
    """
    mask = decay_mask(nn.meta.unbox(params), no_decay_patterns)
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    if grad_clip_norm is not None and grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx


def make_optimizer(optim_config, schedule, trainable_params: Any) -> optax.GradientTransformation:
    """Optimizer from an `optim` config section."""
    name = optim_config.get("name", "adamw") if hasattr(optim_config, "get") else optim_config.name
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; known: ['adamw']")
    return adamw(
        schedule, trainable_params, weight_decay=float(optim_config.weight_decay),
        b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.eps),
        grad_clip_norm=optim_config.grad_clip_norm or None)
