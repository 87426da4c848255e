"""Video-LLaMA `.pth` checkpoints (DAMO-NLP-SG/Video-LLaMA `VideoLLAMA.state_dict()` names) <-> the
params of `vllama_jax.models.video_llama.VideoLlama`.

The reference saves `{"model": state_dict, "optimizer", "config", "scaler", "epoch"}` where the state
dict holds only the parameters with `requires_grad=True` plus *every* buffer of the model
(`runner_base._save_checkpoint`), and loads it with `load_state_dict(strict=False)`. So a released
vision-branch checkpoint (`ckpt`) holds `video_query_tokens`, `llama_proj.*`,
`video_frame_position_embedding.weight`, `video_Qformer.bert.*`; an audio-branch one (`ckpt_2`)
holds `audio_query_tokens`, `audio_Qformer.bert.*`, `audio_llama_proj.*`,
`audio_position_embedding.weight`; both also carry the buffers (`*.bert.embeddings.position_ids`,
`llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq`, and with the audio branch ImageBind's
`modality_preprocessors.text.mask` and `modality_postprocessors.{audio,depth,thermal,imu}.1.log_logit_scale`).
MiniGPT-4's `pretrained_minigpt4.pth` (the `llama_proj_model` option) holds `llama_proj.*` alone.

The key map covers the *whole* composite, one "component" per module of the reference:

  component                       original keys                         our param path
  visual_encoder                  visual_encoder.*  (EVA, lavis.py)     image_encoder/visual_encoder
  ln_vision                       ln_vision.weight/.bias                image_encoder/ln_vision/scale, bias
  image_qformer                   query_tokens, Qformer.bert.*          image_encoder/qformer
  llama                           llama_model.<HF LLaMA key>            llama
  llama_proj                      llama_proj.weight/.bias (T)           llama_proj/kernel, bias
  video_frame_position_embedding  video_frame_position_embedding.weight video_frame_position_embedding
  video_qformer                   video_query_tokens, video_Qformer.bert.*  video_qformer
  audio_encoder                   audio_encoder.<ImageBind audio key>   audio_encoder
  audio_vision_encoder            audio_encoder.<ImageBind vision key>  audio_vision_encoder
  audio_qformer                   audio_query_tokens, audio_Qformer.bert.*  audio_qformer
  audio_llama_proj                audio_llama_proj.weight/.bias (T)     audio_llama_proj/kernel, bias
  audio_position_embedding        audio_position_embedding.weight       audio_position_embedding

(Q-Former keys as in `lavis.qformer_entries`: the `video_Qformer`/`audio_Qformer` have cross-attention
in every layer and no text FFN (`intermediate`/`output` were set to None), so only
`attention.*`, `crossattention.*`, `intermediate_query.*`, `output_query.*` and
`embeddings.LayerNorm.*` exist; `docs/CHECKPOINT_KEYS.md` lists every key.)

Import finds which components a file holds (any of a component's parameter keys present) and then
requires all of that component's keys (missing ones or wrong shapes raise `CheckpointError` naming
them). Buffers, ImageBind modalities Video-LLaMA does not use and Q-Former text-side keys are
`ignored` with a reason; anything else is `unmatched` (reported, an error with `strict=True`) --
the reference would silently have dropped it. Export writes the reference's names, shapes and
float32 dtype, plus (by default) the buffers a real checkpoint carries, in the reference's module
order, so `VideoLLAMA(...).load_state_dict(ckpt["model"], strict=False)` reports no unexpected keys.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from vllama_jax.convert import hf_llama, imagebind, lavis
from vllama_jax.convert.common import (CheckpointError, ConversionReport, Entry, check_strict, copy_entry,
                                       export_entries, get_path, ignore_rules, import_entries, linear_entries,
                                       moved, norm_entries, np_dtype, read_state_dict, save_state_dict,
                                       sort_rest, transposed_entry)
from vllama_jax import tree_paths
from vllama_jax.models import scan as layer_scan
from vllama_jax.models.video_llama import BRANCHES as MODEL_BRANCHES
from vllama_jax.models.video_llama import VideoLlamaConfig

StateDict = Mapping[str, np.ndarray]
Params = dict[str, Any]

# The reference's module registration order (= its state_dict order after the three query tokens,
# which VideoLLAMA registers on itself).
COMPONENTS = ("visual_encoder", "ln_vision", "image_qformer", "llama", "llama_proj",
              "video_frame_position_embedding", "video_qformer", "audio_encoder", "audio_vision_encoder",
              "audio_qformer", "audio_llama_proj", "audio_position_embedding")
# The trained components of each branch, as the model declares them (`vllama-convert --branch`
# names the vision branch by its medium, 'video').
BRANCHES = {"video": MODEL_BRANCHES["vision"].trains, "audio": MODEL_BRANCHES["audio"].trains}
TRAINABLE = BRANCHES["video"] + BRANCHES["audio"]
AUDIO_COMPONENTS = ("audio_encoder", "audio_vision_encoder") + BRANCHES["audio"]
PARAM_PATHS = {
    "visual_encoder": ("image_encoder", "visual_encoder"), "ln_vision": ("image_encoder", "ln_vision"),
    "image_qformer": ("image_encoder", "qformer"), "llama": ("llama",), "llama_proj": ("llama_proj",),
    "video_frame_position_embedding": ("video_frame_position_embedding",),
    "video_qformer": ("video_qformer",), "audio_encoder": ("audio_encoder",),
    "audio_vision_encoder": ("audio_vision_encoder",), "audio_qformer": ("audio_qformer",),
    "audio_llama_proj": ("audio_llama_proj",), "audio_position_embedding": ("audio_position_embedding",),
}
QUERY_TOKEN_KEYS = ("query_tokens", "video_query_tokens", "audio_query_tokens")
# Standalone files of the frozen towers in this key map: (components, key prefix the file lacks,
# whether the state dict sits under {"model": ...}).
TOWER_FILES = {
    "blip2": (("visual_encoder", "ln_vision", "image_qformer"), "", True),
    "eva_vit": (("visual_encoder",), "visual_encoder.", False),
    "imagebind": (("audio_encoder", "audio_vision_encoder"), "audio_encoder.", False),
}
# Components whose per-layer trees a `scan_layers` config keeps stacked into one tree with a leading
# layer axis (`vllama_jax.models.scan`): component -> (layer prefix, does this config scan it).
SCANNED = {
    "visual_encoder": ("blocks", lambda c: c.vit.scan_layers),
    "llama": ("layers", lambda c: c.llama.scan_layers),
}
# LlamaConfig fields that say how we run the model, not what the checkpoint holds.
LLAMA_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers")

# bert-base-uncased's max_position_embeddings: the size of every Q-Former's position_ids buffer.
BERT_MAX_POSITIONS = 512
IMAGEBIND_TEXT_CONTEXT = 77
# ImageBind's fixed (learnable=False) logit scales, stored as buffers.
IMAGEBIND_LOGIT_SCALES = (("audio", 20.0), ("depth", 5.0), ("thermal", 10.0), ("imu", 5.0))

BUFFER_RULES = (
    (r"(Qformer|video_Qformer|audio_Qformer)\.bert\.embeddings\.position_ids$",
     "BERT position_ids buffer (the Q-Formers use no position embeddings)"),
    (r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",
     "RoPE inv_freq buffer (recomputed from the LLaMA config)"),
    (r"audio_encoder\.modality_preprocessors\.text\.mask$", "ImageBind text causal-mask buffer"),
    (r"audio_encoder\.modality_postprocessors\.\w+\.1\.log_logit_scale$",
     "ImageBind fixed logit-scale buffer (the audio tower's comes from imagebind_huge.pth)"),
)
is_buffer = ignore_rules(BUFFER_RULES)


def _other_rules(config: VideoLlamaConfig) -> list[Callable[[str], str | None]]:
    rules = [is_buffer,
             ignore_rules([(r"audio_encoder\.modality_\w+\.(text|depth|thermal|imu)\.",
                            "ImageBind modality Video-LLaMA does not use")]),
             lavis.eva_vit_ignored(config.vit, "visual_encoder.")]
    rules += [lavis.qformer_ignored(p) for p in ("Qformer.bert.", "video_Qformer.bert.", "audio_Qformer.bert.")]
    if config.llama.tie_word_embeddings:
        rules.append(ignore_rules([(r"llama_model\.lm_head\.weight$", "tied embeddings: lm_head is embed_tokens")]))
    return rules


def _why_ignored(config: VideoLlamaConfig) -> Callable[[str], str | None]:
    rules = _other_rules(config)
    return lambda key: next((why for rule in rules if (why := rule(key)) is not None), None)


# ------------------------------------------------------------------------------------------ key map

def available_components(config: VideoLlamaConfig) -> tuple[str, ...]:
    """The components this config's model has (no audio ones without the audio branch)."""
    have = set(COMPONENTS)
    if config.audio_qformer is None:
        have -= set(AUDIO_COMPONENTS)
    if config.imagebind_audio is None:
        have.discard("audio_encoder")
    if config.imagebind_vision is None:
        have.discard("audio_vision_encoder")
    return tuple(c for c in COMPONENTS if c in have)


