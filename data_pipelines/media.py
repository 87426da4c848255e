"""Writing media files (mp4 with optional audio, images) for fixtures, tests and the synthetic demo.

Everything is written with PyAV (h264 video, aac audio) and PIL, so tests build real encoded media
that goes through the same decoders as downloaded datasets.
"""
from __future__ import annotations

import fractions
import os
from typing import Optional

import av
import numpy as np
from PIL import Image

_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected uint8 [T>=1,H,W,3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected dtype uint8, got {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        # yuv420p (what every player and our decoder expect from h264) needs even sizes.
        raise ValueError(f"frames: height and width must be even for h264/yuv420p, got {frames.shape[1:3]}")
    return frames


def _check_audio(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio: expected mono float32 [N>0], got shape {audio.shape}")
    if sample_rate not in _AAC_RATES:
        raise ValueError(f"sample_rate: {sample_rate} is not an AAC sample rate {_AAC_RATES}")
    return np.clip(audio, -1.0, 1.0)


def _add_video_stream(container, frames: np.ndarray, rate, time_base, rotation: int):
    codec = "libx264" if "libx264" in av.codecs_available else "h264"
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = time_base
    # Small files and near-exact pixels for round-trip tests; no b-frames keeps pts in decode order.
    stream.options = {"crf": "18", "preset": "veryfast", "bf": "0"}
    if rotation:
        stream.set_display_rotation(rotation)
    return stream


def _add_audio_stream(container, sample_rate: int):
    stream = container.add_stream("aac", rate=sample_rate)
    stream.layout = "mono"
    stream.codec_context.time_base = fractions.Fraction(1, sample_rate)
    return stream


def _encode_video(container, stream, frames: np.ndarray, pts: np.ndarray, time_base) -> None:
    for image, t in zip(frames, pts):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(t)
        frame.time_base = time_base
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _encode_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    frame_size = stream.codec_context.frame_size or 1024
    for start in range(0, audio.size, frame_size):
        chunk = audio[start:start + frame_size]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = fractions.Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_mp4(path: str, frames: np.ndarray, fps: float, audio: Optional[np.ndarray] = None,
              sample_rate: int = 16000, *, timestamps: Optional[np.ndarray] = None,
              rotation: int = 0, faststart: bool = False) -> str:
    """Writes `frames` (uint8 [T,H,W,3], H and W even) as an h264 mp4, with a mono aac track if `audio`.

    `timestamps` (seconds, increasing, one per frame) makes a variable-frame-rate file instead of a
    constant `fps` one. `rotation` (degrees, multiple of 90) is stored as a display matrix, as phones
    do, with the pixels unrotated: players show the frames turned `rotation` degrees
    counter-clockwise (FFmpeg's display-matrix convention; a phone's legacy `rotate=90` tag, a
    clockwise turn, reads back as -90). `faststart` puts the index (moov) before the media data, as
    web-optimised files have it (then a file cut short still declares its full length). Returns `path`.
    """
    frames = _check_frames(frames)
    if audio is not None:
        audio = _check_audio(audio, sample_rate)
    if timestamps is not None:
        timestamps = np.asarray(timestamps, np.float64)
        if timestamps.shape != (frames.shape[0],) or np.any(np.diff(timestamps) <= 1e-3):
            raise ValueError(f"timestamps: expected {frames.shape[0]} strictly increasing seconds "
                             f"(>1 ms apart), got {timestamps}")
    if rotation % 90:
        raise ValueError(f"rotation: expected a multiple of 90 degrees, got {rotation}")
    fps_frac = fractions.Fraction(fps).limit_denominator(1001)
    if fps_frac <= 0:
        raise ValueError(f"fps: expected > 0, got {fps}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if timestamps is None:
        time_base = 1 / fps_frac
        pts = np.arange(frames.shape[0])
    else:
        # A millisecond time base lets each frame carry its own presentation time (variable rate).
        time_base = fractions.Fraction(1, 1000)
        pts = np.round(timestamps * 1000).astype(np.int64)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(path, mode="w", format="mp4", options=options) as container:
        # All streams must exist before the first packet is muxed (that writes the header).
        vstream = _add_video_stream(container, frames, fps_frac, time_base, rotation % 360)
        astream = _add_audio_stream(container, sample_rate) if audio is not None else None
        _encode_video(container, vstream, frames, pts, time_base)
        if astream is not None:
            _encode_audio(container, astream, audio, sample_rate)
    return path


def write_image(path: str, image: np.ndarray, quality: int = 95) -> str:
    """Writes uint8 [H,W,3] as JPEG (by `.jpg`/`.jpeg` suffix) or any format PIL infers. Returns `path`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 [H,W,3], got {image.dtype} {image.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil = Image.fromarray(image, "RGB")
    if path.lower().endswith((".jpg", ".jpeg")):
        pil.save(path, quality=quality)
    else:
        pil.save(path)
    return path
