"""LAVIS / BLIP-2 / Video-LLaMA PyTorch weights <-> Flax params of `EvaViT`, `QFormer`, `Blip2ImageEncoder`.

Files this reads (all through `torch.load(weights_only=True)`):
  * `eva_vit_g.pth`: a flat state dict of LAVIS `eva_vit.VisionTransformer` (40 blocks; BLIP-2 uses 39).
  * BLIP-2 checkpoints (`blip2_pretrained_flant5xxl.pth`, ...): `{"model": state_dict}` with
    `visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, `query_tokens` and text-side weights.
  * Video-LLaMA checkpoints: `{"model": state_dict}` with `video_Qformer.bert.*`, `video_query_tokens`,
    `audio_Qformer.bert.*`, `audio_query_tokens` (the composite converter passes those prefixes).

Key map, EVA ViT (torch key under `prefix` -> Flax path under the ViT's params; `D` = width):
  cls_token [1,1,D]                     -> cls_token
  pos_embed [1,1+g*g,D]                 -> pos_embed (bicubic-resampled to the config grid if g differs,
                                           as LAVIS `interpolate_pos_embed`)
  patch_embed.proj.weight [D,3,p,p]     -> patch_embed/kernel [p*p*3, D] (rows ordered (y, x, c))
  patch_embed.proj.bias                 -> patch_embed/bias
  blocks.{i}.norm1|norm2.weight/.bias   -> blocks_{i}/norm1|norm2/scale, bias
  blocks.{i}.attn.qkv.weight [3D,D]     -> blocks_{i}/attn/query|key|value/kernel (split in thirds, transposed)
  blocks.{i}.attn.q_bias, .v_bias       -> blocks_{i}/attn/query/bias, value/bias (k has no bias)
  blocks.{i}.attn.proj.weight/.bias     -> blocks_{i}/attn/proj/kernel (transposed), bias
  blocks.{i}.mlp.fc1|fc2.weight/.bias   -> blocks_{i}/fc1|fc2/kernel (transposed), bias
  ignored: blocks.{i >= depth}.* (BLIP-2 drops EVA's 40th block), norm.*, fc_norm.*, head.* (LAVIS
  builds no final norm or classifier).
  With `EvaViTConfig.scan_layers` the `blocks_{i}` trees are stacked into one `blocks` tree with a
  leading [depth] axis on import, and unstacked on export (`vllama_jax.models.scan`).

Key map, Q-Former (torch key under `prefix`, e.g. `Qformer.bert.` -> Flax path under the QFormer's params):
  {query_key} [1,Q,H] (no prefix)                    -> query_tokens
  embeddings.LayerNorm.weight/.bias                  -> embed_norm/scale, bias
  encoder.layer.{i}.attention.self.query|key|value.* -> layer_{i}/attention/query|key|value/kernel, bias
  encoder.layer.{i}.attention.output.dense.*         -> layer_{i}/attention/output/kernel, bias
  encoder.layer.{i}.attention.output.LayerNorm.*     -> layer_{i}/attention/norm/scale, bias
  encoder.layer.{i}.crossattention.(same as above)   -> layer_{i}/crossattention/... (layers i % freq == 0;
                                                        key/value take the encoder width)
  encoder.layer.{i}.intermediate_query.dense.*       -> layer_{i}/ffn/intermediate/kernel, bias
  encoder.layer.{i}.output_query.dense.*             -> layer_{i}/ffn/output/kernel, bias
  encoder.layer.{i}.output_query.LayerNorm.*         -> layer_{i}/ffn/norm/scale, bias
  ignored (text side): embeddings.word_embeddings.*, embeddings.position_embeddings.*,
  embeddings.position_ids, encoder.layer.{i}.intermediate.* / .output.* (the text FFN), pooler.*.
  Every torch Linear `weight [out, in]` becomes a Flax `kernel [in, out]`.

BLIP-2 composite: the above with prefixes `visual_encoder.` and `Qformer.bert.`, `query_tokens`, plus
  ln_vision.weight/.bias -> ln_vision/scale, bias; ignored: Qformer.cls.*, text_proj, vision_proj,
  itm_head, temp, t5_proj/opt_proj/llm_proj and the language models.

Conversions return `(params, ConversionReport)`; missing keys and wrong shapes raise `CheckpointError`
naming them; keys nobody claims are listed in `report.unmatched` (an error with `strict=True`).
The inverse functions give the original names and layouts back; both directions are bit exact.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import numpy as np

from vllama_jax.convert.common import (CheckpointError, ConversionReport, Entry, check_strict, copy_entry,
                                       export_entries, expected_keys, ignore_rules, import_entries,
                                       linear_entries, norm_entries, np_dtype, read_state_dict, sort_rest)
from vllama_jax.models import scan as layer_scan
from vllama_jax.models.qformer import QFormerConfig
from vllama_jax.models.vit import EvaViTConfig, interpolate_pos_embed

StateDict = Mapping[str, np.ndarray]
Params = dict[str, Any]

__all__ = ["CheckpointError", "ConversionReport", "expected_keys", "read_state_dict", "eva_vit_entries",
           "qformer_entries", "eva_vit_params_from_state_dict", "eva_vit_state_dict_from_params",
           "qformer_params_from_state_dict", "qformer_state_dict_from_params",
           "blip2_image_encoder_params_from_state_dict", "blip2_image_encoder_state_dict_from_params",
           "load_eva_vit", "load_qformer", "load_blip2_image_encoder"]


# --- the key map ------------------------------------------------------------------------------------

def _patch_entry(key: str, d: int, c: int, p: int, path) -> Entry:
    """Conv patch embedding `[D, C, p, p]` <-> a Dense kernel `[p*p*C, D]` with rows ordered (y, x, c)."""
    return Entry(key, (d, c, p, p), (path,),
                 lambda a: (a.transpose(2, 3, 1, 0).reshape(p * p * c, d),),
                 lambda k: k.reshape(p, p, c, d).transpose(3, 2, 0, 1))


def _qkv_entry(key: str, d: int, paths) -> Entry:
    """A fused `qkv.weight [3D, D]` <-> three Dense kernels `[D, D]`."""
    return Entry(key, (3 * d, d), paths,
                 lambda a: tuple(part.T for part in np.split(a, 3, axis=0)),
                 lambda *ks: np.concatenate([k.T for k in ks], axis=0))


def eva_vit_entries(config: EvaViTConfig, prefix: str = "") -> list[Entry]:
    d, p = config.width, config.patch_size
    out = [
        copy_entry(f"{prefix}cls_token", (1, 1, d), ("cls_token",)),
        copy_entry(f"{prefix}pos_embed", (1, config.num_patches + 1, d), ("pos_embed",)),
        _patch_entry(f"{prefix}patch_embed.proj.weight", d, config.in_channels, p, ("patch_embed", "kernel")),
        copy_entry(f"{prefix}patch_embed.proj.bias", (d,), ("patch_embed", "bias")),
    ]
    for i in range(config.depth):
        k, b = f"{prefix}blocks.{i}.", (f"blocks_{i}",)
        attn = b + ("attn",)
        out += norm_entries(k + "norm1", b + ("norm1",), d)
        out.append(_qkv_entry(k + "attn.qkv.weight", d, tuple(attn + (n, "kernel") for n in ("query", "key", "value"))))
        out.append(copy_entry(k + "attn.q_bias", (d,), attn + ("query", "bias")))
        out.append(copy_entry(k + "attn.v_bias", (d,), attn + ("value", "bias")))
        out += linear_entries(k + "attn.proj", attn + ("proj",), d, d)
        out += norm_entries(k + "norm2", b + ("norm2",), d)
        out += linear_entries(k + "mlp.fc1", b + ("fc1",), d, config.mlp_dim)
        out += linear_entries(k + "mlp.fc2", b + ("fc2",), config.mlp_dim, d)
    return out


def eva_vit_ignored(config: EvaViTConfig, prefix: str):
    """`why_ignored(key)` for EVA keys LAVIS' ViT does not build (extra blocks, final norm, head)."""
    extra_block = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")

    def why(key: str) -> str | None:
        m = extra_block.match(key)
        if m and int(m.group(1)) >= config.depth:
            return f"EVA block beyond depth {config.depth} (BLIP-2 drops the last block)"
        if re.match(re.escape(prefix) + r"(norm|fc_norm|head)\.", key):
            return "final norm / classifier head that LAVIS' ViT does not build"
        return None
    return why


