"""Checks of a Video-LLaMA run's inputs against each other before the first step.

Each mismatch is one `PreflightError` line naming both sides and the setting that fixes it, so a
run does not die later with a traceback (a fbank of the wrong clip count) or train on nonsense
(token ids past the embedding table read garbage and end in `non-finite loss at step 1`).

`check_config(config, task)`: files the config names exist (tokenizer, pretrained weights, earlier
  stages' workdirs, prompt file); the tokenizer's vocabulary fits the LLaMA's embedding table; the
  prompt's `<ImageHere>` placeholders match the query tokens the model produces.
`check_batch(batch, task, config)`: a host batch's token ids < vocab and media shapes vs config.
Shard geometry (stored fbank clips) is checked by the loader on each dataset's first record
(`data_pipelines.loader.check_shard_geometry`).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from vllama_jax.cli_errors import UserError

_PATH_KEYS = {
    "llama_model": "an HF LLaMA directory",
    "tokenizer": "a tokenizer directory",
    "blip2": "the BLIP-2 .pth",
    "imagebind": "imagebind_huge.pth",
    "llama_proj_model": "the MiniGPT-4 .pth",
    "ckpt": "an earlier stage's workdir",
    "ckpt_2": "an earlier stage's workdir",
}


class PreflightError(UserError):
    """Two inputs of a run disagree (or one is missing)."""


def check_paths(config) -> None:
    paths = config.get("paths", {})
    for key, what in _PATH_KEYS.items():
        value = str(paths.get(key, "") or "")
        if value and "://" not in value and not os.path.exists(value):
            raise PreflightError(f"config.paths.{key} = {value!r} does not exist (expected {what})")
    for key in ("ckpt", "ckpt_2"):
        value = str(paths.get(key, "") or "")
        if value and "://" not in value and not os.path.isdir(os.path.join(value, "checkpoints")):
            raise PreflightError(f"config.paths.{key} = {value!r} has no checkpoints/ (expected a vllama-train "
                                 "workdir of an earlier stage)")


def tokenizer_path(config) -> str:
    return str(config.paths.get("tokenizer", "") or config.paths.get("llama_model", "") or "")


def text_vocab_size(path: str) -> int:
    """Ids the tokenizer can give text (its vocabulary without the `<ImageHere>` patch token, which
    the model replaces by media embeddings and never looks up)."""
    from data_pipelines.tokenizer import IMAGE_PATCH_TOKEN, load_tokenizer

    tok = load_tokenizer(path)
    return len(tok) - (IMAGE_PATCH_TOKEN in tok.get_vocab())


def check_vocab(config, task) -> None:
    path = tokenizer_path(config)
    if not path:
        return
    n_text = text_vocab_size(path)
    n_model = int(task.config.llama.vocab_size)
    if n_text > n_model:
        raise PreflightError(
            f"tokenizer {path!r} has {n_text} tokens but the model's LLaMA vocabulary "
            f"(config.model.llama={config.model.llama!r}) has {n_model}: ids >= {n_model} would read past the "
            f"embedding table; set --config.model.vocab_size={n_text} (or more) or use the "
            "tokenizer the LLaMA was trained with")


def check_placeholders(config, task) -> None:
    want = int(task.config.num_media_tokens(task.media))
    have = int(config.data.num_query_placeholders)
    if want != have:
        raise PreflightError(
            f"config.data.num_query_placeholders = {have} <ImageHere> tokens per prompt, but the model puts "
            f"{want} query tokens there (media {list(task.media)}: config.model.num_video_query_token / "
            f"num_audio_query_token); set --config.data.num_query_placeholders={want}")


def check_config(config, task) -> None:
    check_paths(config)
    check_placeholders(config, task)
    check_vocab(config, task)


def check_batch(batch: dict[str, Any], task, config) -> None:
    """A host batch against the model: token ids in range, frames / audio shaped as configured."""
    vocab = int(task.config.llama.vocab_size)
    media = np.asarray(batch["media_mask"], bool) if "media_mask" in batch else None
    for key in ("input_ids", "targets"):
        if key not in batch:
            continue
        ids = np.asarray(batch[key])
        used = ids >= 0 if media is None else (ids >= 0) & ~media
        if used.any() and int(ids[used].max()) >= vocab:
            raise PreflightError(
                f"batch {key} holds token id {int(ids[used].max())} but the model's vocabulary has {vocab} "
                f"(config.model.llama={config.model.llama!r}): the tokenizer "
                f"{tokenizer_path(config) or '(none named)'} is larger than the model's embedding table; set "
                f"--config.model.vocab_size")
    d = config.data
    shapes = {
        "frames": ((int(d.num_frames), int(d.image_size), int(d.image_size), 3),
                   "config.data.num_frames, image_size, image_size, 3"),
        "audio": ((int(d.num_audio_clips), 1, 128, 204), "config.data.num_audio_clips, 1, 128, 204"),
    }
    for key, (want, names) in shapes.items():
        if key in batch and tuple(np.shape(batch[key])[1:]) != want:
            raise PreflightError(f"batch {key} per example {tuple(np.shape(batch[key])[1:])} but the config "
                                 f"expects {want} ({names})")
