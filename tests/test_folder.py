"""`vllama-prepare-data folder`: your own media + captions / instruction files -> the paper adapters' shards."""
import csv
import glob
import json
import os
import wave

import numpy as np
import pytest

from data_pipelines import cli, records, shards
from data_pipelines.adapters import folder
from data_pipelines.media import write_image, write_mp4
from media_fixtures import damaged_files


def _frames(seed, n=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 32, 48, 3), dtype=np.uint8)


def _tone(seconds=1.0, hz=440):
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(16000 * seconds)) / 16000)).astype(np.float32)


def _wav(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((_tone() * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder with good and bad files, a captions CSV and two instruction files."""
    d = tmp_path_factory.mktemp("folder")
    m = d / "media"
    write_mp4(str(m / "beach.mp4"), _frames(0), 8, _tone(), 16000)
    write_mp4(str(m / "trips" / "hike.mp4"), _frames(1), 8, _tone(hz=880), 16000)
    write_mp4(str(m / "silent.mp4"), _frames(2), 8)
    write_image(str(m / "cat.jpg"), _frames(3)[0])
    write_mp4(str(m / "forgotten.mp4"), _frames(4), 8)          # in the folder, named by nothing
    damaged = damaged_files(d / "damaged")
    os.replace(damaged["cut"], m / "cut.mp4")                   # truncated: declares 5.3 s, holds 30 %
    (m / "notes.txt").write_text("not media\n")
    _wav(m / "sound.wav")
    rows = [("beach.mp4", "waves roll onto a sandy beach"),
            ("trips/hike.mp4", "two people walk up a hill"),
            ("silent.mp4", "a silent clip"),
            ("cat.jpg", "a cat on a sofa"),
            ("gone.mp4", "this file was deleted"),
            ("notes.txt", "a text file"),
            ("sound.wav", "a beep"),
            ("cut.mp4", "a clip cut short"),
            ("./beach.mp4", "the same beach again"),
            ("", "no path")]
    with open(d / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "place"])
        w.writerows([(p, c, "home") for p, c in rows])
    with open(d / "captions.csv", "ab") as f:                     # one Latin-1 row, one more for the hike
        f.write("cat.jpg,un caf\xe9 cr\xe8me,home\r\n".encode("latin-1"))
        f.write(b"trips/hike.mp4,a second caption for the hike,home\r\n")
    llava = [{"id": "q1", "image": "cat.jpg",
              "conversations": [{"from": "human", "value": "<image>\nWhat animal is this?"},
                                {"from": "gpt", "value": "A cat."}]},
             {"id": "q2", "video": "beach.mp4",
              "conversations": [{"from": "human", "value": "<video> Where is this?"},
                                {"from": "gpt", "value": "At a beach."}]},
             {"id": "q3", "image": "cat.jpg", "conversations": [{"from": "gpt", "value": "no question"}]}]
    videochat = [{"video": "trips/hike.mp4", "QA": [{"i": "Describe.", "q": "What happens?", "a": "A hike."},
                                                    {"q": "How many people?", "a": "Two."}]},
                 {"video": "missing.mp4", "QA": [{"q": "Anything?", "a": "No."}]},
                 {"QA": [{"q": "Which video?", "a": "None."}]}]
    (d / "llava.json").write_text(json.dumps(llava))
    (d / "videochat.json").write_text(json.dumps(videochat))
    return d


def _prepare(d, out, *extra):
    argv = ["folder", "--media-dir", str(d / "media"), "--data-dir", str(out), "--workers", "0",
            "--no-progress", "--frames", "4", "--short-side", "32", *extra]
    assert cli.main(argv) == 0
    return out / "my_videos" / "1.0.0"


def _records(ds_dir):
    files = sorted(glob.glob(str(ds_dir / "my_videos-train.array_record-*")))
    return [records.decode_example(r) for r in shards.read_records(files)]


def _report(ds_dir):
    with open(ds_dir / shards.report_filename("my_videos", "train")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def prepared(media, tmp_path_factory):
    ds_dir = _prepare(media, tmp_path_factory.mktemp("out"), "--captions", str(media / "captions.csv"),
                      "--instructions", str(media / "llava.json"), "--instructions", str(media / "videochat.json"))
    return _records(ds_dir), _report(ds_dir), ds_dir


def test_every_bad_item_has_its_reason_and_every_good_item_is_written(prepared):
    recs, report, _ = prepared
    skipped = {s["id"]: s for s in report["skipped"]}
    by_category = {}
    for s in report["skipped"]:
        by_category.setdefault(s["category"], []).append(s["id"])
    assert by_category == {
        "missing": ["my_videos/gone.mp4", "my_videos/missing.mp4"],
        "unsupported": ["my_videos/notes.txt", "my_videos/sound.wav"],
        "truncated": ["my_videos/cut.mp4"],
        "duplicate": ["my_videos/beach.mp4#1", "my_videos/trips/hike.mp4#1"],
        "invalid": ["my_videos/line11", "my_videos/cat.jpg#3", "my_videos/entry2"],
        "not_utf8": ["my_videos/cat.jpg#1"],
        "unlabelled": ["my_videos/forgotten.mp4"],
    }, by_category
    assert report["skipped_by_category"] == {k: len(v) for k, v in by_category.items()}
    # Each reason names the file / row and what is wrong.
    assert "captions.csv:6" in skipped["my_videos/gone.mp4"]["error"] and "does not exist" in \
        skipped["my_videos/gone.mp4"]["error"]
    assert "videochat.json[1]" in skipped["my_videos/missing.mp4"]["error"]
    assert "'.txt' is not a video" in skipped["my_videos/notes.txt"]["error"]
    assert "audio file" in skipped["my_videos/sound.wav"]["error"]
    assert "cut.mp4" in skipped["my_videos/cut.mp4"]["error"]
    assert "already captioned at captions.csv:2" in skipped["my_videos/beach.mp4#1"]["error"]
    assert "captions.csv:12" in skipped["my_videos/cat.jpg#1"]["error"]
    assert r"b'\xe9'" in skipped["my_videos/cat.jpg#1"]["error"]
    assert "already captioned at captions.csv:3" in skipped["my_videos/trips/hike.mp4#1"]["error"]
    assert "llava.json[2]" in skipped["my_videos/cat.jpg#3"]["error"]
    assert "no 'video' / 'image' field" in skipped["my_videos/entry2"]["error"]

    got = {(r["id"], r["media"], r["kind"], r["caption"]) for r in recs}
    assert got == {
        ("my_videos/beach.mp4", "video", "caption", "waves roll onto a sandy beach"),
        ("my_videos/trips/hike.mp4", "video", "caption", "two people walk up a hill"),
        ("my_videos/silent.mp4", "video", "caption", "a silent clip"),
        ("my_videos/cat.jpg", "image", "caption", "a cat on a sofa"),
        ("my_videos/cat.jpg#2", "image", "conversation", ""),
        ("my_videos/beach.mp4#2", "video", "conversation", ""),
        ("my_videos/trips/hike.mp4#2", "video", "conversation", ""),
    }
    assert report["num_inputs"] == len(recs) + len(report["skipped"]) == 19 and len(recs) == 7
    by_id = {r["id"]: r for r in recs}
    assert by_id["my_videos/beach.mp4"]["audio_present"] and not by_id["my_videos/silent.mp4"]["audio_present"]
    assert report["no_audio"] == ["my_videos/silent.mp4"]
    assert len(by_id["my_videos/beach.mp4"]["frames"]) == 4
    assert by_id["my_videos/beach.mp4"]["meta"] == dict(by_id["my_videos/beach.mp4"]["meta"], place="home",
                                                        source="captions.csv:2")
    # The conversations follow the paper adapters' rules (placeholder where LLaVA put it, before
    # VideoChat's first question).
    assert by_id["my_videos/beach.mp4#2"]["conversations"][0]["value"] == "<ImageHere> Where is this?"
    hike = by_id["my_videos/trips/hike.mp4#2"]
    assert [t["value"] for t in hike["conversations"]] == ["<ImageHere> What happens?", "A hike.",
                                                           "How many people?", "Two."]
    assert hike["meta"]["i"] == "Describe."


def test_folder_dataset_is_a_tfds_dataset(prepared):
    """Not registered by name (the name is the user's): TFDS reads it from its directory."""
    import tensorflow_datasets as tfds

    recs, _, ds_dir = prepared
    source = tfds.builder_from_directory(str(ds_dir)).as_data_source()["train"]
    assert len(source) == len(recs)
    assert records.decode_example(source[0][records.RECORD_FEATURE])["id"] == recs[0]["id"]


def test_records_equal_the_paper_adapters_for_the_same_file(media, tmp_path):
    """A folder caption record holds exactly what the paper adapters store for that media."""
    from data_pipelines.adapters.common import MediaOptions, build_example

    options = MediaOptions(num_frames=4, short_side=32)
    it = folder.splits(str(media / "media"), captions=str(media / "captions.csv"))["train"][0]
    ours = build_example(it, options)
    theirs = build_example(dict(it, id="webvid2m/x", meta={}), options)
    for k in ("frames", "audio_present", "duration_s"):
        assert ours[k] == theirs[k]
    np.testing.assert_array_equal(ours["fbank"], theirs["fbank"])


def test_require_audio_skips_silent_videos_with_a_reason(media, tmp_path):
    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"path": "beach.mp4", "caption": "a beach"}) + "\n"
                        + json.dumps({"path": "silent.mp4", "caption": "no sound"}) + "\n")
    ds_dir = _prepare(media, tmp_path / "out", "--captions", str(captions), "--require-audio", "--ignore-unlabelled")
    report = _report(ds_dir)
    assert [r["id"] for r in _records(ds_dir)] == ["my_videos/beach.mp4"]
    assert [(s["id"], s["category"]) for s in report["skipped"]] == [("my_videos/silent.mp4", "no_audio")]
    assert "audio was required" in report["skipped"][0]["error"]


def test_jsonl_captions_bad_lines_are_items(media, tmp_path):
    captions = tmp_path / "c.jsonl"
    with open(captions, "wb") as f:
        f.write(b'{"path": "beach.mp4", "caption": "a beach", "tags": ["sea"]}\n\n')
        f.write(b'{"path": "cat.jpg", "caption": "caf\xe9"}\n')
        f.write(b'{"path": "cat.jpg", "caption": \n')
        f.write(b'["cat.jpg", "a list"]\n')
        f.write(b'{"path": "cat.jpg", "caption": "a cat"}\n')
    items = folder.splits(str(media / "media"), captions=str(captions), list_unlabelled=False)["train"]
    assert [(i.get("error_category", ""), i["meta"]["source"]) for i in items] == [
        ("", "c.jsonl:1"), ("not_utf8", "c.jsonl:3"), ("invalid", "c.jsonl:4"), ("invalid", "c.jsonl:5"),
        ("", "c.jsonl:6")]
    assert items[0]["meta"]["tags"] == '["sea"]'


def test_whole_file_problems_are_errors(media, tmp_path):
    with pytest.raises(ValueError, match=r"give a captions file .* and/or instruction JSON"):
        folder.splits(str(media / "media"))
    (tmp_path / "c.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(ValueError, match=r"missing columns \['path', 'caption'\]"):
        folder.splits(str(media / "media"), captions=str(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="expected a .csv"):
        folder.splits(str(media / "media"), captions=str(tmp_path / "c.txt"))
    with pytest.raises(FileNotFoundError, match="media folder"):
        folder.splits(str(tmp_path / "nope"), captions=str(tmp_path / "c.csv"))
    with pytest.raises(SystemExit):
        cli.main(["folder", "--media-dir", str(media), "--data-dir", str(tmp_path), "--name", "My Videos"])


def test_a_separate_audio_file_gives_a_video_its_sound(media, tmp_path):
    """`audio` names the sound of a video (a silent clip + a .wav): the fbank is that file's."""
    from data_pipelines.audio import load_audio_clips

    captions = tmp_path / "c.jsonl"
    rows = [{"path": "silent.mp4", "caption": "a silent clip with its sound", "audio": "sound.wav"},
            {"path": "cat.jpg", "caption": "a cat", "audio": "sound.wav"},
            {"path": "beach.mp4", "caption": "a beach", "audio": "nope.wav"},
            {"path": "trips/hike.mp4", "caption": "a hike", "audio": "notes.txt"}]
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds_dir = _prepare(media, tmp_path / "out", "--captions", str(captions), "--require-audio", "--ignore-unlabelled")
    recs, report = _records(ds_dir), _report(ds_dir)
    assert [r["id"] for r in recs] == ["my_videos/silent.mp4"]
    rec = recs[0]
    assert rec["audio_present"] and rec["meta"]["audio_source"] == "sound.wav"
    want = load_audio_clips(str(media / "media" / "sound.wav")).fbank.astype(np.float16)
    np.testing.assert_array_equal(rec["fbank"], want)
    assert [(s["id"], s["category"]) for s in report["skipped"]] == [
        ("my_videos/cat.jpg", "unsupported"), ("my_videos/beach.mp4", "missing"),
        ("my_videos/trips/hike.mp4", "unsupported")]
    assert "goes with a video, not an image" in report["skipped"][0]["error"]
