"""Audio branch (Vicuna-7B): stage 1 by default, `configs/audio_branch.py:2` for stage 2.

Only the audio Q-Former, its query tokens and position embedding and `audio_llama_proj` train;
frames go through ImageBind's vision tower into the audio Q-Former (the reference `train_flag=1`).
Reference: DAMO-NLP-SG/Video-LLaMA train_configs/audiobranch_stage{1,2}_*.yaml.
"""
from vllama_jax.train import config_lib


def get_config(arg: str = "1"):
    stage, _, backbone = arg.partition(",")
    return config_lib.video_llama("audio", int(stage), backbone or "vicuna7b")
