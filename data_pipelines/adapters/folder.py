"""Your own data: a folder of videos / images plus a captions file and/or instruction conversations.

  media_dir      the media, in any sub-folders. Videos: VIDEO_EXTENSIONS, images: IMAGE_EXTENSIONS.
  captions       CSV with a header naming at least `path,caption` (other columns go to the record's
                 meta), or JSONL, one {"path": ..., "caption": ...} object a line (other keys to meta).
                 Paths are relative to media_dir (or absolute). One caption example per row.
                 An optional `audio` column / key names a separate sound file for a video (its
                 fbank is read from that file instead of the video's own track).
  instructions   JSON files holding a list of conversations in either public format, one
                 conversation example per entry, parsed by the same rules as the paper adapters:
                   LLaVA      {"image" | "video": path, "conversations": [{"from": "human"|"gpt", "value"}]}
                              (`<image>` / `<video>` marks where the media goes: llava_instruct.py)
                   VideoChat  {"video" | "image": path, "QA": [{"q", "a", "i" (optional)}]}
                              (the media goes before the first question: videochat.py)
                 plus, in either, an optional "audio": a separate sound file for the video.

Every problem with one entry or file is a skipped item with a category in the split's report,
and the good items are all written:
  not_utf8     a captions row holds bytes that are not UTF-8 (the rest of the file is still read)
  invalid      a row / entry without a path or caption, or with a malformed conversation
  unsupported  the extension is not a video or image one (an audio file alone included: a record
               holds frames; name it as a video's `audio` instead), or an `audio` file that is not
               an audio / video file or goes with an image
  missing      the named file is not there
  duplicate    a captions row names a file an earlier row already captioned
  unlabelled   a media file under media_dir that no captions row or instruction entry names
               (`list_unlabelled=False` leaves these out of the report)
plus what decoding finds: empty, undecodable, truncated, corrupt, and no_audio when audio is
required (MediaOptions.require_audio).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from data_pipelines.adapters import llava_instruct, videochat
from data_pipelines.adapters.common import expect_list, item, load_json, unique_ids

NAME = "folder"
DEFAULT_NAME = "my_videos"
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus", ".wma")
CAPTION_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_NOT_UTF8 = re.compile("[\udc80-\udcff]+")   # bytes surrogateescape could not decode
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def check_name(name: str) -> str:
    """A dataset name TFDS accepts (it names the directory and the shard files)."""
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"dataset name {name!r}: expected lower-case letters, digits and '_', "
                         "starting with a letter (e.g. my_videos)")
    return name


def media_kind(path: str) -> Tuple[str, str]:
    """('video' | 'image', '') for a supported extension, else ('', why not)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video", ""
    if ext in IMAGE_EXTENSIONS:
        return "image", ""
    if ext in AUDIO_EXTENSIONS:
        return "", (f"{os.path.basename(path)!r} is an audio file; a record holds video or image frames, so name "
                    "it as the 'audio' of the video it goes with (captions column / instruction key)")
    return "", (f"{os.path.basename(path)!r}: extension {ext or '(none)'!r} is not a video "
                f"({' '.join(VIDEO_EXTENSIONS)}) or image ({' '.join(IMAGE_EXTENSIONS)}) extension")


def _not_utf8(values: Sequence[str]) -> str:
    """'' when every value decoded as UTF-8, else the first undecodable bytes."""
    for v in values:
        m = _NOT_UTF8.search(v)
        if m:
            return repr(m.group().encode("utf-8", "surrogateescape"))
    return ""


