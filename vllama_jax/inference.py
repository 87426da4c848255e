"""Loading a trained Video-LLaMA for inference (chat, evaluation, the demo).

`load_for_inference` is the one entry point. It accepts

  * a trainer workdir (`<dir>/checkpoints/<step>/...`, see `vllama_jax.checkpoint`) together with
    the trainer's ml_collections config (a `configs/*.py` path or a ConfigDict). The full params
    are assembled as training assembles them: random init, the frozen towers from the config's
    pretrained paths (`VideoLlamaTask.load_pretrained`), the workdir's `frozen/` checkpoint when it
    was saved, then the trained params of the newest (or given) step. Several workdirs may be
    given (e.g. the vision-branch run, then the audio-branch run, as the reference's `ckpt` and
    `ckpt_2`); each overlays only the params it trained.
  * a params checkpoint directory written by `vllama-convert import` (the released Video-LLaMA
    heads with the LLaMA, BLIP-2 and ImageBind towers); the model config is its manifest's.
  * a `.msgpack` of the full params tree (`save_params_msgpack`) together with a
    `VideoLlamaConfig` (or a preset name, a trainer config, a config file giving either); the tokenizer directory is given or sits next to the
    file as `tokenizer/`.

It returns an `InferenceModel`: config, params, tokenizer and the media layout the model was
trained with (frames, image size, audio clips, conversation style).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from data_pipelines.prompts import CONV_STYLES
from vllama_jax import config_loader
from vllama_jax.models.video_llama import VideoLlamaConfig, init_params

log = logging.getLogger(__name__)


class LoadError(ValueError):
    """A checkpoint, config or tokenizer for inference is missing or does not fit."""


@dataclasses.dataclass
class InferenceModel:
    config: VideoLlamaConfig
    params: dict                 # the full params tree (no 'params' wrapper)
    tokenizer: Any               # an HF tokenizer
    conv_style: str = "vicuna"   # 'vicuna' (###Human/###Assistant) or 'llama_v2' ([INST])
    num_frames: int = 8
    image_size: int = 224
    num_audio_clips: int = 8

    def __post_init__(self):
        if self.conv_style not in CONV_STYLES:
            raise LoadError(f"conv_style must be one of {CONV_STYLES}, got {self.conv_style!r}")


def unwrap_params(tree: Any) -> dict:
    """Accepts `{'params': {...}}` (Flax variables) or the bare params dict."""
    if isinstance(tree, dict) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def abstract_params(config: VideoLlamaConfig) -> dict:
    return unwrap_params(jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0)))


def check_params(params: dict, config: VideoLlamaConfig, where: str) -> None:
    """Every param of `config` present with its shape, nothing extra; errors name the paths."""
    from vllama_jax.train.partition import flatten

    want = {k: tuple(v.shape) for k, v in flatten(abstract_params(config)).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:4]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {extra[:4]})")
        if wrong:
            parts.append("wrong shape " + ", ".join(f"{k}: {have[k]} != {want[k]}" for k in wrong[:4]))
        raise LoadError(f"{where}: params do not fit the model config: " + "; ".join(parts))


# ------------------------------------------------------------------------------------ msgpack

def save_params_msgpack(params: Any, path: str | os.PathLike) -> str:
    """Writes the full params tree (host copy) as a flax msgpack state dict."""
    from flax import serialization

    path = os.fspath(path)
    data = serialization.msgpack_serialize(jax.tree.map(np.asarray, unwrap_params(params)))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def load_params_msgpack(path: str | os.PathLike, config: VideoLlamaConfig) -> dict:
    from flax import serialization

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"params file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            params = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types for a broken file
        raise LoadError(f"params file {path!r} is not a flax msgpack state dict: {e}") from e
    params = unwrap_params(params)
    if not isinstance(params, dict):
        raise LoadError(f"params file {path!r} holds a {type(params).__name__}, expected a dict of params")
    check_params(params, config, path)
    return params


# ------------------------------------------------------------------------------------ trainer workdirs

def _as_load_error(fn, *args, **kwargs):
    from vllama_jax.convert.common import CheckpointError

    try:
        return fn(*args, **kwargs)
    except CheckpointError as e:
        raise LoadError(str(e)) from e


def _trained_params(workdir: str, step: int | None) -> tuple[dict, str]:
    """Only the trained params of one step of a trainer workdir (host arrays) and the step dir."""
    from vllama_jax.convert import params_checkpoint as pc

    state_dir = _as_load_error(pc.locate, workdir, step)[0][0]
    return _as_load_error(pc.load_params, state_dir.parent), str(state_dir.parent)


def _frozen_params(workdir: str) -> dict | None:
    from vllama_jax.convert import params_checkpoint as pc

    frozen = os.path.join(workdir, "frozen")
    if not os.path.isdir(frozen):
        return None
    return _as_load_error(pc.load_params, frozen)


def _overlay(base: dict, update: dict, where: str) -> dict:
    """`base` with `update`'s leaves put in (new paths added; a path in both must keep its shape)."""
    from vllama_jax.train.partition import flatten, unflatten

    flat = flatten(base)
    for k, v in flatten(update).items():
        if k in flat and tuple(np.shape(v)) != tuple(np.shape(flat[k])):
            raise LoadError(f"{where}: {k} has shape {np.shape(v)}, expected {np.shape(flat[k])}")
        flat[k] = v
    return unflatten(flat)