def qformer_entries(config: QFormerConfig, prefix: str = "Qformer.bert.",
                    query_key: str = "query_tokens") -> list[Entry]:
    h, w = config.hidden_size, config.encoder_width
    out = [copy_entry(query_key, (1, config.num_query_tokens, h), ("query_tokens",))]
    out += norm_entries(f"{prefix}embeddings.LayerNorm", ("embed_norm",), h)
    for i in range(config.num_layers):
        k, b = f"{prefix}encoder.layer.{i}.", (f"layer_{i}",)
        blocks = [("attention", h)] + ([("crossattention", w)] if config.has_cross_attention(i) else [])
        for name, kv_in in blocks:
            out += linear_entries(f"{k}{name}.self.query", b + (name, "query"), h, h)
            out += linear_entries(f"{k}{name}.self.key", b + (name, "key"), kv_in, h)
            out += linear_entries(f"{k}{name}.self.value", b + (name, "value"), kv_in, h)
            out += linear_entries(f"{k}{name}.output.dense", b + (name, "output"), h, h)
            out += norm_entries(f"{k}{name}.output.LayerNorm", b + (name, "norm"), h)
        out += linear_entries(f"{k}intermediate_query.dense", b + ("ffn", "intermediate"), h,
                              config.intermediate_size)
        out += linear_entries(f"{k}output_query.dense", b + ("ffn", "output"), config.intermediate_size, h)
        out += norm_entries(f"{k}output_query.LayerNorm", b + ("ffn", "norm"), h)
    return out


