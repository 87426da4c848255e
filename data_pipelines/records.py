"""The shard record schema: one ArrayRecord record = one training example.

Wire format (version 1): a msgpack map. Plain fields are msgpack-native (str, bool, int, bytes,
lists, maps). numpy arrays are maps `{"__nd__": 1, "dtype": str, "shape": [..], "data": bytes|None}`
(C order, little endian); `data` is None when every element is zero, so image / silent examples do
not pay ~420 KB for an all-zero fbank. Every record carries `"version"`; readers reject versions they
do not know. msgpack is used directly (not flax's wrapper) so a reader needs only `msgpack` + numpy.

Fields (`decode_example` returns exactly these keys):
  version        int, RECORD_VERSION
  id             str, "<dataset>/<original id or relative path>"
  media          'video' | 'image'
  frames         list of T JPEG bytes, short side resized to FRAME_SHORT_SIDE (aspect kept).
                 Videos: a pool of frames sampled uniformly over the clip by timestamp (the writer
                 default stores 2x the model's frame count, 16); the loader picks the model's T frames
                 from this pool with `video.sample_indices(len(frames), T, 'uniform'|'headtail', rng)`
                 (uniform T from a uniform 2T pool = the uniform T of the source video). Images: 1 frame.
  frame_times    float32 [T] seconds of each stored frame in the source (zeros for images)
  fbank          float16 [M,1,128,204] normalized Kaldi fbank; all zeros when audio_present is False
  audio_present  bool
  kind           'caption' | 'conversation'
  caption        str ('' for conversation examples)
  conversations  list of {'from': 'human'|'gpt', 'value': str} ([] for caption examples);
                 `<image>` / `<video>` placeholders normalized to IMAGE_PLACEHOLDER; the first
                 turn is human's and holds the conversation's only IMAGE_PLACEHOLDER, at the
                 position the source put it (adapters prefix "<ImageHere> " when it had none)
  duration_s     float, source clip duration (0.0 for images)
  meta           dict str -> str, free-form provenance / labels (e.g. the synthetic set's attributes)

Shards written through the TFDS builders hold each record wrapped in a one-feature
`tf.train.Example` ({RECORD_FEATURE: bytes}), because TFDS always stores Example protos;
`decode_example` accepts both the bare msgpack bytes and that wrapping (told apart by the first
byte: a msgpack map starts with 0x80-0x8f / 0xde / 0xdf, an Example proto with 0x0a), so grain /
array_record readers and `tfds.data_sources(...)[i][RECORD_FEATURE]` both work.
"""
from __future__ import annotations

import io
import re
from typing import Any, Dict, Sequence

import msgpack
import numpy as np
from PIL import Image

RECORD_VERSION = 1
FRAME_SHORT_SIDE = 256
DEFAULT_NUM_FRAMES = 8           # frames the model sees (Video-LLaMA: 8)
DEFAULT_STORED_FRAMES = 16       # frames the writer stores per video (pool for headtail sampling)
NUM_AUDIO_CLIPS = 8
FBANK_SHAPE = (1, 128, 204)      # per clip: [channel, mel bins, frames]
IMAGE_PLACEHOLDER = "<ImageHere>"
MEDIA_KINDS = ("video", "image")
EXAMPLE_KINDS = ("caption", "conversation")
SPEAKERS = ("human", "gpt")

RECORD_FEATURE = "record"
JPEG_QUALITY = 90

FIELDS = ("version", "id", "media", "frames", "frame_times", "fbank", "audio_present", "kind",
          "caption", "conversations", "duration_s", "meta")

_PLACEHOLDER_RE = re.compile(r"<(?:image|video|ImageHere)>")


class RecordError(ValueError):
    """A record (or an example dict about to become one) does not follow the schema."""


def normalize_placeholders(text: str) -> str:
    """Replaces LLaVA / VideoChat media placeholders (`<image>`, `<video>`) by IMAGE_PLACEHOLDER."""
    return _PLACEHOLDER_RE.sub(IMAGE_PLACEHOLDER, text)


def silent_fbank(num_clips: int = NUM_AUDIO_CLIPS) -> np.ndarray:
    """The fbank stored for examples without audio."""
    return np.zeros((num_clips,) + FBANK_SHAPE, np.float16)


