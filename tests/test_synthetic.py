"""Synthetic demo set: balanced attributes, determinism, attributes really in pixels / sound, shards."""
import os
import time

import numpy as np
import pytest

from data_pipelines import records, shards, synthetic
from data_pipelines import video
from data_pipelines.adapters.common import build_example
from data_pipelines.audio import decode_audio


def test_attributes_are_balanced_and_independent():
    attrs = synthetic.balanced_attributes(64, np.random.default_rng(0))
    for name, values in synthetic.ATTRIBUTES.items():
        counts = {v: sum(a[name] == v for a in attrs) for v in values}
        assert counts == {v: 16 for v in values}, name
    # Shuffled per attribute: colour does not determine pitch.
    pairs = {(a["colour"], a["pitch"]) for a in attrs}
    assert len(pairs) >= 12


def test_captions_and_questions():
    attrs = {"colour": "red", "shape": "circle", "motion": "left", "pitch": "low", "rhythm": "slowly"}
    assert synthetic.caption(attrs) == "a red circle moving left while a low tone beeps slowly"
    assert synthetic.caption(attrs, "seen") == "a red circle moving left"
    assert synthetic.caption(attrs, "heard") == "a low tone beeps slowly"
    for view, names in (("seen", synthetic.VISUAL), ("heard", synthetic.AUDIO)):
        answers = [t["value"] for t in synthetic.conversation(attrs, np.random.default_rng(0), view)[1::2]]
        assert sorted(answers) == sorted(attrs[a] for a in names)
    with pytest.raises(ValueError, match="view must be one of"):
        synthetic.caption(attrs, "smelt")
    turns = synthetic.conversation(attrs, np.random.default_rng(0))
    assert turns[0]["value"].startswith(records.IMAGE_PLACEHOLDER + " ")
    qa = {t["value"].replace(records.IMAGE_PLACEHOLDER + " ", ""): a["value"] for t, a in zip(turns[::2], turns[1::2])}
    assert qa == {"What colour is the object?": "red", "What shape is the object?": "circle",
                  "Which direction is the object moving?": "left", "What pitch is the sound?": "low",
                  "How fast does the sound beep?": "slowly"}


def object_pixels(frame, colour):
    return np.all(np.abs(frame.astype(int) - np.array(colour)) < 60, axis=-1)


@pytest.mark.parametrize("motion", synthetic.MOTIONS)
def test_frames_show_colour_and_motion(motion):
    attrs = {"colour": "blue", "shape": "square", "motion": motion, "pitch": "low", "rhythm": "slowly"}
    frames = synthetic.render_frames(attrs, np.random.default_rng(1))
    assert frames.shape == (synthetic.NUM_FRAMES, 64, 64, 3)
    centres = []
    for f in frames:
        ys, xs = np.nonzero(object_pixels(f, synthetic.COLOURS["blue"]))
        assert len(ys) > 100  # the object is there, in its colour
        centres.append((ys.mean(), xs.mean()))
    dy, dx = np.subtract(centres[-1], centres[0])
    expected = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[motion]
    assert np.sign(round(dy / 10)) == expected[0] and np.sign(round(dx / 10)) == expected[1]


def test_shapes_differ_in_area():
    areas = {}
    for shape in synthetic.SHAPES:
        attrs = {"colour": "red", "shape": shape, "motion": "left", "pitch": "low", "rhythm": "slowly"}
        frame = synthetic.render_frames(attrs, np.random.default_rng(2))[0]
        areas[shape] = object_pixels(frame, synthetic.COLOURS["red"]).sum()
    assert len(set(areas.values())) == 4 and min(areas.values()) > 100
    assert areas["circle"] > areas["square"] > areas["cross"] > areas["triangle"]


def test_rendering_some_frames_puts_the_object_where_the_full_clip_has_it():
    attrs = {"colour": "green", "shape": "cross", "motion": "down", "pitch": "low", "rhythm": "slowly"}
    full = synthetic.render_frames(attrs, np.random.default_rng(4))
    some = synthetic.render_frames(attrs, np.random.default_rng(4), frame_indices=[3, 11])
    assert some.shape == (2, 64, 64, 3)
    colour = synthetic.COLOURS["green"]
    for k, t in enumerate([3, 11]):
        np.testing.assert_array_equal(object_pixels(some[k], colour), object_pixels(full[t], colour))
    with pytest.raises(ValueError, match=r"frame_indices must lie in \[0, 16\), got \[3, 16\]"):
        synthetic.render_frames(attrs, np.random.default_rng(4), frame_indices=[3, 16])


