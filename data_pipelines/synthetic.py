"""Synthetic audio-visual demo dataset: facts only visible, facts only audible.

Each clip is a real mp4 (h264 + aac, written by media.py; 16 frames of 64x64 at 4 fps, 4 s of
16 kHz audio) showing one coloured shape moving across a noisy background while a tone beeps:
  visual only: colour (red/green/blue/yellow), shape (circle/square/triangle/cross),
               motion (left/right/up/down)
  audio only:  pitch (low/medium/high/shrill: 200/500/1250/3000 Hz),
               rhythm (slowly/steadily/quickly/rapidly: 1/2/4/8 beeps of 100 ms per second)
Every attribute takes each of its 4 values equally often in each split (so chance is 25 %),
independently shuffled per attribute. Everything is a function of (seed, split, index).

Splits (written through the same shard writer as real data), for split in (train, test):
  caption_{split}         kind='caption': "a red circle moving left while a low tone beeps slowly"
  instruct_{split}        kind='conversation': one question per attribute, shuffled, answered with
                          the attribute's word ("What colour is the object?" -> "red")
  {caption,instruct}_seen_{split}, {caption,instruct}_heard_{split}
                          the same clips with text about only what is seen ("a red circle moving
                          left"; colour, shape, motion questions) or only what is heard ("a low
                          tone beeps slowly"; pitch, rhythm questions): the training text of a
                          branch that has only one of the media, which could answer the rest only
                          by memorising the clips
The writer's workers render each clip's mp4 (kept under media_dir) and decode it like real data for
the caption records; the other splits reuse those records' frames and fbank (same clip, new text),
so each clip is decoded once (the Kaldi fbank dominates the decoding).
Attribute labels are in each record's meta. Test clips use a different random stream than
train clips (same balanced design).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from data_pipelines import records, shards
from data_pipelines.adapters.common import MediaOptions, build_example, item
from data_pipelines.media import write_mp4
from data_pipelines.video import sample_indices

NAME = "vllama_demo"
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 200.0, "medium": 500.0, "high": 1250.0, "shrill": 3000.0}
RHYTHMS = {"slowly": 1.0, "steadily": 2.0, "quickly": 4.0, "rapidly": 8.0}
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS,
              "pitch": tuple(PITCHES), "rhythm": tuple(RHYTHMS)}
VISUAL = ("colour", "shape", "motion")
IN_EACH_FRAME = ("colour", "shape")      # what one frame shows (motion takes several)
AUDIO = ("pitch", "rhythm")
# The attributes each text view talks about ('all': every attribute).
VIEWS = {"all": tuple(ATTRIBUTES), "seen": VISUAL, "heard": AUDIO}
QUESTIONS = {
    "colour": "What colour is the object?",
    "shape": "What shape is the object?",
    "motion": "Which direction is the object moving?",
    "pitch": "What pitch is the sound?",
    "rhythm": "How fast does the sound beep?",
}
SIZE, NUM_FRAMES, FPS, SAMPLE_RATE = 64, 16, 4, 16000
# The shape's size range in pixels (of SIZE): a third to a half of the frame across. The demo's tiny
# ViT sees shape only from an outline spread over its 8-px patches; with shapes of 8-11 px its
# held-out shape accuracy stayed at 0.44-0.62 in every recipe tried (it told apart only shapes of
# different area); at 14-18 px, with the demo's tower recipe, 0.98 (docs/STATUS.md, "The demo").
RADIUS = (14.0, 18.0)
# Bumped whenever the rendering changes: media rendered by another version is never reused.
RENDER_VERSION = 2
# Every beep lasts this long, whatever the rate, so the rate also sets how much of a clip sounds
# (10-80 %). With a fixed on/off ratio instead (0.4 of each period), 1 and 2 beeps/s sound for
# equally long and the tiny audio tower, which learns from pooled patches, confused them (held-out
# rhythm 0.80 with the attribute head on the same tower recipe; 60 ms beeps 0.91, 100 ms 1.00).
BEEP_SECONDS = 0.1
SECONDS = NUM_FRAMES / FPS
SPLIT_SEEDS = {"train": 0, "test": 1, "tower": 2}    # "tower": tower_clips
MEDIA_OPTIONS = MediaOptions(num_frames=NUM_FRAMES, short_side=None)


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {tuple(VIEWS)}, got {view!r}")


def caption(attrs: Dict[str, str], view: str = "all") -> str:
    _check_view(view)
    seen = f"a {attrs['colour']} {attrs['shape']} moving {attrs['motion']}"
    heard = f"a {attrs['pitch']} tone beeps {attrs['rhythm']}"
    return {"all": f"{seen} while {heard}", "seen": seen, "heard": heard}[view]


def conversation(attrs: Dict[str, str], rng: np.random.Generator, view: str = "all") -> List[Dict[str, str]]:
    """One question per attribute of `view`, in a random order, the media placeholder in the first."""
    _check_view(view)
    turns = []
    for k, attr in enumerate(rng.permutation(list(VIEWS[view]))):
        question = QUESTIONS[attr] if k else f"{records.IMAGE_PLACEHOLDER} {QUESTIONS[attr]}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": attrs[attr]}]
    return turns


def balanced_attributes(num: int, rng: np.random.Generator) -> List[Dict[str, str]]:
    """num attribute dicts; each attribute's values appear equally often (exactly, if 4 | num)."""
    columns = {a: rng.permutation(np.arange(num) % len(v)) for a, v in ATTRIBUTES.items()}
    return [{a: ATTRIBUTES[a][int(columns[a][i])] for a in ATTRIBUTES} for i in range(num)]


