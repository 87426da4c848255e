"""EVA ViT-g/14 as BLIP-2 (LAVIS `create_eva_vit_g`) and Video-LLaMA use it: the frozen frame encoder.

Pre-norm ViT blocks with q/v biases (no k bias), absolute position embeddings, no final norm
(BLIP-2 applies its own `ln_vision` outside, see `vllama_jax.models.blip2`). The released
checkpoint has 40 blocks; BLIP-2 builds 39 and drops the last one when loading.

Input images are `[N, H, W, 3]`, channels-last and already normalized; the output is the token
sequence `[N, 1 + P, width]` (class token first, then patches in row-major order). Images whose
patch grid differs from the configured one get the position embedding resampled on the fly with
the same bicubic kernel LAVIS' `interpolate_pos_embed` uses at load time.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.models import scan as layer_scan
from vllama_jax.models.common import Dense, Dtype, LayerNorm, Preset, attention, constrain, param

# The LAVIS ViT initialises its Linear layers with a std-0.02 normal (timm's trunc_normal_ cuts at
# +-2 absolute, i.e. effectively untruncated) and shrinks the residual branches per depth.
_init = nn.initializers.normal(stddev=0.02)
# torch.nn.Conv2d's default (kaiming_uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
_patch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class EvaViTConfig(Preset):
    img_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    num_heads: int = 16
    # LAVIS passes the ratio and truncates: int(1408 * 4.3637) = 6144.
    mlp_ratio: float = 4.3637
    layer_norm_eps: float = 1e-6
    in_channels: int = 3
    remat: bool = False
    # One nn.scan over the blocks: params stacked as `blocks/...` [depth, ...] (the LAVIS
    # converter stacks / unstacks them); compile time independent of depth.
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"EvaViTConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"EvaViTConfig: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def presets(cls):
        return PRESETS


PRESETS = {
    "eva_vit_g": EvaViTConfig(),
    # mlp_ratio 4 keeps the tiny mlp dim (256) divisible by any test mesh's tensor axis.
    "tiny": EvaViTConfig(img_size=28, patch_size=14, width=64, depth=2, num_heads=4, mlp_ratio=4.0),
}


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's a = -0.75."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` weights of torch's 1-D bicubic resize (align_corners=False, no antialias).

    Source coordinates are not clamped (torch clamps only for linear modes); out-of-range taps
    take the border sample.
    """
    out = np.arange(out_size, dtype=np.float64)
    src = (out + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    frac = src - base
    weights = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(weights, (np.arange(out_size), idx), _cubic(frac - (tap - 1)))
    return weights.astype(np.float32)


def interpolate_pos_embed(pos_embed, new_grid: tuple[int, int], num_extra_tokens: int = 1):
    """Resamples `[1, extra + g*g, D]` position embeddings to a `new_grid = (gh, gw)` patch grid.

    Matches LAVIS `interpolate_pos_embed` (torch bicubic, align_corners=False) on the patch part
    and keeps the class token as is. Works on numpy and jax arrays; the result is float32.
    """
    xp = jnp if isinstance(pos_embed, jax.Array) else np
    n = pos_embed.shape[-2] - num_extra_tokens
    old = math.isqrt(n)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or old * old != n:
        raise ValueError(f"pos_embed: expected [1, {num_extra_tokens} + g*g, D] with a square patch grid, "
                         f"got shape {tuple(pos_embed.shape)}")
    extra = pos_embed[:, :num_extra_tokens].astype(xp.float32)
    if (old, old) == tuple(new_grid):
        return pos_embed.astype(xp.float32)
    grid = pos_embed[0, num_extra_tokens:].astype(xp.float32).reshape(old, old, -1)
    rows, cols = bicubic_matrix(old, new_grid[0]), bicubic_matrix(old, new_grid[1])
    grid = xp.einsum("ih,jw,hwd->ijd", rows, cols, grid)
    return xp.concatenate([extra, grid.reshape(1, new_grid[0] * new_grid[1], -1)], axis=1)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """`[N, H, W, C]` -> `[N, H/p * W/p, p*p*C]`, patches row-major, each flattened as (y, x, c)."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


class Attention(nn.Module):
    config: EvaViTConfig
    out_init: nn.initializers.Initializer = _init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_init)
        split = lambda y: constrain(y.reshape(*y.shape[:2], cfg.num_heads, cfg.head_dim),
                                    ("batch", "length", "heads", "kv"))
        # EVA has learned q and v biases but a fixed zero k bias.
        q = split(dense(cfg.width, ("embed", "heads"), name="query")(x))
        k = split(dense(cfg.width, ("embed", "heads"), use_bias=False, name="key")(x))
        v = split(dense(cfg.width, ("embed", "heads"), name="value")(x))
        y = attention(q * jnp.asarray(cfg.head_dim ** -0.5, q.dtype), k, v, dtype=cfg.dtype)
        y = y.reshape(*y.shape[:2], cfg.width)
        return Dense(cfg.width, ("heads", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernel_init=self.out_init, name="proj")(y)


def _residual_out_init(layer_id: int | jax.Array) -> nn.initializers.Initializer:
    """LAVIS' fix_init_weight: residual output layers divided by sqrt(2 * (layer_id + 1)).

    Under `scan_layers` the layer id is a traced scan input, so the scale is applied to a
    std-0.02 draw instead of being folded into the initializer's std.
    """
    if isinstance(layer_id, int):
        return nn.initializers.normal(stddev=0.02 / math.sqrt(2.0 * (layer_id + 1)))

    def init(key, shape, dtype=jnp.float32):
        scale = jax.lax.rsqrt(2.0 * (layer_id.astype(jnp.float32) + 1.0))
        return (_init(key, shape, jnp.float32) * scale).astype(dtype)
    return init


class Block(nn.Module):
    """A pre-norm block. With `scan_form` it is nn.scan's body: `(x, layer_id) -> (x, None)`."""
    config: EvaViTConfig
    layer_id: int = 0
    scan_form: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, layer_id: jax.Array | None = None):
        cfg = self.config
        norm = functools.partial(LayerNorm, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        out_init = _residual_out_init(self.layer_id if layer_id is None else layer_id)
        x = x + Attention(cfg, out_init, name="attn")(norm(name="norm1")(x))
        h = Dense(cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=_init, name="fc1")(norm(name="norm2")(x))
        h = nn.gelu(h, approximate=False)
        h = Dense(cfg.width, ("mlp", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=out_init, name="fc2")(h)
        x = constrain(x + h, ("batch", "length", "embed"))
        return (x, None) if self.scan_form else x


def check_images(images: jax.Array, config: EvaViTConfig) -> None:
    if images.ndim != 4:
        raise ValueError(f"images: expected [N, H, W, {config.in_channels}] (channels-last), "
                         f"got shape {tuple(images.shape)}")
    _, h, w, c = images.shape
    if c != config.in_channels:
        raise ValueError(f"images: expected {config.in_channels} channels in the last dim "
                         f"(channels-last [N, H, W, C]), got shape {tuple(images.shape)}")
    if h % config.patch_size or w % config.patch_size:
        raise ValueError(f"images: height and width must be multiples of the patch size "
                         f"{config.patch_size}, got {h}x{w}")


class EvaViT(nn.Module):
    """`images [N, H, W, 3] -> tokens [N, 1 + (H/p)*(W/p), width]` (LAVIS `VisionTransformer.forward`).

    Params: `patch_embed` (a Dense over flattened `(y, x, c)` patches), `cls_token [1,1,D]`,
    `pos_embed [1, 1+P, D]` for the configured `img_size`, `blocks_{i}` (or, with
    `scan_layers`, `blocks` stacked on a leading `'layers'` axis).
    """
    config: EvaViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        check_images(images, cfg)
        n, h, w, _ = images.shape
        grid = (h // cfg.patch_size, w // cfg.patch_size)
        x = patchify(images.astype(cfg.dtype), cfg.patch_size)
        x = Dense(cfg.width, ("patch", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=_patch_init, name="patch_embed")(x)
        cls = param(self, "cls_token", _init, (1, 1, cfg.width), (None, None, "embed"), cfg.param_dtype)
        pos = param(self, "pos_embed", _init, (1, cfg.num_patches + 1, cfg.width),
                    (None, "length", "embed"), cfg.param_dtype)
        if grid != (cfg.grid_size, cfg.grid_size):
            pos = interpolate_pos_embed(pos, grid)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.dtype), (n, 1, cfg.width)), x], axis=1)
        x = constrain(x + pos.astype(cfg.dtype), ("batch", "length", "embed"))
        block = nn.remat(Block, prevent_cse=not cfg.scan_layers) if cfg.remat else Block
        if cfg.scan_layers:
            blocks = layer_scan.scan(block, cfg.depth, in_axes=(0,))(cfg, scan_form=True, name="blocks")
            x, _ = blocks(x, jnp.arange(cfg.depth))
            return x
        for i in range(cfg.depth):
            x = block(cfg, layer_id=i, name=f"blocks_{i}")(x)
        return x
