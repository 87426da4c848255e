"""ImageBind (Girdhar et al. 2023) audio and vision towers as Video-LLaMA uses them (frozen).

Both towers are ImageBind's `SimpleTransformer` trunk between a modality stem and a head:

  audio  fbank [N,1,128,204] -> Conv2d(1->768, k16, s10, no bias) -> LayerNorm(eps 1e-5)
         -> [cls] + 12x19 patches + learned pos -> 12 pre-LN blocks (nn.MultiheadAttention with
         add_bias_kv: a learned key/value appended as an extra position; drop path 0->0.1)
         -> LN -> cls -> Linear(768->1024, no bias) -> L2-normalise -> x exp(log 20) (not learnable)
  vision image [N,H,W,3] -> repeated to 2 frames (PadIm2Video repeat) -> Conv3d(3->1280,
         k=s=(2,14,14), no bias) -> [cls] + 16x16 patches + learned pos -> LayerNorm (pre-transformer)
         -> 32 pre-LN blocks (no bias_kv) -> LN -> cls -> Linear(1280->1024, no bias) -> L2-normalise

Video-LLaMA feeds the audio Q-Former with the final (normalised, x20) audio embedding, and
during audio-branch training with the vision tower's normalised embedding instead
(`encode_audioQformer(image, modality_type=VISION)`); its audio-visual path also uses the
pre-projection cls feature, returned by `return_pooled=True`.

Parameter layout (Flax) mirrors the PyTorch state dict; `vllama_jax.convert.imagebind` maps it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.models.common import Dense, Dtype, LayerNorm, Preset, attention, constrain, param

# torch.nn.Linear / Conv default init (kaiming_uniform a=sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_init = nn.initializers.xavier_uniform()

ACTIVATION_AXES = ("batch", "length", "embed")


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class ImageBindAudioConfig(Preset):
    embed_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    out_embed_dim: int = 1024
    kernel_size: int = 16
    stride: int = 10
    num_mel_bins: int = 128
    target_len: int = 204
    drop_path: float = 0.1  # max of the linear 0 -> drop_path schedule over blocks; train only
    add_bias_kv: bool = True
    pre_transformer_ln: bool = False
    stem_ln_eps: float = 1e-5  # the stem's nn.LayerNorm keeps torch's default eps
    ln_eps: float = 1e-6
    logit_scale_init: float = 20.0
    max_logit_scale: float = 100.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def presets(cls) -> dict[str, "ImageBindAudioConfig"]:
        return AUDIO_PRESETS

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (mel, time) of the strided conv."""
        return ((self.num_mel_bins - self.kernel_size) // self.stride + 1,
                (self.target_len - self.kernel_size) // self.stride + 1)

    @property
    def num_tokens(self) -> int:
        return 1 + math.prod(self.grid)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.num_mel_bins, self.target_len)


@dataclasses.dataclass(frozen=True)
class ImageBindVisionConfig(Preset):
    embed_dim: int = 1280
    num_blocks: int = 32
    num_heads: int = 16
    mlp_ratio: int = 4
    out_embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    num_frames: int = 2  # temporal kernel and stride; a single image is repeated to this many
    in_channels: int = 3
    drop_path: float = 0.0
    add_bias_kv: bool = False
    pre_transformer_ln: bool = True
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def presets(cls) -> dict[str, "ImageBindVisionConfig"]:
        return VISION_PRESETS

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_tokens(self) -> int:
        return 1 + math.prod(self.grid)


AUDIO_PRESETS = {
    "imagebind_audio_huge": ImageBindAudioConfig(),
    "tiny": ImageBindAudioConfig(embed_dim=32, num_blocks=2, num_heads=4, out_embed_dim=24),
}
VISION_PRESETS = {
    "imagebind_vision_huge": ImageBindVisionConfig(),
    "tiny": ImageBindVisionConfig(embed_dim=32, num_blocks=2, num_heads=4, out_embed_dim=24,
                                  image_size=42),
}


def drop_path_rates(max_rate: float, num_blocks: int) -> list[float]:
    """ImageBind's 'progressive' schedule: linspace(0, max_rate, num_blocks), first block 0."""
    return [float(r) for r in np.linspace(0.0, max_rate, num_blocks, dtype=np.float32)]


# ----------------------------------------------------------------------------- blocks