def make_example(*, id: str, media: str, frames: Sequence[bytes], kind: str, caption: str = "",
                 conversations: Sequence[Dict[str, str]] = (), frame_times=None, fbank=None,
                 audio_present: bool = False, duration_s: float = 0.0,
                 meta: Dict[str, str] | None = None) -> Dict[str, Any]:
    """Builds a schema-complete example dict (defaults filled in, placeholders normalized, validated)."""
    frames = list(frames)
    example = {
        "version": RECORD_VERSION,
        "id": id,
        "media": media,
        "frames": frames,
        "frame_times": (np.zeros(len(frames), np.float32) if frame_times is None
                        else np.asarray(frame_times, np.float32)),
        "fbank": silent_fbank() if fbank is None else np.asarray(fbank, np.float16),
        "audio_present": bool(audio_present),
        "kind": kind,
        "caption": caption,
        "conversations": [{"from": t["from"], "value": normalize_placeholders(t["value"])}
                          for t in conversations],
        "duration_s": float(duration_s),
        "meta": dict(meta or {}),
    }
    validate_example(example)
    return example


def _fail(example_id, msg):
    raise RecordError(f"record {example_id!r}: {msg}")


def _validate_text(ex, eid):
    if ex["kind"] not in EXAMPLE_KINDS:
        _fail(eid, f"kind must be one of {EXAMPLE_KINDS}, got {ex['kind']!r}")
    if not isinstance(ex["caption"], str):
        _fail(eid, f"caption must be str, got {type(ex['caption']).__name__}")
    if ex["kind"] == "caption" and not ex["caption"]:
        _fail(eid, "caption example with an empty caption")
    turns = ex["conversations"]
    if ex["kind"] == "conversation" and not turns:
        _fail(eid, "conversation example without turns")
    for i, turn in enumerate(turns):
        if set(turn) != {"from", "value"} or turn["from"] not in SPEAKERS or not isinstance(turn["value"], str):
            _fail(eid, f"conversations[{i}] must be {{'from': {SPEAKERS}, 'value': str}}, got {turn!r}")
    if turns:
        counts = [t["value"].count(IMAGE_PLACEHOLDER) for t in turns]
        if turns[0]["from"] != "human" or counts[0] != 1 or sum(counts) != 1:
            _fail(eid, f"conversations must start with a human turn holding the only {IMAGE_PLACEHOLDER}; "
                       f"got first speaker {turns[0]['from']!r}, placeholders per turn {counts}")


def _validate_media(ex, eid):
    if ex["media"] not in MEDIA_KINDS:
        _fail(eid, f"media must be one of {MEDIA_KINDS}, got {ex['media']!r}")
    frames = ex["frames"]
    if not frames or not all(isinstance(f, (bytes, bytearray)) for f in frames):
        _fail(eid, "frames must be a non-empty list of JPEG bytes")
    if ex["media"] == "image" and len(frames) != 1:
        _fail(eid, f"an image has exactly 1 frame, got {len(frames)}")
    times = np.asarray(ex["frame_times"])
    if times.shape != (len(frames),):
        _fail(eid, f"frame_times shape {times.shape} != ({len(frames)},)")
    fbank = ex["fbank"]
    if not isinstance(fbank, np.ndarray) or fbank.dtype != np.float16 or fbank.ndim != 4 \
            or fbank.shape[1:] != FBANK_SHAPE:
        _fail(eid, f"fbank must be float16 [M,{','.join(map(str, FBANK_SHAPE))}], got "
                   f"{getattr(fbank, 'dtype', type(fbank))} {getattr(fbank, 'shape', '')}")


def validate_example(example: Dict[str, Any]) -> None:
    """Raises RecordError naming the record and the field when `example` breaks the schema."""
    eid = example.get("id", "<no id>")
    missing = [k for k in FIELDS if k not in example]
    if missing:
        _fail(eid, f"missing fields {missing}")
    extra = [k for k in example if k not in FIELDS]
    if extra:
        _fail(eid, f"unknown fields {extra}")
    if example["version"] != RECORD_VERSION:
        _fail(eid, f"version {example['version']} is not supported (this code reads {RECORD_VERSION})")
    if not isinstance(example["id"], str) or not example["id"]:
        _fail(eid, "id must be a non-empty str")
    meta = example["meta"]
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        _fail(eid, f"meta must be a dict of str -> str, got {meta!r}")
    _validate_media(example, eid)
    _validate_text(example, eid)


def _pack_array(arr: np.ndarray) -> Dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    little = arr.dtype.newbyteorder("<")
    data = None if not arr.any() else arr.astype(little, copy=False).tobytes()
    return {"__nd__": 1, "dtype": little.str, "shape": list(arr.shape), "data": data}


