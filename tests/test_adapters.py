"""Each adapter on a tiny fixture in its dataset's published schema, with real encoded media."""
import functools
import glob
import re
import json
import os

import numpy as np
import pytest

from data_pipelines import records, shards
from data_pipelines.adapters import ADAPTERS, cc595k, cc_sbu_align, llava_instruct, videochat, webvid
from data_pipelines.adapters.common import MediaOptions, build_example
from data_pipelines.media import write_image, write_mp4

OPTIONS = MediaOptions(num_frames=4, short_side=32, num_audio_clips=2)


def image(seed, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def small_video(path, seed, audio=True):
    frames = np.repeat(image(seed, 32, 48)[None], 6, axis=0)
    sound = 0.3 * np.sin(np.arange(16000) * 2 * np.pi * 500 / 16000).astype(np.float32) if audio else None
    return write_mp4(path, frames, 6, sound)


def write_all(split_items, tmp_path, name):
    result = shards.write_shards(split_items, str(tmp_path / "out"), dataset_name=name, split="train",
                                 decode_fn=functools.partial(build_example, options=OPTIONS), progress=False)
    return result, [records.decode_example(r) for r in shards.read_records(result.shard_files)]


def test_registry_names():
    assert sorted(ADAPTERS) == ["cc595k", "cc_sbu_align", "llava_instruct150k", "videochat_instruct11k", "webvid2m"]


def test_webvid(tmp_path):
    src = tmp_path / "webvid"
    small_video(str(src / "videos" / "000001_000050" / "1066674784.mp4"), 0, audio=False)
    small_video(str(src / "videos" / "000051_000100" / "1066692550.mp4"), 1, audio=False)
    (src / "results_2M_train.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "1066674784,https://ak.picdn.net/x/1066674784/preview.mp4,PT00H00M18S,000001_000050,"
        "\"Aerial shot, winter forest \"\"sunrise\"\"\"\n"
        "1066692550,https://ak.picdn.net/x/1066692550/preview.mp4,PT00H00M07S,000051_000100,Cow eating grass \n"
        "1066692999,https://ak.picdn.net/x/1066692999/preview.mp4,PT00H00M07S,000051_000100,Not downloaded\n")
    (src / "results_2M_val.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "1066692550,https://x,PT00H00M07S,000051_000100,Cow again\n")
    splits = webvid.splits(str(src))
    assert set(splits) == {"train", "validation"}
    result, examples = write_all(splits["train"], tmp_path, "webvid2m")
    assert [e["id"] for e in examples] == ["webvid2m/1066674784", "webvid2m/1066692550"]
    assert [e["caption"] for e in examples] == ['Aerial shot, winter forest "sunrise"', "Cow eating grass"]
    assert all(e["kind"] == "caption" and e["media"] == "video" and len(e["frames"]) == 4 for e in examples)
    assert examples[0]["meta"]["duration"] == "PT00H00M18S"
    assert records.decode_frames(examples[0]).shape == (4, 32, 48, 3)
    assert result.skipped_by_category == {"missing": 1}
    assert result.no_audio == ["webvid2m/1066674784", "webvid2m/1066692550"]


def test_webvid_bad_header(tmp_path):
    (tmp_path / "results_2M_train.csv").write_text("id,url,caption\n1,x,y\n")
    with pytest.raises(ValueError, match="missing columns"):
        webvid.splits(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="results_2M_train.csv"):
        webvid.splits(str(tmp_path / "nowhere"))


def test_cc595k(tmp_path):
    src = tmp_path / "cc595k"
    write_image(str(src / "images" / "GCC_train_002582585.jpg"), image(0))
    write_image(str(src / "images" / "GCC_train_002429825.jpg"), image(1))
    chat = [
        {"id": "GCC_train_002582585", "image": "GCC_train_002582585.jpg", "conversations": [
            {"from": "human", "value": "Provide a brief description of the given image.\n<image>"},
            {"from": "gpt", "value": "olive oil is a healthy ingredient used liberally ."}]},
        {"id": "GCC_train_002429825", "image": "GCC_train_002429825.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
            {"from": "gpt", "value": "a view of a city with mountains in the background"}]},
        {"id": "GCC_train_broken", "image": "GCC_train_broken.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}]},
    ]
    (src / "chat.json").write_text(json.dumps(chat))
    result, examples = write_all(cc595k.splits(str(src))["train"], tmp_path, "cc595k")
    assert [e["caption"] for e in examples] == ["olive oil is a healthy ingredient used liberally .",
                                                "a view of a city with mountains in the background"]
    assert examples[0]["meta"]["instruction"].startswith("Provide a brief description")
    assert all(e["media"] == "image" and len(e["frames"]) == 1 and e["kind"] == "caption" for e in examples)
    frame = records.decode_frames(examples[0])[0]
    assert min(frame.shape[:2]) == 32  # short side resized, aspect kept
    assert result.skipped_by_category == {"invalid": 1} and "gpt turn" in result.skipped[0]["error"]


def test_cc_sbu_align(tmp_path):
    src = tmp_path / "cc_sbu_align"
    write_image(str(src / "image" / "2.jpg"), image(2))
    write_image(str(src / "image" / "3.jpg"), image(3))
    (src / "filter_cap.json").write_text(json.dumps({"annotations": [
        {"image_id": "2", "caption": "The image shows a man fishing on a lawn next to a river."},
        {"image_id": "3", "caption": "The image shows a red car parked on the street."},
        {"image_id": "9", "caption": "Its image file is missing."}]}))
    result, examples = write_all(cc_sbu_align.splits(str(src))["train"], tmp_path, "cc_sbu_align")
    assert [e["id"] for e in examples] == ["cc_sbu_align/2", "cc_sbu_align/3"]
    assert examples[1]["caption"] == "The image shows a red car parked on the street."
    assert result.skipped_by_category == {"missing": 1}
    (src / "filter_cap.json").write_text(json.dumps([{"image_id": "2"}]))
    with pytest.raises(ValueError, match="annotations"):
        cc_sbu_align.splits(str(src))


def test_llava_instruct(tmp_path):
    src = tmp_path / "llava"
    # Video-LLaMA's layout: COCO 2014 file names; a bare-name file is found as well.
    write_image(str(src / "train2014" / "COCO_train2014_000000033471.jpg"), image(4))
    write_image(str(src / "train2014" / "000000052846.jpg"), image(5))
    data = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is positioned on top of the back of the couch."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "gpt", "value": "Starts with the wrong speaker <image>"}]},
    ]
    (src / "llava_instruct_150k.json").write_text(json.dumps(data))
    result, examples = write_all(llava_instruct.splits(str(src))["train"], tmp_path, "llava_instruct150k")
    assert [e["id"] for e in examples] == ["llava_instruct150k/000000033471", "llava_instruct150k/000000052846"]
    turns = examples[0]["conversations"]
    assert turns[0] == {"from": "human", "value": "<ImageHere>\nWhat are the colors of the bus in the image?"}
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"] and examples[0]["kind"] == "conversation"
    assert examples[1]["conversations"][0]["value"].endswith("\n<ImageHere>")
    assert result.skipped[0]["id"] == "llava_instruct150k/000000052846#1"
    assert "alternate" in result.skipped[0]["error"]


def test_videochat(tmp_path):
    src = tmp_path / "videochat"
    small_video(str(src / "videos" / "044401_044450" / "1019467378.mp4"), 6, audio=True)
    small_video(str(src / "videos" / "033301_033350" / "1027463138.mp4"), 7, audio=False)
    data = [
        {"video": "044401_044450/1019467378.mp4", "QA": [
            {"i": "", "q": "What is the man doing in the video?", "a": "He is playing a guitar."},
            {"i": "", "q": "Where is he?", "a": "On a stage."}]},
        {"video": "033301_033350/1027463138.mp4", "QA": [
            {"i": "Describe the following video in detail.", "q": "", "a": "A cat sleeps on a sofa."}]},
        {"video": "033301_033350/1027463138.mp4", "QA": [{"q": "No answer"}]},
    ]
    (src / "videochat_instruct_11k.json").write_text(json.dumps(data))
    result, examples = write_all(videochat.splits(str(src))["train"], tmp_path, "videochat_instruct11k")
    assert [e["id"] for e in examples] == ["videochat_instruct11k/044401_044450/1019467378.mp4",
                                           "videochat_instruct11k/033301_033350/1027463138.mp4"]
    assert examples[0]["conversations"] == [
        {"from": "human", "value": "<ImageHere> What is the man doing in the video?"},
        {"from": "gpt", "value": "He is playing a guitar."},
        {"from": "human", "value": "Where is he?"}, {"from": "gpt", "value": "On a stage."}]
    assert examples[0]["audio_present"] and not examples[1]["audio_present"]
    assert examples[1]["meta"]["i"] == "Describe the following video in detail."
    assert examples[1]["conversations"][0]["value"] == "<ImageHere> "
    assert result.skipped_by_category == {"invalid": 1} and "'q' and 'a'" in result.skipped[0]["error"]
    assert len(examples[0]["frame_times"]) == 4 and examples[0]["duration_s"] == pytest.approx(1.0)


def test_missing_annotation_files_name_the_path(tmp_path):
    for module, fname in ((cc595k, "chat.json"), (cc_sbu_align, "filter_cap.json"),
                          (llava_instruct, "llava_instruct_150k.json"), (videochat, "videochat_instruct_11k.json")):
        with pytest.raises(FileNotFoundError, match=fname):
            module.splits(str(tmp_path))
    (tmp_path / "chat.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        cc595k.splits(str(tmp_path))
    assert os.path.exists(tmp_path / "chat.json")


def test_cli_builds_an_adapter_dataset(tmp_path, capsys):
    import tensorflow_datasets as tfds

    from data_pipelines import cli

    src = tmp_path / "cc_sbu_align"
    for i in range(3):
        write_image(str(src / "image" / f"{i}.jpg"), image(10 + i))
    (src / "filter_cap.json").write_text(json.dumps({"annotations": [
        {"image_id": str(i), "caption": f"caption {i}"} for i in range(4)]}))
    assert cli.main(["cc_sbu_align", "--source", str(src), "--data-dir", str(tmp_path / "out"), "--workers", "0",
                     "--short-side", "24", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["splits"]["train"]["num_written"] == 3 and summary["splits"]["train"]["num_skipped"] == 1
    ds = tfds.data_source("cc_sbu_align", split="train", data_dir=str(tmp_path / "out"))
    examples = [records.decode_example(ds[i]["record"]) for i in range(len(ds))]
    assert [e["caption"] for e in examples] == ["caption 0", "caption 1", "caption 2"]
    assert min(records.decode_frames(examples[0]).shape[1:3]) == 24
    report = json.load(open(os.path.join(tmp_path / "out", "cc_sbu_align", "1.0.0", "cc_sbu_align-train.report.json")))
    assert report["skipped_by_category"] == {"missing": 1}


def test_cli_skips_damaged_videos_and_reports_why(tmp_path, capsys):
    """Truncated, corrupt and 0-byte videos: skipped, counted by reason, listed with path and error
    in the report the summary line names; only the intact video is written."""
    from data_pipelines import cli
    from media_fixtures import damaged_files

    src = tmp_path / "webvid"
    files = damaged_files(src / "videos" / "p")
    rows = [f"{k},https://x/{k}.mp4,PT00H00M05S,p,clip {k}" for k in ("good", "cut", "corrupt", "empty", "gone")]
    (src / "results_2M_train.csv").write_text("videoid,contentUrl,duration,page_dir,name\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert cli.main(["webvid2m", "--source", str(src), "--data-dir", str(out), "--workers", "0",
                     "--frames", "4", "--short-side", "32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report_path = os.path.join(out, "webvid2m", "1.0.0", "webvid2m-train.report.json")
    line = next(x for x in printed.splitlines() if x.startswith("webvid2m/train:"))
    assert line == (f"webvid2m/train: wrote 1 of 5 items; skipped 4 (corrupt 1, empty 1, missing 1, "
                    f"1 more reason); each skipped item and why: {report_path}")
    report = json.load(open(report_path))
    assert report["skipped_by_category"] == {"truncated": 1, "corrupt": 1, "empty": 1, "missing": 1}
    why = {os.path.basename(s["path"]): s for s in report["skipped"]}
    assert why["cut.mp4"]["path"] == files["cut"]
    assert re.search(r"truncated: decoded \d\.\d s of 5\.3 s, \d+ of 132 frames", why["cut.mp4"]["error"])
    assert "decode error mid-stream" in why["corrupt.mp4"]["error"]
    assert "0 bytes" in why["empty.mp4"]["error"]
    examples = [records.decode_example(r) for r in shards.read_records(
        sorted(glob.glob(os.path.join(out, "webvid2m", "1.0.0", "webvid2m-train.array_record*"))))]
    assert [e["id"] for e in examples] == ["webvid2m/good"]
    assert examples[0]["audio_present"] and examples[0]["meta"]["audio_channels"] == "imagebind"


def test_frame_size_stores_the_frames_decord_gives(tmp_path):
    """MediaOptions(frame_size=S): frames scaled in FFmpeg at decode time (the original's reader),
    then JPEG: within JPEG rounding of decode_video(size=(S, S))."""
    from data_pipelines import video

    y, x = np.mgrid[0:36, 0:64]
    smooth = np.stack([np.stack([(2 * x + 9 * t) % 256, 3 * y, x + y], -1) for t in range(6)]).astype(np.uint8)
    path = write_mp4(str(tmp_path / "v.mp4"), smooth, 6)  # JPEG keeps smooth frames close
    it = webvid.item(id="v", media="video", path=path, kind="caption", caption="c")
    options = MediaOptions(num_frames=4, frame_size=24, num_audio_clips=2)
    example = build_example(it, options)
    frames = records.decode_frames(records.decode_example(records.encode_example(example)))
    direct = video.decode_video(path, 4, size=(24, 24)).frames
    assert frames.shape == direct.shape == (4, 24, 24, 3)
    assert np.abs(frames.astype(int) - direct).mean() < 2.0
    assert example["meta"]["frame_scaling"].startswith("ffmpeg bilinear 24x24")
