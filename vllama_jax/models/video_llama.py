"""Video-LLaMA: frozen BLIP-2 image encoder + Video Q-Former, frozen ImageBind + Audio Q-Former, frozen LLaMA.

The composition follows DAMO-NLP-SG/Video-LLaMA `video_llama/models/video_llama.py`:

  video:  frames [B,T,H,W,3] -> (EVA ViT -> ln_vision -> image Q-Former) per frame -> [B,T,32,768]
          + video_frame_position_embedding[t] -> [B, T*32, 768] -> video Q-Former -> llama_proj
  audio:  fbank [B,M,1,128,204] -> ImageBind audio (normalised x20) -> [B,M,1024]
          + audio_position_embedding[m] -> audio Q-Former -> audio_llama_proj
  audio branch trained on frames ("train_flag 1"): frames -> ImageBind vision (normalised) -> [B,T,1024]
          + audio_position_embedding[t] -> audio Q-Former -> audio_llama_proj

Soft tokens of the requested media (in the order asked, e.g. ('audio', 'video') as the reference
demo concatenates them) replace, in order, the positions where `batch['media_mask']` is True, and the
frozen LLaMA runs on the spliced embeddings. The loss is the causal-LM cross-entropy on `targets`
(-100 = ignored), shifted as HF `LlamaForCausalLM` does.

A `frame_mask [B,T]` masks padded frames out of the video (or audio-from-frames) Q-Former's
cross-attention, so a 1-frame image padded to T frames gives exactly the reference's T=1 result.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vllama_jax.models.blip2 import Blip2ImageEncoder
from vllama_jax.models.common import Dense, Preset, constrain, param
from vllama_jax.models.imagebind import ImageBindAudio, ImageBindAudioConfig, ImageBindVision, ImageBindVisionConfig
from vllama_jax.models.llama import Llama, LlamaConfig, LlamaOutput
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.vit import EvaViTConfig

IGNORE_INDEX = -100
MEDIA = ("video", "audio", "audio_from_frames")

# torch.nn.Linear / nn.Embedding defaults, which the reference's randomly initialised heads use.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class VideoLlamaConfig(Preset):
    llama: LlamaConfig
    vit: EvaViTConfig
    image_qformer: QFormerConfig
    video_qformer: QFormerConfig
    # The audio branch (None: not equipped, as the reference's `equip_audio_branch=False`).
    audio_qformer: QFormerConfig | None = None
    imagebind_audio: ImageBindAudioConfig | None = None
    # Only needed to train the audio branch on frames (ImageBind's shared space).
    imagebind_vision: ImageBindVisionConfig | None = None
    max_frame_pos: int = 32
    max_audio_pos: int = 8
    # > 0: the loss computes the vocabulary logits `loss_chunk` positions at a time (forward and
    # backward), never `[B, L, vocab]` at once; 0: from the full logits.
    loss_chunk: int = 0

    def __post_init__(self):
        if self.loss_chunk < 0:
            raise ValueError(f"VideoLlamaConfig.loss_chunk must be >= 0 (0: full logits), got {self.loss_chunk}")
        if self.image_qformer.encoder_width != self.vit.width:
            raise ValueError(f"VideoLlamaConfig: image_qformer.encoder_width {self.image_qformer.encoder_width} "
                             f"!= vit.width {self.vit.width}")
        if self.video_qformer.encoder_width != self.image_qformer.hidden_size:
            raise ValueError(f"VideoLlamaConfig: video_qformer.encoder_width {self.video_qformer.encoder_width} "
                             f"!= image_qformer.hidden_size {self.image_qformer.hidden_size}")
        for name in ("imagebind_audio", "imagebind_vision"):
            tower = getattr(self, name)
            if tower is None:
                continue
            if self.audio_qformer is None:
                raise ValueError(f"VideoLlamaConfig: {name} is set but audio_qformer is None")
            if tower.out_embed_dim != self.audio_qformer.encoder_width:
                raise ValueError(f"VideoLlamaConfig: {name}.out_embed_dim {tower.out_embed_dim} != "
                                 f"audio_qformer.encoder_width {self.audio_qformer.encoder_width}")
        if self.audio_qformer is not None and self.imagebind_audio is None and self.imagebind_vision is None:
            raise ValueError("VideoLlamaConfig: audio_qformer needs imagebind_audio and/or imagebind_vision")

    @property
    def num_video_tokens(self) -> int:
        return BRANCHES["vision"].num_tokens(self)

    @property
    def num_audio_tokens(self) -> int:
        return BRANCHES["audio"].num_tokens(self)

    @property
    def has_audio(self) -> bool:
        """Whether the model can encode recorded audio (ImageBind's audio tower + the audio Q-Former)."""
        return self.audio_qformer is not None and self.imagebind_audio is not None

    def num_media_tokens(self, media: Sequence[str]) -> int:
        return sum(self.num_video_tokens if m == "video" else self.num_audio_tokens for m in media)

    @classmethod
    def presets(cls):
        return PRESETS

    def replace(self, **overrides) -> "VideoLlamaConfig":
        return dataclasses.replace(self, **overrides)



@dataclasses.dataclass(frozen=True)
class FrozenTower:
    """A frozen tower that feeds a branch: the top-level submodule, the batch key it reads and the
    key its output is cached under (`vllama_jax.train.feature_cache`)."""
    module: str
    input_key: str
    cache_key: str


@dataclasses.dataclass(frozen=True)
class Branch:
    """One trainable branch of the composite, declared once; the trainer's partition, the `.pth`
    converter, the feature cache and the configs derive from it.

    `trains`: the top-level param subtrees it trains (each one a component of the reference's
    state dict, in its module order); `towers`: medium -> the frozen tower that medium runs
    through; `qformer`: the `VideoLlamaConfig` field whose `num_query_tokens` is the number of
    soft tokens (= `<ImageHere>` placeholders in a prompt) the branch puts into the LLM.
    """
    name: str
    trains: tuple[str, ...]
    towers: Mapping[str, FrozenTower]
    qformer: str

    def trainable_patterns(self) -> tuple[str, ...]:
        """Regexes over '/'-joined param paths (`vllama_jax.train.partition`); the optional
        `params/` prefix accepts a tree that still carries Flax's collection name."""
        return tuple(rf"(params/)?{re.escape(name)}(/.*)?" for name in self.trains)

    def num_tokens(self, config: "VideoLlamaConfig") -> int:
        qformer = getattr(config, self.qformer)
        return 0 if qformer is None else qformer.num_query_tokens


# The reference's vision branch (`frozen_video_Qformer` / `frozen_llama_proj`) and audio branch
# (`frozen_audio_Qformer`); the audio branch trains on recorded audio or, as the reference's
# `train_flag 1`, on frames through ImageBind's vision tower.
BRANCHES: dict[str, Branch] = {
    "vision": Branch(
        "vision", trains=("llama_proj", "video_frame_position_embedding", "video_qformer"),
        towers={"video": FrozenTower("image_encoder", "frames", "image_features")}, qformer="video_qformer"),
    "audio": Branch(
        "audio", trains=("audio_qformer", "audio_llama_proj", "audio_position_embedding"),
        towers={"audio": FrozenTower("audio_encoder", "audio", "audio_features"),
                "audio_from_frames": FrozenTower("audio_vision_encoder", "frames", "audio_vision_features")},
        qformer="audio_qformer"),
}
# Medium -> its frozen tower, over every branch.
FROZEN_TOWERS: dict[str, FrozenTower] = {m: t for b in BRANCHES.values() for m, t in b.towers.items()}


def branch_of(medium: str) -> Branch:
    """The branch whose soft tokens a medium ('video', 'audio', 'audio_from_frames') becomes."""
    for b in BRANCHES.values():
        if medium in b.towers:
            return b
    raise ValueError(f"unknown medium {medium!r}; expected one of {MEDIA}")


def _full(llama: str) -> VideoLlamaConfig:
    return VideoLlamaConfig(
        llama=LlamaConfig.preset(llama), vit=EvaViTConfig.preset("eva_vit_g"),
        image_qformer=QFormerConfig.preset("blip2_qformer"), video_qformer=QFormerConfig.preset("video_qformer"),
        audio_qformer=QFormerConfig.preset("audio_qformer"),
        imagebind_audio=ImageBindAudioConfig.preset("imagebind_audio_huge"),
        imagebind_vision=ImageBindVisionConfig.preset("imagebind_vision_huge"))


def _tiny() -> VideoLlamaConfig:
    image_qformer = QFormerConfig.preset("tiny", num_layers=2)
    return VideoLlamaConfig(
        llama=LlamaConfig.preset("tiny"), vit=EvaViTConfig.preset("tiny"), image_qformer=image_qformer,
        video_qformer=QFormerConfig.preset("tiny_video", encoder_width=image_qformer.hidden_size),
        audio_qformer=QFormerConfig.preset("tiny_audio", encoder_width=24),
        imagebind_audio=ImageBindAudioConfig.preset("tiny"),
        imagebind_vision=ImageBindVisionConfig.preset("tiny", image_size=28))


PRESETS = {
    "vicuna7b": _full("llama_7b"),
    "llama2_7b": _full("llama2_7b"),
    "llama2_13b": _full("llama2_13b"),
    "tiny": _tiny(),
}


def dummy_batch(config: VideoLlamaConfig, batch_size: int = 1, num_frames: int = 1,
                num_clips: int = 1, media: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Zeros of the right shapes for `init` / `eval_shape` (all media by default)."""
    if media is None:
        media = VideoLlama(config).available_media()
    k = config.num_media_tokens(media)
    length = k + 2
    size = config.vit.img_size
    batch = {
        "frames": jnp.zeros((batch_size, num_frames, size, size, 3), jnp.float32),
        "frame_mask": jnp.ones((batch_size, num_frames), bool),
        "input_ids": jnp.ones((batch_size, length), jnp.int32),
        "attention_mask": jnp.ones((batch_size, length), jnp.int32),
        "targets": jnp.full((batch_size, length), IGNORE_INDEX, jnp.int32),
        "media_mask": jnp.zeros((batch_size, length), bool).at[:, 1:1 + k].set(True),
    }
    if config.imagebind_audio is not None:
        a = config.imagebind_audio
        batch["audio"] = jnp.zeros((batch_size, num_clips, *a.input_shape), jnp.float32)
    return batch


def init_params(config: VideoLlamaConfig, rng: jax.Array) -> dict[str, Any]:
    """Random, unboxed params of every branch of `config` (traceable, for `jax.jit`/`eval_shape`)."""
    return nn.meta.unbox(abstract_or_init(config, rng))


def abstract_or_init(config: VideoLlamaConfig, rng: jax.Array) -> dict[str, Any]:
    """Boxed variables (with logical axes); under `jax.eval_shape` this costs nothing."""
    return VideoLlama(config).init({"params": rng}, dummy_batch(config), method=VideoLlama.init_all)


def splice_media(embeds: jax.Array, soft: jax.Array, media_mask: jax.Array) -> jax.Array:
    """Puts `soft [B,K,D]` into `embeds [B,L,D]` at the True positions of `media_mask [B,L]`, in order.

    Every row must have exactly K True positions (the loader guarantees it; `check_media_mask`
    verifies it on host arrays). A packed batch splices over the batch as one sequence
    (`splice_packed_media`).
    """
    idx = jnp.clip(jnp.cumsum(media_mask.astype(jnp.int32), axis=1) - 1, 0, soft.shape[1] - 1)
    gathered = jnp.take_along_axis(soft, idx[..., None], axis=1)
    return jnp.where(media_mask[..., None], gathered.astype(embeds.dtype), embeds)


def splice_packed_media(embeds: jax.Array, soft: jax.Array, media_mask: jax.Array) -> jax.Array:
    """A packed batch's splice: `soft [N, K, D]` (one media slot each) fills the media positions of
    `embeds [B, L, D]` in row-major order, slot after slot (`data_pipelines.packing` orders the
    slots so; empty slots come last and are never reached)."""
    b, l, d = embeds.shape
    flat = splice_media(embeds.reshape(1, b * l, d), soft.reshape(1, -1, soft.shape[-1]), media_mask.reshape(1, b * l))
    return flat.reshape(b, l, d)


def check_media_mask(media_mask: Any, num_tokens: int, example_mask: Any = None) -> None:
    """Host-side check that each row has exactly `num_tokens` media positions (skipped when traced);
    a packed batch (`example_mask [N]`) a multiple of `num_tokens` per row and `num_tokens` per
    example it holds."""
    if isinstance(media_mask, jax.core.Tracer) or isinstance(example_mask, jax.core.Tracer):
        return
    counts = np.asarray(media_mask).sum(axis=1)
    if example_mask is not None:
        bad = np.nonzero(counts % num_tokens)[0]
        total, examples = int(counts.sum()), int(np.asarray(example_mask).sum())
        if bad.size or total != num_tokens * examples:
            raise ValueError(f"media_mask: a packed batch of {examples} examples has {total} media positions "
                             f"(rows {counts.tolist()[:8]}), expected {num_tokens} per example (one per soft "
                             f"token of the requested media)")
        return
    bad = np.nonzero(counts != num_tokens)[0]
    if bad.size:
        raise ValueError(f"media_mask: rows {bad[:8].tolist()} have {counts[bad[:8]].tolist()} media positions, "
                         f"expected {num_tokens} (one per soft token of the requested media)")


def shifted_labels(targets: jax.Array, segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """HF's shift: position i predicts `targets[:, i+1]`. Returns (labels [B, L-1] with ignored ones
    set to 0, valid [B, L-1]); in packed rows no position predicts the next example's first token."""
    labels = targets[:, 1:]
    valid = labels != IGNORE_INDEX
    if segment_ids is not None:
        valid &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return jnp.where(valid, labels, 0), valid


def causal_lm_loss(logits: jax.Array, targets: jax.Array,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """HF-style shifted cross-entropy: position i predicts `targets[:, i+1]`; returns (mean, count)."""
    labels, valid = shifted_labels(targets, segment_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), labels)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(count, 1), count


def chunked_causal_lm_loss(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int,
                           dtype: Any = jnp.float32,
                           segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`causal_lm_loss(hidden @ kernel, targets)` without holding the `[B, L, vocab]` logits.

    A scan over `chunk` positions at a time: each chunk's logits `[B, chunk, vocab]` (matmul in
    `dtype`, cross-entropy in float32, as `Llama.head`) are reduced to a sum at once, and under
    `jax.checkpoint` the backward recomputes them per chunk instead of keeping them.
    """
    labels, valid = shifted_labels(targets, segment_ids)
    h = hidden[:, :-1]
    b, n, d = h.shape
    chunk = max(1, min(chunk, n))   # a short sequence is one chunk, not padded up to `chunk`
    pad = -n % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    labels, valid = (jnp.pad(x, ((0, 0), (0, pad))) for x in (labels, valid))
    chunks = lambda x: x.reshape(b, -1, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def chunk_sum(kernel, h_c, y_c, v_c):
        logits = jnp.dot(h_c.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_c)
        return jnp.sum(jnp.where(v_c, ce, 0.0))

    def body(total, xs):
        return total + chunk_sum(kernel, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(h), chunks(labels), chunks(valid)))
    count = jnp.sum(valid)
    return total / jnp.maximum(count, 1), count


class VideoLlama(nn.Module):
    """The composite model; see the module docstring. Param subtrees:

    `image_encoder` {visual_encoder, ln_vision, qformer} (frozen), `video_frame_position_embedding`,
    `video_qformer`, `llama_proj`, `audio_encoder` (ImageBind audio, frozen), `audio_vision_encoder`
    (ImageBind vision, frozen), `audio_position_embedding`, `audio_qformer`, `audio_llama_proj`,
    `llama` (frozen).
    """
    config: VideoLlamaConfig

    def setup(self):
        c = self.config
        d = c.llama.hidden_size
        self.image_encoder = Blip2ImageEncoder(c.vit, c.image_qformer)
        hv = c.video_qformer
        self.video_frame_position_embedding = param(
            self, "video_frame_position_embedding", nn.initializers.normal(1.0),
            (c.max_frame_pos, hv.encoder_width), ("frames", "embed"), hv.param_dtype)
        self.video_qformer = QFormer(hv)
        self.llama_proj = Dense(d, ("encoder_embed", "embed"), dtype=c.llama.dtype, param_dtype=hv.param_dtype,
                                kernel_init=torch_linear_kernel_init,
                                bias_init=torch_linear_bias_init(hv.hidden_size))
        if c.audio_qformer is not None:
            ha = c.audio_qformer
            if c.imagebind_audio is not None:
                self.audio_encoder = ImageBindAudio(c.imagebind_audio)
            if c.imagebind_vision is not None:
                self.audio_vision_encoder = ImageBindVision(c.imagebind_vision)
            self.audio_position_embedding = param(
                self, "audio_position_embedding", nn.initializers.normal(1.0),
                (c.max_audio_pos, ha.encoder_width), ("frames", "embed"), ha.param_dtype)
            self.audio_qformer = QFormer(ha)
            self.audio_llama_proj = Dense(d, ("encoder_embed", "embed"), dtype=c.llama.dtype,
                                          param_dtype=ha.param_dtype, kernel_init=torch_linear_kernel_init,
                                          bias_init=torch_linear_bias_init(ha.hidden_size))
        self.llama = Llama(c.llama)

    # ------------------------------------------------------------------ encoders -> soft tokens
    def encode_video(self, frames: jax.Array, frame_mask: jax.Array | None = None,
                     deterministic: bool = True) -> jax.Array:
        """`frames [B,T,H,W,3]` (CLIP-normalised) -> `[B, num_video_tokens, d_llm]`."""
        b, t = self._check_frames(frames)
        # The frozen BLIP-2 encoder always runs in eval mode (the reference's `disabled_train`).
        q = self.image_encoder(frames.reshape(b * t, *frames.shape[2:]), deterministic=True)
        q = q.reshape(b, t, q.shape[1], q.shape[2])
        q = q + self.video_frame_position_embedding[:t].astype(q.dtype)[None, :, None, :]
        mask = None if frame_mask is None else jnp.repeat(self._check_mask(frame_mask, b, t), q.shape[2], axis=1)
        v = self.video_qformer(q.reshape(b, t * q.shape[2], q.shape[3]), mask, deterministic=deterministic)
        return self.llama_proj(v)

    def encode_audio(self, audio: jax.Array, deterministic: bool = True) -> jax.Array:
        """`audio [B,M,1,mel,frames]` fbank clips -> `[B, num_audio_tokens, d_llm]`."""
        self._require_audio("audio_encoder", "imagebind_audio")
        if audio.ndim != 5:
            raise ValueError(f"audio must be [batch, clips, 1, mel, frames], got shape {tuple(audio.shape)}")
        b, m = audio.shape[:2]
        emb = self.audio_encoder(audio.reshape(b * m, *audio.shape[2:]), deterministic=True)
        return self._audio_tokens(emb.reshape(b, m, -1), None, deterministic)

    def encode_audio_from_frames(self, frames: jax.Array, frame_mask: jax.Array | None = None,
                                 deterministic: bool = True) -> jax.Array:
        """Audio-branch training input: frames through ImageBind vision -> audio Q-Former tokens."""
        self._require_audio("audio_vision_encoder", "imagebind_vision")
        b, t = self._check_frames(frames)
        emb = self.audio_vision_encoder(frames.reshape(b * t, *frames.shape[2:]), deterministic=True)
        mask = None if frame_mask is None else self._check_mask(frame_mask, b, t)
        return self._audio_tokens(emb.reshape(b, t, -1), mask, deterministic)

    def _audio_tokens(self, emb: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        m = emb.shape[1]
        if m > self.config.max_audio_pos:
            raise ValueError(f"{m} audio clips/frames exceed max_audio_pos={self.config.max_audio_pos}")
        emb = emb + self.audio_position_embedding[:m].astype(emb.dtype)[None]
        return self.audio_llama_proj(self.audio_qformer(emb, mask, deterministic=deterministic))

    def encode_media(self, batch: Mapping[str, jax.Array], media: Sequence[str],
                     deterministic: bool = True) -> jax.Array:
        """Soft tokens of each requested medium, concatenated in the order given: `[B, K, d_llm]`."""
        parts = []
        for m in media:
            if m == "video":
                parts.append(self.encode_video(batch["frames"], batch.get("frame_mask"), deterministic))
            elif m == "audio":
                parts.append(self.encode_audio(batch["audio"], deterministic))
            elif m == "audio_from_frames":
                parts.append(self.encode_audio_from_frames(batch["frames"], batch.get("frame_mask"),
                                                           deterministic))
            else:
                raise ValueError(f"unknown medium {m!r}; expected one of {MEDIA}")
        return jnp.concatenate(parts, axis=1)

    # ------------------------------------------------------------------ LLM
    def embed_inputs(self, batch: Mapping[str, jax.Array], media: Sequence[str],
                     deterministic: bool = True) -> jax.Array:
        """LLaMA input embeddings with the media soft tokens spliced in: `[B, L, d_llm]`.

        A packed batch (`segment_ids` present, see `data_pipelines.packing`) holds several examples
        per row and their media in N slots `[N, ...]` (`example_mask [N]`): the N slots are
        encoded as one batch and their soft tokens fill the batch's media positions in row-major
        order (empty slots are encoded but never spliced).
        """
        media_mask = batch["media_mask"].astype(bool)
        packed = "segment_ids" in batch
        check_media_mask(media_mask, self.config.num_media_tokens(media),
                         batch["example_mask"] if packed else None)
        ids = jnp.where(media_mask, 0, batch["input_ids"])
        embeds = self.llama.embed(ids)
        if not media:
            return embeds
        soft = self.encode_media(batch, media, deterministic)
        return splice_packed_media(embeds, soft, media_mask) if packed else splice_media(embeds, soft, media_mask)

    def __call__(self, batch: Mapping[str, jax.Array], media: Sequence[str] = ("video",),
                 deterministic: bool = True, return_logits: bool = True,
                 return_hidden: bool = False) -> LlamaOutput:
        embeds = self.embed_inputs(batch, media, deterministic)
        return self.llama(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                          segment_ids=batch.get("segment_ids"), return_logits=return_logits,
                          return_hidden=return_hidden)

    def loss(self, batch: Mapping[str, jax.Array], media: Sequence[str] = ("video",),
             deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean next-token cross-entropy over the batch's target tokens (packed or not: the same
        tokens give the same loss); with `config.loss_chunk` the logits are never all held."""
        c, segments = self.config, batch.get("segment_ids")
        if not c.loss_chunk:
            loss, count = causal_lm_loss(self(batch, media, deterministic).logits, batch["targets"], segments)
        else:
            hidden = self(batch, media, deterministic, return_logits=False, return_hidden=True).hidden_states
            loss, count = chunked_causal_lm_loss(hidden, self.llama.head_kernel(), batch["targets"],
                                                 c.loss_chunk, c.llama.dtype, segments)
        return loss, {"num_tokens": count}

    def available_media(self) -> tuple[str, ...]:
        c = self.config
        return ("video",) + (("audio",) if c.has_audio else ()) + (
            ("audio_from_frames",) if c.audio_qformer is not None and c.imagebind_vision is not None else ())

    def init_all(self, batch: Mapping[str, jax.Array]) -> LlamaOutput:
        """Touches every branch so `init` creates all params (setup submodules are created lazily)."""
        return self(batch, self.available_media(), deterministic=True)

    # ------------------------------------------------------------------ checks
    def _check_frames(self, frames: jax.Array) -> tuple[int, int]:
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [batch, time, height, width, 3], got shape {tuple(frames.shape)}")
        if frames.shape[1] > self.config.max_frame_pos:
            raise ValueError(f"{frames.shape[1]} frames exceed max_frame_pos={self.config.max_frame_pos}")
        return frames.shape[0], frames.shape[1]

    @staticmethod
    def _check_mask(mask: jax.Array, b: int, t: int) -> jax.Array:
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"frame_mask must be [batch, time] = {(b, t)}, got {tuple(mask.shape)}")
        return mask.astype(bool)

    def _require_audio(self, attr: str, field: str) -> None:
        if self.config.audio_qformer is None or getattr(self.config, field) is None:
            raise ValueError(f"this VideoLlamaConfig has no {field}: the audio branch needs it for {attr}")
