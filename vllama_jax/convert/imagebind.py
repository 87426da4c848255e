"""ImageBind `imagebind_huge.pth` <-> Flax params of `ImageBindAudio` / `ImageBindVision`.

The checkpoint is a flat state dict of ImageBind's `ImageBindModel` (all six modalities). Only
the audio and vision keys are read; every other key is returned in `ignored` (never dropped
silently). Key map (`m` = audio | vision, `D` = width, `{i}` = block):

  modality_preprocessors.m.cls_token [1,1,D]               -> cls_token
  modality_preprocessors.m.pos_embedding_helper.pos_embed  -> pos_embed [1,L,D]
  modality_preprocessors.audio.rgbt_stem.proj.weight [D,1,k,k]       -> stem_kernel [k,k,1,D]
  modality_preprocessors.audio.rgbt_stem.norm_layer.weight/.bias     -> stem_norm/scale, bias
  modality_preprocessors.vision.rgbt_stem.proj.1.weight [D,3,2,p,p]  -> stem_kernel [2,p,p,3,D]
  modality_trunks.vision.pre_transformer_layer.0.weight/.bias        -> trunk/pre_norm/scale, bias
  modality_trunks.m.blocks.{i}.norm_1|norm_2.weight/.bias  -> trunk/block_{i}/norm_1|norm_2/scale, bias
  modality_trunks.m.blocks.{i}.attn.in_proj_weight [3D,D]  -> .../attn/query|key|value/kernel [D,H,D/H]
  modality_trunks.m.blocks.{i}.attn.in_proj_bias [3D]      -> .../attn/query|key|value/bias [H,D/H]
  modality_trunks.audio.blocks.{i}.attn.bias_k|bias_v [1,1,D] -> .../attn/bias_k|bias_v [H,D/H]
  modality_trunks.m.blocks.{i}.attn.out_proj.weight [D,D]  -> .../attn/out_kernel [H,D/H,D]
  modality_trunks.m.blocks.{i}.attn.out_proj.bias          -> .../attn/out_bias
  modality_trunks.m.blocks.{i}.mlp.fc1|fc2.weight/.bias    -> .../mlp/fc1|fc2/kernel (transposed), bias
  modality_heads.m.0.weight/.bias                          -> head_norm/scale, bias
  modality_heads.m.2.weight [1024,D]                       -> head/kernel [D,1024]
  modality_postprocessors.audio.1.log_logit_scale []       -> log_logit_scale (a buffer in torch)

Both directions are pure reshapes/transposes, so a round trip is bit exact; dtypes are kept
unless `dtype` is given. A missing key, a wrong shape, or an audio/vision key the config does
not expect (e.g. a 13th block) raises `ImageBindCheckpointError` naming the key and shapes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from vllama_jax.convert.common import (CheckpointError, Entry, conv_kernel_entry, copy_entry, export_entries,
                                       expected_keys, import_entries, norm_entries, read_state_dict,
                                       save_state_dict, transposed_entry)
from vllama_jax.models.imagebind import ImageBindAudioConfig, ImageBindVisionConfig

log = logging.getLogger(__name__)

StateDict = Mapping[str, np.ndarray]
Params = dict[str, Any]
MODALITY_GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads",
                   "modality_postprocessors")

# One error type for every converter; the old name stays importable.
ImageBindCheckpointError = CheckpointError

__all__ = ["ImageBindCheckpointError", "ImageBindWeights", "audio_entries", "vision_entries", "expected_keys",
           "audio_params_from_state_dict", "vision_params_from_state_dict", "audio_state_dict_from_params",
           "vision_state_dict_from_params", "read_state_dict", "import_imagebind", "save_imagebind"]


@dataclasses.dataclass(frozen=True)
class ImageBindWeights:
    """Result of `import_imagebind`: params per tower (None when not requested) and skipped keys."""
    audio: Params | None
    vision: Params | None
    ignored: tuple[str, ...]


def _attention_entries(prefix: str, path: tuple[str, ...], d: int, heads: int,
                       bias_kv: bool) -> list[Entry]:
    dh = d // heads
    names = ("query", "key", "value")

    def split_weight(w):  # [3D, D] (out, in) -> 3 x [D, H, dh]
        return tuple(part.T.reshape(d, heads, dh) for part in np.split(w, 3, axis=0))

    def join_weight(*ks):
        return np.concatenate([k.reshape(d, d).T for k in ks], axis=0)

    entries = [
        Entry(prefix + "in_proj_weight", (3 * d, d), tuple(path + (n, "kernel") for n in names),
               split_weight, join_weight),
        Entry(prefix + "in_proj_bias", (3 * d,), tuple(path + (n, "bias") for n in names),
               lambda b: tuple(p.reshape(heads, dh) for p in np.split(b, 3)),
               lambda *bs: np.concatenate([b.reshape(d) for b in bs])),
        Entry(prefix + "out_proj.weight", (d, d), (path + ("out_kernel",),),
               lambda w: (w.T.reshape(heads, dh, d),), lambda k: k.reshape(d, d).T),
        copy_entry(prefix + "out_proj.bias", (d,), path + ("out_bias",)),
    ]
    if bias_kv:
        for n in ("bias_k", "bias_v"):
            entries.append(Entry(prefix + n, (1, 1, d), (path + (n,),),
                                  lambda b: (b.reshape(heads, dh),), lambda b: b.reshape(1, 1, d)))
    return entries


def _trunk_entries(cfg, modality: str) -> list[Entry]:
    d, root = cfg.embed_dim, f"modality_trunks.{modality}."
    entries = []
    if cfg.pre_transformer_ln:
        entries += norm_entries(root + "pre_transformer_layer.0", ("trunk", "pre_norm"), d)
    hidden = cfg.mlp_ratio * d
    for i in range(cfg.num_blocks):
        p, path = f"{root}blocks.{i}.", ("trunk", f"block_{i}")
        entries += norm_entries(p + "norm_1", path + ("norm_1",), d)
        entries += norm_entries(p + "norm_2", path + ("norm_2",), d)
        entries += _attention_entries(p + "attn.", path + ("attn",), d, cfg.num_heads, cfg.add_bias_kv)
        entries += [
            transposed_entry(p + "mlp.fc1.weight", (hidden, d), path + ("mlp", "fc1", "kernel")),
            copy_entry(p + "mlp.fc1.bias", (hidden,), path + ("mlp", "fc1", "bias")),
            transposed_entry(p + "mlp.fc2.weight", (d, hidden), path + ("mlp", "fc2", "kernel")),
            copy_entry(p + "mlp.fc2.bias", (d,), path + ("mlp", "fc2", "bias")),
        ]
    return entries


def _common_entries(cfg, modality: str) -> list[Entry]:
    d, pre = cfg.embed_dim, f"modality_preprocessors.{modality}."
    head = f"modality_heads.{modality}."
    return [
        copy_entry(pre + "cls_token", (1, 1, d), ("cls_token",)),
        copy_entry(pre + "pos_embedding_helper.pos_embed", (1, cfg.num_tokens, d), ("pos_embed",)),
        *_trunk_entries(cfg, modality),
        *norm_entries(head + "0", ("head_norm",), d),
        transposed_entry(head + "2.weight", (cfg.out_embed_dim, d), ("head", "kernel")),
    ]


def audio_entries(cfg: ImageBindAudioConfig) -> list[Entry]:
    pre, k, d = "modality_preprocessors.audio.", cfg.kernel_size, cfg.embed_dim
    return [
        conv_kernel_entry(pre + "rgbt_stem.proj.weight", (d, 1, k, k), ("stem_kernel",)),
        *norm_entries(pre + "rgbt_stem.norm_layer", ("stem_norm",), d),
        *_common_entries(cfg, "audio"),
        copy_entry("modality_postprocessors.audio.1.log_logit_scale", (), ("log_logit_scale",)),
    ]


def vision_entries(cfg: ImageBindVisionConfig) -> list[Entry]:
    pre, p, d = "modality_preprocessors.vision.", cfg.patch_size, cfg.embed_dim
    return [
        conv_kernel_entry(pre + "rgbt_stem.proj.1.weight", (d, cfg.in_channels, cfg.num_frames, p, p),
                          ("stem_kernel",)),
        *_common_entries(cfg, "vision"),
    ]


# ----------------------------------------------------------------------------- generic import/export

def _modality_of(key: str) -> str | None:
    group, _, rest = key.partition(".")
    return rest.partition(".")[0] if group in MODALITY_GROUPS else None


def _import(sd: StateDict, entries: list[Entry], modality: str, what: str, dtype) -> Params:
    """Like `import_entries`, and a key of this modality that no entry reads is an error too
    (an ImageBind file holds exactly one tower per modality, so a surplus key means a config mismatch)."""
    expected = expected_keys(entries)
    surplus = sorted(k for k in sd if _modality_of(k) == modality and k not in expected)
    if surplus and all(k in sd for k in expected):
        raise ImageBindCheckpointError(
            f"{what}: checkpoint has {modality} key(s) the config does not expect (does the config "
            f"match the checkpoint, e.g. num_blocks?): {', '.join(surplus[:5])}"
            + (" ..." if len(surplus) > 5 else ""))
    return import_entries(sd, entries, what, dtype)


def _export(params: Params, entries: list[Entry], dtype) -> dict[str, np.ndarray]:
    return export_entries(params, entries, dtype)


def audio_params_from_state_dict(sd: StateDict, cfg: ImageBindAudioConfig, dtype=None) -> Params:
    """ImageBind state dict -> `ImageBindAudio` params (keys of other modalities are not read)."""
    return _import(sd, audio_entries(cfg), "audio", "ImageBind audio tower", dtype)


def vision_params_from_state_dict(sd: StateDict, cfg: ImageBindVisionConfig, dtype=None) -> Params:
    """ImageBind state dict -> `ImageBindVision` params (keys of other modalities are not read)."""
    return _import(sd, vision_entries(cfg), "vision", "ImageBind vision tower", dtype)


def audio_state_dict_from_params(params: Params, cfg: ImageBindAudioConfig, dtype=None) -> dict[str, np.ndarray]:
    return _export(params, audio_entries(cfg), dtype)


def vision_state_dict_from_params(params: Params, cfg: ImageBindVisionConfig, dtype=None) -> dict[str, np.ndarray]:
    return _export(params, vision_entries(cfg), dtype)


# ----------------------------------------------------------------------------- files

def import_imagebind(src, audio_cfg: ImageBindAudioConfig | None = None,
                     vision_cfg: ImageBindVisionConfig | None = None,
                     modalities=("audio", "vision"), dtype=None) -> ImageBindWeights:
    """Reads `imagebind_huge.pth` (a path or an already loaded state dict) into tower params.

    Configs default to the real-size presets. Keys of modalities not requested (text, depth,
    thermal, imu, and audio/vision when left out) are returned in `ignored` and logged.
    """
    unknown = set(modalities) - {"audio", "vision"}
    if unknown:
        raise ValueError(f"modalities: expected a subset of ('audio', 'vision'), got {sorted(unknown)}")
    sd = src if isinstance(src, Mapping) else read_state_dict(src)
    audio = vision = None
    if "audio" in modalities:
        audio = audio_params_from_state_dict(
            sd, audio_cfg or ImageBindAudioConfig.preset("imagebind_audio_huge"), dtype)
    if "vision" in modalities:
        vision = vision_params_from_state_dict(
            sd, vision_cfg or ImageBindVisionConfig.preset("imagebind_vision_huge"), dtype)
    ignored = tuple(sorted(k for k in sd if _modality_of(k) not in modalities))
    if ignored:
        groups = sorted({_modality_of(k) or k.partition(".")[0] for k in ignored})
        log.info("ImageBind import: ignored %d keys (%s)", len(ignored), ", ".join(groups))
    return ImageBindWeights(audio, vision, ignored)


def save_imagebind(path, audio: Params | None = None, vision: Params | None = None,
                   audio_cfg: ImageBindAudioConfig | None = None,
                   vision_cfg: ImageBindVisionConfig | None = None) -> dict[str, np.ndarray]:
    """Writes the given towers back as an ImageBind-keyed state dict with `torch.save`."""
    sd: dict[str, np.ndarray] = {}
    if audio is not None:
        sd.update(audio_state_dict_from_params(
            audio, audio_cfg or ImageBindAudioConfig.preset("imagebind_audio_huge")))
    if vision is not None:
        sd.update(vision_state_dict_from_params(
            vision, vision_cfg or ImageBindVisionConfig.preset("imagebind_vision_huge")))
    save_state_dict(path, sd)
    return sd
