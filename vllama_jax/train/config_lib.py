"""Building blocks of the ml_collections training configs in `configs/`.

`base_config()` holds every field the trainer reads, with defaults; `video_llama(...)` fills in
one Video-LLaMA stage from the reference `train_configs/*.yaml` of DAMO-NLP-SG/Video-LLaMA
(visionbranch_stage{1,2}, audiobranch_stage{1,2}); the files in `configs/` pick a stage and a
backbone. Tower sizes are referenced by preset name (`vllama_jax.models.*.PRESETS`).
"""
from __future__ import annotations

import ml_collections

VICUNA_TEMPLATE = "###Human: {} ###Assistant: "
LLAMA2_TEMPLATE = "[INST] <<SYS>>\n \n<</SYS>>\n\n{} [/INST] "

# Reference `run:` sections. Batch sizes are per GPU in the yaml; the reference runs used 8 GPUs,
# so the global batch here is 8x. Warmup and epochs count optimizer steps.
_RUNS = {
    ("vision", 1): dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=2500,
                        iters_per_epoch=2500, max_epoch=5, batch_per_gpu=32),
    ("vision", 2): dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=1000,
                        iters_per_epoch=1000, max_epoch=3, batch_per_gpu=4),
    ("audio", 1): dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000,
                       iters_per_epoch=5000, max_epoch=5, batch_per_gpu=32),
    ("audio", 2): dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=400,
                       iters_per_epoch=1000, max_epoch=3, batch_per_gpu=4),
}
REFERENCE_GPUS = 8

# Reference `datasets:` per stage (name -> sample_ratio; None: not given).
_DATASETS = {
    1: {"webvid": 100, "cc_sbu_align": 24},   # WebVid-2M captions + LLaVA CC-595k
    2: {"cc_sbu_align": None, "llava_instruct": None, "webvid_instruct": None},
}
# max_txt_len: stage 1 uses the model default (32); stage 2 sets it per branch.
_MAX_TXT_LEN = {("vision", 1): 32, ("vision", 2): 320, ("audio", 1): 32, ("audio", 2): 512}

