"""The demo's tiny stand-ins for the pretrained towers, pretrained on the demo data, then saved as
the real towers ship (HF LLaMA directory, LAVIS BLIP-2 `.pth`, `imagebind_huge.pth`).

Video-LLaMA starts from towers pretrained elsewhere (Vicuna, BLIP-2, ImageBind). The demo has none,
so it makes small ones from the synthetic train split and freezes them, like the paper:

  language model  next-token prediction on the split's captions and dialogues. The dialogues are
                  rendered in the prompt layouts the model later sees (the training conversation
                  layout, the chat's audio+video message), with the media *described in words*
                  where the soft tokens will go, so the LM learns to answer from its context, the
                  skill a real LLM brings;
  vision          EVA ViT + ln_vision + image Q-Former on frames (the demo renders clips for it,
                  `synthetic.tower_clips`, as a real tower sees far more images than the data
                  it is later tuned on): linear heads over the pooled
                  queries of a clip's frames (in order) predict the bag of caption tokens and
                  the caption's motion word, heads on each frame's pooled queries its colour
                  and shape words;
  audio           ImageBind's audio tower on 2-second fbank clips: linear heads on its embedding
                  predict the bag of caption tokens and the caption's pitch and rhythm words.
The heads are thrown away. Training uses one small loop (`fit`): AdamW, warmup-cosine, jit, tqdm,
TensorBoard scalars through the trainer's `MetricsLogger`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vllama_jax.models.blip2 import Blip2ImageEncoder
from vllama_jax.models.imagebind import ImageBindAudio, ImageBindAudioConfig, ImageBindVision, ImageBindVisionConfig
from vllama_jax.models.llama import Llama, LlamaConfig
from vllama_jax.models.qformer import QFormerConfig
from vllama_jax.models.vit import EvaViTConfig
from vllama_jax.train.metrics import MetricsLogger


@dataclasses.dataclass(frozen=True)
class FitConfig:
    steps: int
    batch_size: int
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    log_every: int = 10


def fit(name: str, model: nn.Module, params: Any, loss_fn: Callable, arrays: Mapping[str, np.ndarray],
        config: FitConfig, seed: int, logdir: str | None) -> tuple[Any, list[dict]]:
    """Trains `params` of `model` on batches drawn from `arrays` (shared leading example dim).

    `loss_fn(model, params, batch, rng) -> (loss, metrics)`. Batch i is a pure function of (seed, i).
    Returns the params and the logged history ({'step', 'loss', ...} per log window).
    """
    n = len(next(iter(arrays.values())))
    if not 1 <= config.batch_size <= n:
        raise ValueError(f"{name}: batch_size {config.batch_size} must be in [1, {n}] (the number of examples)")
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, min(config.warmup_steps, config.steps - 1),
                                                  config.steps, end_value=config.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, rng), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(metrics, loss=loss)

    # Named at construction: a later set_description is one more line in a log file.
    logger = MetricsLogger(logdir, total_steps=config.steps, progress=True, desc=name)
    history, pending = [], []
    key = jax.random.key(seed)
    try:
        for i in range(config.steps):
            index = np.random.default_rng([seed, i]).choice(n, config.batch_size, replace=False)
            batch = {k: v[index] for k, v in arrays.items()}
            params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, i))
            pending.append(metrics)
            logger.advance()
            if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
                window = jax.device_get(pending)
                pending = []
                summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                if not np.isfinite(summary["loss"]):
                    raise FloatingPointError(f"{name}: loss became {summary['loss']} at step {i + 1}")
                logger.log(i + 1, summary, prefix=f"pretrain_{name}")
                history.append({"step": i + 1, **summary})
    finally:
        logger.close()
    return params, history


def _init(model: nn.Module, seed: int, *args, **kwargs):
    """Unboxed random params, as one jitted program (op by op, every initializer shape compiles)."""
    return jax.jit(lambda r: nn.meta.unbox(model.init(r, *args, **kwargs)["params"]))(jax.random.key(seed))


# ---------------------------------------------------------------------------------- language model

def lm_loss(model: nn.Module, params, batch, rng):
    """Next-token cross-entropy on the tokens of `loss_mask` (every real token but a text's BOS)."""
    logits = model.apply({"params": params}, input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    labels, valid = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:] > 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels)
    loss = jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return loss, {}


