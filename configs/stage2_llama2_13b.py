"""Stage 2 (vision branch) on Llama-2-13B-chat: the stage2_llama2_7b recipe with the 13B backbone.

The reference has one train_configs/visionbranch_stage2_*.yaml for every backbone (only the
`llama_model` path differs), so everything but the LLaMA preset (40 layers, width 5120, 40 heads,
and with it llama_proj's output width) is the 7B recipe.
"""
from vllama_jax.train import config_lib


def get_config():
    c = config_lib.video_llama("vision", 2, "llama2_7b")
    c.model.llama = "llama2_13b"
    return c
