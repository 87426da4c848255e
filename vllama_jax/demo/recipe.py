"""The demo: Video-LLaMA's recipe in miniature on the synthetic audio-visual set, on a CPU.

    1. data       synthetic clips (data_pipelines/synthetic.py): colour, shape and motion only
                  visible; pitch and rhythm only audible; written as ArrayRecord shards
    2. towers     tiny stand-ins for the pretrained towers (vllama_jax/demo/pretrain.py): a LLaMA
                  pretrained as a language model on the train text, an EVA ViT + image Q-Former
                  (on many short clips rendered for it alone) and an ImageBind audio tower (on
                  the train audio) pretrained on their modality; saved as the real
                  ones ship (HF directory, LAVIS- and ImageBind-keyed state dicts), then frozen
    3. stage 1    video-caption pretraining of the vision branch (video Q-Former, frame position
                  embedding, query tokens, llama_proj) and the audio branch (audio Q-Former, its
                  position embedding and query tokens, audio_llama_proj), one run each, with the
                  trainer (vllama_jax/train) on the frozen towers' cached outputs; each branch
                  on captions of its own medium (what is seen / what is heard)
    4. stage 2    instruction tuning of each branch on questions about its own medium, from its
                  stage-1 run; the audio branch's with the vision branch's video tokens in its
                  prompts (demo_config.joint_stage), as the eval and the chat present both
    5. evaluate   held-out clips (test split): every question answered by generation with the
                  audio and video soft tokens together (vllama_jax/evaluate/), and with each
                  medium alone, accuracy per attribute vs chance; a few dialogues through the
                  Chat library on a test mp4

Deviation from the paper (on purpose): the paper trains the audio branch on video-text data with
ImageBind's *vision* encoder standing in for audio (ImageBind's shared embedding space); the demo's
tiny ImageBind has no shared space, so its audio branch trains on the audio itself.
Another simplification: each training example has one fixed view of its media (uniform frames, no
random crops), so the frozen towers run once per example (vllama_jax/train/feature_cache.py).

Everything is a function of the seed: rerunning with the same seed gives the same numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from vllama_jax.machine import describe as describe_machine, machine_facts

DEVIATION = ("The audio branch trains on the audio itself (ImageBind audio tower -> audio Q-Former), "
             "not on frames through ImageBind's vision tower as in the paper (the demo's tiny ImageBind "
             "has no shared embedding space).")
DATA_SPLITS = ("caption_train", "instruct_train", "caption_seen_train", "instruct_seen_train",
               "caption_heard_train", "instruct_heard_train", "instruct_test")
PHASES = ("data", "tokenizer", "pretrain", "vision1", "vision2", "audio1", "audio2", "evaluate")


def load_demo_config(name: str = "full"):
    """(`vllama_jax.demo.config`, its `get_config(name)`)."""
    from vllama_jax.demo import config as demo_config

    return demo_config, demo_config.get_config(name)


@dataclasses.dataclass
class Layout:
    """Where the demo writes everything under its work directory."""
    root: Path

    def __post_init__(self):
        self.root = Path(self.root).resolve()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def media(self) -> Path:
        return self.root / "media"

    @property
    def towers(self) -> Path:
        return self.root / "towers"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    def shards(self, split: str) -> str:
        return str(self.data / f"vllama_demo-{split}.array_record-?????-of-?????")


class _Phases:
    """Phase banners with wall times (printed, and kept for the summary)."""

    def __init__(self, out):
        self.out = out
        self.times: dict[str, float] = {}

    def __call__(self, name: str, what: str):
        return _Phase(self, name, what)


class _Phase:
    def __init__(self, phases, name, what):
        self.phases, self.name, self.what = phases, name, what

    def __enter__(self):
        self.start = time.perf_counter()
        self.phases.out(f"\n== [{self.name}] {self.what}")
        return self

    def __exit__(self, *exc):
        took = time.perf_counter() - self.start
        self.phases.times[self.name] = round(took, 1)
        if exc[0] is None:
            self.phases.out(f"== [{self.name}] done in {took:.1f} s")


# ------------------------------------------------------------------------------------ data

def build_data(layout: Layout, demo, workers: int, out) -> dict:
    from data_pipelines import synthetic

    d = demo.data
    results = synthetic.write_splits(str(layout.media), str(layout.data), num_train=d.num_train,
                                     num_test=d.num_test, seed=demo.seed, num_workers=workers, progress=True)
    counts = {r.split: r.num_written for r in results}
    skipped = {r.split: r.num_inputs - r.num_written for r in results if r.num_inputs != r.num_written}
    if skipped:
        raise RuntimeError(f"the synthetic writer skipped clips: {skipped}")
    out(f"   clips written: {counts}")
    return counts


def _records(pattern: str) -> list[dict]:
    from data_pipelines.loader import ShardSource

    source = ShardSource([pattern])
    return [source[i] for i in range(len(source))]


def lm_corpus(records: list[dict], renderings: int, num_frames: int, seed: int) -> list[list[str]]:
    """Texts for the language model, one list per train clip: its captions (every view), and its dialogue
    rendered `renderings` times in the layouts the model meets (the training conversation, the
    eval's single question, the chat's audio+video message), the media described in words.

    The training conversation and single question talk about a random view (synthetic.VIEWS):
    everything, only what is seen, or only what is heard, described accordingly, as the vision
    branch's and the audio branch's training text and the eval's audio+video prompt."""
    from data_pipelines import prompts
    from data_pipelines import synthetic
    from data_pipelines import video
    from vllama_jax import chat

    groups = []
    for k, ex in enumerate(records):
        texts = []
        groups.append(texts)
        attrs = {a: ex["meta"][a] for a in synthetic.ATTRIBUTES}
        seen, heard = synthetic.caption(attrs, "seen"), synthetic.caption(attrs, "heard")
        times = np.asarray(ex["frame_times"], np.float32)[
            video.sample_indices(len(ex["frames"]), num_frames, "uniform")]
        time_msg = prompts.video_time_message(times)
        texts += [synthetic.caption(attrs, view) for view in synthetic.VIEWS]
        rng = np.random.default_rng([seed, 7, k])
        for _ in range(renderings):
            view = list(synthetic.VIEWS)[rng.integers(len(synthetic.VIEWS))]
            described = {"seen": seen, "heard": heard,
                         "all": f"{heard} {seen}" if rng.random() < 0.5 else f"{seen} {heard}"}[view]
            turns = synthetic.conversation(attrs, rng, view)
            layout = rng.integers(3)
            if layout == 0:      # the training conversation (loader: insert_media + vicuna_text)
                media = prompts.insert_media(turns, "video", 1, time_msg)
                texts.append(prompts.vicuna_text(media)[0].replace(prompts.IMAGE_PLACEHOLDER, described))
            elif layout == 1:    # one question (evaluate.runner.qa_prompt) with its answer
                q = int(rng.integers(len(turns) // 2))
                prompt = (prompts.vicuna_text(prompts.insert_media([turns[2 * q]], "video", 1, time_msg))[0]
                          + "Assistant:")
                texts.append(prompt.replace(prompts.IMAGE_PLACEHOLDER, described) + " "
                             + turns[2 * q + 1]["value"] + "###")
            else:                # the chat's audio+video upload, then every question
                conv = chat.new_conversation("vicuna")
                message = chat.AUDIO_VIDEO_MESSAGE.replace(prompts.IMAGE_PLACEHOLDER, heard, 1)
                message = message.replace(prompts.IMAGE_PLACEHOLDER, seen, 1)
                turns = ex["conversations"]
                for i in range(0, len(turns), 2):
                    q = turns[i]["value"].replace(prompts.IMAGE_PLACEHOLDER, "").strip()
                    conv.append_message(conv.roles[0], f"{message} {q}" if i == 0 else q)
                    conv.append_message(conv.roles[1], turns[i + 1]["value"])
                texts.append(conv.get_prompt())
    return groups


# ------------------------------------------------------------------------------------ towers

def _loader_batches(train_config, pattern: str, batch_size: int):
    """One pass over `pattern` with the stage's eval transforms (fixed view per example), in order."""
    from data_pipelines import loader

    lc = dataclasses.replace(loader.loader_config_from(train_config, train=False), batch_size=batch_size,
                             drop_remainder=False, shuffle=False, num_epochs=1, keep_ids=True)
    return loader.make_loader(loader.DatasetSpec(paths=(pattern,), name=Path(pattern).name), lc,
                              loader._encoder_from(train_config), shard_index=0, shard_count=1)


def _clip_ids(ids) -> list[str]:
    # caption and instruct records of one clip differ only in the id's last part.
    return [str(i).rsplit("/", 1)[0] for i in ids]


def pretrain_towers(layout: Layout, demo, demo_module, vocab_size: int, records: list[dict], out):
    """Pretrains and saves the three towers; returns (config.paths entries, histories, the train
    clips' media arrays, the tower params). `records`: the instruct_train records (`_records`)."""
    from data_pipelines import synthetic
    from vllama_jax.demo import pretrain
    from vllama_jax.train.video_llama_task import model_config

    # The audio runs' config equips every tower.
    probe = demo_module.stage_config(demo, "audio", 1, paths={"tokenizer": str(layout.tokenizer)},
                                     vocab_size=vocab_size)
    vconfig = model_config(probe)
    tokenizer = _tokenizer(layout.tokenizer)
    histories = {}

    def fit_config(name):
        f = demo.pretrain[name]
        return pretrain.FitConfig(steps=f.steps, batch_size=f.batch_size, lr=f.lr, log_every=max(f.steps // 20, 1))

    groups = lm_corpus(records, demo.pretrain.lm_renderings, demo.data.num_frames, demo.seed)
    corpus = pretrain.tokenize_corpus(groups, tokenizer, vconfig.llama.max_position_embeddings)
    out(f"   language model: {sum(map(len, groups))} texts, {int(corpus['attention_mask'].sum())} tokens "
        f"in {len(corpus['input_ids'])} rows")
    llama, histories["llama"] = pretrain.pretrain_llama(vconfig.llama, corpus, fit_config("llama"), demo.seed,
                                                        str(layout.tensorboard / "pretrain_llama"))

    media, targets = train_media(layout, probe)
    ids = media["ids"]
    bag = pretrain.bag_of_tokens(targets, vconfig.llama.vocab_size)
    # The instruct records read above are the same clips (same id but its last part, same meta).
    metas = dict(zip(_clip_ids([r["id"] for r in records]), (r["meta"] for r in records)))

    tower_frames, tower_labels = tower_clips(demo)
    out(f"   image tower: {len(tower_frames)} rendered clips of {tower_frames.shape[1]} frames")
    # No caption bag of words for the image tower (a zero-width bag): a colour word is in every
    # caption, so the bag pulls the tiny ViT's features to colour, away from shape.
    no_bag = np.zeros((len(tower_frames), 0), np.float32)
    image_encoder, histories["vision"] = pretrain.pretrain_vision(
        vconfig.vit, vconfig.image_qformer, tower_frames, no_bag, *tower_labels,
        [a in synthetic.IN_EACH_FRAME for a in synthetic.VISUAL], fit_config("vision"),
        demo.seed + 1, str(layout.tensorboard / "pretrain_vision"), bag_weight=0.0,
        attribute_weights=[demo.pretrain.attribute_weights.get(a, 1.0) for a in synthetic.VISUAL])
    del tower_frames
    audio, histories["audio"] = pretrain.pretrain_audio(
        vconfig.imagebind_audio, media["audio"], bag, *_labels([metas[i] for i in ids], synthetic.AUDIO),
        fit_config("audio"), demo.seed + 2, str(layout.tensorboard / "pretrain_audio"),
        bag_weight=demo.pretrain.bag_weight)
    paths = pretrain.save_towers(str(layout.towers), llama=(llama, vconfig.llama), tokenizer_dir=str(layout.tokenizer),
                                 image_encoder=(image_encoder, vconfig.vit, vconfig.image_qformer),
                                 audio=(audio, vconfig.imagebind_audio), vision_config=None, seed=demo.seed)
    (layout.towers / TOWERS_FILE).write_text(json.dumps({"config": demo.name, "seed": demo.seed, "paths": paths}))
    return paths, histories, media, {"image_encoder": image_encoder, "audio_encoder": audio}


def train_media(layout: Layout, config) -> tuple[dict, np.ndarray]:
    """The train clips as the stage runs see them (caption_train, in order): ({'frames', 'audio'
    (float16 fbank), 'ids'}, the captions' target tokens)."""
    frames, fbank, targets, ids = [], [], [], []
    for batch in _loader_batches(config, layout.shards("caption_train"), 32):
        frames.append(batch["frames"])
        fbank.append(batch["audio"].astype(np.float16))
        targets.append(batch["targets"])
        ids += _clip_ids(batch["example_id"])
    return {"frames": np.concatenate(frames), "audio": np.concatenate(fbank), "ids": ids}, np.concatenate(targets)


TOWERS_FILE = "towers.json"


def saved_towers(layout: Layout, demo, demo_module) -> tuple[dict, int, dict, dict]:
    """What the pretrain phase left in the work dir, for a rerun from a later phase
    (`--from-phase`): (config.paths entries, the vocabulary size, the train clips' media, the
    frozen tower params)."""
    from vllama_jax.cli_errors import UserError
    from vllama_jax.train.video_llama_task import build_task

    record = layout.towers / TOWERS_FILE
    if not record.is_file():
        raise UserError(f"--from-phase: {layout.root} holds no pretrained towers ({record} missing); "
                        "run the whole demo there first")
    saved = json.loads(record.read_text())
    if (saved["config"], saved["seed"]) != (demo.name, demo.seed):
        raise UserError(f"--from-phase: the towers in {layout.root} are of the {saved['config']!r} demo at seed "
                        f"{saved['seed']}, not {demo.name!r} at seed {demo.seed}")
    paths = saved["paths"]
    vocab_size = len(_tokenizer(layout.tokenizer))
    config = demo_module.stage_config(demo, "audio", 1, paths=paths, vocab_size=vocab_size)
    params = build_task(config).load_pretrained({})
    media, _ = train_media(layout, config)
    return paths, vocab_size, media, {k: params[k] for k in ("image_encoder", "audio_encoder")}


def tower_clips(demo):
    """The image tower's pretraining set (`synthetic.tower_clips`) as the loader presents frames
    (eval transform at the demo's image size): frames `[N, T, S, S, 3]` and (`attribute_labels`,
    value counts) of the visible attributes."""
    from data_pipelines import synthetic
    from data_pipelines import video

    raw, attrs = synthetic.tower_clips(demo.pretrain.vision_clips, demo.pretrain.vision_frames, demo.seed)
    n, t = raw.shape[:2]
    frames = video.eval_transform(raw.reshape(n * t, *raw.shape[2:]), demo.data.image_size)
    return frames.reshape(n, t, *frames.shape[1:]), _labels(attrs, synthetic.VISUAL)


def _labels(metas, names):
    """(`demo_pretrain.attribute_labels` of the attributes `names`, each one's number of values)."""
    from data_pipelines import synthetic
    from vllama_jax.demo import pretrain

    values = {a: synthetic.ATTRIBUTES[a] for a in names}
    return pretrain.attribute_labels(metas, values), [len(v) for v in values.values()]


def _tokenizer(path):
    from data_pipelines.tokenizer import load_tokenizer

    return load_tokenizer(path)


# ------------------------------------------------------------------------------------ stages

def _frozen_tower(model, batch, medium: str):
    """Only the frozen tower of `medium`, on the clips' frames / fbank clips flattened."""
    from vllama_jax.models.video_llama import FROZEN_TOWERS

    tower = FROZEN_TOWERS[medium]
    x = batch[tower.input_key]
    return getattr(model, tower.module)(x.reshape(-1, *x.shape[2:]).astype(np.float32))


def tower_features(model_config, towers: dict, media: dict, medium: str, batch_size: int = 32):
    """The frozen tower's output for every train clip (`feature_cache.FeatureDataset`), computed
    once: the clips' view is fixed, so every stage of the branch replays it."""
    import jax

    from vllama_jax.inference import abstract_params
    from vllama_jax.models.video_llama import FROZEN_TOWERS, VideoLlama
    from vllama_jax.train import feature_cache

    t = FROZEN_TOWERS[medium]
    tower, key, source = t.module, t.cache_key, t.input_key
    x = media[source]
    batches = ({source: x[i:i + batch_size]} for i in range(0, len(x), batch_size))
    # VideoLlama's setup creates every param; only the tower's are read, the rest may be zeros.
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(model_config))
    params[tower] = towers[tower]
    return feature_cache.build_feature_dataset(VideoLlama(model_config), {"params": params}, batches,
                                               (feature_cache.CachedOutput((tower,), key),), method=_frozen_tower,
                                               method_args=(medium,))


def stage_run_config(layout: Layout, demo, demo_module, branch: str, stage: int, paths: dict, vocab_size: int):
    """The trainer config of one stage run, started from the earlier runs in the work dir."""
    run_paths = dict(paths)
    # Stage 2 starts from stage 1. The audio runs hold the vision branch too (frozen; audio2's
    # prompts show its video tokens): vision2's, as `ckpt_2` beside audio2's start, audio1.
    starts = ([f"{branch}1"] if stage == 2 else []) + (["vision2"] if branch == "audio" else [])
    for key, start in zip(("ckpt", "ckpt_2"), starts):
        run_paths[key] = str(layout.run(start))
    return demo_module.stage_config(demo, branch, stage, paths=run_paths, vocab_size=vocab_size)


def train_stage(layout: Layout, demo, demo_module, branch: str, stage: int, paths: dict, vocab_size: int,
                features, feature_ids: list[str]):
    """One trainer run on the cached frozen-tower outputs; returns (trainer config, TrainResult)."""
    import jax

    from vllama_jax import sharding
    from vllama_jax.train import feature_cache
    from vllama_jax.train import loop
    from vllama_jax.train.video_llama_task import build_task

    config = stage_run_config(layout, demo, demo_module, branch, stage, paths, vocab_size)
    task = build_task(config)
    cached_outputs = feature_cache.outputs_for_media(task.media)
    # Each branch trains on the text about its own medium (synthetic.py's seen / heard splits); the
    # run beside the video tokens (demo_config.joint_stage) on the questions about both, so it also
    # learns how its tokens affect the visual answers (on the heard questions only, that effect
    # would go untrained).
    view = "" if demo_module.joint_stage(branch, stage) else ("_seen" if branch == "vision" else "_heard")
    split = f"{'caption' if stage == 1 else 'instruct'}{view}_train"
    text = {k: [] for k in ("input_ids", "attention_mask", "targets", "media_mask", "frame_mask")}
    ids = []
    for batch in _loader_batches(config, layout.shards(split), int(config.train.batch_size)):
        for k in text:
            text[k].append(batch[k])
        ids += _clip_ids(batch["example_id"])
    if ids != feature_ids:
        raise RuntimeError(f"{split} does not list the clips in the order of caption_train")
    data = feature_cache.FeatureDataset({**{o.key: features[o.key] for o in cached_outputs},
                                         **{k: np.concatenate(v) for k, v in text.items()}})
    cached = feature_cache.CachedFeatureTask(task, outputs=cached_outputs)
    train_iter = data.iterator(int(config.train.batch_size), seed=int(config.train.seed))
    # One device: the demo is sized for a CPU, and a mesh over several (fake) devices would only
    # partition the tiny step and slow its compile.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    result = loop.train(config, cached, train_iter, workdir=str(layout.run(f"{branch}{stage}")), mesh=mesh)
    return config, result


# ------------------------------------------------------------------------------------ evaluation

EVAL_MEDIA = {"audio+video": ("audio", "video"), "video": ("video",), "audio": ("audio",)}


def evaluate(layout: Layout, demo, audio_config, out) -> dict:
    """The held-out questions answered three times: with the audio and video soft tokens together
    (`eval_report.json`, the demo's result), with the video tokens alone and with the audio tokens
    alone (`eval_report_{video,audio}.json`: what each branch knows on its own)."""
    from data_pipelines import loader
    from vllama_jax.evaluate import runner
    from vllama_jax.inference import load_for_inference

    model = load_for_inference([str(layout.run("vision2")), str(layout.run("audio2"))], audio_config)
    lc = dataclasses.replace(loader.loader_config_from(audio_config, train=False), batch_size=1)
    reports = {}
    for name, media in EVAL_MEDIA.items():
        reports[name] = runner.run_eval(model, [layout.shards("instruct_test")], loader_config=lc, media=media,
                                   batch_size=demo.eval.batch_size, max_new_tokens=demo.eval.max_new_tokens,
                                   kinds=("qa",), bucket=demo.eval.bucket)
        suffix = "" if name == "audio+video" else f"_{name}"
        runner.write_report(reports[name], layout.root / f"eval_report{suffix}.json")
    return reports, model


def own_medium_accuracy(reports: dict) -> dict[str, float]:
    """Each attribute's accuracy with only the medium that carries it (video: seen, audio: heard),
    and each attribute group's mean (`evaluate.metrics.DEMO_GROUPS`: 'visual', 'audio')."""
    from data_pipelines import synthetic
    from vllama_jax.evaluate.metrics import DEMO_GROUPS

    per = {a: reports["video" if a in synthetic.VISUAL else "audio"]["metrics"]["attributes"]["per_attribute"][a]
           ["accuracy"] for a in synthetic.ATTRIBUTES}
    return {**per, **{group: float(np.mean([per[a] for a in names])) for group, names in DEMO_GROUPS.items()}}


def sample_dialogues(model, layout: Layout, demo, out) -> list[dict]:
    """A few held-out mp4s through the Chat library: video with its sound, five questions each."""
    from data_pipelines import synthetic
    from vllama_jax.chat import Chat

    records = _records(layout.shards("instruct_test"))
    dialogues = []
    chat = Chat(model, seed=demo.seed, log=lambda msg: out(f"   chat: {msg}"))
    gen = dict(do_sample=False, max_new_tokens=demo.eval.max_new_tokens)
    for ex in records[:demo.eval.sample_dialogues]:
        split, index = ex["meta"]["split"], int(ex["id"].split("/")[-2])
        mp4 = synthetic.clip_path(str(layout.media), split, index, demo.seed)
        chat.reset()
        turns = [("upload", mp4, chat.upload_video(mp4))]
        for attr in synthetic.ATTRIBUTES:
            chat.ask(synthetic.QUESTIONS[attr])
            answer = chat.answer(**gen)
            turns.append((attr, synthetic.QUESTIONS[attr], answer, ex["meta"][attr]))
        dialogues.append({"mp4": mp4, "turns": turns, "prompt": chat.prompt})
    return dialogues


# ------------------------------------------------------------------------------------ outputs

def write_chat_config(layout: Layout, config) -> str:
    """`<workdir>/chat_config.py`: the audio-branch stage-2 trainer config (which equips both
    branches), for `vllama-chat` / `vllama-eval --config` over the vision2 + audio2 runs."""
    json_path = layout.root / "chat_config.json"
    json_path.write_text(config.to_json(indent=1))
    py_path = layout.root / "chat_config.py"
    py_path.write_text(
        '"""The demo\'s trainer config (audio2 run), for vllama-chat / vllama-eval --config."""\n'
        "import json\nimport os\n\nimport ml_collections\n\n\n"
        "def get_config():\n"
        "    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat_config.json')\n"
        "    with open(path) as f:\n"
        "        return ml_collections.ConfigDict(json.load(f))\n")
    return str(py_path)


def chat_paths(workdir: str = "./vllama_demo_run") -> dict:
    """What `vllama-chat` / `vllama-web` load after a demo run in `workdir`: the vision2 + audio2
    runs (`checkpoint`), the chat config, and the held-out test clips of the run's seed."""
    from data_pipelines import synthetic

    layout = Layout(workdir)
    seed = 0
    if (layout.root / "summary.json").is_file():
        seed = int(json.loads((layout.root / "summary.json").read_text()).get("seed", 0))
    test_dir = Path(synthetic.clip_path(str(layout.media), "test", 0, seed)).parent
    return {"checkpoint": [str(layout.run("vision2")), str(layout.run("audio2"))],
            "config": str(layout.root / "chat_config.py"), "clips": sorted(glob.glob(str(test_dir / "*.mp4")))}


def plot_losses(histories: dict[str, list[dict]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, hist in histories.items():
        if not hist:
            continue
        ax = axes[0] if name.startswith("pretrain") else axes[1]
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=name.replace("pretrain_", ""))
    # Two short lines each: one long line ran past the figure's edge.
    axes[0].set_title("tower pretraining\nLM: next token; vision / audio: caption bag + attributes", fontsize=10)
    axes[1].set_title("Video-LLaMA stages\nanswer-token cross-entropy", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def format_table(reports: dict) -> str:
    """Per attribute: accuracy with audio + video, with its own medium alone, chance; group means."""
    from data_pipelines import synthetic

    attrs = reports["audio+video"]["metrics"]["attributes"]
    own = own_medium_accuracy(reports)
    lines = [f"{'attribute':<10}{'heard/seen':<12}{'audio+video':>12}{'own medium':>12}{'chance':>8}{'n':>5}"]
    for attr, s in attrs["per_attribute"].items():
        kind = "seen" if attr in synthetic.VISUAL else "heard"
        lines.append(f"{attr:<10}{kind:<12}{s['accuracy']:>12.1%}{own[attr]:>12.1%}{s['chance']:>8.0%}{s['total']:>5d}")
    for name, g in attrs["groups"].items():
        lines.append(f"{name + ' (mean)':<22}{g['accuracy']:>12.1%}{own[name]:>12.1%}{g['chance']:>8.0%}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main

@contextlib.contextmanager
def _compile_settings(light: bool, cache_dir: Path):
    """JAX settings while the demo runs, restored after (the demo may run inside a bigger process):

    * XLA with most optimizations off (`jax_disable_most_optimizations`) when `light` (the quick
      config, whose runs take a few steps): a stage train step compiles in 4.2 s instead of 11.6 s
      but runs in 33 ms instead of 16 (measured on 2 cores), which the full demo's hundreds of steps
      do not repay;
    * the persistent compilation cache in the work dir, so a rerun of the demo skips most compiles.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    before = {n: jax.config.values[n] for n in names}
    try:
        for n, v in zip(names, (bool(light), str(cache_dir), 1.0, 0)):
            jax.config.update(n, v)
        compilation_cache.reset_cache()
        yield
    finally:
        for n, v in before.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


@contextlib.contextmanager
def _xla_optimizations(on: bool):
    """XLA optimizations on (or off) inside, whatever `_compile_settings` chose: the tower
    pretraining runs a few programs for hundreds of steps, where optimized code pays for its
    longer compile (LM pretraining measured 148 s -> 74 s for 500 steps on 2 cores)."""
    import jax

    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", not on)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


CHAT_COMMAND_FILE = "chat.sh"


# The phases a run can start from (`from_phase`): those after the tower pretraining, whose inputs
# (data, tokenizer, towers) a finished run leaves in its work dir.
RESUMABLE = PHASES[PHASES.index("vision1"):]


def run_demo(workdir: str = "./vllama_demo_run", *, seed: int = 0, quick: bool = False, skip_data: bool = False,
             workers: int | None = None, from_phase: str | None = None, out=print) -> dict:
    """Runs every phase (or, with `from_phase`, that one and the later ones on what an earlier run
    left in `workdir`); returns the summary written to `<workdir>/summary.json`."""
    from vllama_jax.cli_errors import UserError

    if from_phase is not None and from_phase not in RESUMABLE:
        raise UserError(f"--from-phase must be one of {', '.join(RESUMABLE)}, got {from_phase!r}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    demo_module, demo = load_demo_config("quick" if quick else "full")
    with _compile_settings(demo.light_compiles, Path(workdir).resolve() / "jax_cache"):
        return _run(workdir, demo_module, demo, seed=seed, skip_data=skip_data, workers=workers,
                    from_phase=from_phase, out=out)


def _run(workdir, demo_module, demo, *, seed, skip_data, workers, out, from_phase=None) -> dict:
    start = time.perf_counter()
    demo.seed = int(seed)
    layout = Layout(workdir)
    layout.root.mkdir(parents=True, exist_ok=True)
    phases = _Phases(out)
    machine = machine_facts()
    out(f"vllama-demo ({demo.name}, seed {seed}) in {layout.root}")
    out(f"machine: {describe_machine(machine)}")
    out(f"note: {DEVIATION}")
    workers = max((os.cpu_count() or 1) - 1, 1) if workers is None else workers
    if from_phase is None:
        paths, histories, vocab_size, towers, media = _towers_phases(layout, demo, demo_module, phases, skip_data,
                                                                     workers, out)
    else:
        out(f"   --from-phase {from_phase}: reusing the data, tokenizer, towers"
            + "".join(f", {n}" for n in RESUMABLE[:RESUMABLE.index(from_phase)]) + f" in {layout.root}")
        paths, vocab_size, media, towers = saved_towers(layout, demo, demo_module)
        histories = {}
    configs = {}
    from data_pipelines import synthetic
    from vllama_jax.train.video_llama_task import model_config

    vconfig = model_config(demo_module.stage_config(demo, "audio", 1, paths=paths, vocab_size=vocab_size))
    features = {}   # cached frozen-tower outputs of the train clips, by FrozenTower.cache_key
    for branch in ("vision", "audio"):
        for stage in (1, 2):
            name = f"{branch}{stage}"
            if from_phase is not None and RESUMABLE.index(name) < RESUMABLE.index(from_phase):
                if not layout.run(name).is_dir():
                    from vllama_jax.cli_errors import UserError

                    raise UserError(f"--from-phase {from_phase}: {layout.run(name)} is missing (run the phases "
                                    "before it first)")
                configs[name] = stage_run_config(layout, demo, demo_module, branch, stage, paths, vocab_size)
                continue
            what = {1: "video-caption pretraining", 2: "instruction tuning"}[stage]
            trains = ("video Q-Former, frame positions, query tokens, llama_proj" if branch == "vision" else
                      "audio Q-Former, audio positions, query tokens, audio_llama_proj")
            with phases(name, f"stage {stage} ({what}), {branch} branch: trains {trains}"):
                from vllama_jax.models.video_llama import FROZEN_TOWERS

                # The joint run (demo_config.joint_stage) also reads the video tokens.
                needed = ["video"] if branch == "vision" else ["audio"] + (["video"] if stage == 2 else [])
                for medium in needed:
                    if FROZEN_TOWERS[medium].cache_key not in features:
                        features.update(tower_features(vconfig, towers, media, medium).arrays)
                if from_phase is not None:
                    # A rerun starts the run afresh, not from the earlier run's last step.
                    shutil.rmtree(layout.run(name), ignore_errors=True)
                configs[name], result = train_stage(layout, demo, demo_module, branch, stage, paths, vocab_size,
                                                    features, media["ids"])
                histories[name] = result.history
                out(f"   loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f} "
                    f"({result.step} steps) -> {layout.run(name)}")
    return _finish(layout, demo, configs, histories, phases, machine, paths, start, from_phase, out)


def _towers_phases(layout, demo, demo_module, phases, skip_data, workers, out):
    """The data, tokenizer and pretrain phases: (config.paths of the towers, their loss histories,
    the vocabulary size, the tower params, the train clips' media)."""
    with phases("data", "synthetic audio-visual clips -> ArrayRecord shards"):
        have = all(glob.glob(layout.shards(s)) for s in DATA_SPLITS)
        if skip_data and have:
            out(f"   --skip-data: reusing {layout.data}")
        else:
            build_data(layout, demo, workers, out)
    with phases("tokenizer", "demo BPE tokenizer on the train text"):
        from data_pipelines.tokenizer import build_demo_tokenizer

        records = _records(layout.shards("instruct_train"))
        texts = [t for group in lm_corpus(records, 1, demo.data.num_frames, demo.seed) for t in group]
        build_demo_tokenizer(texts, layout.tokenizer, vocab_size=demo.vocab_size)
        vocab_size = len(_tokenizer(layout.tokenizer))
        out(f"   vocab {vocab_size} tokens -> {layout.tokenizer}")
    with phases("pretrain", "tiny towers: LLaMA (text), EVA ViT + image Q-Former (frames), ImageBind audio"), \
            _xla_optimizations(True):
        paths, tower_hist, media, towers = pretrain_towers(layout, demo, demo_module, vocab_size, records, out)
        for name, h in tower_hist.items():
            out(f"   {name}: loss {h[0]['loss']:.3f} -> {h[-1]['loss']:.3f} ({h[-1]['step']} steps)")
        out(f"   saved: {json.dumps(paths)}")
    histories = {f"pretrain_{k}": v for k, v in tower_hist.items()}
    return paths, histories, vocab_size, towers, media


def _finish(layout, demo, configs, histories, phases, machine, paths, start, from_phase, out) -> dict:
    from data_pipelines import synthetic

    with phases("evaluate", "held-out clips: audio + video soft tokens, every question answered by generation"):
        reports, model = evaluate(layout, demo, configs["audio2"], out)
        report = reports["audio+video"]
        out(format_table(reports))
        dialogues = sample_dialogues(model, layout, demo, out)
        for d in dialogues:
            out(f"\n   {Path(d['mp4']).name}: Human uploads the video with its sound -> {d['turns'][0][2]}")
            for attr, question, answer, label in d["turns"][1:]:
                mark = "ok" if answer.strip().lower().startswith(label) else f"expected {label}"
                out(f"     Human: {question}\n     Assistant: {answer}   [{mark}]")
    png = plot_losses(histories, layout.root / "loss_curves.png")
    chat_config = write_chat_config(layout, configs["audio2"])
    groups = report["metrics"]["attributes"]["groups"]
    summary = {
        "config": demo.name, "seed": demo.seed, "from_phase": from_phase, "machine": machine, "deviation": DEVIATION,
        "accuracy": {a: s["accuracy"] for a, s in report["metrics"]["attributes"]["per_attribute"].items()},
        "accuracy_own_medium": own_medium_accuracy(reports),
        "visual_accuracy": groups["visual"]["accuracy"], "audio_accuracy": groups["audio"]["accuracy"],
        "chance": 0.25, "phase_seconds": phases.times, "load_average_1min_at_end": os.getloadavg()[0],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "files": {"workdir": str(layout.root), "eval_report": str(layout.root / "eval_report.json"),
                  "chat_command": str(layout.root / CHAT_COMMAND_FILE),
                  "loss_png": png, "tensorboard": [str(layout.tensorboard)] +
                  [str(layout.run(n) / "tb") for n in configs], "runs": [str(layout.run(n)) for n in configs],
                  "towers": paths, "data": str(layout.data), "media": str(layout.media)},
        "sample_dialogues": dialogues,
        "final_losses": {k: v[-1]["loss"] for k, v in histories.items() if v},
    }
    with open(layout.root / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    own = summary["accuracy_own_medium"]
    out(f"\nwith each medium alone: visual attributes {own['visual']:.1%}, audio attributes {own['audio']:.1%}")
    out(f"visual attributes {summary['visual_accuracy']:.1%}, audio attributes {summary['audio_accuracy']:.1%} "
        f"(chance 25%); {summary['wall_seconds']:.0f} s in all")
    out("files:")
    out(f"   summary          {layout.root / 'summary.json'}")
    out(f"   eval report      {summary['files']['eval_report']}")
    out(f"   loss curves      {png}")
    out(f"   tensorboard      tensorboard --logdir {layout.root}   (TensorBoard itself: pip install -e '.[tensorboard]')")
    out(f"   trainer runs     {layout.root / 'runs'} (vision1, vision2, audio1, audio2)")
    out(f"   towers           {layout.towers}")
    test_mp4 = synthetic.clip_path(str(layout.media), "test", 0, demo.seed)
    command = (f"vllama-chat --checkpoint {layout.run('vision2')} {layout.run('audio2')} "
               f"--config {chat_config} --video {test_mp4}")
    (layout.root / CHAT_COMMAND_FILE).write_text(f"#!/bin/sh\n# Chat with the demo's model about a held-out clip.\n"
                                                 f"exec {command} \"$@\"\n")
    os.chmod(layout.root / CHAT_COMMAND_FILE, 0o755)
    out(f"   chat             {command}\n                    (also in {layout.root / CHAT_COMMAND_FILE})")
    web = "vllama-web" if layout.root == Path("./vllama_demo_run").resolve() else f"vllama-web --demo {layout.root}"
    out(f"   web demo         {web}   (then open http://127.0.0.1:7860)")
    return summary
