"""Stage 2 (vision branch) instruction tuning on Vicuna-7B.

Reference: DAMO-NLP-SG/Video-LLaMA train_configs/visionbranch_stage2_*.yaml.
"""
from vllama_jax.train import config_lib


def get_config():
    return config_lib.video_llama("vision", 2, "vicuna7b")
