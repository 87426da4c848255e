"""Loader throughput: examples/s of the grain pipeline on this machine.

Writes synthetic shards shaped like real ones (16 stored JPEG frames per video, short side 256,
fbank float16 [8,1,128,204] with audio present, a caption), then times the full per-example work:
record decode, 8 of 16 frames JPEG-decoded, random resized crop to 224 + CLIP normalization,
tokenization and packing, batching.

    python benchmarks/loader_throughput.py                       # a sweep over threads / processes
    python benchmarks/loader_throughput.py --read-threads 2 --workers 0
    python benchmarks/loader_throughput.py --step-examples-per-sec 12.5   # + loader/step ratio

`--step-examples-per-sec` is the hook for the train step's consumption rate (global examples/s
of one process); the ratio loader/step > 1 means the loader keeps up.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np


def _write_shards(out_dir: str, num_examples: int, num_shards: int, seed: int = 0) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordWriter

    from data_pipelines.records import DEFAULT_STORED_FRAMES, encode_example, encode_jpeg, make_example

    rng = np.random.default_rng(seed)
    # Smooth random images compress like video frames do; white noise would inflate JPEG sizes.
    base = rng.integers(0, 255, (num_examples, 9, 12, 3), dtype=np.uint8)
    paths = [os.path.join(out_dir, f"bench-{k:05d}-of-{num_shards:05d}.array_record") for k in range(num_shards)]
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    from PIL import Image

    for i in range(num_examples):
        small = Image.fromarray(base[i])
        frames = []
        for t in range(DEFAULT_STORED_FRAMES):
            img = np.asarray(small.resize((341, 256), Image.BICUBIC))
            frames.append(encode_jpeg(np.roll(img, 8 * t, axis=1)))
        ex = make_example(id=f"bench/{i}", media="video", frames=frames, kind="caption",
                          caption=f"a synthetic clip number {i} with a moving pattern.",
                          frame_times=np.arange(DEFAULT_STORED_FRAMES) * 0.25,
                          fbank=rng.standard_normal((8, 1, 128, 204)).astype(np.float16),
                          audio_present=True, duration_s=4.0)
        writers[i % num_shards].write(encode_example(ex))
    for w in writers:
        w.close()
    return paths


def _encoder(out_dir: str):
    from data_pipelines.tokenizer import TextEncoder, build_demo_tokenizer, load_tokenizer

    texts = [f"a synthetic clip number {i} with a moving pattern." for i in range(200)]
    return TextEncoder(load_tokenizer(build_demo_tokenizer(texts, os.path.join(out_dir, "tok"), 600)))


def measure(paths, encoder, config, batches: int, warmup: int) -> float:
    """Examples/s over `batches` batches after `warmup` batches (startup excluded)."""
    from data_pipelines.loader import make_loader

    it = make_loader(paths, config, encoder, 0, 1)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return batches * config.batch_size / elapsed


def main(argv=None) -> int:
    from data_pipelines.loader import LoaderConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-examples", type=int, default=96)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--read-threads", type=int, default=None, help="one setting instead of the sweep")
    ap.add_argument("--workers", type=int, default=None, help="mp_prefetch processes (with --read-threads)")
    ap.add_argument("--eval", action="store_true", help="eval transforms (resize, uniform) instead of train")
    ap.add_argument("--step-examples-per-sec", type=float, default=None,
                    help="train step consumption (examples/s per process) to compare against")
    ap.add_argument("--json", default=None, help="write {setting: examples/s, ...} here")
    args = ap.parse_args(argv)

    base = LoaderConfig.preset("stage1", batch_size=args.batch_size, num_frames=args.num_frames,
                               image_size=args.image_size, train=not args.eval)
    if args.read_threads is not None or args.workers is not None:
        settings = [(args.read_threads if args.read_threads is not None else 2, args.workers or 0)]
    else:
        settings = [(1, 0), (2, 0), (4, 0), (1, 2), (2, 2)]
    print(f"cpu cores: {os.cpu_count()}  examples: {args.num_examples}  batches timed: {args.batches} "
          f"(after {args.warmup} warmup)")
    print(f"batch: B={base.batch_size} T={base.num_frames} {base.image_size}x{base.image_size} frames from "
          f"16 stored JPEG (256 short side), fbank [8,1,128,204], L={base.seq_len}, train={base.train}")
    best, rates = 0.0, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_shards(tmp, args.num_examples, num_shards=4)
        encoder = _encoder(tmp)
        for threads, workers in settings:
            cfg = dataclasses.replace(base, read_threads=threads, worker_count=workers,
                                      prefetch_buffer_size=max(2 * base.batch_size, 8))
            rate = measure(paths, encoder, cfg, args.batches, args.warmup)
            best = max(best, rate)
            rates[f"read_threads={threads},workers={workers}"] = rate
            print(f"  read_threads={threads} worker_processes={workers}: {rate:7.1f} examples/s")
    print(f"loader examples/s (best): {best:.1f}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"examples_per_s": rates, "best_examples_per_s": best, "batch_size": base.batch_size,
                       "num_frames": base.num_frames, "image_size": base.image_size, "train": base.train,
                       "load_avg_1m": os.getloadavg()[0]}, f, indent=1)
    if args.step_examples_per_sec:
        ratio = best / args.step_examples_per_sec
        print(f"train step consumes {args.step_examples_per_sec:.1f} examples/s: loader/step = {ratio:.2f} "
              f"({'keeps up' if ratio >= 1 else 'input-bound'})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
