"""Building blocks shared by the towers: logically-partitioned Dense/LayerNorm/Embed, attention core.

Parameter layouts follow Flax (`Dense.kernel` is `[in, out]`, i.e. the transpose of `torch.nn.Linear.weight`);
converters in `vllama_jax.convert` do the transposes. Every parameter carries logical axis names
(see `vllama_jax.sharding.LOGICAL_RULES`); one array may not use the same logical name twice.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

# torch.nn.Linear / BERT / ViT defaults differ; towers pass their own init, these are fallbacks.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """`nn.Dense` whose kernel `[in, out]` and bias `[out]` carry logical axes `axes=(in, out)`."""
    features: int
    axes: Axes
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)),
            (x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = jnp.dot(x, kernel, precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, (self.axes[-1],)),
                              (self.features,), self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with `scale`/`bias` annotated with logical axis `axis`.

    Statistics are computed in float32 whatever the compute dtype, as torch autocast does.
    """
    epsilon: float = 1e-6
    axis: str | None = "embed"
    use_bias: bool = True
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                               (d,), self.param_dtype)
            y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)),
                              (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Axes,
          dtype: Dtype = jnp.float32) -> jax.Array:
    """A raw parameter with logical axes (query tokens, position embeddings, cls tokens...)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              bias: jax.Array | None = None, dtype: Dtype = jnp.float32) -> jax.Array:
    """Softmax attention over `[batch, length, heads, head_dim]` inputs, softmax in float32.

    `mask` broadcasts to `[batch, heads, q_len, kv_len]` (True = attend); `bias` is added to the
    logits. `q` must already be scaled (towers differ in where they scale). Fully masked rows
    give zeros rather than NaN.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v.astype(dtype))


@dataclasses.dataclass(frozen=True)
class Preset:
    """Mixin for frozen-dataclass configs with named presets: `Cfg.preset('tiny', dtype=...)`.

    Subclasses define a module-level `PRESETS: dict[str, Cfg]` and set `_presets` to it via
    `presets()` classmethod override.
    """

    @classmethod
    def presets(cls) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str, **overrides):
        table = cls.presets()
        if name not in table:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(table)}")
        return dataclasses.replace(table[name], **overrides)