QFORMER_IGNORED = (
    (r"embeddings\.(word_embeddings\.|position_embeddings\.|position_ids$)",
     "Q-Former text embeddings (queries only, no position embeddings)"),
    (r"encoder\.layer\.\d+\.(intermediate|output)\.", "Q-Former text FFN (queries use the *_query FFN)"),
    (r"pooler\.", "BERT pooler (unused)"),
)


def qformer_ignored(prefix: str):
    """`why_ignored(key)` for the text-side keys of a LAVIS Q-Former under `prefix`."""
    return ignore_rules(QFORMER_IGNORED, prefix)


_BLIP2_IGNORED = re.compile(
    r"(Qformer\.cls\.|text_proj\.|vision_proj\.|itm_head\.|temp$|(t5|opt|llm)_proj\.|(t5|opt|llm)_model\.)")


def _import(sd: StateDict, entries: list[Entry], in_scope, why_ignored, dtype, what: str):
    params = import_entries(sd, entries, what, dtype)
    ignored, unmatched = sort_rest(sd, (e.key for e in entries), in_scope, why_ignored)
    return params, ConversionReport(tuple(e.key for e in entries), ignored, unmatched)


# --- public pure functions --------------------------------------------------------------------------

def eva_vit_params_from_state_dict(sd: StateDict, config: EvaViTConfig, prefix: str = "",
                                   dtype=None) -> tuple[Params, ConversionReport]:
    """EvaViT params from a LAVIS `VisionTransformer` state dict; only keys under `prefix` are looked at.

    `dtype` defaults to `config.param_dtype`. A `pos_embed` for another (square) patch grid is
    resampled to the config grid and noted in the report.
    """
    dtype = np_dtype(config.param_dtype if dtype is None else dtype)
    notes = ()
    pos_key = f"{prefix}pos_embed"
    want = (1, config.num_patches + 1, config.width)
    if pos_key in sd and np.shape(sd[pos_key]) != want and np.shape(sd[pos_key])[-1:] == want[-1:]:
        found = np.shape(sd[pos_key])
        try:
            pos = interpolate_pos_embed(np.asarray(sd[pos_key], np.float32), (config.grid_size,) * 2)
        except ValueError as e:
            raise CheckpointError(f"EVA ViT: checkpoint key {pos_key!r} has shape {found}, expected {want} "
                                  f"or another square patch grid") from e
        sd = {**sd, pos_key: pos}
        notes = (f"{pos_key}: resampled {found} -> {want} (bicubic, as LAVIS interpolate_pos_embed)",)
    params, report = _import(sd, eva_vit_entries(config, prefix), lambda k: k.startswith(prefix),
                             eva_vit_ignored(config, prefix), dtype, "EVA ViT")
    if config.scan_layers:
        params = layer_scan.stack_layers(params, "blocks")
    return params, dataclasses.replace(report, notes=notes)


def eva_vit_state_dict_from_params(params: Params, config: EvaViTConfig, prefix: str = "",
                                   dtype=None) -> dict[str, np.ndarray]:
    """Inverse of `eva_vit_params_from_state_dict`: LAVIS names and layouts (numpy arrays)."""
    if layer_scan.is_stacked(params, "blocks"):
        params = layer_scan.unstack_layers(jax.device_get(params), "blocks")
    return export_entries(params, eva_vit_entries(config, prefix), np_dtype(dtype))


