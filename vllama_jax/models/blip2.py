"""BLIP-2's frozen image encoder as Video-LLaMA runs it on every frame: EVA ViT -> ln_vision -> Q-Former."""
from __future__ import annotations

import flax.linen as nn
import jax

from vllama_jax.models.common import LayerNorm
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.vit import EvaViT, EvaViTConfig

# BLIP-2's `ln_vision` is its fp16-safe torch.nn.LayerNorm subclass: default eps, computed in fp32.
LN_VISION_EPS = 1e-5


class Blip2ImageEncoder(nn.Module):
    """`images [N, H, W, 3] -> [N, num_query_tokens, hidden]` (32 x 768 for the real presets).

    Params: `visual_encoder` (EvaViT), `ln_vision` (LayerNorm over the ViT width), `qformer`.
    Every ViT token is attended to (LAVIS passes an all-ones `image_atts`).
    """
    vit_config: EvaViTConfig
    qformer_config: QFormerConfig
    ln_vision_eps: float = LN_VISION_EPS

    def __post_init__(self):
        if self.qformer_config.encoder_width != self.vit_config.width:
            raise ValueError(f"Blip2ImageEncoder: qformer_config.encoder_width "
                             f"{self.qformer_config.encoder_width} != vit_config.width {self.vit_config.width}")
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        vit = self.vit_config
        x = EvaViT(vit, name="visual_encoder")(images)
        x = LayerNorm(self.ln_vision_eps, dtype=vit.dtype, param_dtype=vit.param_dtype, name="ln_vision")(x)
        return QFormer(self.qformer_config, name="qformer")(x, None, deterministic=deterministic)
