"""The Beam pipeline writes exactly the single-process writer's shards and report, and resumes."""
import functools
import json
import os

import numpy as np
import pytest

from data_pipelines import shards
from data_pipelines.adapters.common import MediaOptions, build_example, item
from data_pipelines.media import write_image, write_mp4
from media_fixtures import damaged_files

beam_shards = pytest.importorskip("data_pipelines.beam_shards")
pytest.importorskip("apache_beam")

DECODE = functools.partial(build_example, options=MediaOptions(num_frames=4, short_side=32))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam")
    rng = np.random.default_rng(0)
    out = []
    for k in range(5):
        tone = (0.3 * np.sin(2 * np.pi * (300 + 100 * k) * np.arange(16000) / 16000)).astype(np.float32)
        path = write_mp4(str(d / f"v{k}.mp4"), rng.integers(0, 255, (8, 32, 48, 3), dtype=np.uint8), 8,
                         tone if k % 2 == 0 else None)
        out.append(item(id=f"t/v{k}", media="video", path=path, kind="caption", caption=f"clip {k}"))
    out.append(item(id="t/img", media="image", path=write_image(str(d / "i.jpg"), rng.integers(0, 255, (32, 32, 3),
                                                                                            dtype=np.uint8)),
                    kind="caption", caption="an image"))
    out.append(item(id="t/cut", media="video", path=damaged_files(d)["cut"], kind="caption", caption="cut"))
    out.append(item(id="t/gone", media="video", path=str(d / "gone.mp4"), kind="caption", caption="gone"))
    out.append(item(id="t/bad", media="video", path="", kind="caption", error="bad row", error_category="invalid"))
    return out


def _shard_records(result):
    return [list(shards.read_records([f])) for f in result.shard_files]


def _report(result):
    out = result.to_json()
    for k in ("elapsed_s", "shards_written", "shards_reused"):
        out.pop(k)
    return out


@pytest.fixture(scope="module")
def single(items, tmp_path_factory):
    return shards.write_shards(items, str(tmp_path_factory.mktemp("single")), decode_fn=DECODE, dataset_name="t",
                               split="train", examples_per_shard=3, progress=False)


def test_beam_records_and_report_equal_the_single_process_writer(items, single, tmp_path):
    ours = beam_shards.write_shards(items, str(tmp_path), decode_fn=DECODE, dataset_name="t", split="train",
                                    examples_per_shard=3)
    assert [os.path.basename(f) for f in ours.shard_files] == [os.path.basename(f) for f in single.shard_files]
    assert _shard_records(ours) == _shard_records(single)
    assert _report(ours) == _report(single)
    assert not [f for f in os.listdir(tmp_path) if ".items.jsonl" in f]   # the work list is removed
    assert single.skipped_by_category == {"truncated": 1, "missing": 1, "invalid": 1}
    with open(tmp_path / shards.report_filename("t", "train")) as f:
        assert json.load(f)["skipped_by_category"] == single.skipped_by_category


def test_beam_with_two_worker_processes_and_resume(items, single, tmp_path):
    args = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    first = beam_shards.write_shards(items, str(tmp_path), decode_fn=DECODE, dataset_name="t", split="train",
                                     examples_per_shard=3, beam_args=args)
    assert _shard_records(first) == _shard_records(single) and first.shards_written == 3
    # A crash that lost the last shard: the rerun writes only that one, leaving the others untouched.
    kept = {f: os.stat(f).st_mtime_ns for f in first.shard_files[:2]}
    os.remove(first.shard_files[2])
    again = beam_shards.write_shards(items, str(tmp_path), decode_fn=DECODE, dataset_name="t", split="train",
                                     examples_per_shard=3, beam_args=args)
    assert (again.shards_written, again.shards_reused) == (1, 2)
    assert {f: os.stat(f).st_mtime_ns for f in again.shard_files[:2]} == kept
    assert _shard_records(again) == _shard_records(single) and _report(again) == _report(single)


def test_prepare_data_cli_with_beam_writes_what_it_writes_without(items, tmp_path):
    """`vllama-prepare-data folder --beam=...` (two DirectRunner worker processes) and the default
    writer give the same shard files, record for record."""
    from data_pipelines import cli

    media_dir = os.path.dirname(items[0]["path"])
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\n" + "".join(f"v{k}.mp4,clip {k}\n" for k in range(5)) + "gone.mp4,gone\n")
    outs = {}
    for how, extra in (("pool", ["--workers", "0"]),
                       ("beam", ["--beam=--direct_num_workers=2 --direct_running_mode=multi_processing"])):
        out = tmp_path / how
        assert cli.main(["folder", "--media-dir", media_dir, "--captions", str(captions), "--data-dir", str(out),
                         "--frames", "4", "--short-side", "32", "--examples-per-shard", "2", "--no-progress",
                         "--ignore-unlabelled", *extra]) == 0
        ds = out / "my_videos" / "1.0.0"
        files = sorted(f for f in os.listdir(ds) if ".array_record-" in f)
        outs[how] = {f: list(shards.read_records([str(ds / f)])) for f in files}
        with open(ds / shards.report_filename("my_videos", "train")) as f:
            report = json.load(f)
        assert (report["num_written"], report["skipped_by_category"]) == (5, {"missing": 1})
    assert outs["beam"] == outs["pool"] and len(outs["pool"]) == 3
