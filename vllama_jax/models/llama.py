"""The LLaMA family (LLaMA-1 / Vicuna, Llama-2, Llama-3/3.1) as Flax Linen, with a functional KV cache.

Semantics follow `transformers.LlamaForCausalLM` (RMSNorm, rotate-half RoPE incl. Llama-3 frequency
scaling, SwiGLU, MHA/GQA), so HF checkpoints load through `vllama_jax.convert.hf_llama` and logits agree.

Parameter tree (names mirror HF so the key map is obvious; kernels are `[in, out]`):

  embed_tokens/embedding           [vocab, hidden]          ('vocab', 'embed')
  layers_{i}/input_layernorm/scale [hidden]                 ('embed',)
  layers_{i}/self_attn/q_proj/kernel [hidden, H*hd]         ('embed', 'heads')
  layers_{i}/self_attn/k_proj/kernel [hidden, KV*hd]        ('embed', 'kv_heads')
  layers_{i}/self_attn/v_proj/kernel [hidden, KV*hd]        ('embed', 'kv_heads')
  layers_{i}/self_attn/o_proj/kernel [H*hd, hidden]         ('heads', 'embed')
  layers_{i}/post_attention_layernorm/scale [hidden]        ('embed',)
  layers_{i}/mlp/{gate,up}_proj/kernel [hidden, inter]      ('embed', 'mlp')
  layers_{i}/mlp/down_proj/kernel  [inter, hidden]          ('mlp', 'embed')
  norm/scale                       [hidden]                 ('embed',)
  lm_head/kernel                   [hidden, vocab]          ('embed', 'vocab')   (absent when tied)

q/k/v/o keep HF's fused head layout (H*hd as one dim): the HF import is a plain transpose, and sharding
the fused dim over `tensor` splits on head boundaries whenever the tensor axis divides the head count.

Padding: `attention_mask [B, L]` (1 = token, 0 = pad; left or right padding). Without explicit
`positions`, a token's RoPE position is the number of real tokens before it (what HF `generate` uses),
so a left-padded row gets the same positions as the unpadded one.

KV cache (`KVCache`, from `init_cache`): fixed-shape per-layer `[B, max_len, kv_heads, head_dim]` k/v,
a `[B, max_len]` validity mask and the scalar write `index`. A call with `cache=` writes its L tokens
at slots `index .. index+L-1` and returns the advanced cache, so prefill (L = prompt length) and decode
(L = 1) are the same function and fit `jax.lax.while_loop`. All rows share `index`, so batches are
left-padded for generation; the mask makes pad slots invisible. Writing past `max_len` is an error
when `index` is concrete and undefined (clamped by XLA) under tracing: size the cache for
prompt + new tokens.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.models import scan as layer_scan
from vllama_jax.models.common import Dense, Dtype, Preset, attention, constrain, param

KV_CACHE_AXES = ("batch", "kv_length", "kv_heads", "kv")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling (HF `rope_type="llama3"`)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Preset):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Token ids travel with the config so an HF export round-trips and generation knows when to stop.
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    # What a rematerialised layer keeps (`vllama_jax.models.scan.REMAT_POLICIES`).
    remat_policy: str = "full"
    # One nn.scan over the layers: params stacked as `layers/...` [num_layers, ...], the KV cache
    # as [num_layers, B, max_len, kv_heads, head_dim] arrays; compile time independent of depth.
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @classmethod
    def presets(cls) -> dict[str, "LlamaConfig"]:
        return PRESETS


_LLAMA1_7B = LlamaConfig()
_LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
_TINY = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=128)

PRESETS: dict[str, LlamaConfig] = {
    # LLaMA-1 7B and Vicuna-7B (v0 / v1.1) share this shape.
    "llama_7b": _LLAMA1_7B,
    "llama2_7b": dataclasses.replace(_LLAMA1_7B, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama2_13b": dataclasses.replace(
        _LLAMA1_7B, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
        num_kv_heads=40, rms_norm_eps=1e-5, max_position_embeddings=4096),
    # Llama-3 8B as released (8k context, plain RoPE); Llama-3.1 8B is the same shape with rope scaling.
    "llama3_8b": _LLAMA3_8B,
    "llama3_1_8b": dataclasses.replace(
        _LLAMA3_8B, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        eos_token_id=(128001, 128008, 128009)),
    "tiny": _TINY,
    "tiny_mha": dataclasses.replace(_TINY, num_kv_heads=4),
    # Small original context so the Llama-3 scaling touches low, medium and high frequencies.
    "tiny_llama3": dataclasses.replace(_TINY, rope_theta=10000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
}


# ---------------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim/2]` in float32, computed the way transformers does."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """transformers' `_compute_llama3_parameters`: long wavelengths slowed by `factor`, short kept,
    the band between interpolated smoothly."""
    f32 = np.float32
    low_freq_wavelen = f32(s.original_max_position_embeddings / s.low_freq_factor)
    high_freq_wavelen = f32(s.original_max_position_embeddings / s.high_freq_factor)
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(s.factor), inv_freq)
    smooth = ((f32(s.original_max_position_embeddings) / wavelen - f32(s.low_freq_factor))
              / f32(s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / f32(s.factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, L, head_dim]` in float32 for integer `positions [B, L]` (HF's duplicated-halves layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [B, L, heads, head_dim]`; done in float32 then cast back (more exact than HF's bf16)."""
    xf = x.astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


