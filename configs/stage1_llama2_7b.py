"""Stage 1 (vision branch) pretraining on Llama-2-7B-chat.

Reference: DAMO-NLP-SG/Video-LLaMA train_configs/visionbranch_stage1_*.yaml.
"""
from vllama_jax.train import config_lib


def get_config():
    return config_lib.video_llama("vision", 1, "llama2_7b")
