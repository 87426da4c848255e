"""Stage 2 (vision branch) with the towers' tiny presets: a few CPU steps end to end, on the shards
and the tokenizer the project writes (see configs/tiny_stage1.py), e.g. after tiny_stage1:

  vllama-train --config configs/tiny_stage2.py --workdir runs/tiny2 \
      --config.data.shards='data/vllama_demo/1.0.0/vllama_demo-instruct_train.array_record*' \
      --config.paths.tokenizer=data/tokenizer --config.paths.ckpt=runs/tiny1
"""
from data_pipelines import records
from vllama_jax.train import config_lib


def get_config():
    c = config_lib.tiny(config_lib.video_llama("vision", 2, "vicuna7b"))
    c.data.datasets = {}                  # one set of shards: config.data.shards
    c.data.dataset_shards = {}
    c.data.num_audio_clips = records.NUM_AUDIO_CLIPS   # what vllama-prepare-data stores by default
    return c