# ------------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: statistics in float32, normalized value cast to the compute dtype, then scaled."""
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table `[vocab, hidden]`; `attend` is the tied output projection."""
    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    def setup(self):
        self.embedding = param(self, "embedding", nn.initializers.normal(self.init_std),
                               (self.num_embeddings, self.features), ("vocab", "embed"), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        # Gather from a table whose embed dim is fsdp-sharded would leave the output sharded on embed,
        # which XLA can only turn into batch sharding by full rematerialization; FSDP gathers it anyway.
        table = constrain(jnp.asarray(self.embedding, self.dtype), ("vocab", None))
        return jnp.take(table, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, jnp.asarray(self.embedding, self.dtype).T)


def _dense(config: LlamaConfig, features: int, axes, name: str | None = None) -> Dense:
    return Dense(features, axes, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
                 kernel_init=nn.initializers.normal(config.initializer_range), name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None, segment_ids=None):
        c = self.config
        b, l, _ = x.shape
        q = _dense(c, c.num_heads * c.head_dim, ("embed", "heads"), "q_proj")(x)
        k = _dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "k_proj")(x)
        v = _dense(c, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), "v_proj")(x)
        q = constrain(apply_rope(q.reshape(b, l, c.num_heads, c.head_dim), cos, sin),
                      ("batch", "length", "heads", "kv"))
        k = constrain(apply_rope(k.reshape(b, l, c.num_kv_heads, c.head_dim), cos, sin),
                      ("batch", "length", "kv_heads", "kv"))
        v = constrain(v.reshape(b, l, c.num_kv_heads, c.head_dim), ("batch", "length", "kv_heads", "kv"))
        if cache_k is not None:
            start = (0, index, 0, 0)
            cache_k = constrain(jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start),
                                KV_CACHE_AXES)
            cache_v = constrain(jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start),
                                KV_CACHE_AXES)
            k, v = cache_k, cache_v
        # Grouped KV heads read without repeating them; mask [B, Lq, S] for every head; packed
        # rows (segment_ids, no cache) attend within their own example only.
        segments = None if segment_ids is None else (segment_ids, segment_ids)
        out = attention(q, k, v, mask[:, None], c.dtype, scale=c.head_dim ** -0.5, segment_ids=segments)
        out = out.reshape(b, l, c.num_heads * c.head_dim)
        out = _dense(c, c.hidden_size, ("heads", "embed"), "o_proj")(out)
        return out, cache_k, cache_v


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = _dense(c, c.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(c, c.hidden_size, ("mlp", "embed"), "down_proj")(h)


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer; returns the new residual stream and this layer's (updated) cache,
    as `(x, cache_k, cache_v)`, or as nn.scan's `(x, (cache_k, cache_v))` with `scan_form`."""
    config: LlamaConfig
    scan_form: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None, segment_ids=None):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)  # noqa: E731
        h, cache_k, cache_v = LlamaAttention(c, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, cache_k, cache_v, index, segment_ids)
        x = x + h
        x = x + LlamaMLP(c, name="mlp")(norm("post_attention_layernorm")(x))
        x = constrain(x, ("batch", "length", "embed"))
        return (x, (cache_k, cache_v)) if self.scan_form else (x, cache_k, cache_v)


