"""The Q-Former: BERT layers over learned query tokens that cross-attend to an encoder's features.

One module serves BLIP-2's image Q-Former and Video-LLaMA's video and audio Q-Formers. It is the
query-only path of LAVIS `Qformer.BertModel` (`bert(query_embeds=..., encoder_hidden_states=...)`):
with no text input LAVIS' `BertEmbeddings` applies its LayerNorm and dropout to the query tokens
alone (no position embeddings), every layer runs self-attention over the queries, cross-attention
to the encoder every `cross_attention_freq` layers (layers 0, f, 2f, ...), and the query-specific FFN
(`intermediate_query` / `output_query`); the text FFN is never used and does not exist here.
Post-norm BERT sublayers: `LayerNorm(x + dropout(dense(f(x))))`, exact-erf GELU.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vllama_jax.models.common import Dense, Dtype, LayerNorm, Preset, attention, constrain, param


@dataclasses.dataclass(frozen=True)
class QFormerConfig(Preset):
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"QFormerConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError(f"QFormerConfig: cross_attention_freq must be >= 1, got {self.cross_attention_freq}")

    @classmethod
    def presets(cls):
        return PRESETS


_BLIP2 = QFormerConfig()
_TINY = QFormerConfig(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64, encoder_width=64,
                      cross_attention_freq=2, num_query_tokens=8)
PRESETS = {
    "blip2_qformer": _BLIP2,
    # Video-LLaMA `init_video_Qformer`: bert-base with 2 layers, cross-attention in every layer.
    "video_qformer": dataclasses.replace(_BLIP2, num_layers=2, cross_attention_freq=1, encoder_width=768),
    "audio_qformer": dataclasses.replace(_BLIP2, num_layers=2, cross_attention_freq=1, encoder_width=1024,
                                         num_query_tokens=8),
    "tiny": _TINY,
    "tiny_video": dataclasses.replace(_TINY, num_layers=2, cross_attention_freq=1, encoder_width=32),
    "tiny_audio": dataclasses.replace(_TINY, num_layers=2, cross_attention_freq=1, encoder_width=48,
                                      num_query_tokens=4),
}


class BertAttention(nn.Module):
    """Multi-head (self or cross) attention + `LayerNorm(x + dropout(output(attn)))`.

    Params: `query`, `key`, `value`, `output` (Dense), `norm` (LayerNorm).
    """
    config: QFormerConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x, context=None, mask=None, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=init)
        kv_in = "encoder_embed" if self.cross else "embed"
        context = x if context is None else context
        split = lambda y: constrain(y.reshape(*y.shape[:2], cfg.num_heads, cfg.head_dim),
                                    ("batch", "length", "heads", "kv"))
        q = split(dense(cfg.hidden_size, ("embed", "heads"), name="query")(x))
        k = split(dense(cfg.hidden_size, (kv_in, "heads"), name="key")(context))
        v = split(dense(cfg.hidden_size, (kv_in, "heads"), name="value")(context))
        keep = None   # dropout on the attention probabilities: its scaled keep mask
        if not deterministic and cfg.attention_dropout > 0:
            shape = (q.shape[0], cfg.num_heads, q.shape[1], k.shape[1])
            keep = nn.Dropout(cfg.attention_dropout)(jnp.ones(shape, jnp.float32), deterministic=False)
        y = attention(q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype), k, v, mask, cfg.dtype, probs_multiplier=keep)
        y = dense(cfg.hidden_size, ("heads", "embed"), name="output")(y.reshape(*y.shape[:2], cfg.hidden_size))
        y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(y + x)


class QueryFeedForward(nn.Module):
    """LAVIS `intermediate_query` + `output_query`. Params: `intermediate`, `output`, `norm`."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=init, name="intermediate")(x)
        h = nn.gelu(h, approximate=False)
        h = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=init, name="output")(h)
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(h + x)


class QFormerLayer(nn.Module):
    """Params: `attention`, `crossattention` (only where `config.has_cross_attention(layer)`), `ffn`."""
    config: QFormerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, context, mask, deterministic: bool = True):
        cfg = self.config
        x = BertAttention(cfg, name="attention")(x, deterministic=deterministic)
        if cfg.has_cross_attention(self.layer):
            x = BertAttention(cfg, cross=True, name="crossattention")(x, context, mask, deterministic)
        x = QueryFeedForward(cfg, name="ffn")(x, deterministic)
        return constrain(x, ("batch", "length", "embed"))


def _encoder_mask(encoder_mask, hidden_shape):
    """`[N, L]` bool or 0/1 mask -> `[N, 1, 1, L]` bool (True = attend), or None."""
    if encoder_mask is None:
        return None
    if tuple(encoder_mask.shape) != tuple(hidden_shape[:2]):
        raise ValueError(f"encoder_mask: expected shape [N, L] = {tuple(hidden_shape[:2])} matching "
                         f"encoder_hidden_states, got {tuple(encoder_mask.shape)}")
    mask = encoder_mask if encoder_mask.dtype == jnp.bool_ else encoder_mask != 0
    return mask[:, None, None, :]


class QFormer(nn.Module):
    """`(encoder_hidden_states [N, L, W], encoder_mask [N, L] | None) -> [N, num_query_tokens, hidden]`.

    Params: `query_tokens [1, Q, hidden]`, `embed_norm` (LAVIS `embeddings.LayerNorm`),
    `layer_{i}`. Dropout (hidden and attention probs) runs when `deterministic=False` and then
    needs a `'dropout'` rng.
    """
    config: QFormerConfig

    @nn.compact
    def __call__(self, encoder_hidden_states: jax.Array, encoder_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.encoder_width:
            raise ValueError(f"encoder_hidden_states: expected [N, L, {cfg.encoder_width}], "
                             f"got shape {tuple(encoder_hidden_states.shape)}")
        mask = _encoder_mask(encoder_mask, encoder_hidden_states.shape)
        context = constrain(encoder_hidden_states.astype(cfg.dtype), ("batch", "length", "embed"))
        n = encoder_hidden_states.shape[0]
        queries = param(self, "query_tokens", nn.initializers.normal(cfg.initializer_range),
                        (1, cfg.num_query_tokens, cfg.hidden_size), (None, "query", "embed"), cfg.param_dtype)
        x = jnp.broadcast_to(queries.astype(cfg.dtype), (n, cfg.num_query_tokens, cfg.hidden_size))
        x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embed_norm")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        layer = nn.remat(QFormerLayer, static_argnums=(4,)) if cfg.remat else QFormerLayer
        for i in range(cfg.num_layers):
            x = layer(cfg, layer=i, name=f"layer_{i}")(x, context, mask, deterministic)
        return x
