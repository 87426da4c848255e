"""Stage 1 (vision branch) with the towers' tiny presets: a few CPU steps end to end."""
from vllama_jax.train import config_lib


def get_config():
    return config_lib.tiny(config_lib.video_llama("vision", 1, "vicuna7b"))