def with_hf_llama(config: VideoLlamaConfig, hf) -> VideoLlamaConfig:
    """`config` with the LLaMA architecture of an HF checkpoint (directory, config.json or its dict);
    the runtime fields (dtype, remat, scan) stay `config`'s."""
    runtime = {f: getattr(config.llama, f) for f in LLAMA_RUNTIME_FIELDS if hasattr(config.llama, f)}
    return config.replace(llama=hf_llama.config_from_hf(hf, **runtime))


def _llama_entries(config) -> list[Entry]:
    out = []
    for key, spec in hf_llama.key_map(config).items():
        make = transposed_entry if spec.transpose else copy_entry
        out.append(make(key, spec.hf_shape, spec.path))
    return out


def component_entries(config: VideoLlamaConfig, component: str) -> list[Entry]:
    """The key map of one component: original keys -> paths under the composite's params."""
    c = config
    path = PARAM_PATHS.get(component)
    if component not in available_components(c):
        known = ", ".join(available_components(c))
        raise ValueError(f"component {component!r} is not part of this VideoLlamaConfig (it has: {known})")
    d = c.llama.hidden_size
    if component == "visual_encoder":
        return moved(lavis.eva_vit_entries(c.vit, "visual_encoder."), "", path)
    if component == "ln_vision":
        return moved(norm_entries("ln_vision", (), c.vit.width), "", path)
    if component == "image_qformer":
        return moved(lavis.qformer_entries(c.image_qformer, "Qformer.bert.", "query_tokens"), "", path)
    if component == "llama":
        return moved(_llama_entries(c.llama), "llama_model.", path)
    if component == "llama_proj":
        return linear_entries("llama_proj", path, c.video_qformer.hidden_size, d)
    if component == "video_frame_position_embedding":
        return [copy_entry("video_frame_position_embedding.weight",
                           (c.max_frame_pos, c.video_qformer.encoder_width), path)]
    if component == "video_qformer":
        return moved(lavis.qformer_entries(c.video_qformer, "video_Qformer.bert.", "video_query_tokens"), "", path)
    if component == "audio_encoder":
        return moved(imagebind.audio_entries(c.imagebind_audio), "audio_encoder.", path)
    if component == "audio_vision_encoder":
        return moved(imagebind.vision_entries(c.imagebind_vision), "audio_encoder.", path)
    if component == "audio_qformer":
        return moved(lavis.qformer_entries(c.audio_qformer, "audio_Qformer.bert.", "audio_query_tokens"), "", path)
    if component == "audio_llama_proj":
        return linear_entries("audio_llama_proj", path, c.audio_qformer.hidden_size, d)
    if component == "audio_position_embedding":
        return [copy_entry("audio_position_embedding.weight", (c.max_audio_pos, c.audio_qformer.encoder_width), path)]
    raise AssertionError(component)