def _shape_mask(shape: str, radius: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    ay, ax = np.abs(yy), np.abs(xx)
    if shape == "circle":
        return yy ** 2 + xx ** 2 <= radius ** 2
    if shape == "square":
        return (ay <= radius * 0.85) & (ax <= radius * 0.85)
    if shape == "triangle":
        return (yy <= radius * 0.8) & (yy >= -radius) & (ax <= (yy + radius) * 0.58)
    return ((ay <= radius * 0.3) & (ax <= radius)) | ((ax <= radius * 0.3) & (ay <= radius))


def render_frames(attrs: Dict[str, str], rng: np.random.Generator,
                  frame_indices: Optional[Sequence[int]] = None) -> np.ndarray:
    """uint8 [NUM_FRAMES, SIZE, SIZE, 3]: the shape crossing the frame in the motion direction;
    only the frames at `frame_indices` (of NUM_FRAMES) when given."""
    radius = rng.uniform(*RADIUS)
    lane = rng.uniform(radius + 2, SIZE - radius - 2)
    start, end = radius + 1, SIZE - radius - 1
    if attrs["motion"] in ("left", "up"):
        start, end = end, start
    background = rng.uniform(20, 60)
    colour = np.array(COLOURS[attrs["colour"]], np.float32) * rng.uniform(0.85, 1.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    times = range(NUM_FRAMES) if frame_indices is None else [int(t) for t in frame_indices]
    if not all(0 <= t < NUM_FRAMES for t in times):
        raise ValueError(f"render_frames: frame_indices must lie in [0, {NUM_FRAMES}), got {list(times)}")
    frames = np.empty((len(times), SIZE, SIZE, 3), np.uint8)
    for k, t in enumerate(times):
        pos = start + (end - start) * t / (NUM_FRAMES - 1)
        cy, cx = (lane, pos) if attrs["motion"] in ("left", "right") else (pos, lane)
        image = background + rng.normal(0.0, 6.0, (SIZE, SIZE, 1)).astype(np.float32)
        image = np.repeat(image, 3, axis=-1)
        image[_shape_mask(attrs["shape"], radius, yy - cy, xx - cx)] = colour
        frames[k] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def render_audio(attrs: Dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """float32 [SECONDS * SAMPLE_RATE]: a tone of the pitch gated into BEEP_SECONDS beeps at the rhythm."""
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    freq = PITCHES[attrs["pitch"]] * rng.uniform(0.97, 1.03)
    rate = RHYTHMS[attrs["rhythm"]]
    phase = (t * rate + rng.uniform(0.0, 1.0)) % 1.0
    gate = (phase < BEEP_SECONDS * rate).astype(np.float32)
    # 5 ms ramps keep the gating from adding broadband clicks that blur the pitch.
    ramp = int(0.005 * SAMPLE_RATE)
    gate = np.convolve(gate, np.ones(ramp) / ramp, mode="same")
    tone = np.sin(2 * np.pi * freq * t) * gate * rng.uniform(0.3, 0.5)
    return (tone + rng.normal(0.0, 0.005, t.shape)).astype(np.float32)


def _clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


def tower_clips(num: int, num_frames: int, seed: int = 0) -> Tuple[np.ndarray, List[Dict[str, str]]]:
    """`num` clips for pretraining the demo's image tower, rendered in memory from their own random
    stream (no mp4, no audio; neither the train nor the test clips): uint8 `[num, num_frames,
    SIZE, SIZE, 3]`, each clip's frames drawn in order at random from its NUM_FRAMES ('headtail'
    sampling, so the shape sits anywhere on its path), and the clips' attributes (balanced).

    A pretrained tower has seen far more images than the data it is later tuned on; many short
    clips give the tiny ViT the many shape instances it needs (docs/STATUS.md, "The demo").
    """
    if num < 1 or not 1 <= num_frames <= NUM_FRAMES:
        raise ValueError(f"tower_clips: need num >= 1 and 1 <= num_frames <= {NUM_FRAMES}, got {num}, {num_frames}")
    attrs = balanced_attributes(num, np.random.default_rng([seed, SPLIT_SEEDS["tower"]]))
    frames = np.empty((num, num_frames, SIZE, SIZE, 3), np.uint8)
    for i, a in enumerate(attrs):
        rng = _clip_rng(seed, "tower", i)
        frames[i] = render_frames(a, rng, sample_indices(NUM_FRAMES, num_frames, "headtail", rng))
    return frames, attrs


def _media_root(media_dir: str, seed: int) -> str:
    return os.path.join(media_dir, f"v{RENDER_VERSION}", f"seed{seed}")


def clip_path(media_dir: str, split: str, index: int, seed: int = 0) -> str:
    """Where clip `index` of `split` is (or will be) rendered as an mp4."""
    return os.path.join(_media_root(media_dir, seed), split, f"{index:05d}.mp4")


def clip_items(media_dir: str, split: str, num: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Caption items of one split; their mp4s (`clip_path`: `{media_dir}/v{RENDER_VERSION}/seed{seed}/
    {split}/{i:05d}.mp4`) are rendered by `build_clip_example` in the writer's workers if not there yet."""
    if num < 1:
        raise ValueError(f"num_{split} must be >= 1, got {num}")
    attrs = balanced_attributes(num, np.random.default_rng([seed, SPLIT_SEEDS[split]]))
    return [dict(item(id=f"{NAME}/{split}/{i:05d}/caption", media="video", kind="caption",
                      path=clip_path(media_dir, split, i, seed),
                      caption=caption(a), meta=dict(a, split=split)),
                 render={"seed": seed, "split": split, "index": i})
            for i, a in enumerate(attrs)]


def render_clip(clip_item: Dict[str, Any]) -> str:
    """Writes the item's mp4 unless present (atomically, so a crash leaves no half file)."""
    path = clip_item["path"]
    if not os.path.exists(path):
        attrs = {a: clip_item["meta"][a] for a in ATTRIBUTES}
        r = clip_item["render"]
        rng = _clip_rng(r["seed"], r["split"], r["index"])
        tmp = f"{path}.tmp-{os.getpid()}.mp4"
        write_mp4(tmp, render_frames(attrs, rng), FPS, render_audio(attrs, rng), SAMPLE_RATE)
        os.replace(tmp, path)
    return path


def build_clip_example(clip_item: Dict[str, Any], options: MediaOptions = MEDIA_OPTIONS) -> Dict[str, Any]:
    """Renders the clip's mp4 if needed, then decodes it like any real video (adapters.common)."""
    render_clip(clip_item)
    return build_example(clip_item, options)


# The derived splits: (name prefix, record kind, view); each gets its own text random stream.
DERIVED = (("instruct", "conversation", "all"), ("caption_seen", "caption", "seen"),
           ("instruct_seen", "conversation", "seen"), ("caption_heard", "caption", "heard"),
           ("instruct_heard", "conversation", "heard"))


def derived_items(caption_items: List[Dict[str, Any]], caption_result, prefix: str, seed: int = 0) -> List[Dict[str, Any]]:
    """Items of the derived split `prefix` (a DERIVED name) reusing the media of the written caption
    records (no second decode)."""
    kinds = {name: (kind, view) for name, kind, view in DERIVED}
    if prefix not in kinds:
        raise ValueError(f"derived split must be one of {tuple(kinds)}, got {prefix!r}")
    skipped = {s["id"] for s in caption_result.skipped}
    kept = [c for c in caption_items if c["id"] not in skipped]
    sources = [(path, k) for path, n in zip(caption_result.shard_files, caption_result.shard_lengths)
               for k in range(n)]
    if len(sources) != len(kept):
        raise ValueError(f"{len(kept)} caption items kept but {len(sources)} caption records written")
    kind, view = kinds[prefix]
    return [{"id": c["id"].replace("/caption", f"/{prefix}"), "source": src, "seed": seed, "kind": kind,
             "view": view, "stream": 1 + [d[0] for d in DERIVED].index(prefix)}
            for c, src in zip(kept, sources)]


def retext_example(derived_item: Dict[str, Any]) -> Dict[str, Any]:
    """The caption record at item["source"] with the item's text: its view's caption, or its
    view's question-answer conversation."""
    path, index = derived_item["source"]
    example = records.decode_example(shards.read_record(path, index))
    attrs = {a: example["meta"][a] for a in ATTRIBUTES}
    split, clip = example["meta"]["split"], int(example["id"].split("/")[-2])
    new_id = example["id"].replace("/caption", "/" + derived_item["id"].rsplit("/", 1)[1])
    view = derived_item["view"]
    if derived_item["kind"] == "caption":
        return dict(example, id=new_id, caption=caption(attrs, view), meta=dict(example["meta"], view=view))
    rng = np.random.default_rng([derived_item["seed"], SPLIT_SEEDS[split], clip, derived_item["stream"]])
    return dict(example, id=new_id, kind="conversation", caption="", conversations=conversation(attrs, rng, view),
                meta=dict(example["meta"], view=view))


def write_splits(media_dir: str, out_dir: str, num_train: int = 256, num_test: int = 64, seed: int = 0,
                 limit: Optional[int] = None, options: MediaOptions = MEDIA_OPTIONS,
                 **write_kwargs) -> List["shards.SplitResult"]:
    """Renders, decodes and writes caption_{train,test}, then derives the other splits (DERIVED)
    from those records. `options`: frames / audio clips stored per clip (default MEDIA_OPTIONS).

    write_kwargs go to `shards.write_shards` (examples_per_shard, num_workers, progress).
    """
    results = []
    for split, num in (("train", num_train), ("test", num_test)):
        items = clip_items(media_dir, split, num, seed)[:limit]
        os.makedirs(os.path.join(_media_root(media_dir, seed), split), exist_ok=True)
        captions = shards.write_shards(items, out_dir, decode_fn=functools.partial(build_clip_example, options=options),
                                       dataset_name=NAME,
                                       split=f"caption_{split}", **write_kwargs)
        results.append(captions)
        for prefix, _, _ in DERIVED:
            results.append(shards.write_shards(derived_items(items, captions, prefix, seed), out_dir,
                                               decode_fn=retext_example, dataset_name=NAME, split=f"{prefix}_{split}",
                                               **dict(write_kwargs, num_workers=0)))
    return results