# ------------------------------------------------------------------------------------ cache + model

@flax.struct.dataclass
class KVCache:
    """Functional KV cache: pass it in, get the advanced one back (a pytree with fixed shapes).

    k/v are a tuple of per-layer `[B, max_len, kv_heads, head_dim]` arrays, or with
    `config.scan_layers` one `[num_layers, B, max_len, kv_heads, head_dim]` array each.
    """
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array            # [B, max_len] bool: slot holds a real (non-pad) token
    index: jax.Array           # int32 scalar: next slot to write

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs positive batch and max_len, got batch={batch}, max_len={max_len}")
    dtype = config.dtype if dtype is None else dtype
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    mask, index = jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32)
    if config.scan_layers:
        stacked = (config.num_layers,) + shape
        return KVCache(k=jnp.zeros(stacked, dtype), v=jnp.zeros(stacked, dtype), mask=mask, index=index)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   mask=mask, index=index)


def cache_shardings(cache: KVCache, mesh) -> KVCache:
    """NamedShardings for a cache: batch over the data axes, kv heads over `tensor`."""
    from vllama_jax.sharding import logical_sharding
    mask, index = logical_sharding(mesh, ("batch", "kv_length")), logical_sharding(mesh, ())
    if not isinstance(cache.k, tuple):
        kv = logical_sharding(mesh, (layer_scan.LAYER_AXIS,) + KV_CACHE_AXES)
        return KVCache(k=kv, v=kv, mask=mask, index=index)
    kv = logical_sharding(mesh, KV_CACHE_AXES)
    return KVCache(k=tuple(kv for _ in cache.k), v=tuple(kv for _ in cache.v), mask=mask, index=index)