def _read_text(path: str, what: str) -> str:
    """The file's text; bytes that are not UTF-8 stay in it as lone surrogates, found per row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist")
    with open(path, "rb") as f:
        return f.read().decode("utf-8-sig", "surrogateescape")


# Row readers yield (line number, {column: str}, error, error category).
def _csv_rows(path: str, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("path", "caption") if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"captions csv {path!r}: missing columns {missing}; the header is {reader.fieldnames}, "
                         "expected at least path,caption")
    for row in reader:
        extra = row.pop(None, None)   # more fields than the header names
        error = f"{len(extra)} more fields than the header's {len(reader.fieldnames)}" if extra else ""
        yield reader.line_num, {k: v or "" for k, v in row.items()}, error, "invalid" if error else ""


def _jsonl_rows(path: str, text: str):
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        bad = _not_utf8([raw])
        if bad:
            yield line, {}, f"not UTF-8 text (bytes {bad}); save the captions file as UTF-8", "not_utf8"
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:
            yield line, {}, f"not a JSON object: {e}", "invalid"
            continue
        if not isinstance(row, dict):
            yield line, {}, f"expected a JSON object with 'path' and 'caption', got {type(row).__name__}", "invalid"
            continue
        yield line, {k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()}, "", ""


class _Resolver:
    """Entry paths -> files under media_dir, and which files the entries named."""

    def __init__(self, media_dir: str):
        self.media_dir = os.path.abspath(media_dir)
        self.named = set()

    def __call__(self, path: str) -> Tuple[str, str]:
        """(absolute path, id path: relative to media_dir when inside it)."""
        full = os.path.normpath(os.path.join(self.media_dir, path))
        self.named.add(full)
        rel = os.path.relpath(full, self.media_dir)
        return full, (full if rel.startswith("..") else rel.replace(os.sep, "/"))


def _audio_error(resolve: "_Resolver", audio: str, kind: str) -> Tuple[str, str, str]:
    """(audio file path, error, category) for an entry's optional separate sound file."""
    if not audio:
        return "", "", ""
    full, _ = resolve(audio)
    ext = os.path.splitext(full)[1].lower()
    if kind != "video":
        return full, f"an 'audio' file goes with a video, not {'an image' if kind == 'image' else 'this file'}", \
            "unsupported"
    if ext not in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS:
        return full, (f"'audio' {os.path.basename(full)!r}: extension {ext or '(none)'!r} is not an audio "
                      f"({' '.join(AUDIO_EXTENSIONS)}) or video extension"), "unsupported"
    if not os.path.isfile(full):
        return full, f"'audio' {full!r} does not exist", "missing"
    return full, "", ""


def _media_error(full: str, kind: str, why: str) -> Tuple[str, str]:
    if not kind:
        return why, "unsupported"
    if not os.path.isfile(full):
        return f"{full!r} does not exist", "missing"
    return "", ""


def caption_items(captions_path: str, resolve: _Resolver, name: str) -> List[Dict]:
    """One caption item per row of a CSV / JSONL captions file (bad rows become error items)."""
    ext = os.path.splitext(captions_path)[1].lower()
    if ext not in CAPTION_FORMATS:
        raise ValueError(f"captions file {captions_path!r}: expected a .csv (header path,caption) or .jsonl "
                         f"file, got {ext or 'no extension'!r}")
    text = _read_text(captions_path, "captions file")
    rows = (_csv_rows if CAPTION_FORMATS[ext] == "csv" else _jsonl_rows)(captions_path, text)
    where = os.path.basename(captions_path)
    first: Dict[str, str] = {}
    out = []
    for line, row, error, category in rows:
        source = f"{where}:{line}"
        path, caption = row.get("path", ""), row.get("caption", "").strip()
        bad = _not_utf8(list(row.values()))
        if not error and bad:
            error, category = f"not UTF-8 text (bytes {bad}); save the captions file as UTF-8", "not_utf8"
        if not error and not (path and caption):
            error, category = "empty 'path' or 'caption'", "invalid"
        full, rel = resolve(path) if path and not _not_utf8([path]) else ("", f"line{line}")
        if not error:
            kind, why = media_kind(full)
            error, category = _media_error(full, kind, why)
        audio_path = ""
        if not error:
            audio_path, error, category = _audio_error(resolve, row.get("audio", ""), media_kind(full)[0])
        if not error:
            if full in first:
                error, category = f"{rel!r} was already captioned at {first[full]}", "duplicate"
            else:
                first[full] = source
        meta = {k: v for k, v in row.items() if k not in ("path", "caption", "audio") and not _not_utf8([k, v])}
        out.append(_with_audio(item(id=f"{name}/{rel}", media=media_kind(full)[0] or "video", path=full,
                                    kind="caption", caption=caption, meta=dict(meta, source=source),
                                    error=f"{source}: {error}" if error else "", error_category=category),
                               audio_path))
    return out


