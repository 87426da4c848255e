"""Video / image decoding, frame sampling and the pixel transforms of Video-LLaMA's processors.

Decoding (PyAV) samples frames by presentation time, so variable-frame-rate files are sampled
evenly in time; for constant-rate files the result equals the reference's index sampling
(`np.arange(0, vlen, vlen / n).astype(int)` in `video_llama/processors/video_processor.py`).
Display-matrix rotation is applied; clips with fewer frames than asked repeat frames (the
reference silently returns fewer frames, which its datasets then reject). `size=(h, w)` scales
inside FFmpeg while decoding, giving exactly the frames of the reference's decord
`VideoReader(height=h, width=w)` (chat and `load_video` use it). Only the frames the sampled
ones depend on are decoded (keyframe seeks, h264 non-reference pictures skipped). Files far
shorter than their container declares, or with decoder errors, are VideoDecodeErrors
(categories 'truncated' / 'corrupt'). docs/MEDIA.md compares every path with the original.

Transforms (pure numpy + PIL, for the loader to apply to decoded JPEG frames):
  eval_transform   resize to 224x224 bicubic, aspect not kept (alpro_video_eval / blip2_image_eval)
  train_transform  random resized crop, scale 0.5-1, ratio 3/4-4/3, bicubic, one crop per clip
                   (alpro_video_train / blip2_image_train; no flip in either). For videos the
                   reference decodes at 224x224 (aspect squashed) and crops that; `squash=True`
                   reproduces that geometry with a single resampling of the source pixels.
  normalize        /255 then CLIP mean/std
"""
from __future__ import annotations

import dataclasses
import os
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import av
import av.filter
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
IMAGE_SIZE = 224
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
SAMPLINGS = ("uniform", "headtail")


class MediaDecodeError(ValueError):
    """A media file is missing, empty or cannot be decoded. `path` and `reason` say which and why."""

    kind = "media"

    def __init__(self, path, reason: str, category: str = "undecodable"):
        self.path = str(path)
        self.reason = reason
        # "missing" | "empty" | "undecodable" | "truncated" | "corrupt": the report groups by it
        self.category = category
        super().__init__(f"cannot decode {self.kind} {self.path!r}: {reason}")


class VideoDecodeError(MediaDecodeError):
    kind = "video"


class ImageDecodeError(MediaDecodeError):
    kind = "image"


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    """Frames picked from one video.

    frames: uint8 [T,H,W,3], display orientation; times: float64 [T] seconds from the first frame;
    indices: int [T] position of each frame among all `num_source_frames` frames (time order).
    """
    frames: np.ndarray
    times: np.ndarray
    indices: np.ndarray
    num_source_frames: int
    duration_s: float
    rotation: int
    has_audio: bool


# ----------------------------------------------------------------------------- sampling

