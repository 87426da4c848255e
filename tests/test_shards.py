"""Shard writer: decode -> shard -> read round trip, broken inputs, resumability, TFDS and grain readers."""
import functools
import glob
import importlib.util
import json
import os

import numpy as np
import pytest

from data_pipelines import records, shards
from data_pipelines import video
from data_pipelines.adapters.common import MediaOptions, build_example, item
from data_pipelines.audio import load_audio_clips
from data_pipelines.media import write_mp4

OPTIONS = MediaOptions(num_frames=6, short_side=48, num_audio_clips=2)


def tone(seconds, freq=440.0, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def clip_frames(num, seed, h=32, w=40):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
    return np.concatenate([np.roll(base, k, axis=2) for k in range(num)])


def video_item(path, i):
    return item(id=f"test/{i}", media="video", path=path, kind="caption", caption=f"clip {i}")


@pytest.fixture
def videos(tmp_path):
    """3 good videos (two with audio), a corrupt, an empty and a missing file."""
    d = tmp_path / "media"
    paths = [write_mp4(str(d / "a.mp4"), clip_frames(12, 0), 8, tone(1.5, 300)),
             write_mp4(str(d / "b.mp4"), clip_frames(20, 1), 10, None),
             write_mp4(str(d / "c.mp4"), clip_frames(9, 2), 6, tone(1.5, 900))]
    corrupt = d / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    return paths, [str(corrupt), str(empty), str(d / "missing.mp4")]


def read_split(result):
    return [records.decode_example(r) for r in shards.read_records(result.shard_files)]


def test_round_trip_equals_direct_decoding(tmp_path, videos):
    good, _ = videos
    items = [video_item(p, i) for i, p in enumerate(good)]
    decode_fn = functools.partial(build_example, options=OPTIONS)
    result = shards.write_shards(items, str(tmp_path / "out"), decode_fn=decode_fn, dataset_name="t",
                                 split="train", num_shards=2, progress=False)
    assert result.shard_lengths == [1, 2] and result.num_written == 3
    examples = read_split(result)
    assert [e["id"] for e in examples] == ["test/0", "test/1", "test/2"]
    for ex, path in zip(examples, good):
        direct = video.decode_video(path, OPTIONS.num_frames, short_side=OPTIONS.short_side)
        # Stored JPEGs are exactly the JPEG encoding of the directly decoded frames...
        assert ex["frames"] == [records.encode_jpeg(f) for f in direct.frames]
        stored = records.decode_frames(ex)
        assert stored.shape == direct.frames.shape
        # ...and decode back close to them (JPEG q90 of random 8px colour blocks; unrelated frames: ~85).
        assert np.abs(stored.astype(int) - direct.frames).mean() < 8.0
        np.testing.assert_allclose(ex["frame_times"], direct.times, atol=1e-6)
        np.testing.assert_array_equal(direct.indices, video.sample_by_time(
            np.arange(direct.num_source_frames), direct.num_source_frames, OPTIONS.num_frames))
        assert ex["duration_s"] == pytest.approx(direct.duration_s)
        if ex["audio_present"]:
            fbank = load_audio_clips(path, num_clips=OPTIONS.num_audio_clips).fbank.astype(np.float16)
            np.testing.assert_array_equal(ex["fbank"], fbank)
            assert ex["fbank"].dtype == np.float16 and np.abs(ex["fbank"]).max() > 0.1
    assert [e["audio_present"] for e in examples] == [True, False, True]
    assert not examples[1]["fbank"].any() and examples[1]["fbank"].shape == (2, 1, 128, 204)
    assert result.no_audio == ["test/1"]


def test_broken_inputs_are_skipped_counted_and_listed(tmp_path, videos):
    good, broken = videos
    paths = [good[0], broken[0], good[1], broken[1], broken[2], good[2]]
    items = [video_item(p, i) for i, p in enumerate(paths)]
    items.append(dict(video_item(good[0], 6), error="annotation row 7 has no caption"))
    out = str(tmp_path / "out")
    result = shards.write_shards(items, out, decode_fn=functools.partial(build_example, options=OPTIONS),
                                 dataset_name="t", split="train", examples_per_shard=3, progress=False)
    assert result.num_written == 3 and result.num_inputs == 7
    assert [e["id"] for e in read_split(result)] == ["test/0", "test/2", "test/5"]
    report = json.load(open(os.path.join(out, "t-train.report.json")))
    assert report["num_skipped"] == 4
    assert report["skipped_by_category"] == {"undecodable": 1, "empty": 1, "missing": 1, "invalid": 1}
    skipped = {s["id"]: s for s in report["skipped"]}
    assert set(skipped) == {"test/1", "test/3", "test/4", "test/6"}
    assert skipped["test/1"]["path"] == broken[0] and broken[0] in skipped["test/1"]["error"]
    assert report["no_audio"] == ["test/2"] and report["num_no_audio"] == 1
    assert report["shard_lengths"] == [1, 1, 1]


class Interrupted(Exception):
    """Not a skippable error: stands in for a crash / Ctrl-C in the middle of a run."""


def crash_after(item_, limit, seen):
    seen.append(item_["id"])
    if len(seen) > limit:
        raise Interrupted(item_["id"])
    return build_example(item_, OPTIONS)


def test_resume_after_interruption(tmp_path, videos):
    good, _ = videos
    items = [video_item(good[i % 3], i) for i in range(8)]
    out = str(tmp_path / "out")
    seen = []
    with pytest.raises(Interrupted):
        shards.write_shards(items, out, decode_fn=functools.partial(crash_after, limit=5, seen=seen),
                            dataset_name="t", split="train", examples_per_shard=2, progress=False)
    finished = sorted(glob.glob(os.path.join(out, "t-train.array_record-?????-of-?????")))
    assert [os.path.basename(p)[-14:] for p in finished] == ["00000-of-00004", "00001-of-00004"]
    stamps = {p: os.stat(p).st_mtime_ns for p in finished}

    seen2 = []
    result = shards.write_shards(items, out, decode_fn=functools.partial(crash_after, limit=99, seen=seen2),
                                 dataset_name="t", split="train", examples_per_shard=2, progress=False)
    assert result.shards_reused == 2 and result.shards_written == 2
    assert seen2 == [f"test/{i}" for i in range(4, 8)]  # only the unfinished shards were decoded
    assert {p: os.stat(p).st_mtime_ns for p in finished} == stamps
    assert not glob.glob(os.path.join(out, "*.tmp-*"))
    assert [e["id"] for e in read_split(result)] == [f"test/{i}" for i in range(8)]

    clean = shards.write_shards(items, str(tmp_path / "clean"), decode_fn=functools.partial(build_example, options=OPTIONS),
                                dataset_name="t", split="train", examples_per_shard=2, progress=False)
    assert list(shards.read_records(clean.shard_files)) == list(shards.read_records(result.shard_files))

    # A different partition of the same items must not reuse the old shards.
    regrouped = shards.write_shards(items, out, decode_fn=functools.partial(build_example, options=OPTIONS),
                                    dataset_name="t", split="train", examples_per_shard=3, progress=False)
    assert regrouped.shards_reused == 0 and regrouped.shard_lengths == [2, 3, 3]


def test_parallel_workers_write_the_same_bytes(tmp_path, videos):
    good, broken = videos
    items = [video_item(p, i) for i, p in enumerate(good + broken[:1] + good)]
    fn = functools.partial(build_example, options=OPTIONS)
    serial = shards.write_shards(items, str(tmp_path / "s"), decode_fn=fn, dataset_name="t", split="x",
                                 num_shards=2, progress=False)
    parallel = shards.write_shards(items, str(tmp_path / "p"), decode_fn=fn, dataset_name="t", split="x",
                                   num_shards=2, num_workers=2, chunksize=1, progress=False)
    assert list(shards.read_records(serial.shard_files)) == list(shards.read_records(parallel.shard_files))
    assert parallel.skipped[0]["id"] == "test/3" and parallel.num_written == 6


def test_all_items_broken_is_an_error(tmp_path):
    items = [video_item(str(tmp_path / f"missing{i}.mp4"), i) for i in range(2)]
    with pytest.raises(ValueError, match="all 2 items failed"):
        shards.write_shards(items, str(tmp_path / "out"), decode_fn=build_example, dataset_name="t",
                            split="train", progress=False)


def test_wrapped_records_match_tfds_serializer():
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_serializer

    features = tfds.features.FeaturesDict({"record": tfds.features.Tensor(shape=(), dtype=np.object_)})
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    for size in (0, 5, 200, 70000):
        payload = np.random.default_rng(size).bytes(size)
        expected = serializer.serialize_example(features.encode_example({"record": payload}))
        assert records.wrap_tf_example(payload) == expected
        assert records.unwrap_tf_example(expected) == payload


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None


def test_tfds_builder_output_readable_by_tfds_and_grain(tmp_path, videos):
    import grain
    import tensorflow_datasets as tfds

    from data_pipelines import tfds_builders

    good, broken = videos
    source = tmp_path / "webvid"
    rows = [("1", "p0", "a cat, running"), ("2", "p0", "a dog"), ("3", "p1", "broken"), ("4", "p1", "missing"),
            ("5", "p1", "a bird"), ("6", "p2", 'a "fish"')]
    srcs = {"1": good[0], "2": good[1], "3": broken[0], "5": good[2], "6": good[0]}
    lines = ["videoid,contentUrl,duration,page_dir,name"]
    for vid, page, name in rows:
        quoted = name.replace('"', '""')
        lines.append(f'{vid},http://x/{vid}.mp4,PT00H00M10S,{page},"{quoted}"')
        if vid in srcs:
            os.makedirs(source / "videos" / page, exist_ok=True)
            with open(srcs[vid], "rb") as f:
                (source / "videos" / page / f"{vid}.mp4").write_bytes(f.read())
    (source / "results_2M_train.csv").write_text("\n".join(lines) + "\n")

    data_dir = str(tmp_path / "tfds")
    builder = tfds_builders.build("webvid2m", data_dir, source_dir=str(source), options=OPTIONS,
                                  examples_per_shard=2, progress=False)
    split = builder.info.splits["train"]
    assert split.num_examples == 4 and split.shard_lengths == [2, 0, 2]  # shard 1 held only broken files
    assert not os.path.exists(builder.work_dir)

    source_ds = tfds.data_source("webvid2m", split="train", data_dir=data_dir)
    via_tfds = [records.decode_example(source_ds[i]["record"]) for i in range(len(source_ds))]
    assert [e["id"] for e in via_tfds] == ["webvid2m/1", "webvid2m/2", "webvid2m/5", "webvid2m/6"]
    assert via_tfds[0]["caption"] == "a cat, running" and via_tfds[0]["meta"]["page_dir"] == "p0"
    assert via_tfds[3]["caption"] == 'a "fish"'
    assert via_tfds[0]["frames"] == via_tfds[3]["frames"]  # same source file

    files = sorted(glob.glob(os.path.join(builder.data_dir, "webvid2m-train.array_record-*")))
    grain_ds = grain.sources.ArrayRecordDataSource(files)
    assert len(grain_ds) == 4
    assert [records.decode_example(grain_ds[i])["id"] for i in range(4)] == [e["id"] for e in via_tfds]

    report = json.load(open(os.path.join(builder.data_dir, "webvid2m-train.report.json")))
    assert report["skipped_by_category"] == {"undecodable": 1, "missing": 1}
    assert report["no_audio"] == ["webvid2m/2"]

    again = tfds_builders.build("webvid2m", data_dir, source_dir=str(source), progress=False)
    assert again.info.splits["train"].num_examples == 4  # an existing dataset is reused as is
