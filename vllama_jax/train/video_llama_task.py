"""The Video-LLaMA training task: builds the composite model from an ml_collections config.

Implements the `vllama_jax.train.task.Task` contract. The medium the loss trains on follows the
reference's `train_flag`: the vision branch trains on frames through the video Q-Former
(`('video',)`); the audio branch trains on frames through ImageBind's vision tower into the audio
Q-Former (`('audio_from_frames',)`), or, with `config.model.audio_train_input = 'audio'`, on the
audio itself through ImageBind's audio tower (`('audio',)`; not the reference, used by the demo).
`config.model.train_with_media` (e.g. `('video',)` in an audio run; not the reference) puts the
soft tokens of other, frozen media beside the trained one's in every prompt, in the chat's order
(audio, then video) as a chat with both uploads shows them, so the trained branch learns beside them.

`config.model.overrides` (tower name -> {field: value}) changes fields of a tower preset, e.g. the
demo's own small towers; `config.paths.ckpt` names an earlier stage's trainer workdir whose trained
params start this run (the reference's stage-2 `ckpt`), `config.paths.ckpt_2` a second one applied
after it (the reference's `ckpt_2`: e.g. the other branch's run, for a run that holds both).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from vllama_jax.models.imagebind import ImageBindAudioConfig, ImageBindVisionConfig
from vllama_jax.models.llama import LlamaConfig
from vllama_jax.models.qformer import QFormerConfig
from vllama_jax.models.video_llama import (BRANCHES, VideoLlama, VideoLlamaConfig, abstract_or_init,
                                           init_params)
from vllama_jax.models.vit import EvaViTConfig

log = logging.getLogger(__name__)


def model_config(config) -> VideoLlamaConfig:
    """`VideoLlamaConfig` from `config.model` (tower preset names + the reference's knobs)."""
    m = config.model
    dtype = jnp.dtype(config.train.get("compute_dtype") or "float32")
    dropout = float(m.get("dropout", 0.1))
    remat = bool(m.get("remat", False))

    overrides = m.get("overrides") or {}

    def preset(cls, tower, **kw):
        # Config-derived fields win over the overrides (they must agree with the data).
        return cls.preset(m[tower], **{**dict(overrides.get(tower) or {}), **kw})

    def qformer(tower, **kw):
        return preset(QFormerConfig, tower, hidden_dropout=dropout, attention_dropout=dropout, remat=remat,
                      dtype=dtype, **kw)

    image_qformer = preset(QFormerConfig, "qformer", num_query_tokens=int(m.num_query_token), dtype=dtype)
    audio = bool(m.get("equip_audio_branch", False))   # the reference's name for "has an audio branch"
    imagebind_audio = preset(ImageBindAudioConfig, "imagebind_audio", dtype=dtype) if audio else None
    # As the reference: the audio Q-Former reads ImageBind's output embedding.
    audio_qformer = qformer("audio_qformer", num_query_tokens=int(m.num_audio_query_token),
                            encoder_width=imagebind_audio.out_embed_dim) if audio else None
    # ImageBind's vision tower only feeds the audio Q-Former when the audio branch trains on frames.
    from_frames = audio and _audio_train_input(config) == "frames"
    vocab = {"vocab_size": int(m.vocab_size)} if int(m.get("vocab_size", 0) or 0) > 0 else {}
    return VideoLlamaConfig(
        llama=preset(LlamaConfig, "llama", dtype=dtype, remat=remat, **vocab),
        vit=preset(EvaViTConfig, "vit", img_size=int(config.data.image_size), dtype=dtype, remat=remat),
        image_qformer=image_qformer,
        video_qformer=qformer("video_qformer", num_query_tokens=int(m.num_video_query_token),
                              encoder_width=image_qformer.hidden_size),
        audio_qformer=audio_qformer,
        imagebind_audio=imagebind_audio,
        imagebind_vision=(preset(ImageBindVisionConfig, "imagebind_vision", image_size=int(config.data.image_size),
                                 dtype=dtype) if from_frames else None),
        max_frame_pos=int(m.max_frame_pos),
        loss_chunk=int(m.get("loss_chunk", 0)),
    )


AUDIO_TRAIN_INPUTS = ("frames", "audio")


def _audio_train_input(config) -> str:
    value = str(config.model.get("audio_train_input", "frames"))
    if value not in AUDIO_TRAIN_INPUTS:
        raise ValueError(f"config.model.audio_train_input must be one of {AUDIO_TRAIN_INPUTS}, got {value!r}")
    return value


def train_branch(config) -> str:
    """`config.model.train_branch`: the one branch (`models.video_llama.BRANCHES`) this run trains;
    the reference trains its branches in separate runs (its train_flag 2, both at once, is not
    defined by its forward)."""
    m = config.model
    name = str(m.get("train_branch", "vision"))
    if name not in BRANCHES:
        raise ValueError(f"config.model.train_branch must be one of {sorted(BRANCHES)}, got {name!r}")
    if name == "audio" and not bool(m.get("equip_audio_branch", False)):
        raise ValueError("config.model.train_branch='audio' needs config.model.equip_audio_branch=True")
    return name


def train_media(config) -> tuple[str, ...]:
    """What the loss trains on: the reference's train_flag 0 (video) or 1 (audio Q-Former on frames)."""
    m = config.model
    trained = ("video",) if train_branch(config) == "vision" else (
        ("audio_from_frames",) if _audio_train_input(config) == "frames" else ("audio",))
    extra = tuple(m.get("train_with_media", ()) or ())
    kind = "video" if trained == ("video",) else "audio"
    if any(e not in ("audio", "video") for e in extra) or len(set(extra)) != len(extra) or kind in extra:
        raise ValueError(f"config.model.train_with_media must list other media ('audio' / 'video') once each, "
                         f"not the trained {kind!r}; got {extra!r}")
    # The chat's order: audio first, then video.
    return tuple(sorted(extra + trained, key=("audio", "audio_from_frames", "video").index))


@dataclasses.dataclass(frozen=True)
class PretrainedPaths:
    """Local files the frozen towers come from (empty: keep the random init, e.g. tiny runs)."""
    llama_model: str = ""   # HF LLaMA / Vicuna directory
    blip2: str = ""         # LAVIS BLIP-2 .pth (EVA ViT-g + ln_vision + Q-Former)
    imagebind: str = ""     # imagebind_huge.pth
    llama_proj_model: str = ""  # MiniGPT-4 pretrained_minigpt4.pth: llama_proj alone (the reference's stage 1)
    ckpt: str = ""          # an earlier stage's trainer workdir: its trained params start this run
    ckpt_2: str = ""        # a second one, applied after `ckpt` (its params replace ckpt's where both have them)

    @property
    def ckpts(self) -> tuple[str, ...]:
        return tuple(p for p in (self.ckpt, self.ckpt_2) if p)

    @classmethod
    def from_config(cls, config) -> "PretrainedPaths":
        p = config.get("paths", {})
        return cls(**{f.name: str(p.get(f.name, "") or "") for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class VideoLlamaTask:
    config: VideoLlamaConfig
    media: tuple[str, ...] = ("video",)
    pretrained: PretrainedPaths = PretrainedPaths()
    branch: str = "vision"   # the branch that trains (`BRANCHES`); every other param is frozen

    def trainable_patterns(self) -> tuple[str, ...]:
        return BRANCHES[self.branch].trainable_patterns()

    @property
    def model(self) -> VideoLlama:
        return VideoLlama(self.config)

    def abstract_params(self):
        return jax.eval_shape(lambda r: abstract_or_init(self.config, r), jax.random.key(0))["params"]

    def init_params(self, rng):
        return init_params(self.config, rng)["params"]

    def pretrained_subtrees(self) -> tuple[str, ...]:
        """The top-level subtrees `load_pretrained` fills (the trainer skips their random init)."""
        c, paths = self.config, self.pretrained
        names = (["llama"] if paths.llama_model else []) + (["image_encoder"] if paths.blip2 else [])
        names += ["llama_proj"] if paths.llama_proj_model else []
        if paths.imagebind and c.audio_qformer is not None:
            names += [n for n, cfg in (("audio_encoder", c.imagebind_audio),
                                       ("audio_vision_encoder", c.imagebind_vision)) if cfg is not None]
        for ckpt in paths.ckpts:
            names += list(stage_params(ckpt, metadata_only=True))
        return tuple(dict.fromkeys(names))

    def loss_fn(self, params, batch, rng, deterministic):
        return self.model.apply({"params": params}, batch, self.media, deterministic,
                                method=VideoLlama.loss, rngs={"dropout": rng})


    def load_pretrained(self, params):
        """Overwrites the random init of every frozen tower whose file is configured."""
        from vllama_jax.convert import hf_llama, imagebind, lavis

        c, paths, params = self.config, self.pretrained, dict(params)
        if paths.llama_model:
            loaded_config, params["llama"] = hf_llama.load_hf(paths.llama_model, config=c.llama)
            log.info("loaded LLaMA from %s", paths.llama_model)
        if paths.blip2:
            params["image_encoder"], report = lavis.load_blip2_image_encoder(paths.blip2, c.vit, c.image_qformer)
            log.info("loaded BLIP-2 image encoder from %s: %s", paths.blip2, report)
        if paths.imagebind and c.audio_qformer is not None:
            towers = {"audio_encoder": ("audio", c.imagebind_audio), "audio_vision_encoder": ("vision", c.imagebind_vision)}
            towers = {name: m for name, (m, cfg) in towers.items() if cfg is not None}
            weights = imagebind.import_imagebind(paths.imagebind, c.imagebind_audio, c.imagebind_vision,
                                                 modalities=tuple(towers.values()))
            for name, modality in towers.items():
                params[name] = getattr(weights, modality)
            log.info("loaded ImageBind %s tower(s) from %s", " + ".join(towers.values()), paths.imagebind)
        if paths.llama_proj_model:
            from vllama_jax.convert import video_llama

            loaded, report = video_llama.load_video_llama(paths.llama_proj_model, c, components=("llama_proj",))
            params["llama_proj"] = loaded["llama_proj"]
            log.info("loaded llama_proj from %s: %s", paths.llama_proj_model, report.summary())
        # After llama_proj_model, as the reference loads its ckpt over it.
        for ckpt in paths.ckpts:
            params.update(stage_params(ckpt))
            log.info("started from the trained params of %s", ckpt)
        return params


def stage_params(workdir: str, metadata_only: bool = False) -> dict:
    """Only the trained params (newest step) of a trainer workdir, as host arrays (or their
    `ShapeDtypeStruct`s, nothing read but metadata)."""
    from vllama_jax.convert import params_checkpoint as pc

    (item, keys), *_ = pc.locate(workdir)
    # A workdir's first item is its newest step's state; reading that step alone skips frozen/.
    where = item.parent if keys == ("params",) else workdir
    return pc.params_metadata(where) if metadata_only else pc.load_params(where)


def build_task(config) -> VideoLlamaTask:
    return VideoLlamaTask(model_config(config), train_media(config), PretrainedPaths.from_config(config),
                          train_branch(config))
