"""Before/after ratios of the efficiency options, each pair measured in this one process.

* scan_layers: compile time (and s/step) of the train step with the LLaMA layers and EVA ViT
  blocks as one `nn.scan` vs unrolled, on the tiny towers at the real depths (LLaMA-7B's 32
  layers, BLIP-2's 39 EVA blocks).
* remat policy of the frozen LLaMA (gradients flow through it to the soft tokens): s/step of
  no remat vs `full` vs `dots` on the `small` config (remat trades step time for activation memory).
* donation of the train state: s/step with and without `donate_argnums` on `small`.
* attention: `jax.nn.dot_product_attention` vs `vllama_jax.models.common.attention` (einsum +
  float32 softmax), forward + backward on the small ViT's shapes.

    python -m benchmarks.efficiency
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def _ratio(before: float, after: float) -> float:
    return before / after if after else float("nan")


def scan_layers(steps: int, rounds: int, llama_layers: int = 32, vit_depth: int = 39) -> dict:
    from benchmarks.train_step import WORKLOADS, bench_configs, build_runner, interleaved, summarize, synthetic_batch

    base = bench_configs()["tiny_224"]
    work = dataclasses.replace(WORKLOADS["tiny_224"], batch_size=2, num_frames=4)
    deep = base.replace(llama=dataclasses.replace(base.llama, num_layers=llama_layers),
                        vit=dataclasses.replace(base.vit, depth=vit_depth))
    batch = synthetic_batch(deep, work)
    runners = []
    for name, scan in (("unrolled", False), ("scan", True)):
        cfg = deep.replace(llama=dataclasses.replace(deep.llama, scan_layers=scan),
                           vit=dataclasses.replace(deep.vit, scan_layers=scan))
        runners.append(build_runner(name, cfg, batch, media=work.media))
    times = interleaved(runners, rounds, steps)
    u, s = (summarize(times[r.name])["median_s"] for r in runners)
    return {"what": f"{llama_layers} LLaMA layers + {vit_depth} ViT blocks (tiny widths, 224 px, B=2, T=4)",
            "compile_s_unrolled": runners[0].compile_s, "compile_s_scan": runners[1].compile_s,
            "compile_speedup": _ratio(runners[0].compile_s, runners[1].compile_s),
            "init_compile_s_unrolled": runners[0].init_compile_s, "init_compile_s_scan": runners[1].init_compile_s,
            "init_compile_speedup": _ratio(runners[0].init_compile_s, runners[1].init_compile_s),
            "step_s_unrolled": u, "step_s_scan": s, "step_speedup": _ratio(u, s)}


def remat_and_donation(steps: int, rounds: int) -> dict:
    from benchmarks.train_step import WORKLOADS, bench_configs, build_runner, interleaved, summarize, synthetic_batch

    base, work = bench_configs()["small"], WORKLOADS["small"]
    batch = synthetic_batch(base, work)
    variants = {"no_remat": (base, True), "no_donation": (base, False)}
    for policy in ("full", "dots"):
        variants[f"remat_{policy}"] = (base.replace(llama=dataclasses.replace(
            base.llama, remat=True, remat_policy=policy)), True)
    runners = [build_runner(name, cfg, batch, media=work.media, donate=donate)
               for name, (cfg, donate) in variants.items()]
    times = {k: summarize(v)["median_s"] for k, v in interleaved(runners, rounds, steps).items()}
    return {"what": "small config train step, s/step", **{f"step_s_{k}": v for k, v in times.items()},
            "remat_full_slowdown": _ratio(times["remat_full"], times["no_remat"]),
            "remat_dots_slowdown": _ratio(times["remat_dots"], times["no_remat"]),
            "donation_speedup": _ratio(times["no_donation"], times["no_remat"]),
            "compile_s": {r.name: r.compile_s for r in runners}}


def attention(reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from vllama_jax.models.common import attention as ours

    b, length, heads, dim = 16, 257, 6, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (b, length, heads, dim), jnp.float32) for kk in keys)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))

    impls = {"einsum": loss(lambda q, k, v: ours(q * dim ** -0.5, k, v)),
             "dot_product_attention": loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))}
    out, times = {}, {}
    for name, fn in impls.items():
        out[name] = jax.block_until_ready(fn(q, k, v))
        times[name] = []
    for _ in range(reps):
        for name, fn in impls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - start)
    err = float(jnp.max(jnp.abs(out["einsum"][1][0] - out["dot_product_attention"][1][0])))
    best = {k: min(v) for k, v in times.items()}
    return {"what": f"fwd+bwd [B={b}, L={length}, H={heads}, D={dim}] f32 on {jax.devices()[0].platform}",
            **{f"s_{k}": v for k, v in best.items()},
            "dot_product_attention_speedup": _ratio(best["einsum"], best["dot_product_attention"]),
            "max_grad_diff": err}


def main(argv=None) -> int:
    from benchmarks.common import show, write_json
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=("scan", "remat", "attention"), action="append")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    parts = {"scan": lambda: scan_layers(args.steps, args.rounds),
             "remat": lambda: remat_and_donation(args.steps, args.rounds),
             "attention": lambda: attention(5)}
    result = {}
    for name in args.only or list(parts):
        result[name] = parts[name]()
        show({name: result[name]})
    result["load_avg_1m"] = os.getloadavg()[0]
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