def test_tower_clips_are_their_own_balanced_set_in_frame_order():
    frames, attrs = synthetic.tower_clips(16, 2, seed=0)
    assert frames.shape == (16, 2, 64, 64, 3) and frames.dtype == np.uint8
    for name, values in synthetic.ATTRIBUTES.items():
        assert sorted(a[name] for a in attrs) == sorted(list(values) * 4), name
    again, same = synthetic.tower_clips(16, 2, seed=0)
    np.testing.assert_array_equal(frames, again)
    assert same == attrs
    assert not np.array_equal(synthetic.tower_clips(16, 2, seed=1)[0], frames)
    for clip, a in zip(frames, attrs):
        centres = [np.argwhere(object_pixels(f, synthetic.COLOURS[a["colour"]])).mean(0) for f in clip]
        dy, dx = centres[1] - centres[0]
        step = {"left": dx < 0, "right": dx > 0, "up": dy < 0, "down": dy > 0}[a["motion"]]
        assert step, (a, centres)  # the second frame is later on the object's path
    with pytest.raises(ValueError, match="num_frames"):
        synthetic.tower_clips(4, 17)


@pytest.mark.parametrize("pitch,rhythm", [("low", "slowly"), ("shrill", "rapidly"), ("medium", "quickly"),
                                          ("high", "steadily")])