def tokenize_corpus(groups: Sequence[Sequence[str]], tokenizer, max_len: int) -> dict[str, np.ndarray]:
    """Packed rows: each group's texts (each with its BOS) concatenated into rows of at most
    `max_len` tokens, a group never sharing a row with another; right-padded to the longest row
    rounded up to a multiple of 8. `input_ids`, `attention_mask`, `loss_mask` `[N, L]`.

    Packing as LLM pretraining does: without it most of each row was padding (captions are a
    tenth of a dialogue's length). A group holds texts about one clip, so what a text may read
    from an earlier one in its row is true of its own clip. A text longer than `max_len` is an error.
    """
    rows: list[list[int]] = []
    for group in groups:
        row: list[int] = []
        for text in group:
            ids = tokenizer(text)["input_ids"]
            if len(ids) > max_len:
                raise ValueError(f"a corpus text has {len(ids)} tokens > max_len {max_len}: raise the LM's context")
            if len(row) + len(ids) > max_len:
                rows.append(row)
                row = []
            row += ids
        if row:
            rows.append(row)
    length = min(-(-max(len(r) for r in rows) // 8) * 8, max_len)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask,
            "loss_mask": mask * (ids != tokenizer.bos_token_id).astype(np.int32)}


def pretrain_llama(config: LlamaConfig, corpus: Mapping[str, np.ndarray], fit_config: FitConfig, seed: int,
                   logdir: str | None):
    model = Llama(config)
    ids = jnp.asarray(corpus["input_ids"][:1])
    params = _init(model, seed, input_ids=ids)
    return fit("llama", model, params, lm_loss, corpus, fit_config, seed, logdir)


# ---------------------------------------------------------------------------------- caption supervision

def bag_of_tokens(targets: np.ndarray, vocab_size: int) -> np.ndarray:
    """Multi-hot `[N, vocab]` of each row's target tokens (ids != -100), the caption's bag of words."""
    bag = np.zeros((targets.shape[0], vocab_size), np.float32)
    rows, cols = np.nonzero(targets >= 0)
    bag[rows, targets[rows, cols]] = 1.0
    return bag


def attribute_labels(metas: Sequence[Mapping[str, str]], attributes: Mapping[str, Sequence[str]]) -> np.ndarray:
    """`[N, A]` int32: the index of each example's value of each attribute (the caption's words
    that name it), in `attributes` order."""
    labels = np.zeros((len(metas), len(attributes)), np.int32)
    for i, meta in enumerate(metas):
        for j, (name, values) in enumerate(attributes.items()):
            if meta.get(name) not in values:
                raise ValueError(f"example {i}: attribute {name!r} is {meta.get(name)!r}, expected one of {values}")
            labels[i, j] = list(values).index(meta[name])
    return labels


class CaptionHeads(nn.Module):
    """Linear heads on a tower's pooled output: the caption's bag of tokens (multi-label) and, per
    attribute, which of its values the caption names (softmax).

    The attribute heads stand in for the supervision a real pretrained tower brings: the bag of
    words alone left the tiny towers blind to shape, motion and rhythm (a linear probe on their
    features at chance), as its loss is dominated by the caption words every clip shares."""
    vocab_size: int
    num_values: tuple[int, ...]

    @nn.compact
    def __call__(self, pooled: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        x = nn.LayerNorm(name="head_norm")(pooled)
        logits = nn.Dense(self.vocab_size + sum(self.num_values), name="head")(x)
        splits = np.cumsum((self.vocab_size,) + self.num_values)[:-1]
        bag, *attrs = jnp.split(logits, splits, axis=-1)
        return bag, tuple(attrs)


def caption_loss(outputs, batch, bag_weight: float, attribute_weights: Sequence[float] | None = None):
    """`bag_weight` x the bag's sigmoid cross-entropy (summed over the vocab) + the attributes'
    softmax cross-entropy (a sum over attributes, weighted by `attribute_weights`, default 1);
    metrics: each attribute's train accuracy."""
    bag_logits, attr_logits = outputs
    weights = attribute_weights or (1.0,) * len(attr_logits)
    if len(weights) != len(attr_logits):
        raise ValueError(f"attribute_weights: {len(weights)} weights for {len(attr_logits)} attributes")
    bag = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(bag_logits, batch["bag"]), axis=-1))
    metrics, attr = {"bag_loss": bag}, 0.0
    for j, (logits, weight) in enumerate(zip(attr_logits, weights)):
        # Per-frame logits [B, T, values] score every frame against the clip's label.
        labels = jnp.broadcast_to(batch["labels"][:, j].reshape((-1,) + (1,) * (logits.ndim - 2)), logits.shape[:-1])
        attr += weight * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        metrics[f"acc{j}"] = jnp.mean(jnp.argmax(logits, -1) == labels)
    return bag_weight * bag + attr, metrics


class FrameCaptioner(nn.Module):
    """BLIP-2 image encoder per frame, its queries pooled per frame. The attributes marked in
    `per_frame` (what any one frame shows: colour, shape) are predicted from each frame alone;
    the bag of tokens and the others (motion) from the frames concatenated in order."""
    vit: EvaViTConfig
    qformer: QFormerConfig
    vocab_size: int
    num_values: tuple[int, ...]
    per_frame: tuple[bool, ...]

    @nn.compact
    def __call__(self, frames: jax.Array):
        b, t = frames.shape[:2]
        q = Blip2ImageEncoder(self.vit, self.qformer, name="image_encoder")(frames.reshape(b * t, *frames.shape[2:]))
        pooled = jnp.mean(q, axis=1).reshape(b, t, q.shape[-1])
        clip_values = tuple(n for n, f in zip(self.num_values, self.per_frame) if not f)
        frame_values = tuple(n for n, f in zip(self.num_values, self.per_frame) if f)
        bag, clip_attrs = CaptionHeads(self.vocab_size, clip_values, name="heads")(pooled.reshape(b, -1))
        _, frame_attrs = CaptionHeads(0, frame_values, name="frame_heads")(pooled)
        clip_attrs, frame_attrs = iter(clip_attrs), iter(frame_attrs)
        return bag, tuple(next(frame_attrs) if f else next(clip_attrs) for f in self.per_frame)


