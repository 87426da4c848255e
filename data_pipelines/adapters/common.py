"""What every adapter shares: the item format, media options and item -> record example decoding.

An adapter only parses its dataset's annotation files into *items*, plain picklable dicts:
  {"id", "media": "video"|"image", "path", "kind": "caption"|"conversation",
   "caption": str, "conversations": [{"from", "value"}], "meta": {str: str}, "error": str (optional),
   "error_category": str (optional; the report's category for "error", default "invalid"),
   "audio_path": str (optional, videos: the sound is read from this audio file, not the video's track)}
`build_example(item, options)` (run in the writer's worker processes) decodes the media and
returns the record example. A malformed annotation entry becomes an item with "error" set, so
it is skipped and listed in the report like a broken file instead of stopping the run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from data_pipelines import records, video
from data_pipelines.audio import DEFAULT_CHANNELS, AudioDecodeError, load_audio_clips


@dataclasses.dataclass(frozen=True)
class MediaOptions:
    """How media is stored. num_frames: frames kept per video (a uniform pool the loader samples
    its T frames from; 16 = 2x Video-LLaMA's 8, so headtail sampling has choices). short_side:
    resize so the shorter side is this (None keeps the source size). audio_channels: how a
    multichannel track is read, "imagebind" (the original's, default), "mix" or a channel index
    (data_pipelines/audio.py); stored in each record's meta["audio_channels"]. frame_size: store
    video frames scaled to frame_size x frame_size inside FFmpeg while decoding, the pixels the
    original's decord VideoReader(height=, width=) gives (aspect squashed; replaces short_side for
    videos; the eval transform's resize is then the identity, the train crop is drawn on exactly
    the frame the original crops); recorded in meta["frame_scaling"]. require_audio: a video
    without a usable audio track is skipped (category "no_audio") instead of kept silent, for
    audio-branch data."""
    num_frames: int = records.DEFAULT_STORED_FRAMES
    short_side: Optional[int] = records.FRAME_SHORT_SIDE
    jpeg_quality: int = records.JPEG_QUALITY
    num_audio_clips: int = records.NUM_AUDIO_CLIPS
    audio: bool = True
    audio_channels: str | int = DEFAULT_CHANNELS
    frame_size: Optional[int] = None
    require_audio: bool = False


class ItemError(records.RecordError):
    """An item the adapter already knows is bad (its "error"); `category` groups it in the report."""

    def __init__(self, message: str, category: str = ""):
        super().__init__(message)
        self.category = category or "invalid"


def item(*, id: str, media: str, path: str, kind: str, caption: str = "",
         conversations: Sequence[Dict[str, str]] = (), meta: Optional[Dict[str, str]] = None,
         error: str = "", error_category: str = "") -> Dict[str, Any]:
    out = {"id": id, "media": media, "path": path, "kind": kind, "caption": caption,
           "conversations": [dict(t) for t in conversations], "meta": dict(meta or {})}
    if error:
        out["error"] = error
        if error_category:
            out["error_category"] = error_category
    return out


def unique_ids(ids: Iterable[str]) -> List[str]:
    """Appends #k to the k-th repeat of an id (source files repeat images / videos)."""
    seen: Dict[str, int] = {}
    out = []
    for i in ids:
        k = seen.get(i, 0)
        seen[i] = k + 1
        out.append(i if k == 0 else f"{i}#{k}")
    return out


def entry_ids(entries: Sequence[Any], name: str, id_field: str) -> List[str]:
    """`unique_ids` of `name/<entry[id_field]>`, the entry's index standing in where the field (or
    the entry as a dict) is missing."""
    return unique_ids(f"{name}/{e.get(id_field, i) if isinstance(e, dict) else i}" for i, e in enumerate(entries))


def keyed_entries(entries: Sequence[Any], name: str, id_field: str) -> List[tuple]:
    """(`entry_ids`' id, the entry) pairs, an entry that is not a dict read as {} (it then fails the
    adapter's field checks and becomes an error item, not a crash)."""
    return [(uid, e if isinstance(e, dict) else {}) for uid, e in zip(entry_ids(entries, name, id_field), entries)]


def load_json(path: str, what: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{what}: {path!r} is not valid JSON: {e}") from e


def expect_list(obj: Any, path: str, what: str) -> List[Any]:
    if not isinstance(obj, list):
        raise ValueError(f"{what}: {path!r} must hold a JSON list, got {type(obj).__name__}")
    if not obj:
        raise ValueError(f"{what}: {path!r} holds no entries")
    return obj


def _audio(path: str, has_audio: bool, options: MediaOptions):
    """(fbank float16, present, error note). A broken audio track keeps the video, noted in meta."""
    if not (options.audio and has_audio):
        return records.silent_fbank(options.num_audio_clips), False, ""
    try:
        clips = load_audio_clips(path, num_clips=options.num_audio_clips, channels=options.audio_channels)
    except AudioDecodeError as e:
        return records.silent_fbank(options.num_audio_clips), False, str(e)
    if not clips.present:
        return records.silent_fbank(options.num_audio_clips), False, ""
    return np.asarray(clips.fbank, np.float16), True, ""


def _video_fields(item: Dict[str, Any], options: MediaOptions) -> Dict[str, Any]:
    if options.frame_size:
        size = (options.frame_size, options.frame_size)
        decoded = video.decode_video(item["path"], options.num_frames, "uniform", size=size)
    else:
        decoded = video.decode_video(item["path"], options.num_frames, "uniform", short_side=options.short_side)
    audio_path = item.get("audio_path") or ""
    fbank, present, audio_error = _audio(audio_path or item["path"], bool(audio_path) or decoded.has_audio, options)
    if options.require_audio and not present:
        raise video.VideoDecodeError(item["path"], f"no usable audio track ({audio_error or 'the file has none'}); "
                                     "audio was required (require_audio / --require-audio)", "no_audio")
    meta = dict(item["meta"], source_frames=str(decoded.num_source_frames))
    if options.frame_size:
        meta["frame_scaling"] = f"ffmpeg bilinear {options.frame_size}x{options.frame_size} (decord)"
    if decoded.rotation:
        meta["rotation"] = str(decoded.rotation)
    if audio_error:
        meta["audio_error"] = audio_error
    if present:
        meta["audio_channels"] = str(options.audio_channels)
        if audio_path:
            meta["audio_source"] = os.path.basename(audio_path)
    return dict(frames=[records.encode_jpeg(f, options.jpeg_quality) for f in decoded.frames],
                frame_times=decoded.times, fbank=fbank, audio_present=present,
                duration_s=decoded.duration_s, meta=meta)


def _image_fields(item: Dict[str, Any], options: MediaOptions) -> Dict[str, Any]:
    image = video.load_image(item["path"])[None]
    if options.short_side:
        image = video.resize_short_side(image, options.short_side)
    return dict(frames=[records.encode_jpeg(image[0], options.jpeg_quality)],
                fbank=records.silent_fbank(options.num_audio_clips), audio_present=False,
                meta=dict(item["meta"]))


def build_example(item: Dict[str, Any], options: MediaOptions = MediaOptions()) -> Dict[str, Any]:
    """item -> records example (decodes the media). Raises ValueError / OSError for bad items."""
    if item.get("error"):
        raise ItemError(f"{item['id']}: {item['error']}", item.get("error_category", ""))
    if item["media"] == "video":
        fields = _video_fields(item, options)
    elif item["media"] == "image":
        fields = _image_fields(item, options)
    else:
        raise records.RecordError(f"{item['id']}: media must be 'video' or 'image', got {item['media']!r}")
    return records.make_example(id=item["id"], media=item["media"], kind=item["kind"],
                                caption=item["caption"], conversations=item["conversations"], **fields)
