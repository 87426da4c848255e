"""Data preparation throughput: the Beam pipeline (1 and 2 DirectRunner workers) vs the single-process writer.

Each writer prepares the same WebVid-like clips into fresh shards (16 frames stored at short side
256 + 8 audio clips of Kaldi fbank per video, the writer defaults), one after the other in this one
run, so the ratios compare like with like on this machine's load (printed). Clips: h264 596x336
(WebVid-2M's preview size) at 25 fps with a keyframe every 2 s and a 48 kHz stereo AAC track,
--seconds long (WebVid-2M's mean is ~18 s); --distinct files written, repeated to --clips paths.

    single      shards.write_shards(num_workers=0): decode + encode + write in this process
    beam_1      beam_shards.write_shards, DirectRunner in this process (Beam's own overhead)
    beam_2      beam_shards.write_shards, --direct_num_workers=2 --direct_running_mode=multi_processing

The projection to WebVid-2M (2.5 M clips) assumes per-worker throughput stays what beam_2 measured
per worker (workers share nothing but the output file system) and adds no start-up or straggler
time: hours = 2.5e6 / (per-worker videos/s x N) / 3600; storage = 2.5e6 x bytes per clip.

    python benchmarks/beam_prepare.py --json beam.json
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WEBVID_CLIPS = 2_500_000


def _writers(items, out_root):
    from data_pipelines import beam_shards, shards
    from data_pipelines.adapters.common import MediaOptions, build_example

    decode = functools.partial(build_example, options=MediaOptions())
    kw = dict(decode_fn=decode, dataset_name="bench", split="train", examples_per_shard=4)
    return {
        "single": (1, lambda d: shards.write_shards(items, d, progress=False, **kw)),
        "beam_1": (1, lambda d: beam_shards.write_shards(items, d, **kw)),
        "beam_2": (2, lambda d: beam_shards.write_shards(
            items, d, beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"], **kw)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--distinct", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from benchmarks.media_decode import write_clip
    from data_pipelines.adapters.common import item

    tmp = tempfile.mkdtemp(prefix="beam_bench_")
    try:
        sources = [write_clip(os.path.join(tmp, f"src{k}.mp4"), args.seconds, width=596, height=336,
                              bframes=k % 2 == 0) for k in range(args.distinct)]
        items = []
        for k in range(args.clips):
            path = os.path.join(tmp, f"clip{k}.mp4")
            shutil.copyfile(sources[k % len(sources)], path)
            items.append(item(id=f"bench/{k}", media="video", path=path, kind="caption", caption=f"clip {k}"))
        rows = {}
        for name, (workers, write) in _writers(items, tmp).items():
            out = os.path.join(tmp, name)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = write(out)
            elapsed = time.perf_counter() - start
            assert result.num_written == args.clips, result.skipped
            rows[name] = dict(workers=workers, seconds=round(elapsed, 2),
                              videos_per_s=round(args.clips / elapsed, 3),
                              per_worker_videos_per_s=round(args.clips / elapsed / workers, 3),
                              bytes_per_clip=result.num_bytes // args.clips, load_before=round(load, 2))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows["single"]["videos_per_s"]
    for r in rows.values():
        r["vs_single"] = round(r["videos_per_s"] / base, 3)
    per_worker = rows["beam_2"]["per_worker_videos_per_s"]
    projection = [dict(workers=n, hours=round(WEBVID_CLIPS / (per_worker * n) / 3600, 1))
                  for n in (1, 16, 64, 256, 1024)]
    out = dict(clips=args.clips, seconds_per_clip=args.seconds, size="596x336", cpus=os.cpu_count(),
               writers=rows, webvid2m=dict(clips=WEBVID_CLIPS, per_worker_videos_per_s=per_worker,
                                           storage_tb=round(WEBVID_CLIPS * rows["single"]["bytes_per_clip"] / 1e12, 2),
                                           projection=projection))
    print("| writer | workers | videos/s | per worker | vs single | KB/clip | load before |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['workers']} | {r['videos_per_s']} | {r['per_worker_videos_per_s']} | "
              f"{r['vs_single']}x | {r['bytes_per_clip'] // 1000} | {r['load_before']} |")
    print("\n| WebVid-2M workers | hours |\n|---|---|")
    for r in projection:
        print(f"| {r['workers']} | {r['hours']} |")
    print(f"storage: {out['webvid2m']['storage_tb']} TB")
    from benchmarks.common import write_json
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