def qformer_params_from_state_dict(sd: StateDict, config: QFormerConfig, prefix: str = "Qformer.bert.",
                                   query_key: str = "query_tokens", dtype=None
                                   ) -> tuple[Params, ConversionReport]:
    """QFormer params from LAVIS `BertModel` keys under `prefix` plus the `query_key` tensor.

    Video-LLaMA: `prefix='video_Qformer.bert.', query_key='video_query_tokens'` (or `audio_`).
    `dtype` defaults to `config.param_dtype`.
    """
    dtype = np_dtype(config.param_dtype if dtype is None else dtype)
    return _import(sd, qformer_entries(config, prefix, query_key), lambda k: k.startswith(prefix),
                   qformer_ignored(prefix), dtype, "Q-Former")


def qformer_state_dict_from_params(params: Params, config: QFormerConfig, prefix: str = "Qformer.bert.",
                                   query_key: str = "query_tokens", dtype=None) -> dict[str, np.ndarray]:
    """Inverse of `qformer_params_from_state_dict` (query-path keys only; no text-side weights)."""
    return export_entries(params, qformer_entries(config, prefix, query_key), np_dtype(dtype))


def _ln_vision_entries(width: int, prefix: str = "ln_vision") -> list[Entry]:
    return norm_entries(prefix, (), width)


def blip2_image_encoder_params_from_state_dict(sd: StateDict, vit_config: EvaViTConfig,
                                               qformer_config: QFormerConfig, dtype=None
                                               ) -> tuple[Params, ConversionReport]:
    """`Blip2ImageEncoder` params from a BLIP-2 state dict (the `"model"` dict of the .pth).

    Every key is accounted for: loaded, ignored on purpose (text side, LM projections) or unmatched.
    """
    vit, r_vit = eva_vit_params_from_state_dict(sd, vit_config, "visual_encoder.", dtype)
    ln, r_ln = _import(sd, _ln_vision_entries(vit_config.width), lambda k: k.startswith("ln_vision."),
                       lambda k: None, np_dtype(vit_config.param_dtype if dtype is None else dtype), "ln_vision")
    qf, r_qf = qformer_params_from_state_dict(sd, qformer_config, "Qformer.bert.", "query_tokens", dtype)
    report = r_vit.merge(r_ln, r_qf)
    seen = set(report.loaded) | set(report.ignored) | set(report.unmatched)
    rest = [k for k in sd if k not in seen]
    ignored = {k: "BLIP-2 text side / language-model part" for k in rest if _BLIP2_IGNORED.match(k)}
    unmatched = tuple(k for k in rest if k not in ignored)
    report = report.merge(ConversionReport((), ignored, unmatched))
    return {"visual_encoder": vit, "ln_vision": ln, "qformer": qf}, report


def blip2_image_encoder_state_dict_from_params(params: Params, vit_config: EvaViTConfig,
                                               qformer_config: QFormerConfig, dtype=None
                                               ) -> dict[str, np.ndarray]:
    """Inverse of `blip2_image_encoder_params_from_state_dict` (image path only)."""
    for name in ("visual_encoder", "ln_vision", "qformer"):
        if name not in params:
            raise CheckpointError(f"params: missing subtree {name!r} (have {sorted(params)})")
    return {
        **eva_vit_state_dict_from_params(params["visual_encoder"], vit_config, "visual_encoder.", dtype),
        **export_entries(params["ln_vision"], _ln_vision_entries(vit_config.width), np_dtype(dtype)),
        **qformer_state_dict_from_params(params["qformer"], qformer_config, "Qformer.bert.", "query_tokens", dtype),
    }


# --- files -------------------------------------------------------------------------------------------

def load_eva_vit(path, config: EvaViTConfig, prefix: str = "", strict: bool = False, dtype=None):
    """`eva_vit_g.pth` -> `(EvaViT params, report)`."""
    params, report = eva_vit_params_from_state_dict(read_state_dict(path), config, prefix, dtype)
    return params, check_strict(report, strict, path)


def load_qformer(path, config: QFormerConfig, prefix: str = "Qformer.bert.", query_key: str = "query_tokens",
                 strict: bool = False, dtype=None):
    """One Q-Former out of a BLIP-2 or Video-LLaMA `.pth` -> `(QFormer params, report)`."""
    params, report = qformer_params_from_state_dict(read_state_dict(path), config, prefix, query_key, dtype)
    return params, check_strict(report, strict, path)


def load_blip2_image_encoder(path, vit_config: EvaViTConfig, qformer_config: QFormerConfig,
                             strict: bool = False, dtype=None):
    """A BLIP-2 `.pth` -> `(Blip2ImageEncoder params, report)`."""
    params, report = blip2_image_encoder_params_from_state_dict(read_state_dict(path), vit_config,
                                                                qformer_config, dtype)
    return params, check_strict(report, strict, path)