def _with_audio(it: Dict, audio_path: str) -> Dict:
    if audio_path and not it.get("error"):
        it["audio_path"] = audio_path
    return it


def _conversation(entry) -> Tuple[list, Dict[str, str], str]:
    """(turns, meta, error) of one LLaVA or VideoChat entry, by the paper adapters' rules."""
    if "QA" in entry:
        turns, instruction, error = videochat.qa_turns(entry["QA"])
        return turns, ({"i": instruction} if instruction else {}), error
    if "conversations" in entry:
        error = llava_instruct.conversation_error(entry["conversations"])
        return ([] if error else entry["conversations"]), {}, error
    return [], {}, "neither 'conversations' (LLaVA format) nor 'QA' (VideoChat format)"


def instruction_items(json_path: str, resolve: _Resolver, name: str) -> List[Dict]:
    """One conversation item per entry of a LLaVA / VideoChat instruction JSON file."""
    entries = expect_list(load_json(json_path, "instruction json"), json_path, "instruction json")
    where = os.path.basename(json_path)
    out = []
    for k, entry in enumerate(entries):
        source = f"{where}[{k}]"
        entry = entry if isinstance(entry, dict) else {}
        turns, meta, error = _conversation(entry) if entry else ([], {}, "entry is not a JSON object")
        path = next((str(entry[key]) for key in ("video", "image", "path") if entry.get(key)), "")
        category = "invalid" if error else ""
        if not error and not path:
            error, category = "no 'video' / 'image' field", "invalid"
        full, rel = resolve(path) if path else ("", f"entry{k}")
        if not error:
            kind, why = media_kind(full)
            error, category = _media_error(full, kind, why)
        audio_path = ""
        if not error:
            audio_path, error, category = _audio_error(resolve, str(entry.get("audio") or ""), media_kind(full)[0])
        out.append(_with_audio(item(id=f"{name}/{rel}", media=media_kind(full)[0] or "video", path=full,
                                    kind="conversation", conversations=[] if error else turns,
                                    meta=dict(meta, source=source),
                                    error=f"{source}: {error}" if error else "", error_category=category),
                               audio_path))
    return out


def unlabelled_items(resolve: _Resolver, skip: Sequence[str], name: str) -> List[Dict]:
    """Media files under media_dir that no entry named, as error items (so the report lists them)."""
    skip = {os.path.abspath(p) for p in skip}
    media_ext = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS + AUDIO_EXTENSIONS
    out = []
    for root, dirs, files in os.walk(resolve.media_dir):
        dirs.sort()
        for f in sorted(files):
            full = os.path.normpath(os.path.join(root, f))
            if full in resolve.named or full in skip or os.path.splitext(f)[1].lower() not in media_ext:
                continue
            rel = os.path.relpath(full, resolve.media_dir).replace(os.sep, "/")
            out.append(item(id=f"{name}/{rel}", media=media_kind(full)[0] or "video", path=full, kind="caption",
                            error="no captions row or instruction entry names this file",
                            error_category="unlabelled"))
    return out


def splits(source_dir: str, captions: Optional[str] = None, instructions: Sequence[str] = (),
           name: str = DEFAULT_NAME, list_unlabelled: bool = True) -> Dict[str, List[Dict]]:
    """{"train": items} for the media under `source_dir` named by `captions` and/or `instructions`."""
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"media folder {source_dir!r} does not exist")
    if not captions and not instructions:
        raise ValueError("give a captions file (CSV / JSONL: path, caption) and/or instruction JSON files "
                         "(LLaVA / VideoChat conversations) naming the media")
    check_name(name)
    resolve = _Resolver(source_dir)
    items = caption_items(captions, resolve, name) if captions else []
    for path in instructions:
        items += instruction_items(path, resolve, name)
    if list_unlabelled:
        items += unlabelled_items(resolve, [captions or "", *instructions], name)
    for it, uid in zip(items, unique_ids(it["id"] for it in items)):
        it["id"] = uid
    return {"train": items}
