"""Media for inference: files and stored records -> model inputs -> soft tokens.

The one place chat (`chat.Chat`, and through it the web page), evaluation (`evaluate.runner`) and
the demo turn media into what the LLaMA receives:

  * files (an upload, `vllama-chat --video`): `load_video_frames` (uniform frames scaled inside
    FFmpeg, as decord gives them, with the reference's frame-time message), `load_image_frames`
    (a one-frame clip), `load_audio` (ImageBind's fbank clips);
  * stored records (ArrayRecord shards) go through the loader's own eval transform
    (`data_pipelines.loader.frame_indices` / `frame_pixels` / `stored_fbank`), as in training;
  * arrays -> soft tokens: `encode_media` (one medium, jitted once per config) and `soft_tokens`
    (several media concatenated in placeholder order).

Files that cannot be used raise `MediaError` with a message for the user (chat re-raises it as
`ChatError`). data_pipelines/media.py is the other direction: writing mp4/wav files.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.models.video_llama import VideoLlama

ENCODERS = {"video": "encode_video", "audio": "encode_audio"}


class MediaError(ValueError):
    """A media file or record that cannot be turned into model inputs."""


# ------------------------------------------------------------------------------------ files

def _media_error(path: str, what: str) -> MediaError | None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return MediaError(f"expected a file path for the {what}, got {path!r}")
    if not os.path.exists(path):
        return MediaError(f"{what} file {str(path)!r} does not exist")
    if os.path.isdir(path):
        return MediaError(f"{what} path {str(path)!r} is a directory, not a file")
    return None


def load_video_frames(path: str, num_frames: int, image_size: int) -> tuple[np.ndarray, str, bool]:
    """(frames float32 [T,S,S,3] CLIP-normalised, the reference's time message, has an audio track).

    Frames are scaled to S x S inside FFmpeg while decoding, the pixels the original's decord
    `VideoReader(height=S, width=S)` gives."""
    from data_pipelines import prompts
    from data_pipelines.video import MediaDecodeError, decode_video, normalize

    err = _media_error(path, "video")
    if err:
        raise err
    try:
        decoded = decode_video(path, num_frames, "uniform", size=(image_size, image_size))
    except MediaDecodeError as e:
        raise MediaError(f"{str(path)!r} is not a readable video ({e.reason})") from e
    return normalize(decoded.frames), prompts.video_time_message(decoded.times), decoded.has_audio


def load_image_frames(path: str, image_size: int) -> np.ndarray:
    from data_pipelines.video import MediaDecodeError, load_image_clip

    err = _media_error(path, "image")
    if err:
        raise err
    try:
        return load_image_clip(path, size=image_size)
    except MediaDecodeError as e:
        raise MediaError(f"{str(path)!r} is not a readable image ({e.reason})") from e


def load_audio(path: str, num_clips: int) -> np.ndarray | None:
    """fbank clips float32 [M,1,128,204], or None when the file has no audio track."""
    from data_pipelines.audio import AudioDecodeError, load_audio_clips

    err = _media_error(path, "audio")
    if err:
        raise err
    try:
        clips = load_audio_clips(path, num_clips=num_clips)
    except (AudioDecodeError, ValueError) as e:
        raise MediaError(f"cannot read audio from {str(path)!r}: {getattr(e, 'reason', e)}") from e
    return clips.fbank if clips.present else None


# ------------------------------------------------------------------------------------ soft tokens

@functools.partial(jax.jit, static_argnames=("config", "method"))
def encode_media(params, x, *, config, method: str):
    """Soft tokens `[1, K, d_llm]` of one medium (`VideoLlama.encode_video` / `encode_audio`);
    module-level so every caller over the same config shares the compiled program."""
    return VideoLlama(config).apply({"params": params}, x, method=getattr(VideoLlama, method))


def soft_tokens(params, config, media: Sequence[str], frames: np.ndarray | None,
                fbank: np.ndarray | None) -> jax.Array:
    """`[K, d_llm]`: each medium's soft tokens of one clip, concatenated in `media` order (the
    placeholder order: audio before video, as the reference's inference). An image is a 1-frame clip."""
    parts = []
    for m in media:
        x = frames if m == "video" else fbank
        parts.append(encode_media(params, jnp.asarray(x)[None], config=config, method=ENCODERS[m])[0])
    return jnp.concatenate(parts, axis=0)
