"""Frozen-feature cache: train-step speed with the frozen towers' outputs read from the cache vs
run every step, on the same params, batch and optimizer, in one process (runners interleaved).

Both steps are the trainer's own (`benchmarks.train_step.build_runner`); the cached one trains
`vllama_jax.train.feature_cache.CachedFeatureTask` on the batch's cached features. Their first-step
losses are compared (same state, batch and dropout rng: they must agree to float32 rounding).

    python -m benchmarks.feature_cache --config tiny
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def measure(config_name: str, *, steps: int, rounds: int) -> dict:
    import jax

    from benchmarks.common import load_average
    from benchmarks.train_step import WORKLOADS, bench_configs, build_runner, interleaved, summarize, synthetic_batch
    from vllama_jax.models.video_llama import VideoLlama
    from vllama_jax.train import feature_cache
    from vllama_jax.train.video_llama_task import VideoLlamaTask

    config, work = bench_configs()[config_name], WORKLOADS[config_name]
    task = VideoLlamaTask(config, work.media)
    # Host copies: each runner places (and donates) its own buffers.
    params = jax.device_get(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    batch = synthetic_batch(config, work)
    outputs = feature_cache.outputs_for_media(work.media)
    cached_task = feature_cache.CachedFeatureTask(task, outputs)
    cached_batch = feature_cache.build_feature_dataset(task.model, {"params": params}, [batch], outputs,
                                                       method=VideoLlama.encode_media, method_args=(work.media,),
                                            keep=None, drop=feature_cache.RAW_MEDIA_KEYS).arrays
    uncached = build_runner("uncached", config, batch, params=params, task=task)
    cached = build_runner("cached", config, cached_batch, params=cached_task._drop(params), task=cached_task)
    first = {r.name: (r.run(1), r.last_loss)[1] for r in (uncached, cached)}
    times = interleaved([uncached, cached], rounds, steps, warmup=0)
    u, c = summarize(times["uncached"]), summarize(times["cached"])
    return {
        "config": config_name, "batch_size": work.batch_size, "num_frames": work.num_frames,
        "uncached_s_per_step": u["median_s"], "cached_s_per_step": c["median_s"],
        "speedup": u["median_s"] / c["median_s"],
        "uncached_compile_s": uncached.compile_s, "cached_compile_s": cached.compile_s,
        "uncached_step_gflop": (uncached.flops or 0) / 1e9, "cached_step_gflop": (cached.flops or 0) / 1e9,
        "first_step_loss_uncached": first["uncached"], "first_step_loss_cached": first["cached"],
        "loss_abs_diff": abs(first["uncached"] - first["cached"]),
        "cache_bytes_per_example": int(sum(np.asarray(v[:1]).nbytes for k, v in cached_batch.items()
                                           if k in {o.key for o in outputs})),
        "load_avg_1m": load_average(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("tiny", "tiny_224", "small"), action="append",
                    help="default: tiny_224 (tiny towers, 224 px frames) and tiny (28 px)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from benchmarks.common import measure_each
    measure_each(args.config or ["tiny_224", "tiny"], lambda name: measure(name, steps=args.steps, rounds=args.rounds),
                 args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