def key_map(config: VideoLlamaConfig, components: Iterable[str] | None = None) -> dict[str, list[Entry]]:
    """component -> its entries, for `components` (default: every component the config has)."""
    return {name: component_entries(config, name)
            for name in (available_components(config) if components is None else components)}


def _param_dtype(config: VideoLlamaConfig, component: str):
    tower = {"visual_encoder": config.vit, "ln_vision": config.vit, "image_qformer": config.image_qformer,
             "llama": config.llama, "audio_encoder": config.imagebind_audio,
             "audio_vision_encoder": config.imagebind_vision}.get(component)
    if tower is None:  # the trainable heads follow their Q-Former (as VideoLlama builds them)
        tower = config.audio_qformer if component in BRANCHES["audio"] else config.video_qformer
    return tower.param_dtype


def _detection_keys(entries: list[Entry]) -> list[str]:
    """The parameter keys of a component (a buffer such as ImageBind's audio logit scale, which
    every audio-branch checkpoint carries, does not mean the tower is in the file)."""
    return [e.key for e in entries if is_buffer(e.key) is None]


def components_in(sd: Iterable[str], config: VideoLlamaConfig) -> tuple[str, ...]:
    """The components of which `sd` holds at least one parameter key."""
    keys = set(sd)
    return tuple(name for name, entries in key_map(config).items()
                 if any(k in keys for k in _detection_keys(entries)))