_BACKBONES = {
    "vicuna7b": dict(llama="llama_7b", template=VICUNA_TEMPLATE, end_sym="###", conv_style="vicuna"),
    "llama2_7b": dict(llama="llama2_7b", template=LLAMA2_TEMPLATE, end_sym="</s>", conv_style="llama_v2"),
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.task = ml_collections.ConfigDict()
    # 'module:function' called with the whole config, returning a vllama_jax.train.task.Task.
    c.task.builder = "vllama_jax.train.video_llama_task:build_task"

    c.model = ml_collections.ConfigDict()
    c.model.llama = "llama_7b"
    c.model.vocab_size = 0           # 0: the LLaMA preset's; else the embedding table size (>= the tokenizer's)
    c.model.vit = "eva_vit_g"
    c.model.qformer = "blip2_qformer"
    c.model.video_qformer = "video_qformer"
    c.model.audio_qformer = "audio_qformer"
    c.model.imagebind_audio = "imagebind_audio_huge"
    c.model.imagebind_vision = "imagebind_vision_huge"
    # Query tokens (the reference's names): the frozen BLIP-2 image Q-Former's per frame, and the
    # trained video / audio Q-Formers', which are the soft tokens each branch puts into the LLM
    # (so a prompt holds that many <ImageHere> placeholders: data.num_query_placeholders).
    c.model.num_query_token = 32
    c.model.num_video_query_token = 32
    c.model.num_audio_query_token = 8
    c.model.max_frame_pos = 32
    c.model.equip_audio_branch = False
    # The branch this run trains (vllama_jax.models.video_llama.BRANCHES declares what each trains);
    # the reference's frozen_video_Qformer / frozen_llama_proj / frozen_audio_Qformer flags.
    c.model.train_branch = "vision"
    c.model.max_txt_len = 32
    c.model.end_sym = "###"
    c.model.prompt_template = VICUNA_TEMPLATE
    c.model.conv_style = "vicuna"
    c.model.remat = False            # rematerialise tower blocks in the backward pass
    c.model.dropout = 0.1
    # Loss logits over the vocab computed this many positions at a time (0: all [B, L, vocab] at once).
    c.model.loss_chunk = 128

    c.paths = ml_collections.ConfigDict()
    c.paths.llama_model = ""         # HF LLaMA/Vicuna directory (weights + tokenizer)
    c.paths.tokenizer = ""           # defaults to llama_model when empty
    c.paths.blip2 = ""               # LAVIS EVA ViT-g + BLIP-2 Q-Former .pth
    c.paths.imagebind = ""           # imagebind_huge.pth
    c.paths.llama_proj_model = ""    # MiniGPT-4 checkpoint, initialises llama_proj (stage 1)
    c.paths.ckpt = ""                # an earlier run's workdir whose trained params start this one (stage 2: stage 1's)
    c.paths.ckpt_2 = ""              # a second one, applied after ckpt (e.g. the other branch's run)
    c.paths.prompt_path = ""

    c.data = ml_collections.ConfigDict()
    # 'module:function' called with the config: a train iterator with get_state/set_state
    # (a grain DatasetIterator), and a zero-argument-per-call eval iterator factory.
    c.data.train_builder = "data_pipelines.loader:build_train_iter"
    c.data.eval_builder = ""
    c.data.datasets = ml_collections.ConfigDict()   # name -> sample ratio (-1: by dataset size)
    c.data.num_frames = 8
    c.data.image_size = 224
    c.data.num_audio_clips = 8
    c.data.shards = ""               # ArrayRecord shard glob; may contain '{name}' (a dataset name)
    c.data.dataset_shards = ml_collections.ConfigDict()   # name -> glob, overrides `shards`
    c.data.eval_shards = ""          # shards for data.eval_builder (data_pipelines.loader:build_eval_iter)
    c.data.read_threads = 2
    c.data.worker_count = 0          # grain worker processes (0: threads only)
    c.data.seq_len = 0               # padded text length (0: from max_txt_len)
    # <ImageHere> tokens per prompt: the soft tokens of the media the loss trains on, i.e. the
    # trained branch's model.num_{video,audio}_query_token (train.preflight checks it).
    c.data.num_query_placeholders = 32
    c.data.pack = False              # several examples per row (data_pipelines.packing)
    # With pack: media slots per global batch (0: 2 x train.batch_size). The frozen towers encode
    # every slot, empty or not, so size it for the examples a batch holds: LLaVA-like lengths in
    # 512-token rows average 1.4 examples per row (benchmarks/packing.py); a batch that runs out of
    # slots closes early (no example is dropped). Must divide by the processes and accum_steps.
    c.data.media_per_batch = 0

    c.freeze = ml_collections.ConfigDict()
    # What trains beyond the task's own declaration (a Video-LLaMA task: model.train_branch).
    c.freeze.preset = ""                # vllama_jax.train.partition.TRAINABLE_PRESETS
    c.freeze.patterns = ()              # extra trainable regexes over '/'-joined param paths

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr_sched = "linear_warmup_cosine_lr"
    c.optim.init_lr = 1e-4
    c.optim.min_lr = 8e-5
    c.optim.warmup_lr = 1e-6
    c.optim.warmup_steps = 2500
    c.optim.iters_per_epoch = 2500
    c.optim.max_epoch = 5
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 0.0     # 0: off (the reference does not clip)

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 0          # 0: max_epoch * iters_per_epoch
    c.train.batch_size = 256         # global
    c.train.accum_steps = 1
    c.train.seed = 42
    c.train.log_every = 50
    c.train.save_every = 1000
    c.train.eval_every = 0
    c.train.compute_dtype = "bfloat16"
    c.train.frozen_dtype = "bfloat16"   # the reference kept the LLM in bf16
    c.train.progress = True
    c.train.tensorboard = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.save_frozen = False    # frozen towers come from paths.*; True for random-init runs

    # Train on precomputed outputs of the frozen towers (vllama_jax.train.feature_cache): built
    # once into `path` from data.shards with eval transforms (one fixed view per example).
    c.feature_cache = ml_collections.ConfigDict()
    c.feature_cache.enabled = False
    c.feature_cache.path = ""
    c.feature_cache.source_builder = ""   # 'module:function' -> finite batches (default: the shards)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)        # (data, fsdp, tensor): FSDP over all devices
    return c


def video_llama(branch: str, stage: int, backbone: str) -> ml_collections.ConfigDict:
    """One reference stage: branch 'vision' | 'audio', stage 1 | 2, backbone 'vicuna7b' | 'llama2_7b'."""
    if (branch, stage) not in _RUNS:
        raise ValueError(f"unknown stage {branch!r} {stage!r}; known: {sorted(_RUNS)}")
    if backbone not in _BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(_BACKBONES)}")
    c = base_config()
    run, bb = _RUNS[(branch, stage)], _BACKBONES[backbone]
    for k in ("init_lr", "min_lr", "warmup_lr", "warmup_steps", "iters_per_epoch", "max_epoch"):
        c.optim[k] = run[k]
    c.train.batch_size = run["batch_per_gpu"] * REFERENCE_GPUS
    c.model.llama = bb["llama"]
    c.model.prompt_template = bb["template"]
    c.model.end_sym = bb["end_sym"]
    c.model.conv_style = bb["conv_style"]
    c.model.max_txt_len = _MAX_TXT_LEN[(branch, stage)]
    c.data.datasets = ml_collections.ConfigDict(
        {k: -1 if v is None else v for k, v in _DATASETS[stage].items()})
    c.data.dataset_shards = ml_collections.ConfigDict({k: "" for k in _DATASETS[stage]})
    audio = branch == "audio"
    c.model.equip_audio_branch = audio
    c.model.train_branch = branch
    # Audio-branch training feeds frames through ImageBind's vision tower into the audio
    # Q-Former: the prompt carries num_audio_query_token (8) placeholders.
    c.data.num_query_placeholders = c.model.num_audio_query_token if audio else c.model.num_video_query_token
    c.paths.prompt_path = "prompts/alignment_image.txt" if stage == 2 else ""
    return c


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a stage config to the towers' `tiny` presets and a few CPU steps."""
    m = config.model
    m.llama, m.vit, m.qformer = "tiny", "tiny", "tiny"
    m.video_qformer, m.audio_qformer = "tiny_video", "tiny_audio"
    m.imagebind_audio, m.imagebind_vision = "tiny", "tiny"
    m.num_query_token, m.num_video_query_token, m.num_audio_query_token = 4, 4, 2
    m.max_frame_pos = 4
    m.max_txt_len = 16
    # Fits the tokenizers the project makes (data_pipelines.tokenizer.build_demo_tokenizer, <= 1024
    # ids); the tiny preset's 256 is smaller than any of them (3 specials + 256 byte pieces + ASCII).
    m.vocab_size = 1024
    config.data.num_frames = 2
    config.data.image_size = 28
    config.data.num_audio_clips = 2
    config.data.num_query_placeholders = (m.num_audio_query_token if m.train_branch == "audio"
                                          else m.num_video_query_token)
    o = config.optim
    o.warmup_steps, o.iters_per_epoch, o.max_epoch = 2, 5, 2
    t = config.train
    t.batch_size, t.log_every, t.save_every = 8, 2, 5
    t.compute_dtype, t.frozen_dtype = "float32", ""
    config.checkpoint.save_frozen = True
    config.mesh.shape = (-1, 1, 1)
    return config


def dtype_of(name):
    """The jnp dtype a config's dtype field names (`train.compute_dtype`, `train.frozen_dtype`);
    None where it is unset (None, '', 'none')."""
    if name in (None, "", "none", "None"):
        return None
    import jax.numpy as jnp   # lazily: configs are built without jax
    return jnp.dtype(name)
