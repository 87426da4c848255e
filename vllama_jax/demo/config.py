"""The demo's settings (`vllama-demo`; re-exported as `configs/demo.py`): data sizes, tower sizes,
pretraining and stage settings.

`get_config()` is the full demo (about 10 minutes on 2 CPU cores); `get_config("quick")` a tiny
variant that only shows every phase working (CI). `stage_config(demo, branch, stage, ...)` turns
the demo settings into the trainer's ml_collections config of one Video-LLaMA stage, starting
from the reference stage config (`config_lib.video_llama`) so everything not set here is the
paper's recipe.
"""
import ml_collections

from vllama_jax.train import config_lib


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
    if arg not in ("full", "quick"):
        raise ValueError(f"demo config: expected 'full' or 'quick', got {arg!r}")
    quick = arg == "quick"
    c = ml_collections.ConfigDict()
    c.name = arg
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # 512 train clips: with fewer the stage runs memorise the clips instead of reading shape from
    # the frozen tower's features (history: docs/STATUS.md, "The demo").
    c.data.num_train = 16 if quick else 512
    c.data.num_test = 8 if quick else 64
    c.data.num_frames = 8             # sampled of the 16 stored, as the reference's 8
    c.data.image_size = 32            # 4 x 4 patches of 8 px
    c.data.num_audio_clips = 8        # 2-second clips, as ImageBind / the reference
    c.data.conv_seq_len = 160         # stage-2 conversations (5 questions) + media tokens

    # Tower sizes: overrides of each tower's `tiny` preset (config_lib.tiny names them).
    c.towers = ml_collections.ConfigDict()
    # initializer_range 1/sqrt(64) (HF's 0.02 is a 4096-wide model's): word embeddings on the
    # scale of the soft tokens the projections produce.
    c.towers.llama = dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=4,
                          head_dim=16, max_position_embeddings=256, initializer_range=0.125)
    c.towers.vit = dict(patch_size=8, width=64, depth=2, num_heads=4)
    c.towers.qformer = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, encoder_width=64)
    c.towers.video_qformer = dict(hidden_size=64, num_heads=4, intermediate_size=128)
    c.towers.audio_qformer = dict(hidden_size=64, num_heads=4, intermediate_size=128)
    c.towers.imagebind_audio = dict(embed_dim=48, num_blocks=2, num_heads=4, out_embed_dim=64, drop_path=0.0)
    c.num_query_token = 8             # image Q-Former queries per frame
    c.num_video_query_token = 8
    c.num_audio_query_token = 4
    c.vocab_size = 768                # demo tokenizer's cap (BPE over the train text; it runs out of merges ~590)

    def fit(steps, batch_size, lr):
        return ml_collections.ConfigDict(dict(steps=steps, batch_size=batch_size, lr=lr))

    c.pretrain = ml_collections.ConfigDict()
    # The LM needs ~600 steps before it answers from its context (copies the asked attribute's
    # word from the description) rather than guessing.
    c.pretrain.llama = fit(10 if quick else 700, 8, 5e-3)
    # Towers: attribute heads beside the caption bag of words (demo.pretrain.CaptionHeads); the bag
    # alone leaves shape, motion and rhythm out of the features. The image tower learns from its own
    # rendered clips (synthetic.tower_clips: many shape instances at random places), as a ViT needs
    # many shape instances; its shape accuracy sits near 0.45 (two equal-area pairs) for ~300
    # steps before it climbs, and the demo's shape answers follow the tower's: hence 900 steps.
    c.pretrain.vision = fit(10 if quick else 900, 8 if quick else 64, 3e-3)
    c.pretrain.vision_clips = 32 if quick else 8192
    c.pretrain.vision_frames = 2
    # Loss weights of the tower's attribute heads (1 if not named): colour, learned first and
    # easily, otherwise takes over the tiny ViT's features and shape is not learned.
    c.pretrain.attribute_weights = dict(colour=0.1, motion=0.3)
    c.pretrain.audio = fit(10 if quick else 300, 16 if quick else 32, 5e-3)
    # The audio tower's bag of caption words: its summed-over-vocab loss (~20) on the attributes'
    # scale (~1). (The image tower has none: demo.pretrain_towers.)
    c.pretrain.bag_weight = 0.05
    c.pretrain.lm_renderings = 1 if quick else 2   # renderings of each train dialogue in the LM corpus

    # Stage runs: (branch, stage) -> steps, batch, peak lr (warmup-cosine as the reference).
    c.stages = ml_collections.ConfigDict()
    for branch in ("vision", "audio"):
        for stage in (1, 2):
            c.stages[f"{branch}{stage}"] = fit(4 if quick else 120, 8 if quick else 32, 5e-3)
    # The video Q-Former learns motion (an order across frames) from stage 1's captions, slowly:
    # more stage-1 steps are the cheapest way to it.
    c.stages.vision1.steps = 4 if quick else 400
    # Audio stage 2 (beside the video tokens): more updates at half the batch, in the same time.
    if not quick:
        c.stages.audio2.steps, c.stages.audio2.batch_size = 240, 16
    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 6
    c.eval.batch_size = 8 if quick else 32
    c.eval.sample_dialogues = 2 if quick else 3
    c.eval.bucket = 96                # every question prompt (56-72 tokens) pads to one length: one program
    # XLA optimizations off (recipe._compile_settings) only for the quick config's few-step runs:
    # over hundreds of steps optimized code pays for its longer compile.
    c.light_compiles = quick
    return c


