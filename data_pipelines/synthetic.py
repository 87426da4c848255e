"""Synthetic audio-visual demo dataset: facts only visible, facts only audible.

Each clip is a real mp4 (h264 + aac, written by media.py; 16 frames of 64x64 at 4 fps, 4 s of
16 kHz audio) showing one coloured shape moving across a noisy background while a tone beeps:
  visual only: colour (red/green/blue/yellow), shape (circle/square/triangle/cross),
               motion (left/right/up/down)
  audio only:  pitch (low/medium/high/shrill: 200/500/1250/3000 Hz),
               rhythm (slowly/steadily/quickly/rapidly: 1/2/4/8 beeps per second)
Every attribute takes each of its 4 values equally often in each split (so chance is 25 %),
independently shuffled per attribute. Everything is a function of (seed, split, index).

Splits (written through the same shard writer as real data):
  caption_train / caption_test    kind='caption': "a red circle moving left while a low tone beeps slowly"
  instruct_train / instruct_test  kind='conversation': one question per attribute, shuffled,
                                  answered with the attribute's word ("What colour is the object?" -> "red")
Attribute labels are in each record's meta. Test clips use a different random stream than
train clips (same balanced design).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np

from data_pipelines import records
from data_pipelines.adapters.common import MediaOptions, item
from data_pipelines.media import write_mp4

NAME = "vllama_demo"
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = ("left", "right", "up", "down")
PITCHES = {"low": 200.0, "medium": 500.0, "high": 1250.0, "shrill": 3000.0}
RHYTHMS = {"slowly": 1.0, "steadily": 2.0, "quickly": 4.0, "rapidly": 8.0}
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": MOTIONS,
              "pitch": tuple(PITCHES), "rhythm": tuple(RHYTHMS)}
VISUAL = ("colour", "shape", "motion")
AUDIO = ("pitch", "rhythm")
QUESTIONS = {
    "colour": "What colour is the object?",
    "shape": "What shape is the object?",
    "motion": "Which direction is the object moving?",
    "pitch": "What pitch is the sound?",
    "rhythm": "How fast does the sound beep?",
}
SIZE, NUM_FRAMES, FPS, SAMPLE_RATE = 64, 16, 4, 16000
SECONDS = NUM_FRAMES / FPS
SPLIT_SEEDS = {"train": 0, "test": 1}
MEDIA_OPTIONS = MediaOptions(num_frames=NUM_FRAMES, short_side=None)
MANIFEST = "manifest.json"


def caption(attrs: Dict[str, str]) -> str:
    return (f"a {attrs['colour']} {attrs['shape']} moving {attrs['motion']} "
            f"while a {attrs['pitch']} tone beeps {attrs['rhythm']}")


def conversation(attrs: Dict[str, str], rng: np.random.Generator) -> List[Dict[str, str]]:
    turns = []
    for k, attr in enumerate(rng.permutation(list(ATTRIBUTES))):
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


def render_frames(attrs: Dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """uint8 [NUM_FRAMES, SIZE, SIZE, 3]: the shape crossing the frame in the motion direction."""
    radius = rng.uniform(8.0, 11.0)
    lane = rng.uniform(radius + 2, SIZE - radius - 2)
    start, end = radius + 1, SIZE - radius - 1
    if attrs["motion"] in ("left", "up"):
        start, end = end, start
    background = rng.uniform(20, 60)
    colour = np.array(COLOURS[attrs["colour"]], np.float32) * rng.uniform(0.85, 1.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    frames = np.empty((NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
    for t in range(NUM_FRAMES):
        pos = start + (end - start) * t / (NUM_FRAMES - 1)
        cy, cx = (lane, pos) if attrs["motion"] in ("left", "right") else (pos, lane)
        image = background + rng.normal(0.0, 6.0, (SIZE, SIZE, 1)).astype(np.float32)
        image = np.repeat(image, 3, axis=-1)
        image[_shape_mask(attrs["shape"], radius, yy - cy, xx - cx)] = colour
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def render_audio(attrs: Dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """float32 [SECONDS * SAMPLE_RATE]: a tone of the pitch gated into beeps at the rhythm."""
    t = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    freq = PITCHES[attrs["pitch"]] * rng.uniform(0.97, 1.03)
    rate = RHYTHMS[attrs["rhythm"]]
    phase = (t * rate + rng.uniform(0.0, 1.0)) % 1.0
    gate = (phase < 0.4).astype(np.float32)
    # 5 ms ramps keep the gating from adding broadband clicks that blur the pitch.
    ramp = int(0.005 * SAMPLE_RATE)
    gate = np.convolve(gate, np.ones(ramp) / ramp, mode="same")
    tone = np.sin(2 * np.pi * freq * t) * gate * rng.uniform(0.3, 0.5)
    return (tone + rng.normal(0.0, 0.005, t.shape)).astype(np.float32)


def _clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SEEDS[split], index])


def generate_media(out_dir: str, num_train: int = 256, num_test: int = 64, seed: int = 0) -> Dict[str, List[Dict]]:
    """Writes `{out_dir}/{split}/{i:05d}.mp4` and `{split}.json` (attributes); reuses a matching run.

    Returns {split: [attribute dict + "path"]}.
    """
    params = {"num_train": num_train, "num_test": num_test, "seed": seed, "format": 1}
    manifest = os.path.join(out_dir, MANIFEST)
    clips = {}
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f) == params:
                for split in SPLIT_SEEDS:
                    with open(os.path.join(out_dir, f"{split}.json")) as g:
                        clips[split] = json.load(g)
                clips = {s: [dict(c, path=os.path.join(out_dir, c["file"])) for c in cs] for s, cs in clips.items()}
                if all(os.path.exists(c["path"]) for cs in clips.values() for c in cs):
                    return clips
    os.makedirs(out_dir, exist_ok=True)
    for split, num in (("train", num_train), ("test", num_test)):
        if num < 1:
            raise ValueError(f"num_{split} must be >= 1, got {num}")
        attrs = balanced_attributes(num, np.random.default_rng([seed, SPLIT_SEEDS[split]]))
        clips[split] = []
        for i, a in enumerate(attrs):
            rng = _clip_rng(seed, split, i)
            file = f"{split}/{i:05d}.mp4"
            write_mp4(os.path.join(out_dir, file), render_frames(a, rng), FPS, render_audio(a, rng), SAMPLE_RATE)
            clips[split].append(dict(a, file=file))
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(clips[split], f, indent=0)
        clips[split] = [dict(c, path=os.path.join(out_dir, c["file"])) for c in clips[split]]
    with open(manifest, "w") as f:
        json.dump(params, f)
    return clips


def splits(source_dir: str, num_train: int = 256, num_test: int = 64, seed: int = 0) -> Dict[str, List[Dict[str, Any]]]:
    """Generates (or reuses) the media in source_dir and returns the writer items of the 4 splits."""
    clips = generate_media(source_dir, num_train, num_test, seed)
    out: Dict[str, List[Dict[str, Any]]] = {}
    for split, split_clips in clips.items():
        captions, instructs = [], []
        for i, c in enumerate(split_clips):
            attrs = {a: c[a] for a in ATTRIBUTES}
            meta = dict(attrs, split=split)
            base = f"{NAME}/{split}/{i:05d}"
            captions.append(item(id=f"{base}/caption", media="video", path=c["path"], kind="caption",
                                 caption=caption(attrs), meta=meta))
            turns = conversation(attrs, np.random.default_rng([seed, SPLIT_SEEDS[split], i, 1]))
            instructs.append(item(id=f"{base}/instruct", media="video", path=c["path"],
                                  kind="conversation", conversations=turns, meta=meta))
        out[f"caption_{split}"] = captions
        out[f"instruct_{split}"] = instructs
    return out
