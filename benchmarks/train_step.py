"""Train-step speed of the Video-LLaMA task: compile time, examples/s, FLOP/s against a matmul peak.

The step is the trainer's own (`vllama_jax.train.step.make_train_step` + `jit_train_step`: sharded
jit, donated state, frozen towers under stop_gradient), on one device, with AdamW over the
vision branch (stage 1/2 trainables), on synthetic batches shaped like the loader's.

FLOPs are XLA's cost analysis of the *plain* step (no layer scan, no remat, no accumulation):
the model's FLOPs, so a variant that recomputes (remat) or hides a loop body (scan) is still
credited with the same useful work. "Fraction of peak" divides FLOP/s by the best FLOP/s of a
large jitted f32 matmul measured in the same process.

    python -m benchmarks.train_step --config small --steps 5
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np


# ------------------------------------------------------------------------------------ configs

def bench_configs() -> dict[str, Any]:
    """Model configs by name: `tiny` (the test preset) and `small` (real-shaped towers, scaled down).

    `small` keeps every tower's real structure (224 px frames, patch 14, 32 image/video queries,
    Q-Former cross-attention every 2nd layer, LLaMA SwiGLU with the 7B's 2.6875 mlp ratio and
    head_dim 64..128, a 32000 vocab) at widths a 2-core CPU steps through in about a second.
    """
    from vllama_jax.models.llama import LlamaConfig
    from vllama_jax.models.qformer import QFormerConfig
    from vllama_jax.models.video_llama import VideoLlamaConfig
    from vllama_jax.models.vit import EvaViTConfig

    tiny = VideoLlamaConfig.preset("tiny")
    vit = EvaViTConfig.preset("eva_vit_g", width=384, depth=4, num_heads=6)
    image_qformer = QFormerConfig.preset("blip2_qformer", num_layers=4, hidden_size=384, num_heads=6,
                                         intermediate_size=1536, encoder_width=vit.width)
    small = VideoLlamaConfig(
        llama=LlamaConfig.preset("llama_7b", hidden_size=512, intermediate_size=1376, num_layers=4,
                                 num_heads=8, num_kv_heads=8, head_dim=64),
        vit=vit, image_qformer=image_qformer,
        video_qformer=QFormerConfig.preset("video_qformer", hidden_size=384, num_heads=6,
                                           intermediate_size=1536, encoder_width=image_qformer.hidden_size))
    # The tiny towers on the reference's frame geometry (224 px, 8 frames): the frozen ViT's
    # share of the step is then as large as in the real model, which the cache benchmark needs.
    # Vision branch only (the audio towers would need their own 224 px geometry).
    tiny_224 = tiny.replace(vit=dataclasses.replace(tiny.vit, img_size=224), audio_qformer=None,
                            imagebind_audio=None, imagebind_vision=None)
    return {"tiny": tiny, "tiny_224": tiny_224, "small": small}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark case: a model config and the batch it steps on."""
    name: str
    batch_size: int
    num_frames: int
    seq_len: int
    media: tuple[str, ...] = ("video",)


WORKLOADS = {
    # The tiny config is so small that dispatch and elementwise work dominate: a latency figure.
    "tiny": Workload("tiny", batch_size=8, num_frames=4, seq_len=48),
    "tiny_224": Workload("tiny_224", batch_size=4, num_frames=8, seq_len=48),
    "small": Workload("small", batch_size=2, num_frames=8, seq_len=128),
}


# ------------------------------------------------------------------------------------ batches

