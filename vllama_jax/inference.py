"""Loading a trained Video-LLaMA for inference (chat, evaluation, the demo).

`load_for_inference` is the one entry point. It accepts

  * a trainer workdir (`<dir>/checkpoints/<step>/...`, see `vllama_jax.checkpoint`) together with
    the trainer's ml_collections config (a `configs/*.py` path or a ConfigDict). The full params
    are assembled as training assembles them: random init, the frozen towers from the config's
    pretrained paths (`VideoLlamaTask.load_pretrained`), the workdir's `frozen/` checkpoint when it
    was saved, then the trained params of the newest (or given) step. Several workdirs may be
    given (e.g. the vision-branch run, then the audio-branch run, as the reference's `ckpt` and
    `ckpt_2`); each overlays only the params it trained.
  * a `.msgpack` of the full params tree (`save_params_msgpack`) together with a
    `VideoLlamaConfig` (or a preset name, a trainer config, a config file giving either); the tokenizer directory is given or sits next to the
    file as `tokenizer/`.

It returns an `InferenceModel`: config, params, tokenizer and the media layout the model was
trained with (frames, image size, audio clips, conversation style).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from vllama_jax.models.video_llama import VideoLlamaConfig, init_params

log = logging.getLogger(__name__)

CONV_STYLES = ("vicuna", "llama_v2")


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

def load_train_config(config: Any):
    """An ml_collections ConfigDict from a config object or a `configs/*.py` path (`get_config()`)."""
    if not isinstance(config, (str, os.PathLike)):
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise LoadError(f"trainer config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_vllama_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise LoadError(f"trainer config file {path!r} defines no get_config()")
    return module.get_config()


def _restore_trained(workdir: str, step: int | None) -> tuple[dict, int]:
    """The trained params of one step of a trainer workdir (host arrays) and that step."""
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise LoadError(f"{workdir!r} is not a trainer workdir: no checkpoints/ directory in it")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise LoadError(f"no checkpoint{'' if step is None else f' for step {step}'} under {directory} "
                            f"(steps there: {list(manager.all_steps())})")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"]["params"]), int(step)


def _restore_frozen(workdir: str) -> dict | None:
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), "frozen")
    if not os.path.isdir(directory):
        return None
    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree.map(np.asarray, ckptr.restore(directory))


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
    random init overwritten by the configured pretrained towers), then each workdir's trained params."""
    from vllama_jax.train.video_llama_task import build_task

    task = build_task(train_config)
    params = _restore_frozen(workdirs[0])
    if params is None:
        # The trainer's own init key (loop._initial_state), so random frozen towers come out the same.
        init_rng = jax.random.split(jax.random.PRNGKey(int(train_config.train.get("seed", 0))))[0]
        params = jax.tree.map(np.asarray, jax.jit(task.init_params)(init_rng))
        params = jax.tree.map(np.asarray, task.load_pretrained(params))
        if not any(getattr(task.pretrained, f.name) for f in dataclasses.fields(task.pretrained)):
            log.warning("%s has no frozen/ checkpoint and the config names no pretrained towers: the frozen "
                        "towers are the trainer's random init for seed %s", workdirs[0],
                        train_config.train.get("seed", 0))
    for i, workdir in enumerate(workdirs):
        trained, got = _restore_trained(workdir, step if i == 0 else None)
        params = _overlay(params, trained, f"{workdir} step {got}")
        log.info("loaded trained params of step %d from %s", got, workdir)
    check_params(params, task.config, ", ".join(workdirs))
    return task.config, params


def model_config_from(config: Any) -> VideoLlamaConfig:
    """A VideoLlamaConfig from itself, a preset name, a trainer config (ConfigDict) or a `.py` file
    whose `get_config()` returns either."""
    if isinstance(config, VideoLlamaConfig):
        return config
    if isinstance(config, str) and not config.endswith(".py"):
        try:
            return VideoLlamaConfig.preset(config)
        except ValueError as e:
            raise LoadError(str(e)) from e
    loaded = load_train_config(config)
    if isinstance(loaded, VideoLlamaConfig):
        return loaded
    from vllama_jax.train.video_llama_task import model_config

    return model_config(loaded)


# ------------------------------------------------------------------------------------ entry point

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


def load_for_inference(checkpoint: str | os.PathLike | Sequence[str], config: Any, *,
                       tokenizer: str | os.PathLike | None = None, step: int | None = None,
                       conv_style: str | None = None, mesh=None) -> InferenceModel:
    """A trained model ready for `Chat` / `evaluate`.

    checkpoint: a trainer workdir (or several, overlaid in order), or a `.msgpack` params file.
    config: for workdirs the trainer config (path or ConfigDict); for msgpack a VideoLlamaConfig,
      its preset name, a trainer config, or a `.py` file whose get_config() returns one of those. tokenizer: a tokenizer directory (default: the trainer config's
      paths.tokenizer / paths.llama_model, or `tokenizer/` next to a msgpack file).
    conv_style: overrides the config's chat format. mesh: place the params sharded on it.
    """
    paths = [os.fspath(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else [os.fspath(c) for c in checkpoint]
    if not paths:
        raise LoadError("no checkpoint given")
    if paths[0].endswith(".msgpack"):
        if len(paths) != 1:
            raise LoadError("give one .msgpack params file (several are only allowed for trainer workdirs)")
        vconfig = model_config_from(config)
        params = load_params_msgpack(paths[0], vconfig)
        side = os.path.join(os.path.dirname(os.path.abspath(paths[0])), "tokenizer")
        tok = _tokenizer(tokenizer, side if os.path.isdir(side) else None)
        model = InferenceModel(vconfig, params, tok, conv_style or "vicuna", image_size=vconfig.vit.img_size,
                               num_frames=min(8, vconfig.max_frame_pos),
                               num_audio_clips=min(8, vconfig.max_audio_pos))
    else:
        for p in paths:
            if not os.path.isdir(p):
                raise LoadError(f"checkpoint {p!r} is neither a .msgpack file nor a trainer workdir")
        tc = load_train_config(config)
        if isinstance(tc, VideoLlamaConfig) or not hasattr(tc, "model"):
            raise LoadError("a trainer workdir needs the trainer's config (configs/*.py or its ConfigDict)")
        vconfig, params = _from_workdirs(paths, tc, step)
        tok = _tokenizer(tokenizer, tc.paths.get("tokenizer", "") or tc.paths.get("llama_model", ""))
        model = InferenceModel(vconfig, params, tok, conv_style or str(tc.model.get("chat_format", "vicuna")),
                               num_frames=int(tc.data.num_frames), image_size=int(tc.data.image_size),
                               num_audio_clips=int(tc.data.num_audio_clips))
    if mesh is not None:
        from vllama_jax import sharding
        from vllama_jax.models.video_llama import abstract_or_init

        boxed = unwrap_params(jax.eval_shape(lambda r: abstract_or_init(model.config, r), jax.random.key(0)))
        model.params = jax.device_put(model.params, sharding.param_shardings(boxed, mesh))
    return model
