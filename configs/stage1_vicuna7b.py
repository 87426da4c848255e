"""Stage 1 (vision branch) video/image-caption pretraining on Vicuna-7B.

Reference: DAMO-NLP-SG/Video-LLaMA train_configs/visionbranch_stage1_*.yaml.
"""
from vllama_jax.train import config_lib


def get_config():
    return config_lib.video_llama("vision", 1, "vicuna7b")
