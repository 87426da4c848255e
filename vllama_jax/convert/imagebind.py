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
import os
from typing import Any, Callable, Mapping

import numpy as np

from vllama_jax.models.imagebind import ImageBindAudioConfig, ImageBindVisionConfig

log = logging.getLogger(__name__)

StateDict = Mapping[str, np.ndarray]
Params = dict[str, Any]
MODALITY_GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads",
                   "modality_postprocessors")


class ImageBindCheckpointError(ValueError):
    """An ImageBind checkpoint does not fit the configured tower, or cannot be read."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One torch tensor <-> one or more Flax arrays."""
    key: str
    torch_shape: tuple[int, ...]
    paths: tuple[tuple[str, ...], ...]
    to_flax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_torch: Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageBindWeights:
    """Result of `import_imagebind`: params per tower (None when not requested) and skipped keys."""
    audio: Params | None
    vision: Params | None
    ignored: tuple[str, ...]


def _same(key, shape, path) -> _Entry:
    return _Entry(key, tuple(shape), (path,), lambda a: (a,), lambda a: a)


def _linear_kernel(key, n_out, n_in, path) -> _Entry:
    return _Entry(key, (n_out, n_in), (path,), lambda a: (a.T,), lambda a: a.T)


def _layer_norm(prefix, d, path) -> list[_Entry]:
    return [_same(prefix + "weight", (d,), path + ("scale",)), _same(prefix + "bias", (d,), path + ("bias",))]


def _conv_kernel(key, torch_shape, path) -> _Entry:
    """torch [out, in, *window] <-> Flax [*window, in, out]."""
    nd = len(torch_shape)
    fwd = tuple(range(2, nd)) + (1, 0)
    inv = tuple(int(i) for i in np.argsort(fwd))
    return _Entry(key, tuple(torch_shape), (path,), lambda a: (a.transpose(fwd),),
                  lambda a: a.transpose(inv))


def _attention_entries(prefix: str, path: tuple[str, ...], d: int, heads: int,
                       bias_kv: bool) -> list[_Entry]:
    dh = d // heads
    names = ("query", "key", "value")

    def split_weight(w):  # [3D, D] (out, in) -> 3 x [D, H, dh]
        return tuple(part.T.reshape(d, heads, dh) for part in np.split(w, 3, axis=0))

    def join_weight(*ks):
        return np.concatenate([k.reshape(d, d).T for k in ks], axis=0)

    entries = [
        _Entry(prefix + "in_proj_weight", (3 * d, d), tuple(path + (n, "kernel") for n in names),
               split_weight, join_weight),
        _Entry(prefix + "in_proj_bias", (3 * d,), tuple(path + (n, "bias") for n in names),
               lambda b: tuple(p.reshape(heads, dh) for p in np.split(b, 3)),
               lambda *bs: np.concatenate([b.reshape(d) for b in bs])),
        _Entry(prefix + "out_proj.weight", (d, d), (path + ("out_kernel",),),
               lambda w: (w.T.reshape(heads, dh, d),), lambda k: k.reshape(d, d).T),
        _same(prefix + "out_proj.bias", (d,), path + ("out_bias",)),
    ]
    if bias_kv:
        for n in ("bias_k", "bias_v"):
            entries.append(_Entry(prefix + n, (1, 1, d), (path + (n,),),
                                  lambda b: (b.reshape(heads, dh),), lambda b: b.reshape(1, 1, d)))
    return entries


def _trunk_entries(cfg, modality: str) -> list[_Entry]:
    d, root = cfg.embed_dim, f"modality_trunks.{modality}."
    entries = []
    if cfg.pre_transformer_ln:
        entries += _layer_norm(root + "pre_transformer_layer.0.", d, ("trunk", "pre_norm"))
    hidden = cfg.mlp_ratio * d
    for i in range(cfg.num_blocks):
        p, path = f"{root}blocks.{i}.", ("trunk", f"block_{i}")
        entries += _layer_norm(p + "norm_1.", d, path + ("norm_1",))
        entries += _layer_norm(p + "norm_2.", d, path + ("norm_2",))
        entries += _attention_entries(p + "attn.", path + ("attn",), d, cfg.num_heads, cfg.add_bias_kv)
        entries += [
            _linear_kernel(p + "mlp.fc1.weight", hidden, d, path + ("mlp", "fc1", "kernel")),
            _same(p + "mlp.fc1.bias", (hidden,), path + ("mlp", "fc1", "bias")),
            _linear_kernel(p + "mlp.fc2.weight", d, hidden, path + ("mlp", "fc2", "kernel")),
            _same(p + "mlp.fc2.bias", (d,), path + ("mlp", "fc2", "bias")),
        ]
    return entries


def _common_entries(cfg, modality: str) -> list[_Entry]:
    d, pre = cfg.embed_dim, f"modality_preprocessors.{modality}."
    head = f"modality_heads.{modality}."
    return [
        _same(pre + "cls_token", (1, 1, d), ("cls_token",)),
        _same(pre + "pos_embedding_helper.pos_embed", (1, cfg.num_tokens, d), ("pos_embed",)),
        *_trunk_entries(cfg, modality),
        *_layer_norm(head + "0.", d, ("head_norm",)),
        _linear_kernel(head + "2.weight", cfg.out_embed_dim, d, ("head", "kernel")),
    ]