class DropPath(nn.Module):
    """Stochastic depth (timm DropPath): drops a sample's whole residual branch, rescales the rest."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class HeadsProjection(nn.Module):
    """embed -> [heads, head_dim] projection with bias (one third of torch's in_proj)."""
    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param(self, "kernel", xavier_init, (x.shape[-1], self.num_heads, self.head_dim),
                       ("embed", "heads", "kv"), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (self.num_heads, self.head_dim),
                     ("heads", "kv"), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("bld,dhk->blhk", x, kernel) + bias


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=...)` self-attention.

    With add_bias_kv a learned key and value (after projection) are appended to every
    sequence as one extra attended position.
    """
    num_heads: int
    add_bias_kv: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {self.num_heads}")
        head_dim = dim // self.num_heads
        proj = lambda name: HeadsProjection(self.num_heads, head_dim, self.dtype,  # noqa: E731
                                            self.param_dtype, name=name)(x)
        q, k, v = proj("query"), proj("key"), proj("value")
        if self.add_bias_kv:
            bias_init = nn.initializers.normal(stddev=dim ** -0.5)
            extra = [param(self, n, bias_init, (self.num_heads, head_dim), ("heads", "kv"),
                           self.param_dtype) for n in ("bias_k", "bias_v")]
            extra = [jnp.broadcast_to(e.astype(self.dtype), (batch, 1, self.num_heads, head_dim))
                     for e in extra]
            k = jnp.concatenate([k, extra[0]], axis=1)
            v = jnp.concatenate([v, extra[1]], axis=1)
        q = q * jnp.asarray(head_dim ** -0.5, self.dtype)
        out = attention(q, k, v, dtype=self.dtype)
        kernel = param(self, "out_kernel", xavier_init, (self.num_heads, head_dim, dim),
                       ("heads", "kv", "embed"), self.param_dtype)
        bias = param(self, "out_bias", nn.initializers.zeros, (dim,), ("embed",), self.param_dtype)
        out, kernel, bias = nn.dtypes.promote_dtype(out, kernel, bias, dtype=self.dtype)
        return jnp.einsum("blhk,hkd->bld", out, kernel) + bias


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, axes, name: Dense(n, axes, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                            kernel_init=xavier_init, name=name)
        h = dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x)
        h = nn.gelu(h, approximate=False)  # torch nn.GELU() is the exact erf form
        return dense(x.shape[-1], ("mlp", "embed"), "fc2")(h)


class Block(nn.Module):
    """ImageBind `BlockWithMasking` without mask/layer-scale: pre-LN attention and MLP residuals."""
    num_heads: int
    mlp_ratio: int
    add_bias_kv: bool
    drop_path: float
    ln_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        norm = lambda name: LayerNorm(self.ln_eps, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype, name=name)
        drop = DropPath(self.drop_path, name="drop_path")
        h = MultiheadAttention(self.num_heads, self.add_bias_kv, self.dtype, self.param_dtype,
                               name="attn")(norm("norm_1")(x))
        x = x + drop(h, deterministic)
        h = Mlp(self.mlp_ratio * x.shape[-1], self.dtype, self.param_dtype, name="mlp")(norm("norm_2")(x))
        x = x + drop(h, deterministic)
        return constrain(x, ACTIVATION_AXES)


class Trunk(nn.Module):
    """ImageBind `SimpleTransformer`: optional pre-transformer LN, then the blocks."""
    config: Any  # ImageBindAudioConfig | ImageBindVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if cfg.pre_transformer_ln:
            x = LayerNorm(cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pre_norm")(x)
        for i, rate in enumerate(drop_path_rates(cfg.drop_path, cfg.num_blocks)):
            x = Block(cfg.num_heads, cfg.mlp_ratio, cfg.add_bias_kv, rate, cfg.ln_eps, cfg.dtype,
                      cfg.param_dtype, name=f"block_{i}")(x, deterministic)
        return x


# ----------------------------------------------------------------------------- shared tower pieces

def _add_cls_and_pos(module: nn.Module, tokens: jax.Array, cfg) -> jax.Array:
    """[cls] + patches, plus learned positions (ImageBind's openclip init: N(0, 1/dim))."""
    init = nn.initializers.normal(stddev=cfg.embed_dim ** -0.5)
    cls = param(module, "cls_token", init, (1, 1, cfg.embed_dim), (None, None, "embed"), cfg.param_dtype)
    pos = param(module, "pos_embed", init, (1, cfg.num_tokens, cfg.embed_dim), (None, "length", "embed"),
                cfg.param_dtype)
    cls = jnp.broadcast_to(cls.astype(cfg.dtype), (tokens.shape[0], 1, cfg.embed_dim))
    tokens = jnp.concatenate([cls, tokens.astype(cfg.dtype)], axis=1)
    return constrain(tokens + pos.astype(cfg.dtype), ACTIVATION_AXES)


def _head(module: nn.Module, x: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    """LN -> cls token -> Linear(no bias) -> L2 normalise. Returns (pooled, normalised embedding)."""
    x = LayerNorm(cfg.ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="head_norm")(x)
    pooled = x[:, 0]
    emb = Dense(cfg.out_embed_dim, ("embed", "encoder_embed"), use_bias=False, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, kernel_init=torch_default_init, name="head")(pooled)
    emb = emb.astype(jnp.float32)
    # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return pooled, emb


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], dtype: Dtype) -> jax.Array:
    """Valid, bias-free conv of channels-last `x` with a `[*window, in, out]` kernel."""
    nd = len(strides)
    spatial = "".join("DHW"[-nd:])
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=dtype)
    return jax.lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=dims)


# ----------------------------------------------------------------------------- towers

class ImageBindAudio(nn.Module):
    """Audio fbank clips `[N, 1, mel, frames]` (channels-first, as ImageBind) -> `[N, out_embed_dim]`.

    The output is L2-normalised and scaled by min(exp(log_logit_scale), max_logit_scale) = 20.
    `return_pooled=True` returns `(cls feature after head LN [N, embed_dim], embedding)`.
    """
    config: ImageBindAudioConfig

    @nn.compact
    def __call__(self, fbank: jax.Array, deterministic: bool = True, return_pooled: bool = False):
        cfg = self.config
        if fbank.ndim != 4 or tuple(fbank.shape[1:]) != cfg.input_shape:
            raise ValueError(f"ImageBindAudio: fbank must be [N, {', '.join(map(str, cfg.input_shape))}] "
                             f"(clips, channel, mel bins, frames), got {tuple(fbank.shape)}")
        k = cfg.kernel_size
        kernel = param(self, "stem_kernel", torch_default_init, (k, k, 1, cfg.embed_dim),
                       (None, None, "channels", "embed"), cfg.param_dtype)
        x = _conv(jnp.transpose(fbank, (0, 2, 3, 1)), kernel, (cfg.stride, cfg.stride), cfg.dtype)
        x = x.reshape(x.shape[0], -1, cfg.embed_dim)  # mel-major, as torch's flatten(2)
        x = LayerNorm(cfg.stem_ln_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="stem_norm")(x)
        x = _add_cls_and_pos(self, x, cfg)
        x = Trunk(cfg, name="trunk")(x, deterministic)
        pooled, emb = _head(self, x, cfg)
        log_scale = param(self, "log_logit_scale",
                          nn.initializers.constant(np.log(cfg.logit_scale_init)), (), (),
                          cfg.param_dtype)
        scale = jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)), cfg.max_logit_scale)
        emb = (emb * scale).astype(cfg.dtype)
        return (pooled, emb) if return_pooled else emb


class ImageBindVision(nn.Module):
    """Normalised images `[N, H, W, 3]` (or 2-frame clips `[N, 2, H, W, 3]`) -> unit `[N, out_embed_dim]`.

    A single image is repeated to `num_frames` frames before the temporal-kernel Conv3d, as
    ImageBind's PadIm2Video(pad_type='repeat'). No logit scaling for vision.
    """
    config: ImageBindVisionConfig

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True, return_pooled: bool = False):
        cfg = self.config
        size = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if images.ndim == 4 and tuple(images.shape[1:]) == size:
            images = jnp.repeat(images[:, None], cfg.num_frames, axis=1)
        if images.ndim != 5 or tuple(images.shape[1:]) != (cfg.num_frames, *size):
            raise ValueError(
                f"ImageBindVision: images must be [N, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.in_channels}] or [N, {cfg.num_frames}, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.in_channels}], got {tuple(images.shape)}")
        p = cfg.patch_size
        kernel = param(self, "stem_kernel", torch_default_init,
                       (cfg.num_frames, p, p, cfg.in_channels, cfg.embed_dim),
                       ("frames", None, None, "channels", "embed"), cfg.param_dtype)
        x = _conv(images, kernel, (cfg.num_frames, p, p), cfg.dtype)
        x = x.reshape(x.shape[0], -1, cfg.embed_dim)  # (time, row, col)-major, as torch's flatten(2)
        x = _add_cls_and_pos(self, x, cfg)
        x = Trunk(cfg, name="trunk")(x, deterministic)
        pooled, emb = _head(self, x, cfg)
        emb = emb.astype(cfg.dtype)
        return (pooled, emb) if return_pooled else emb