# ------------------------------------------------------------------------------------------ buffers

def buffers(config: VideoLlamaConfig, equip_audio: bool) -> dict[str, dict[str, np.ndarray]]:
    """module -> {key: value} of the buffers `VideoLLAMA.state_dict()` holds, computed as the
    reference computes them (so loading them back into the reference changes nothing)."""
    from vllama_jax.convert.common import import_torch
    torch = import_torch()
    position_ids = torch.arange(BERT_MAX_POSITIONS).expand((1, -1)).numpy().copy()
    dim = config.llama.head_dim
    inv_freq = (1.0 / (config.llama.rope_theta ** (torch.arange(0, dim, 2).float() / dim))).numpy()
    out = {
        "image_qformer": {"Qformer.bert.embeddings.position_ids": position_ids},
        "llama": {f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.copy()
                  for i in range(config.llama.num_layers)},
        "video_qformer": {"video_Qformer.bert.embeddings.position_ids": position_ids.copy()},
    }
    if equip_audio:
        mask = torch.empty(IMAGEBIND_TEXT_CONTEXT, IMAGEBIND_TEXT_CONTEXT).fill_(float("-inf")).triu_(1)
        audio = {"audio_encoder.modality_preprocessors.text.mask": mask.numpy()}
        for modality, init in IMAGEBIND_LOGIT_SCALES:
            audio[f"audio_encoder.modality_postprocessors.{modality}.1.log_logit_scale"] = \
                (torch.ones([]) * np.log(init)).numpy()
        out["audio_encoder"] = audio
        out["audio_qformer"] = {"audio_Qformer.bert.embeddings.position_ids": position_ids.copy()}
    return out


# ------------------------------------------------------------------------------------------ scan_layers

def unstacked(params: Mapping, config: VideoLlamaConfig) -> Mapping:
    """`params` with every stacked (scan_layers) tower back in per-layer trees, as the key map names
    them; unstacked params pass through. Host leaves become views, nothing is copied."""
    for name, (prefix, _) in SCANNED.items():
        path = PARAM_PATHS[name]
        if tree_paths.has(params, path) and layer_scan.is_stacked(get_path(params, path), prefix):
            params = tree_paths.replaced(params, path, layer_scan.unstack_layers(get_path(params, path), prefix))
    return params


def _stack_scanned(params: dict, config: VideoLlamaConfig, component: str) -> dict:
    """Imported per-layer trees of `component` stacked when `config` scans its layers."""
    if component in SCANNED and SCANNED[component][1](config):
        path = PARAM_PATHS[component]
        tree_paths.set_in(params, path, layer_scan.stack_layers(get_path(params, path), SCANNED[component][0]))
    return params


# ------------------------------------------------------------------------------------------ import / export

def _merge_into(dst: dict, src: Mapping) -> dict:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        else:
            dst[k] = v
    return dst


def params_from_state_dict(sd: StateDict, config: VideoLlamaConfig, components: Iterable[str] | None = None,
                           dtype=None, on_tensor: Callable[[str], None] | None = None
                           ) -> tuple[Params, ConversionReport]:
    """Composite params (only the found / requested components' subtrees) from a Video-LLaMA state dict.

    components: None finds them from the keys (`components_in`); given ones are all required.
    dtype: None gives each component its config `param_dtype`.
    """
    if components is None:
        components = components_in(sd, config)
        if not components:
            raise CheckpointError(_nothing_found(sd, config))
    else:
        components = tuple(components)
        for name in components:
            component_entries(config, name)  # raises for unknown / absent components
    params: Params = {}
    used: list[str] = []
    for name in components:
        entries = component_entries(config, name)
        sub = import_entries(sd, entries, f"Video-LLaMA {name}",
                             _param_dtype(config, name) if dtype is None else dtype, on_tensor)
        _merge_into(params, _stack_scanned(sub, config, name))
        used += [e.key for e in entries]
    ignored, unmatched = sort_rest(sd, used, lambda k: True, _why_ignored(config))
    notes = (f"components: {', '.join(components)}",)
    return params, ConversionReport(tuple(used), ignored, unmatched, notes)


def _nothing_found(sd: StateDict, config: VideoLlamaConfig) -> str:
    why = _why_ignored(config)
    keys = [k for k in sd if why(k) is None]
    sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") if keys else "(only buffers)"
    want = ", ".join(f"{c} ({_detection_keys(component_entries(config, c))[0]})"
                     for c in available_components(config) if c in TRAINABLE)
    hint = ""
    if config.audio_qformer is None and any(k.startswith(("audio_Qformer.", "audio_llama_proj.")) for k in sd):
        hint = " It holds audio-branch keys but this config has no audio branch."
    return (f"not a Video-LLaMA checkpoint for this config: none of its components' keys are present "
            f"(looked for e.g. {want}); its {len(sd)} keys start with: {sample}.{hint}")