def joint_stage(branch: str, stage: int) -> bool:
    """Whether the run trains beside the other medium's (frozen) soft tokens: the audio branch's
    stage 2, with the vision2 run's video tokens after its own, as the chat and the eval present
    them (not the reference, whose audio branch only ever trains alone: the demo's two-layer LM
    does not learn on its own to read audio tokens placed next to video tokens it never trained
    beside). It trains on the questions about both media (recipe.train_stage)."""
    return branch == "audio" and stage == 2


def stage_config(demo: ml_collections.ConfigDict, branch: str, stage: int, *, paths: dict,
                 vocab_size: int) -> ml_collections.ConfigDict:
    """The trainer config of one demo run (`branch` 'vision' | 'audio', `stage` 1 | 2).

    The audio branch trains on the audio itself (`audio_train_input='audio'`), not on frames
    through ImageBind's vision tower as the paper does. `paths`: the pretrained towers, `ckpt`
    (the run this one starts from: stage 1's for stage 2, vision2 for audio1) and, for audio2,
    `ckpt_2` (vision2: the vision branch beside it).
    """
    c = config_lib.tiny(config_lib.video_llama(branch, stage, "vicuna7b"))
    m, d, s = c.model, c.data, demo.stages[f"{branch}{stage}"]
    # The vision runs hold no audio branch (as the reference's vision stages); the audio runs hold
    # both, the vision branch taken from the vision2 run (audio1's `paths.ckpt`, audio2's `ckpt_2`).
    m.equip_audio_branch = branch == "audio"
    m.audio_train_input = "audio"
    m.train_branch = branch
    m.overrides = ml_collections.ConfigDict({k: dict(v) for k, v in demo.towers.items()})
    m.overrides.llama = dict(demo.towers.llama, vocab_size=vocab_size)
    m.vocab_size = vocab_size
    m.num_query_token = demo.num_query_token
    m.num_video_query_token = demo.num_video_query_token
    m.num_audio_query_token = demo.num_audio_query_token
    m.max_frame_pos = demo.data.num_frames
    m.max_txt_len = 24 if stage == 1 else demo.data.conv_seq_len
    d.num_frames = demo.data.num_frames
    d.image_size = demo.data.image_size
    d.num_audio_clips = demo.data.num_audio_clips
    d.num_query_placeholders = demo.num_video_query_token if branch == "vision" else demo.num_audio_query_token
    if joint_stage(branch, stage):
        m.train_with_media = ("video",)
        d.num_query_placeholders = demo.num_video_query_token + demo.num_audio_query_token
    d.seq_len = 0 if stage == 1 else demo.data.conv_seq_len
    # Every answer a target: the reference's vicuna mask drifts by two tokens per turn with this
    # tokenizer, which leaves one-word answers after the first turns untrained (and trains on
    # question tokens instead); the demo's model is trained from scratch, so it needs no drift.
    d.aligned_targets = True
    d.datasets = ml_collections.ConfigDict()
    d.dataset_shards = ml_collections.ConfigDict()
    c.paths.prompt_path = ""          # the demo's stage 2 is conversations only
    for k, v in paths.items():
        c.paths[k] = v
    o = c.optim
    o.init_lr, o.min_lr, o.warmup_lr = s.lr, s.lr * 0.1, s.lr * 0.01
    o.warmup_steps, o.iters_per_epoch, o.max_epoch = max(s.steps // 10, 1), s.steps, 1
    o.weight_decay = 0.05
    t = c.train
    t.batch_size, t.total_steps, t.seed = s.batch_size, s.steps, demo.seed + 10 * stage + (branch == "audio")
    t.log_every, t.save_every = max(s.steps // 15, 1), 0
    c.checkpoint.save_frozen = False  # the towers come from paths.*
    c.checkpoint.async_save = False
    c.checkpoint.max_to_keep = 1
    # No dropout in the Q-Formers (the reference has 0.1): on a CPU its random masks double the
    # compile time of a train step, and the demo's clips do not need it.
    m.dropout = 0.0
    return c