@flax.struct.dataclass
class LlamaOutput:
    logits: jax.Array | None          # [B, L, vocab] float32 (None with return_logits=False)
    hidden_states: jax.Array | None   # [B, L, hidden] after the final norm (with return_hidden=True)
    cache: KVCache | None             # the advanced cache when one was passed in


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """RoPE positions of packed rows `[B, L]`: they restart at 0 wherever the segment id changes."""
    idx = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """RoPE position of each token = real tokens before it (+ `offset [B]`); pads get 0 or the last."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1 + jnp.asarray(offset, jnp.int32).reshape(-1, 1)
    return jnp.maximum(pos, 0)


class Llama(nn.Module):
    """LLaMA causal LM. `__call__` returns `LlamaOutput`; `embed` / `head` expose the two ends."""
    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, c.dtype, c.param_dtype, c.initializer_range)
        block = LlamaBlock
        if c.remat:
            block = layer_scan.remat(LlamaBlock, c.remat_policy, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            # Per layer: cos, sin, mask, the write index and segment ids are shared, the cache is sliced.
            in_axes = (nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast)
            self.layers = layer_scan.scan(block, c.num_layers, in_axes)(c, scan_form=True)
        else:
            self.layers = [block(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, ("embed", "vocab"))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, L, hidden]` in the compute dtype; ids must be in [0, vocab)."""
        return self.embed_tokens(input_ids)

    def head_kernel(self) -> jax.Array:
        """The output projection `[hidden, vocab]` (the embedding's transpose when tied), param dtype."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding.T
        return nn.meta.unbox(self.lm_head.variables["params"]["kernel"])

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states → float32 logits over the vocab."""
        logits = self.embed_tokens.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 cache: KVCache | None = None, return_hidden: bool = False,
                 return_logits: bool = True, segment_ids: jax.Array | None = None) -> LlamaOutput:
        """Forward over `input_ids [B, L]` or `inputs_embeds [B, L, hidden]` (exactly one).

        attention_mask `[B, L]` in {0, 1}; positions `[B, L]` int (default: derived from the mask and,
        with a cache, the real tokens already in it); cache: a `KVCache` to write this chunk into.
        segment_ids `[B, L]` int (packed rows, no cache): tokens attend only within their segment, and
        default positions restart at 0 at each segment's start.
        """
        c = self.config
        x = self._inputs(input_ids, inputs_embeds)
        b, l = x.shape[:2]
        token_mask = _check_bl(attention_mask, (b, l), "attention_mask", default=True).astype(bool)
        if positions is not None:
            positions = _check_bl(positions, (b, l), "positions")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training forwards, not with a KV cache")
            segment_ids = _check_bl(segment_ids, (b, l), "segment_ids").astype(jnp.int32)
        if cache is None:
            if positions is None:
                positions = (positions_from_mask(token_mask) if segment_ids is None
                             else positions_from_segments(segment_ids))
            causal = jnp.arange(l)[:, None] >= jnp.arange(l)[None, :]
            mask = causal[None] & token_mask[:, None, :]
            index, new_mask = None, None
        else:
            _check_cache(cache, c, b, l)
            index = cache.index
            if positions is None:
                positions = positions_from_mask(token_mask, jnp.sum(cache.mask, axis=-1, dtype=jnp.int32))
            new_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, index))
            slots = jnp.arange(cache.max_len)
            causal = slots[None, :] <= (index + jnp.arange(l))[:, None]
            mask = causal[None] & new_mask[:, None, :]
        cos, sin = rope_cos_sin(positions, rope_inv_freq(c))

        x = constrain(x, ("batch", "length", "embed"))
        if c.scan_layers:
            ck, cv = (cache.k, cache.v) if cache is not None else (None, None)
            x, (new_k, new_v) = self.layers(x, cos, sin, mask, ck, cv, index, segment_ids)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                ck, cv = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
                x, ck, cv = layer(x, cos, sin, mask, ck, cv, index, segment_ids)
                new_k.append(ck)
                new_v.append(cv)
            new_k, new_v = tuple(new_k), tuple(new_v)
        x = self.norm(x)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_k, v=new_v, mask=new_mask, index=(cache.index + l).astype(jnp.int32))
        return LlamaOutput(logits=self.head(x) if return_logits else None,
                           hidden_states=x if return_hidden else None, cache=new_cache)

    def _inputs(self, input_ids, inputs_embeds) -> jax.Array:
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama needs exactly one of input_ids [B, L] or inputs_embeds [B, L, hidden]")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
            return self.embed(input_ids)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, length, {c.hidden_size}], "
                             f"got shape {inputs_embeds.shape}")
        return inputs_embeds.astype(c.dtype)


def _check_bl(x, shape, name, default=None):
    if x is None:
        return jnp.full(shape, default)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [batch, length] = {tuple(shape)}, got {tuple(x.shape)}")
    return x


def _check_cache(cache: KVCache, config: LlamaConfig, batch: int, length: int) -> None:
    stacked = not isinstance(cache.k, tuple)
    if stacked != config.scan_layers:
        raise ValueError(f"cache k/v are {'stacked arrays' if stacked else 'per-layer tuples'} but the config "
                         f"has scan_layers={config.scan_layers}; build the cache with init_cache(config, ...)")
    if len(cache.k) != config.num_layers or len(cache.v) != config.num_layers:
        raise ValueError(f"cache has {len(cache.k)} layers, config has {config.num_layers}")
    want = (batch, cache.max_len, config.num_kv_heads, config.head_dim)
    if tuple(cache.k[0].shape) != want:
        raise ValueError(f"cache k/v must be [batch, max_len, kv_heads, head_dim] = {want}, "
                         f"got {tuple(cache.k[0].shape)}")
    if not isinstance(cache.index, jax.core.Tracer):
        start = int(cache.index)
        if start + length > cache.max_len:
            raise ValueError(f"writing {length} tokens at cache index {start} overflows the cache "
                             f"(max_len {cache.max_len}); make init_cache larger")