def _from_workdirs(workdirs: Sequence[str], train_config, step: int | None) -> tuple[VideoLlamaConfig, dict]:
    """Frozen params from the first workdir's `frozen/` (or, as the trainer makes them, the seed's
    random init overwritten by the configured pretrained towers), then each workdir's trained params
    (only those: a later run's frozen copy of an earlier run's branch must not replace it)."""
    from vllama_jax.train.task import initial_params
    from vllama_jax.train.video_llama_task import build_task

    task = build_task(train_config)
    params = _frozen_params(workdirs[0])
    trained = [_trained_params(w, step if i == 0 else None) for i, w in enumerate(workdirs)]
    if params is None:
        # The trainer's starting params, so random frozen towers come out the same; only what
        # neither the pretrained files nor the workdirs provide is initialised.
        params = initial_params(task, int(train_config.train.get("seed", 0)),
                                also_provided={k for t, _ in trained for k in t})
        params = jax.tree.map(np.asarray, params)
        if not any(getattr(task.pretrained, f.name) for f in dataclasses.fields(task.pretrained)):
            log.warning("%s has no frozen/ checkpoint and the config names no pretrained towers: the frozen "
                        "towers are the trainer's random init for seed %s", workdirs[0],
                        train_config.train.get("seed", 0))
    for trained_params, where in trained:
        params = _overlay(params, trained_params, where)
        log.info("loaded trained params from %s", where)
    check_params(params, task.config, ", ".join(workdirs))
    return task.config, params


def _from_params_checkpoint(path: str, config: Any) -> tuple[VideoLlamaConfig, dict, dict]:
    """A `vllama-convert import` directory: (config, params, manifest). Without `config` the model is
    the manifest's preset / trainer config with its LLaMA config; an audio branch it does not hold is
    dropped from the config (a vision-only import chats about frames)."""
    from vllama_jax.convert import params_checkpoint as pc, video_llama

    meta = _as_load_error(pc.read_manifest, path)
    if config is None:
        config = meta.get("train_config") or meta.get("preset")
        if not config:
            raise LoadError(f"{path}: the manifest names no preset or trainer config; pass one")
    vconfig = model_config_from(config)
    if meta.get("llama_config"):
        vconfig = video_llama.with_hf_llama(vconfig, meta["llama_config"])
    params = _as_load_error(pc.load_params, path)
    if "audio_qformer" not in params and vconfig.audio_qformer is not None:
        vconfig = dataclasses.replace(vconfig, audio_qformer=None, imagebind_audio=None, imagebind_vision=None)
    check_params(params, vconfig, path)
    return vconfig, params, meta


def model_config_from(config: Any) -> VideoLlamaConfig:
    """A VideoLlamaConfig from itself, a preset name, a trainer config (ConfigDict) or a `.py` file
    whose `get_config()` returns either."""
    if isinstance(config, VideoLlamaConfig):
        return config
    if config is None:
        raise LoadError("no model config: pass a VideoLlamaConfig, its preset name or a trainer config")
    if isinstance(config, str) and not config_loader.split_spec(config)[0].endswith(".py"):
        try:
            return VideoLlamaConfig.preset(config)
        except ValueError as e:
            raise LoadError(str(e)) from e
    loaded = config_loader.resolve(config)
    if isinstance(loaded, VideoLlamaConfig):
        return loaded
    from vllama_jax.train.video_llama_task import model_config

    return model_config(loaded)


# ------------------------------------------------------------------------------------ entry point

def _media_layout(config: VideoLlamaConfig) -> dict:
    """The reference's inference layout (8 frames, 8 clips), within what the config can embed."""
    return dict(num_frames=min(8, config.max_frame_pos), image_size=config.vit.img_size,
                num_audio_clips=min(8, config.max_audio_pos))


def _trainer_media_layout(tc) -> dict:
    return dict(num_frames=int(tc.data.num_frames), image_size=int(tc.data.image_size),
                num_audio_clips=int(tc.data.num_audio_clips))