def audio_entries(cfg: ImageBindAudioConfig) -> list[_Entry]:
    pre, k, d = "modality_preprocessors.audio.", cfg.kernel_size, cfg.embed_dim
    return [
        _conv_kernel(pre + "rgbt_stem.proj.weight", (d, 1, k, k), ("stem_kernel",)),
        *_layer_norm(pre + "rgbt_stem.norm_layer.", d, ("stem_norm",)),
        *_common_entries(cfg, "audio"),
        _same("modality_postprocessors.audio.1.log_logit_scale", (), ("log_logit_scale",)),
    ]


def vision_entries(cfg: ImageBindVisionConfig) -> list[_Entry]:
    pre, p, d = "modality_preprocessors.vision.", cfg.patch_size, cfg.embed_dim
    return [
        _conv_kernel(pre + "rgbt_stem.proj.1.weight", (d, cfg.in_channels, cfg.num_frames, p, p),
                     ("stem_kernel",)),
        *_common_entries(cfg, "vision"),
    ]


def expected_keys(entries: list[_Entry]) -> dict[str, tuple[int, ...]]:
    return {e.key: e.torch_shape for e in entries}


# ----------------------------------------------------------------------------- generic import/export

def _modality_of(key: str) -> str | None:
    group, _, rest = key.partition(".")
    return rest.partition(".")[0] if group in MODALITY_GROUPS else None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    node = tree
    for i, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise ImageBindCheckpointError(f"params have no entry {'/'.join(path[:i + 1])}")
        node = node[name]
    return np.asarray(node)


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    return a if dtype is None else np.asarray(a, dtype)


def _import(sd: StateDict, entries: list[_Entry], modality: str, what: str, dtype) -> Params:
    expected = expected_keys(entries)
    missing = [k for k in expected if k not in sd]
    if missing:
        shown = ", ".join(f"{k} {expected[k]}" for k in missing[:5])
        raise ImageBindCheckpointError(
            f"{what}: checkpoint lacks {len(missing)} expected key(s): {shown}"
            + (" ..." if len(missing) > 5 else ""))
    surplus = sorted(k for k in sd if _modality_of(k) == modality and k not in expected)
    if surplus:
        raise ImageBindCheckpointError(
            f"{what}: checkpoint has {modality} key(s) the config does not expect (does the config "
            f"match the checkpoint, e.g. num_blocks?): {', '.join(surplus[:5])}"
            + (" ..." if len(surplus) > 5 else ""))
    params: Params = {}
    for e in entries:
        a = np.asarray(sd[e.key])
        if tuple(a.shape) != e.torch_shape:
            raise ImageBindCheckpointError(
                f"{what}: {e.key} has shape {tuple(a.shape)}, the config expects {e.torch_shape}")
        for path, value in zip(e.paths, e.to_flax(a)):
            _set(params, path, _cast(np.array(value, order="C"), dtype))
    return params


def _export(params: Params, entries: list[_Entry], dtype) -> dict[str, np.ndarray]:
    out = {}
    for e in entries:
        arr = np.array(e.to_torch(*[_get(params, p) for p in e.paths]), order="C")
        if tuple(arr.shape) != e.torch_shape:
            raise ImageBindCheckpointError(
                f"params for {e.key} give shape {tuple(arr.shape)}, expected {e.torch_shape}")
        out[e.key] = _cast(arr, dtype)
    return out


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

def _tensor_to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; keep the bits
        import ml_dtypes  # noqa: PLC0415
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_state_dict(path) -> dict[str, np.ndarray]:
    """`torch.load(path, weights_only=True)` as numpy arrays (torch is imported only here)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageBindCheckpointError(f"ImageBind checkpoint {path!r} does not exist")
    import torch  # noqa: PLC0415

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a broken file
        raise ImageBindCheckpointError(
            f"cannot read {path!r} as a PyTorch state dict (torch.load weights_only=True): {e}") from e
    if isinstance(obj, Mapping) and set(obj) == {"model"}:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ImageBindCheckpointError(f"{path!r} holds a {type(obj).__name__}, expected a state dict "
                                       "(str -> tensor) of ImageBindModel")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ImageBindCheckpointError(f"{path!r}: entries {bad[:5]} are not tensors")
    return {k: _tensor_to_numpy(v) for k, v in obj.items()}


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
    import torch  # noqa: PLC0415

    sd: dict[str, np.ndarray] = {}
    if audio is not None:
        sd.update(audio_state_dict_from_params(
            audio, audio_cfg or ImageBindAudioConfig.preset("imagebind_audio_huge")))
    if vision is not None:
        sd.update(vision_state_dict_from_params(
            vision, vision_cfg or ImageBindVisionConfig.preset("imagebind_vision_huge")))
    torch.save({k: _numpy_to_tensor(v) for k, v in sd.items()}, os.fspath(path))
    return sd


def _numpy_to_tensor(a: np.ndarray):
    import torch  # noqa: PLC0415

    a = np.array(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
