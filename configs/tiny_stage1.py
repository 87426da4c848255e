"""Stage 1 (vision branch) with the towers' tiny presets: a few CPU steps end to end, on the shards
and the tokenizer the project writes:

  vllama-prepare-data demo --data-dir data --num-train 64 --num-test 16
  vllama-prepare-data tokenizer --shards 'data/vllama_demo/1.0.0/*-instruct_train.array_record*' --out data/tokenizer
  vllama-train --config configs/tiny_stage1.py --workdir runs/tiny1 \
      --config.data.shards='data/vllama_demo/1.0.0/vllama_demo-caption_train.array_record*' \
      --config.paths.tokenizer=data/tokenizer
"""
from data_pipelines import records
from vllama_jax.train import config_lib


def get_config():
    c = config_lib.tiny(config_lib.video_llama("vision", 1, "vicuna7b"))
    c.data.datasets = {}                  # one set of shards: config.data.shards
    c.data.dataset_shards = {}
    c.data.num_audio_clips = records.NUM_AUDIO_CLIPS   # what vllama-prepare-data stores by default
    return c