def _trainer_config_of(config: Any):
    """The trainer ConfigDict `config` is or names (a `.py` file), else None (a preset, a VideoLlamaConfig)."""
    if config is None or isinstance(config, VideoLlamaConfig):
        return None
    if isinstance(config, (str, os.PathLike)) and not os.fspath(config).endswith(".py"):
        return None
    loaded = config_loader.resolve(config)
    return loaded if hasattr(loaded, "model") and not isinstance(loaded, VideoLlamaConfig) else None


def _tokenizer(path: str | os.PathLike | None, fallback: str | None):
    from data_pipelines.tokenizer import TokenizerError, load_tokenizer

    path = path or fallback
    if not path:
        raise LoadError("no tokenizer: pass a tokenizer directory (or set paths.tokenizer / "
                        "paths.llama_model in the trainer config)")
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise LoadError(str(e)) from e


def load_for_inference(checkpoint: str | os.PathLike | Sequence[str], config: Any = None, *,
                       tokenizer: str | os.PathLike | None = None, step: int | None = None,
                       conv_style: str | None = None, mesh=None) -> InferenceModel:
    """A trained model ready for `Chat` / `evaluate`.

    checkpoint: a trainer workdir (or several, overlaid in order), a `vllama-convert import` params
      checkpoint, or a `.msgpack` params file.
    config: for workdirs the trainer config (path or ConfigDict); for msgpack a VideoLlamaConfig,
      its preset name, a trainer config, or a `.py` file whose get_config() returns one of those;
      for a params checkpoint optional (default: its manifest's).
    tokenizer: a tokenizer directory (default: the trainer config's paths.tokenizer /
      paths.llama_model, `tokenizer/` next to a msgpack file, or a params checkpoint's LLaMA source).
    conv_style: overrides the config's chat format. mesh: place the params sharded on it.
    """
    paths = [os.fspath(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else [os.fspath(c) for c in checkpoint]
    if not paths:
        raise LoadError("no checkpoint given")
    first = paths[0]
    if first.endswith(".msgpack"):
        if len(paths) != 1:
            raise LoadError("give one .msgpack params file (several are only allowed for trainer workdirs)")
        vconfig = model_config_from(config)
        params = load_params_msgpack(first, vconfig)
        side = os.path.join(os.path.dirname(os.path.abspath(first)), "tokenizer")
        model = InferenceModel(vconfig, params, _tokenizer(tokenizer, side if os.path.isdir(side) else None),
                               conv_style or "vicuna", **_media_layout(vconfig))
    elif os.path.isfile(os.path.join(first, "manifest.json")):
        if len(paths) != 1:
            raise LoadError("give one params checkpoint directory (several are only allowed for trainer workdirs)")
        vconfig, params, meta = _from_params_checkpoint(first, config)
        llama_source = (meta.get("subtrees") or {}).get("llama", {}).get("source")
        tc = _trainer_config_of(config if config is not None else meta.get("train_config"))
        if tc is None:
            style = conv_style or ("llama_v2" if "llama2" in str(meta.get("preset") or "") else "vicuna")
            model = InferenceModel(vconfig, params, _tokenizer(tokenizer, llama_source), style,
                                   **_media_layout(vconfig))
        else:  # imported for a trainer config: its tokenizer, chat format and media layout
            tok = _tokenizer(tokenizer, tc.paths.get("tokenizer", "") or llama_source)
            model = InferenceModel(vconfig, params, tok, conv_style or str(tc.model.get("conv_style", "vicuna")),
                                   **_trainer_media_layout(tc))
    else:
        for p in paths:
            if not os.path.isdir(os.path.join(p, "checkpoints")):
                raise LoadError(f"checkpoint {p!r} is neither a .msgpack file nor a trainer workdir (checkpoints/) "
                                "nor a `vllama-convert import` params checkpoint (manifest.json)")
        tc = config_loader.resolve(config)
        if isinstance(tc, VideoLlamaConfig) or not hasattr(tc, "model"):
            raise LoadError("a trainer workdir needs the trainer's config (configs/*.py or its ConfigDict)")
        vconfig, params = _from_workdirs(paths, tc, step)
        tok = _tokenizer(tokenizer, tc.paths.get("tokenizer", "") or tc.paths.get("llama_model", ""))
        model = InferenceModel(vconfig, params, tok, conv_style or str(tc.model.get("conv_style", "vicuna")),
                               **_trainer_media_layout(tc))
    if mesh is not None:
        from vllama_jax import sharding
        from vllama_jax.models.video_llama import abstract_or_init

        boxed = unwrap_params(jax.eval_shape(lambda r: abstract_or_init(model.config, r), jax.random.key(0)))
        model.params = jax.device_put(model.params, sharding.param_shardings(boxed, mesh))
    return model