class ClipCaptioner(nn.Module):
    """ImageBind's audio tower on one fbank clip, caption heads."""
    audio: ImageBindAudioConfig
    vocab_size: int
    num_values: tuple[int, ...]

    @nn.compact
    def __call__(self, fbank: jax.Array):
        emb = ImageBindAudio(self.audio, name="audio_encoder")(fbank, deterministic=True)
        return CaptionHeads(self.vocab_size, self.num_values, name="heads")(emb)


def pretrain_vision(vit: EvaViTConfig, qformer: QFormerConfig, frames: np.ndarray, bag: np.ndarray,
                    labels: np.ndarray, num_values: Sequence[int], per_frame: Sequence[bool], fit_config: FitConfig,
                    seed: int, logdir: str | None, bag_weight: float = 1.0,
                    attribute_weights: Sequence[float] | None = None):
    """frames `[N, T, S, S, 3]` CLIP-normalised, `labels` `[N, A]` (`attribute_labels` of the
    visible attributes), `per_frame` which of them each frame shows; returns the `image_encoder`
    params and the history."""
    model = FrameCaptioner(vit, qformer, bag.shape[1], tuple(num_values), tuple(per_frame))
    params = _init(model, seed, jnp.asarray(frames[:1]))
    loss = lambda m, p, b, r: caption_loss(m.apply({"params": p}, b["frames"]), b, bag_weight,  # noqa: E731
                                           attribute_weights)
    arrays = {"frames": frames, "bag": bag, "labels": labels}
    params, history = fit("vision", model, params, loss, arrays, fit_config, seed, logdir)
    return params["image_encoder"], history


def pretrain_audio(config: ImageBindAudioConfig, fbank: np.ndarray, bag: np.ndarray, labels: np.ndarray,
                   num_values: Sequence[int], fit_config: FitConfig, seed: int, logdir: str | None,
                   bag_weight: float = 1.0):
    """fbank `[N, M, 1, mel, frames]`: every clip of an example is a training input with the
    example's bag and `labels` (the audible attributes). Returns the `audio_encoder` params and the history."""
    n, m = fbank.shape[:2]
    clips = fbank.reshape(n * m, *fbank.shape[2:])
    model = ClipCaptioner(config, bag.shape[1], tuple(num_values))
    params = _init(model, seed, jnp.asarray(clips[:1], jnp.float32))
    loss = lambda mdl, p, b, r: caption_loss(mdl.apply({"params": p}, b["clips"].astype(jnp.float32)), b,  # noqa: E731
                                             bag_weight)
    arrays = {"clips": clips, "bag": np.repeat(bag, m, axis=0), "labels": np.repeat(labels, m, axis=0)}
    params, history = fit("audio", model, params, loss, arrays, fit_config, seed, logdir)
    return params["audio_encoder"], history


# ---------------------------------------------------------------------------------- files

def save_towers(out_dir: str, *, llama: tuple[Any, LlamaConfig], tokenizer_dir: str,
                image_encoder: tuple[Any, EvaViTConfig, QFormerConfig],
                audio: tuple[Any, ImageBindAudioConfig], vision_config: ImageBindVisionConfig | None,
                seed: int) -> dict[str, str]:
    """Writes the towers as their real counterparts ship; returns the `config.paths` entries.

    llama_model: an HF LLaMA directory with the tokenizer files; blip2: a LAVIS-keyed state dict;
    imagebind: an ImageBind-keyed state dict (both `.safetensors`, read by the same importers as
    the `.pth` files, so the demo needs no torch; with a randomly initialised vision tower when
    `vision_config` is given: the demo's audio branch trains on audio, so nothing uses it).
    """
    import shutil

    from vllama_jax.convert import hf_llama, imagebind, lavis
    from vllama_jax.convert.common import save_state_dict

    os.makedirs(out_dir, exist_ok=True)
    llama_dir = os.path.join(out_dir, "llama")
    hf_llama.save_hf(jax.device_get(llama[0]), llama[1], llama_dir, overwrite=True, progress=False)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), llama_dir)
    blip2 = os.path.join(out_dir, "blip2_demo.safetensors")
    params, vit, qformer = image_encoder
    save_state_dict(blip2, lavis.blip2_image_encoder_state_dict_from_params(jax.device_get(params), vit, qformer),
                    wrap=True)
    vision = None
    if vision_config is not None:
        vision = nn.meta.unbox(ImageBindVision(vision_config).init(
            jax.random.key(seed), jnp.zeros((1, vision_config.image_size, vision_config.image_size, 3)))["params"])
    ib = os.path.join(out_dir, "imagebind_demo.safetensors")
    imagebind.save_imagebind(ib, audio=jax.device_get(audio[0]), vision=vision, audio_cfg=audio[1],
                             vision_cfg=vision_config)
    return {"llama_model": llama_dir, "tokenizer": llama_dir, "blip2": blip2, "imagebind": ib}