def export_components(params: Mapping, config: VideoLlamaConfig,
                      components: Iterable[str] | None = None) -> tuple[str, ...]:
    """`components` in the reference's order; None: the trainable ones present in `params`."""
    if components is None:
        components = [c for c in TRAINABLE if c in available_components(config) and tree_paths.has(params, PARAM_PATHS[c])]
        if not components:
            raise CheckpointError(f"params hold none of the trainable Video-LLaMA subtrees "
                                  f"({', '.join(PARAM_PATHS[c][0] for c in TRAINABLE)}); have {sorted(params)}")
    components = set(components)
    for name in components:
        component_entries(config, name)  # raises for unknown / absent components
    return tuple(c for c in COMPONENTS if c in components)


def state_dict_from_params(params: Mapping, config: VideoLlamaConfig, components: Iterable[str] | None = None,
                           dtype=np.float32, include_buffers: bool = True,
                           on_tensor: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Reference-named arrays of `components` (default: the trainable ones present in `params`).

    dtype: stored dtype (float32, what the reference trains in); None keeps each array's dtype.
    include_buffers: add the buffers the reference saves next to them (audio ones when an audio
      component is exported, since only then was the reference built with its audio branch).
    The order is the reference's state_dict order.
    """
    components = export_components(params, config, components)
    params = unstacked(params, config)
    maps = key_map(config, components)
    extra = buffers(config, bool(set(components) & set(AUDIO_COMPONENTS))) if include_buffers else {}
    body: dict[str, np.ndarray] = {}
    for name in COMPONENTS:
        for key, value in extra.get(name, {}).items():
            body[key] = value
        if name in maps:
            body.update(export_entries(params, maps[name], dtype, on_tensor))
    head = {k: body.pop(k) for k in QUERY_TOKEN_KEYS if k in body}
    return {**head, **body}


def reference_config(config: VideoLlamaConfig, components: Iterable[str]) -> dict:
    """The `"config"` entry of an exported file: the reference's model options for these weights
    (plain types only, so the file stays loadable with `weights_only=True`)."""
    components = set(components)
    c = config
    model = {
        "arch": "video_llama", "max_frame_pos": c.max_frame_pos,
        "num_query_token": c.image_qformer.num_query_tokens,
        "num_video_query_token": c.video_qformer.num_query_tokens,
        "equip_audio_branch": bool(components & set(AUDIO_COMPONENTS)),
        "frozen_llama_proj": "llama_proj" not in components,
        "frozen_video_Qformer": "video_qformer" not in components,
        "frozen_audio_Qformer": "audio_qformer" not in components,
    }
    if c.audio_qformer is not None:
        model["num_audio_query_token"] = c.audio_qformer.num_query_tokens
    return {"model": model, "exported_by": "vllama_jax", "components": sorted(components, key=COMPONENTS.index)}


# ------------------------------------------------------------------------------------------ files

def load_video_llama(path, config: VideoLlamaConfig, components: Iterable[str] | None = None,
                     strict: bool = False, dtype=None, on_tensor: Callable[[str], None] | None = None
                     ) -> tuple[Params, ConversionReport]:
    """A Video-LLaMA (or MiniGPT-4 `llama_proj`) `.pth` -> `(params of the components found, report)`."""
    sd = read_state_dict(path)
    try:
        params, report = params_from_state_dict(sd, config, components, dtype, on_tensor)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    return params, check_strict(report, strict, path)


def save_video_llama(path, params: Mapping, config: VideoLlamaConfig, components: Iterable[str] | None = None,
                     dtype=np.float32, include_buffers: bool = True, overwrite: bool = True,
                     on_tensor: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Writes `{"model": state_dict, "optimizer": None, "config": ..., "scaler": None, "epoch": 0}` as
    the reference's `_save_checkpoint` does (atomically); returns the state dict written."""
    components = export_components(params, config, components)
    sd = state_dict_from_params(params, config, components, np_dtype(dtype), include_buffers, on_tensor)
    save_state_dict(path, sd, wrap=True, overwrite=overwrite,
                    extra={"optimizer": None, "config": reference_config(config, components), "scaler": None,
                           "epoch": 0})
    return sd