def _check_sampling(num_available: int, n: int, sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
    if n < 1 or num_available < 1:
        raise ValueError(f"need n >= 1 frames out of num_available >= 1, got n={n}, num_available={num_available}")


def _pick_sorted(population: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    # Distinct picks like the reference's rnd.sample; repeats only when the half is too short.
    replace = population.size < k
    return np.sort(rng.choice(population, size=k, replace=replace))


def sample_indices(num_available: int, n: int, sampling: str = "uniform",
                   rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Indices of n frames out of num_available (sorted; repeats when num_available < n).

    uniform: floor(i * num_available / n), the reference's `np.arange(0, vlen, vlen/n).astype(int)`.
    headtail: n//2 distinct random frames from the first half, the rest from the second half
    (the reference's training sampling). Applied to a stored uniform pool of 2n frames, uniform
    picks exactly the uniform n frames of the source video.
    """
    _check_sampling(num_available, n, sampling)
    if sampling == "uniform":
        return (np.arange(n, dtype=np.int64) * num_available) // n
    if rng is None:
        raise ValueError("sampling='headtail' needs an rng (np.random.Generator)")
    half = num_available // 2
    if half == 0:
        return np.zeros(n, np.int64)
    head = _pick_sorted(np.arange(half), n // 2, rng)
    tail = _pick_sorted(np.arange(half, num_available), n - n // 2, rng)
    return np.concatenate([head, tail]).astype(np.int64)


def sample_by_time(pts: Sequence[int], duration: int, n: int, sampling: str = "uniform",
                   rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Indices into the time-sorted frame timestamps `pts` (any integer unit, pts[0] = start).

    uniform: the frame shown at start + i * duration / n (last frame with pts <= that time).
    headtail: as `sample_indices`, with the halves split at start + duration / 2.
    """
    pts = np.asarray(pts, np.int64)
    _check_sampling(pts.size, n, sampling)
    start = int(pts[0])
    if sampling == "uniform":
        # Exact rational targets: with a constant rate they land on frame boundaries exactly.
        targets = [start + Fraction(i * duration, n) for i in range(n)]
        return np.array([max(int(np.searchsorted(pts, int(t // 1), side="right")) - 1, 0)
                         for t in targets], np.int64)
    if rng is None:
        raise ValueError("sampling='headtail' needs an rng (np.random.Generator)")
    mid = start + Fraction(duration, 2)
    num_head = int(np.sum(pts < mid))
    if num_head == 0 or num_head == pts.size:
        return sample_indices(pts.size, n, "headtail", rng)
    head = _pick_sorted(np.arange(num_head), n // 2, rng)
    tail = _pick_sorted(np.arange(num_head, pts.size), n - n // 2, rng)
    return np.concatenate([head, tail]).astype(np.int64)


# ----------------------------------------------------------------------------- decoding

def _open(path: str):
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found", "missing")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)", "empty")
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"not a readable media file ({type(e).__name__}: {e})") from e


def _packet_pts(path: str, container, stream) -> Tuple[List[int], List[int]]:
    """Presentation times of all video packets and of the keyframe packets (demux only, no
    decoding), sorted."""
    pts, keyframes = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream flush packet
            # Some containers (AVI, raw streams) only carry decode times; without b-frames they agree.
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None:
                raise VideoDecodeError(path, "video packets without timestamps")
            pts.append(int(stamp))
            if packet.is_keyframe:
                keyframes.append(int(stamp))
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"demuxing failed ({type(e).__name__}: {e})") from e
    if not pts:
        raise VideoDecodeError(path, "no video frames (zero-length video)", "empty")
    return sorted(set(pts)), sorted(set(keyframes))


def _duration(pts: List[int], stream) -> int:
    """Clip length in pts units: last frame start + one frame period - first frame start."""
    if len(pts) > 1:
        period = int(np.median(np.diff(pts)))
    elif stream.average_rate and stream.time_base:
        period = max(int(round(1 / (stream.average_rate * stream.time_base))), 1)
    else:
        period = 1
    return pts[-1] - pts[0] + max(period, 1)


# A file is truncated when it holds fewer frames (or less time) than its container declares by
# more than this fraction: container frame counts and durations are exact for intact files up to a
# frame or two (edit lists, a last frame's duration), a cut file misses a large part.
TRUNCATION_TOLERANCE = 0.1


def _declared(container, stream) -> tuple[int, float]:
    """(frames, seconds) the container declares for the video stream; 0 where it says nothing.
    The container-wide duration counts only when the video is the file's only stream (with an
    audio track it may be the longer audio's)."""
    frames = int(stream.frames or 0)
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if not seconds and container.duration and len(container.streams) == 1:
        seconds = container.duration / 1e6
    return frames, seconds


def _check_complete(path: str, container, stream, pts: List[int], duration: int, tb: float) -> None:
    """VideoDecodeError('truncated: ...') when far fewer frames / seconds are there than declared."""
    frames, seconds = _declared(container, stream)
    have_s = duration * tb
    short_frames = frames and len(pts) < (1 - TRUNCATION_TOLERANCE) * frames
    short_time = seconds and have_s < (1 - TRUNCATION_TOLERANCE) * seconds
    if short_frames or short_time:
        declared_s = seconds or frames * have_s / max(len(pts), 1)
        of_frames = f", {len(pts)} of {frames} frames" if frames else ""
        raise VideoDecodeError(path, f"truncated: decoded {have_s:.1f} s of {declared_s:.1f} s{of_frames} "
                                     f"(the container declares the full length; the file is cut short)",
                               "truncated")


def _rotation_quarters(frame) -> int:
    # av's frame.rotation is the display matrix angle: counter-clockwise degrees for display.
    angle = int(getattr(frame, "rotation", 0) or 0)
    return int(round(angle / 90.0)) % 4


class _NativeSize:
    """Frames at their stored size, stretched to the display aspect (anamorphic), then rotated."""

    def __init__(self, stream):
        self.sar = stream.sample_aspect_ratio
        # One reformatter per video reuses its swscale context (frame.to_ndarray builds one per call).
        self.reformatter = VideoReformatter()

    def __call__(self, frame, quarters: int) -> np.ndarray:
        image = self.reformatter.reformat(frame, format="rgb24").to_ndarray()
        if self.sar is not None and self.sar not in (0, 1):
            width = max(int(round(image.shape[1] * float(self.sar))), 1)
            image = np.asarray(Image.fromarray(image).resize((width, image.shape[0]), Image.BICUBIC))
        return np.ascontiguousarray(np.rot90(image, quarters)) if quarters else image


# Display rotation (counter-clockwise quarter turns) as FFmpeg transpose filters.
_TRANSPOSES = {1: ("cclock",), 2: ("clock", "clock"), 3: ("clock",)}


class _ScaledInFFmpeg:
    """Frames scaled to exactly height x width inside FFmpeg, as decord's VideoReader(height=,
    width=) does: a filter graph `scale=W:H` (libavfilter's default scaler flags in the FFmpeg
    4.1 decord 0.6.0 ships, bilinear; pixel aspect ignored, aspect squashed) converting to rgb24
    in the same swscale pass (BT.601 limited range for untagged video, the frame's tags otherwise).
    Rotation is applied before scaling with transpose filters, as newer decord does."""

    def __init__(self, stream, size):
        self.stream, self.height, self.width = stream, int(size[0]), int(size[1])
        self.graph, self.quarters = None, None

    def _build(self, quarters: int):
        graph = av.filter.Graph()
        nodes = [graph.add_buffer(template=self.stream)]
        nodes += [graph.add("transpose", t) for t in _TRANSPOSES.get(quarters, ())]
        nodes += [graph.add("scale", f"{self.width}:{self.height}:flags=bilinear"),
                  graph.add("format", "rgb24"), graph.add("buffersink")]
        for a, b in zip(nodes, nodes[1:]):
            a.link_to(b)
        graph.configure()
        self.graph, self.quarters = graph, quarters

    def __call__(self, frame, quarters: int) -> np.ndarray:
        if self.graph is None or quarters != self.quarters:
            self._build(quarters)
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


def _h264_length_size(stream) -> int:
    """NAL length-prefix size of an h264 stream stored as AVCC (mp4/mkv); 0 otherwise."""
    extradata = stream.codec_context.extradata
    if stream.codec_context.name != "h264" or not extradata or len(extradata) < 7 or extradata[0] != 1:
        return 0
    return (extradata[4] & 3) + 1


def _h264_non_reference(data: bytes, length_size: int) -> bool:
    """True when every slice of an AVCC h264 access unit has nal_ref_idc 0: by the standard no
    other picture predicts from it, so not decoding it changes no other frame."""
    pos, slices = 0, 0
    while pos + length_size < len(data):
        size = int.from_bytes(data[pos:pos + length_size], "big")
        header = data[pos + length_size]
        if 1 <= header & 0x1F <= 5:  # coded slice NAL units
            if header & 0x60:
                return False
            slices += 1
        pos += length_size + size
    return slices > 0


def _frames(container, stream, wanted: frozenset, length_size: int):
    """container.decode(stream), but h264 non-reference pictures whose time is not `wanted` are
    never sent to the decoder (about half the frames of x264's default B-frame pattern)."""
    for packet in container.demux(stream):
        if (length_size and packet.size and packet.pts is not None and packet.pts not in wanted
                and _h264_non_reference(bytes(packet), length_size)):
            continue
        yield from packet.decode()


class _SeekMissed(Exception):
    """A seek landed somewhere other than the keyframe asked for: decode sequentially instead."""


def _wrap_decode_error(path: str, stream, e: Exception, last, total_s: float) -> VideoDecodeError:
    if last is None:
        return VideoDecodeError(path, f"decoding failed ({type(e).__name__}: {e})")
    tb = float(stream.time_base or 0)
    at = (last.pts - (stream.start_time or 0)) * tb if tb else 0.0
    of = f" of {total_s:.1f} s" if total_s else ""
    return VideoDecodeError(path, f"decode error mid-stream after {at:.1f} s{of} "
                                  f"({type(e).__name__}: {e})", "corrupt")


def _decode_targets(path: str, container, stream, targets: np.ndarray, keyframes: Sequence[int],
                    convert, total_s: float = 0.0):
    """For each target pts (ascending), the last decoded frame with pts <= target, and the rotation.

    Decodes forward, and seeks to the last keyframe before the next target whenever that keyframe
    lies ahead of the decoder (the frames in between are never decoded, as decord's get_batch
    does); h264 pictures nothing predicts from are skipped unless they are targets. Both leave
    the target frames bit-identical to decoding everything. A decoder error anywhere before the
    last target is a VideoDecodeError ('corrupt').
    """
    n = len(targets)
    out: List[Optional[np.ndarray]] = [None] * n
    keyframes = np.asarray(keyframes, np.int64)
    quarters, prev, last, frames_it, floor, i = 0, None, None, None, None, 0
    wanted, length_size = frozenset(int(t) for t in targets), _h264_length_size(stream)
    try:
        while i < n:
            t = int(targets[i])
            k = np.searchsorted(keyframes, t, side="right") - 1
            kf = int(keyframes[k]) if k >= 0 else None
            if frames_it is None or (kf is not None and prev is not None and kf > prev.pts):
                if frames_it is not None:
                    container.seek(kf, stream=stream, backward=True, any_frame=False)
                    prev, floor = None, kf
                frames_it = _frames(container, stream, wanted, length_size)
            lookahead, exhausted = None, True
            if prev is not None and prev.pts == t:
                frames_it_now = ()  # the frame decoded last round as lookahead is this target
                exhausted = False
            else:
                frames_it_now = frames_it
            for frame in frames_it_now:
                if frame.pts is None or (floor is not None and frame.pts < floor):
                    continue  # an open GOP's leading frames after a seek
                if floor is not None and prev is None and frame.pts != floor:
                    raise _SeekMissed()
                if last is None:
                    quarters = _rotation_quarters(frame)
                last = frame
                if frame.pts > t and prev is not None:
                    lookahead, exhausted = frame, False
                    break
                prev = frame
                if frame.pts == t:  # targets are frame times: no need to decode the next one
                    exhausted = False
                    break
            if prev is None:
                break
            out[i] = convert(prev, quarters)
            i += 1
            while i < n and (exhausted or targets[i] < (lookahead.pts if lookahead else prev.pts + 1)):
                out[i] = out[i - 1]  # the same frame again (fewer frames than asked), or EOF
                i += 1
            if lookahead is not None:
                prev = lookahead
    except av.FFmpegError as e:
        raise _wrap_decode_error(path, stream, e, last, total_s) from e
    if out[0] is None:
        raise VideoDecodeError(path, "no decodable video frames")
    for j in range(1, n):  # a stream that ended early: repeat the last frame it gave
        if out[j] is None:
            out[j] = out[j - 1]
    return out, quarters * 90


def decode_video(path: str, num_frames: int = 8, sampling: str = "uniform",
                 rng: Optional[np.random.Generator] = None,
                 short_side: Optional[int] = None,
                 size: Optional[Tuple[int, int]] = None) -> DecodedVideo:
    """Decodes `num_frames` frames of `path` sampled by time, in display orientation.

    `size=(height, width)` scales each frame to exactly that inside FFmpeg, the frames the
    original's decord `VideoReader(height=, width=)` gives (aspect and pixel aspect ignored).
    Otherwise frames keep their display size, and `short_side` resizes (bicubic, aspect kept) so
    the shorter side has that many pixels. Raises VideoDecodeError (a ValueError naming the path)
    for missing, empty, undecodable or frameless files, files holding far fewer frames than their
    container declares ('truncated'), and decoder errors before the last sampled frame ('corrupt').
    """
    if size is not None and short_side:
        raise ValueError("decode_video: pass size or short_side, not both")
    path = os.fspath(path)
    container = _open(path)
    with container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream")
        stream = container.streams.video[0]
        has_audio = bool(container.streams.audio)
        pts, keyframes = _packet_pts(path, container, stream)
        duration = _duration(pts, stream)
        indices = sample_by_time(pts, duration, num_frames, sampling, rng)
        targets = np.asarray(pts, np.int64)[indices]
        tb = float(stream.time_base) if stream.time_base else 1.0
        _check_complete(path, container, stream, pts, duration, tb)
    # Reopen rather than seek: seeking to the very start is unreliable for some containers.
    for seek in (True, False):
        with _open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            convert = _NativeSize(stream) if size is None else _ScaledInFFmpeg(stream, size)
            try:
                frames, rotation = _decode_targets(path, container, stream, targets,
                                                   keyframes if seek else [], convert, duration * tb)
                break
            except _SeekMissed:
                continue
    frames = np.stack(frames)
    if short_side:
        frames = resize_short_side(frames, short_side)
    return DecodedVideo(frames=frames, times=(targets - pts[0]) * tb, indices=indices,
                        num_source_frames=len(pts), duration_s=duration * tb, rotation=rotation,
                        has_audio=has_audio)


def load_image(path: str) -> np.ndarray:
    """uint8 [H,W,3] RGB (`Image.open(path).convert('RGB')` as the reference; EXIF rotation not applied)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageDecodeError(path, "file not found", "missing")
    if os.path.getsize(path) == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)", "empty")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- transforms

def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected uint8 [T>=1,H,W,3], got {frames.dtype} {frames.shape}")
    return frames


def _resize(frames: np.ndarray, size_wh, box=None) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize(size_wh, Image.BICUBIC, box=box))
                     for f in frames])


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [T,H,W,3] -> shorter side = short_side, aspect kept (bicubic); unchanged if already so."""
    frames = _check_frames(frames)
    h, w = frames.shape[1:3]
    if min(h, w) == short_side:
        return frames
    if h <= w:
        size = (max(int(round(w * short_side / h)), 1), short_side)
    else:
        size = (short_side, max(int(round(h * short_side / w)), 1))
    return _resize(frames, size)


# normalize()'s value for each uint8 level, per channel ([3,256]): a table lookup is 3-5x faster
# than the arithmetic over a clip and gives the same float32 numbers.
_CLIP_TABLE = np.ascontiguousarray(
    ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0) - CLIP_MEAN) / CLIP_STD).T)


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 (or 0-255 float) [...,3] -> float32 CLIP-normalized: (x / 255 - mean) / std."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        return ((frames.astype(np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD
    out = np.empty(frames.shape, np.float32)
    for c in range(3):
        np.take(_CLIP_TABLE[c], frames[..., c], out=out[..., c])
    return out


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale=CROP_SCALE, ratio=CROP_RATIO):
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params (10 tries, then center crop)."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(frames: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE,
                    squash: bool = True, scale=CROP_SCALE, ratio=CROP_RATIO) -> np.ndarray:
    """uint8 [T,H,W,3] -> float32 [T,size,size,3]: one random resized crop for the whole clip.

    squash=True (videos, alpro_video_train): the crop is drawn on the frame squashed to
    size x size, as the reference decodes videos at 224x224 before cropping. squash=False
    (images, blip2_image_train): the crop is drawn on the frame itself.
    """
    frames = _check_frames(frames)
    h, w = frames.shape[1:3]
    if squash:
        top, left, ch, cw = random_resized_crop_params(size, size, rng, scale, ratio)
        sy, sx = h / size, w / size
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    else:
        top, left, ch, cw = random_resized_crop_params(h, w, rng, scale, ratio)
        box = (left, top, left + cw, top + ch)
    return normalize(_resize(frames, (size, size), box=box))


def eval_transform(frames: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [T,H,W,3] -> float32 [T,size,size,3]: bicubic resize to size x size, then normalize."""
    frames = _check_frames(frames)
    return normalize(_resize(frames, (size, size)))


def load_video(path: str, num_frames: int = 8, train: bool = False,
               rng: Optional[np.random.Generator] = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Reference-style clip straight from a file: float32 [num_frames,size,size,3].

    Frames are scaled to size x size while decoding, as the reference's decord reader does;
    train: headtail sampling + a random resized crop of those frames; eval: uniform sampling.
    """
    if train and rng is None:
        raise ValueError("load_video(train=True) needs an rng (np.random.Generator)")
    decoded = decode_video(path, num_frames, "headtail" if train else "uniform", rng, size=(size, size))
    return train_transform(decoded.frames, rng, size) if train else normalize(decoded.frames)


def load_image_clip(path: str, train: bool = False, rng: Optional[np.random.Generator] = None,
                    size: int = IMAGE_SIZE) -> np.ndarray:
    """An image as a 1-frame clip: float32 [1,size,size,3] (blip2_image_train / _eval)."""
    if train and rng is None:
        raise ValueError("load_image_clip(train=True) needs an rng (np.random.Generator)")
    frames = load_image(path)[None]
    return train_transform(frames, rng, size, squash=False) if train else eval_transform(frames, size)