def synthetic_batch(config, work: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """Host arrays shaped like the loader's batch (media tokens after a bos, padded tail)."""
    rng = np.random.default_rng(seed)
    b, t, length = work.batch_size, work.num_frames, work.seq_len
    k = config.num_media_tokens(work.media)
    if k + 2 > length:
        raise ValueError(f"seq_len {length} cannot hold {k} media tokens plus text")
    size = config.vit.img_size
    media_mask = np.zeros((b, length), bool)
    media_mask[:, 1:1 + k] = True
    attention_mask = np.ones((b, length), np.int32)
    attention_mask[:, length - length // 8:] = 0
    targets = rng.integers(3, config.llama.vocab_size, (b, length)).astype(np.int32)
    targets[:, :1 + k] = -100
    targets[attention_mask == 0] = -100
    return {
        "frames": rng.standard_normal((b, t, size, size, 3), np.float32),
        "frame_mask": np.ones((b, t), bool),
        "input_ids": rng.integers(3, config.llama.vocab_size, (b, length)).astype(np.int32),
        "attention_mask": attention_mask,
        "targets": targets,
        "media_mask": media_mask,
    }


# ------------------------------------------------------------------------------------ timing

def matmul_peak(n: int = 2048, rounds: int = 5, chain: int = 4) -> float:
    """Best FLOP/s of a jitted chain of `chain` [n,n]x[n,n] f32 matmuls (the machine's matmul peak)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chained(a, b):
        for _ in range(chain):
            a = (a @ b) * 0.5
        return a

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32) / np.sqrt(n)
    chained(a, b).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        chained(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 * chain / best


@dataclasses.dataclass
class StepRunner:
    """A compiled train step with its live state; `run(n)` advances n steps, returns s/step."""
    name: str
    fn: Callable
    state: Any
    frozen: Any
    batch: Any
    compile_s: float                       # the train step's trace + compile
    flops: float | None = None
    init_compile_s: float | None = None    # the param init's (when the runner initialised them)
    mesh: Any = None                       # where `batch` lives (a new batch goes through shard_batch)
    memory_bytes: int | None = None        # XLA's buffer assignment: arguments + outputs - aliases + temporaries

    def run(self, n: int) -> float:
        import jax

        jax.block_until_ready(self.state)
        start = time.perf_counter()
        for _ in range(n):
            self.state, metrics = self.fn(self.state, self.frozen, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.last_loss = float(metrics["loss"])
        return (time.perf_counter() - start) / n


def build_runner(name: str, config, batch: dict, *, media: Sequence[str] = ("video",),
                 accum_steps: int = 1, seed: int = 0, params=None, task=None,
                 donate: bool = True) -> StepRunner:
    """Inits params (or takes `params`, the task's full tree), the train state and compiles the
    step of `task` (default: the Video-LLaMA task of `config` on `media`)."""
    import jax
    import jax.numpy as jnp

    from vllama_jax import sharding
    from vllama_jax.train import optimizer, partition, schedules
    from vllama_jax.train import step as train_step
    from vllama_jax.train.video_llama_task import VideoLlamaTask

    task = VideoLlamaTask(config, tuple(media)) if task is None else task
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    boxed = task.abstract_params()
    paths = partition.trainable_paths(boxed, VideoLlamaTask(config).trainable_patterns())   # the vision branch
    b_train, b_frozen = partition.split(boxed, paths)
    schedule = schedules.constant(1e-4)
    tx = optimizer.adamw(schedule, b_train)
    init_compile_s = None
    if params is None:
        start = time.perf_counter()
        init = jax.jit(task.init_params).lower(jax.random.PRNGKey(seed)).compile()
        init_compile_s = time.perf_counter() - start
        params = init(jax.random.PRNGKey(seed))
    trainable, frozen = partition.split(params, paths)
    state_sh = train_step.state_shardings(b_train, tx, mesh)
    frozen_sh = sharding.param_shardings(b_frozen, mesh)
    state = jax.device_put(train_step.init_state(trainable, tx, jax.random.PRNGKey(seed + 1)), state_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    batch = sharding.shard_batch(batch, mesh)
    step = train_step.make_train_step(task, tx, schedule, accum_steps=accum_steps)
    fn = train_step.jit_train_step(step, mesh, state_sh, frozen_sh, sharding.batch_shardings(batch, mesh))
    if not donate:
        fn = sharding.MeshJit(step, mesh, in_shardings=(state_sh, frozen_sh, sharding.batch_shardings(batch, mesh)),
                       out_shardings=(state_sh, sharding.logical_sharding(mesh, ())))
    start = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    mem = compiled.memory_analysis()
    memory = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)

    def call(state, frozen, batch):
        with jax.set_mesh(mesh):
            return compiled(state, frozen, batch)

    del jnp
    return StepRunner(name, call, state, frozen, batch, compile_s, flops, init_compile_s, mesh, memory)


def interleaved(runners: Sequence[StepRunner], rounds: int, steps: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds/step of each runner over `rounds` rounds, runners alternating within a round, so
    load changes on a shared machine hit every variant alike."""
    for r in runners:
        if warmup:
            r.run(warmup)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(rounds):
        for r in runners:
            times[r.name].append(r.run(steps))
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# ------------------------------------------------------------------------------------ main

def measure(config_name: str, *, steps: int, rounds: int, peak: float | None = None) -> dict[str, Any]:
    """Compile time, s/step, examples/s and fraction of the matmul peak of one config."""
    from benchmarks.common import load_average

    config = bench_configs()[config_name]
    work = WORKLOADS[config_name]
    runner = build_runner(config_name, config, synthetic_batch(config, work))
    peak_before = matmul_peak() if peak is None else peak
    times = interleaved([runner], rounds, steps)[config_name]
    peak_after = matmul_peak() if peak is None else peak
    peak = max(peak_before, peak_after)
    sec = summarize(times)
    best = sec["min_s"]
    return {
        "config": config_name, "batch_size": work.batch_size, "num_frames": work.num_frames,
        "seq_len": work.seq_len, "compile_s": runner.compile_s, **sec,
        "examples_per_s": work.batch_size / sec["median_s"],
        "step_gflop": (runner.flops or 0.0) / 1e9,
        "gflop_per_s": (runner.flops or 0.0) / sec["median_s"] / 1e9,
        "peak_gflop_per_s": peak / 1e9,
        "fraction_of_peak": (runner.flops or 0.0) / sec["median_s"] / peak,
        "fraction_of_peak_best": (runner.flops or 0.0) / best / peak,
        "loss": runner.last_loss, "load_avg_1m": load_average(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(WORKLOADS), action="append")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results (a list, one per config) here")
    args = ap.parse_args(argv)
    from benchmarks.common import measure_each
    measure_each(args.config or ["tiny", "small"], lambda name: measure(name, steps=args.steps, rounds=args.rounds),
                 args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