def _unpack_array(obj: Dict[str, Any]) -> np.ndarray:
    dtype, shape = np.dtype(obj["dtype"]), tuple(obj["shape"])
    if obj["data"] is None:
        return np.zeros(shape, dtype.newbyteorder("="))
    arr = np.frombuffer(obj["data"], dtype)
    if arr.size != int(np.prod(shape)):
        raise RecordError(f"array payload has {arr.size} elements, shape {shape} needs {np.prod(shape)}")
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _default(obj):
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__} in a record")


def _object_hook(obj):
    return _unpack_array(obj) if obj.get("__nd__") == 1 else obj


def encode_example(example: Dict[str, Any]) -> bytes:
    """Validates `example` (see module docstring) and serializes it to one record's bytes."""
    validate_example(example)
    return msgpack.packb(example, default=_default, use_bin_type=True)


def _varint(buf: bytes, pos: int):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise RecordError("truncated varint in tf.train.Example record")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yields (field number, value) of the length-delimited fields of a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            step = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + step], pos + step
        else:
            raise RecordError(f"unsupported protobuf wire type {wire} in tf.train.Example record")
        yield field, value


def unwrap_tf_example(record: bytes, feature: str = RECORD_FEATURE) -> bytes:
    """The single bytes value of `feature` in a serialized tf.train.Example (what TFDS stores)."""
    # Example{1: Features{1: map entry{1: key, 2: Feature{1: BytesList{1: bytes}}}}}
    for _, features in (f for f in _proto_fields(record) if f[0] == 1):
        for _, entry in (f for f in _proto_fields(features) if f[0] == 1):
            fields = dict(_proto_fields(entry))
            if fields.get(1, b"").decode("utf-8", "replace") != feature:
                continue
            lists = [v for k, v in _proto_fields(fields.get(2, b"")) if k == 1]
            values = [v for lst in lists for k, v in _proto_fields(lst) if k == 1]
            if len(values) != 1:
                raise RecordError(f"tf.train.Example feature {feature!r} holds {len(values)} bytes values, expected 1")
            return bytes(values[0])
    raise RecordError(f"tf.train.Example record has no bytes feature {feature!r}")


def _proto_len_field(field: int, payload: bytes) -> bytes:
    key, size, out = (field << 3) | 2, len(payload), bytearray()
    for value in (key, size):
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
    return bytes(out) + payload


def wrap_tf_example(record: bytes, feature: str = RECORD_FEATURE) -> bytes:
    """`record` as the serialized one-feature tf.train.Example TFDS writes (byte-identical)."""
    bytes_list = _proto_len_field(1, record)
    entry = _proto_len_field(1, feature.encode()) + _proto_len_field(2, _proto_len_field(1, bytes_list))
    return _proto_len_field(1, _proto_len_field(1, entry))


def _is_msgpack_map(record: bytes) -> bool:
    return bool(record) and (0x80 <= record[0] <= 0x8F or record[0] in (0xDE, 0xDF))


def decode_example(record: bytes) -> Dict[str, Any]:
    """Parses one record's bytes (bare or TFDS-wrapped) into the example dict (arrays as numpy)."""
    record = bytes(record)
    if record[:1] == b"\x0a":
        record = unwrap_tf_example(record)
    if not _is_msgpack_map(record):
        raise RecordError(f"record of {len(record)} bytes is neither a msgpack map nor a tf.train.Example "
                          f"(first bytes {record[:8]!r})")
    try:
        example = msgpack.unpackb(record, object_hook=_object_hook, raw=False, strict_map_key=False)
    except RecordError:
        raise
    except (msgpack.UnpackException, ValueError) as e:
        raise RecordError(f"record of {len(record)} bytes is not a valid msgpack record: {e}") from e
    validate_example(example)
    return example


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 [H,W,3] -> baseline JPEG bytes (PIL, 4:2:0), the format of the `frames` field."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame: expected uint8 [H,W,3], got {frame.dtype} {frame.shape}")
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H,W,3] RGB."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise RecordError(f"frame of {len(data)} bytes is not a decodable JPEG: {e}") from e


def decode_frames(example: Dict[str, Any]) -> np.ndarray:
    """The example's stored frames as uint8 [T,H,W,3]."""
    frames = [decode_jpeg(f) for f in example["frames"]]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise RecordError(f"record {example.get('id')!r}: frames have different shapes {sorted(shapes)}")
    return np.stack(frames)