def test_audio_has_pitch_and_beep_rate(pitch, rhythm):
    attrs = {"colour": "red", "shape": "circle", "motion": "left", "pitch": pitch, "rhythm": rhythm}
    wave = synthetic.render_audio(attrs, np.random.default_rng(3))
    sr = synthetic.SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(wave))
    peak = np.fft.rfftfreq(wave.size, 1 / sr)[spectrum.argmax()]
    assert abs(peak / synthetic.PITCHES[pitch] - 1) < 0.05
    envelope = np.abs(wave).reshape(-1, sr // 100).max(axis=1) > 0.1  # 10 ms resolution
    onsets = np.sum(np.diff(envelope.astype(int)) == 1)
    expected = synthetic.RHYTHMS[rhythm] * synthetic.SECONDS
    assert abs(onsets - expected) <= 1
    # Fixed-length beeps: the faster the rhythm, the more of the clip sounds (5 ms bins: a bin
    # holds a whole period of the lowest pitch; each beep edge may add one bin).
    sounding = (np.abs(wave).reshape(-1, sr // 200).max(axis=1) > 0.1).mean()
    assert abs(sounding - synthetic.BEEP_SECONDS * synthetic.RHYTHMS[rhythm]) < 0.1


def test_generation_is_deterministic_and_reused(tmp_path):
    def render(media_dir, seed):
        items = synthetic.clip_items(str(media_dir), "train", 8, seed)
        for it in items:
            os.makedirs(os.path.dirname(it["path"]), exist_ok=True)
            synthetic.render_clip(it)
        return items

    a, b, c = render(tmp_path / "a", 5), render(tmp_path / "b", 5), render(tmp_path / "c", 6)
    assert [x["meta"] for x in a] == [x["meta"] for x in b] and [x["meta"] for x in a] != [x["meta"] for x in c]
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    np.testing.assert_array_equal(video.decode_video(a[3]["path"], 16).frames,
                                  video.decode_video(b[3]["path"], 16).frames)
    np.testing.assert_array_equal(decode_audio(a[3]["path"])[0], decode_audio(b[3]["path"])[0])
    stamp = os.stat(a[0]["path"]).st_mtime_ns
    synthetic.render_clip(a[0])
    assert os.stat(a[0]["path"]).st_mtime_ns == stamp  # existing media is reused
    assert "seed5" in a[0]["path"] and "seed6" in c[0]["path"]  # a new seed never reuses old files
    assert f"v{synthetic.RENDER_VERSION}" in a[0]["path"]  # nor does a new renderer


def test_demo_splits_through_the_writer(tmp_path):
    results = synthetic.write_splits(str(tmp_path / "media"), str(tmp_path / "out"), num_train=8, num_test=4,
                                     seed=0, examples_per_shard=3, progress=False)
    by_split = {r.split: r for r in results}
    assert {k: r.num_written for k, r in by_split.items()} == {
        f"{prefix}_{split}": n for split, n in (("train", 8), ("test", 4))
        for prefix in ("caption", "instruct", "caption_seen", "instruct_seen", "caption_heard", "instruct_heard")}
    # The seen / heard splits: the same clips (same media), text about one medium only.
    seen = [records.decode_example(r) for r in shards.read_records(by_split["instruct_seen_test"].shard_files)]
    heard = [records.decode_example(r) for r in shards.read_records(by_split["caption_heard_test"].shard_files)]
    captions = [records.decode_example(r) for r in shards.read_records(by_split["caption_test"].shard_files)]
    instructs = [records.decode_example(r) for r in shards.read_records(by_split["instruct_test"].shard_files)]
    for cap, ins in zip(captions, instructs):
        assert cap["audio_present"] and cap["fbank"].shape == (8, 1, 128, 204) and cap["fbank"].std() > 0.1
        assert records.decode_frames(cap).shape == (16, 64, 64, 3)
        attrs = {a: cap["meta"][a] for a in synthetic.ATTRIBUTES}
        assert cap["kind"] == "caption" and cap["caption"] == synthetic.caption(attrs)
        assert ins["id"] == cap["id"].replace("/caption", "/instruct") and ins["kind"] == "conversation"
        assert sorted(t["value"] for t in ins["conversations"][1::2]) == sorted(attrs.values())
        assert ins["frames"] == cap["frames"] and np.array_equal(ins["fbank"], cap["fbank"])
    for cap, s, h in zip(captions, seen, heard):
        attrs = {a: cap["meta"][a] for a in synthetic.ATTRIBUTES}
        assert s["id"] == cap["id"].replace("/caption", "/instruct_seen") and s["frames"] == cap["frames"]
        assert sorted(t["value"] for t in s["conversations"][1::2]) == sorted(attrs[a] for a in synthetic.VISUAL)
        assert h["kind"] == "caption" and h["caption"] == synthetic.caption(attrs, "heard")
        assert np.array_equal(h["fbank"], cap["fbank"])
    with pytest.raises(ValueError, match="derived split must be one of"):
        synthetic.derived_items([], by_split["caption_test"], "instruct_smelt")
    # The caption records are the real decode of the rendered mp4.
    direct = build_example(synthetic.clip_items(str(tmp_path / "media"), "test", 4, 0)[2], synthetic.MEDIA_OPTIONS)
    assert direct["frames"] == captions[2]["frames"]
    np.testing.assert_array_equal(direct["fbank"], captions[2]["fbank"])
    # Rerun: everything reused.
    again = synthetic.write_splits(str(tmp_path / "media"), str(tmp_path / "out"), num_train=8, num_test=4,
                                   seed=0, examples_per_shard=3, progress=False)
    assert all(r.shards_written == 0 for r in again)


@pytest.mark.slow
@pytest.mark.ci
def test_a_few_hundred_clips_in_under_a_minute(tmp_path):
    import resource

    from data_pipelines import tfds_builders

    def cpu_seconds():
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    start, cpu0 = time.time(), cpu_seconds()
    builder = tfds_builders.build("vllama_demo", str(tmp_path), source_kwargs=dict(num_train=256, num_test=64),
                                  num_workers=2, progress=False)
    elapsed, cpu = time.time() - start, cpu_seconds() - cpu0
    assert builder.info.splits["caption_train"].num_examples == 256
    assert builder.info.splits["instruct_test"].num_examples == 64
    print(f"320 clips, 640 records: {elapsed:.1f}s wall, {cpu:.1f} CPU-s (load average {os.getloadavg()[0]:.1f})")
    # The CI machine is shared; CPU time over 2 cores is what an idle 2-core machine takes.
    assert cpu / 2 < 60


def test_cli_demo(tmp_path, capsys):
    import tensorflow_datasets as tfds

    from data_pipelines import cli

    assert cli.main(["demo", "--data-dir", str(tmp_path), "--num-train", "4", "--num-test", "4", "--workers", "0",
                     "--no-progress"]) == 0
    for split in ("caption_train", "instruct_train", "caption_test", "instruct_test"):
        ds = tfds.data_source("vllama_demo", split=split, data_dir=str(tmp_path))
        assert len(ds) == 4
    example = records.decode_example(ds[0]["record"])
    assert example["id"] == "vllama_demo/test/00000/instruct" and example["audio_present"]
    media = tmp_path / "vllama_demo" / "media"
    assert os.path.exists(synthetic.clip_path(str(media), "test", 0))
    assert not os.path.exists(tmp_path / "vllama_demo" / "work-1.0.0")
