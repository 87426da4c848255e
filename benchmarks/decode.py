"""Decode tokens/s on one set of tiny LLaMA weights: our KV-cache `generate` vs no cache vs HF.

    ours cached      vllama_jax.generate.generate (prefill + lax.while_loop over the KV cache, one jit)
    ours uncached    one jit too, but every step re-runs the full forward over the fixed-size
                     [B, prompt + new] buffer (masked) and takes the argmax at the last real token
    hf cached        transformers LlamaForCausalLM.generate(use_cache=True) on the same weights,
                     exported with vllama_jax.convert.hf_llama.save_hf
    hf uncached      the same with use_cache=False
    ours beam K      generate(num_beams=K) (the cache holds B*K rows, gathered per beam every step)
    hf beam K        HF generate(num_beams=K, do_sample=False) on the same weights

tokens/s counts the tokens returned (B x new tokens), so a beam row is K times the model work.

All greedy, no eos (every row makes exactly --new-tokens tokens), fixed shapes. Each method runs
once to warm up (compilation, torch's first-call costs), then --reps timed runs; the median is
reported, and every ratio is between numbers measured in this one run. The generated tokens are
compared across methods (they must agree: same weights, same greedy rule).

    python benchmarks/decode.py                       # the tiny preset, batch 4, 32 + 64 tokens
    python benchmarks/decode.py --hidden 256 --layers 4 --json decode.json

On a shared machine the absolute numbers move with the load (printed with `uptime`); the ratios
move much less. `--threads 1` (default) runs XLA and torch single-threaded: a model this small
gains nothing from a second thread, and on a loaded 2-core machine torch's OpenMP pool with 2
threads spin-waits (measured here: 13.9 s vs 0.40 s for the same 64-token HF generate).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="LlamaConfig preset (default: tiny)")
    p.add_argument("--hidden", type=int, default=None, help="override hidden_size (intermediate = 2.5x)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both XLA and torch (0: each library's default)")
    p.add_argument("--beams", type=int, default=4, help="beam-search rows with this many beams (0: none)")
    p.add_argument("--skip-hf", action="store_true", help="only our decoders")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def _config(args):
    from vllama_jax.models.llama import LlamaConfig

    config = LlamaConfig.preset(args.preset)
    if args.hidden:
        config = dataclasses.replace(config, hidden_size=args.hidden, intermediate_size=int(2.5 * args.hidden),
                                     head_dim=args.hidden // config.num_heads)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    need = args.prompt_len + args.new_tokens
    if config.max_position_embeddings < need:
        config = dataclasses.replace(config, max_position_embeddings=need)
    return config


def _params(config, seed):
    """O(1) random weights (not the init's ~0.02 scale), so greedy tokens do not tie."""
    import flax.linen as nn
    import jax

    from vllama_jax.models.llama import Llama

    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(Llama(config).init(jax.random.key(0), np.zeros((1, 2), np.int32))["params"]))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(x.shape, x.dtype)
        return (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _uncached_fn(config, n_new):
    import jax
    import jax.numpy as jnp

    from vllama_jax.models.llama import Llama

    @jax.jit
    def run(params, prompt):
        b, p = prompt.shape
        width = p + n_new
        buf = jnp.zeros((b, width), jnp.int32).at[:, :p].set(prompt)
        model = Llama(config)

        def step(t, buf):
            mask = jnp.broadcast_to(jnp.arange(width) < p + t, (b, width)).astype(jnp.int32)
            logits = model.apply({"params": params}, buf, mask).logits
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + t - 1, axis=1, keepdims=False), axis=-1)
            return jax.lax.dynamic_update_slice(buf, nxt.astype(jnp.int32)[:, None], (0, p + t))
        return jax.lax.fori_loop(0, n_new, step, buf)[:, p:]
    return run


def _time(fn, reps):
    """(median seconds, all seconds, last output) after one untimed warm-up call."""
    out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main(argv=None) -> int:
    from benchmarks.common import uptime, write_json
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.threads == 1:
        if "jax" in sys.modules:
            print("note: jax was imported before main(); --threads 1 cannot reach XLA", file=sys.stderr)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    elif args.threads > 1:
        print("note: --threads > 1 sets torch only; XLA uses its own pool", file=sys.stderr)
    import jax
    import jax.numpy as jnp

    from vllama_jax.generate import GenerationConfig, generate

    config = _config(args)
    params = jax.device_put(_params(config, args.seed))
    rng = np.random.default_rng(args.seed + 1)
    prompt = rng.integers(3, config.vocab_size, size=(args.batch, args.prompt_len)).astype(np.int32)
    n_tok = args.batch * args.new_tokens
    gen = GenerationConfig(max_new_tokens=args.new_tokens)
    ids = jnp.asarray(prompt)
    results, tokens = {}, {}

    def record(name, seconds, times, out):
        results[name] = {"median_s": seconds, "times_s": times, "tokens_per_s": n_tok / seconds}
        tokens[name] = np.asarray(out)
        print(f"  {name:<14} {n_tok / seconds:10.1f} tok/s   median {seconds * 1e3:8.1f} ms  "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})", flush=True)

    print(f"threads: {args.threads or 'library defaults'}; jax {jax.devices()[0].platform}")
    print(f"LLaMA {args.preset}: hidden {config.hidden_size}, {config.num_layers} layers, vocab {config.vocab_size}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.reps} reps")
    print(f"uptime: {uptime()}")
    record("ours_cached", *_time(lambda: generate(params, config, gen, input_ids=ids).tokens.block_until_ready(),
                                 args.reps))
    uncached = _uncached_fn(config, args.new_tokens)
    record("ours_uncached", *_time(lambda: uncached(params, ids).block_until_ready(), args.reps))
    beam = f"ours_beam{args.beams}"
    if args.beams > 1:
        beam_gen = gen.replace(num_beams=args.beams)
        record(beam, *_time(lambda: generate(params, config, beam_gen, input_ids=ids).tokens.block_until_ready(),
                            args.reps))

    if not args.skip_hf:
        import torch
        from transformers import LlamaForCausalLM

        if args.threads:
            torch.set_num_threads(args.threads)
        from vllama_jax.convert.hf_llama import save_hf

        with tempfile.TemporaryDirectory() as d:
            save_hf(jax.device_get(params), config, os.path.join(d, "hf"), progress=False)
            model = LlamaForCausalLM.from_pretrained(os.path.join(d, "hf"), torch_dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        t_ids, t_mask = torch.tensor(prompt, dtype=torch.long), torch.ones(prompt.shape, dtype=torch.long)

        def hf(use_cache):
            with torch.no_grad():
                return model.generate(t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, use_cache=use_cache,
                                      pad_token_id=0)[:, args.prompt_len:].numpy()
        record("hf_cached", *_time(lambda: hf(True), args.reps))
        record("hf_uncached", *_time(lambda: hf(False), args.reps))
        if args.beams > 1:
            def hf_beam():
                with torch.no_grad():
                    return model.generate(t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, do_sample=False, num_beams=args.beams,
                                          pad_token_id=0)[:, args.prompt_len:].numpy()
            record(f"hf_beam{args.beams}", *_time(hf_beam, args.reps))

    # Greedy rows against ours_cached, beam rows against ours_beam (what each should reproduce).
    against = {k: beam if "beam" in k else "ours_cached" for k in results}
    ratios = {f"{against[k]}/{k}": results[against[k]]["tokens_per_s"] / v["tokens_per_s"]
              for k, v in results.items() if k != against[k]}
    if beam in results:
        ratios[f"ours_cached/{beam}"] = results["ours_cached"]["tokens_per_s"] / results[beam]["tokens_per_s"]
    match = {k: float(np.mean(v == tokens[against[k]])) for k, v in tokens.items() if k != against[k]}
    print("ratios (tokens/s, same run):")
    for k, v in ratios.items():
        print(f"  {k:<28} {v:6.2f}x")
    print("tokens equal to ours (greedy to ours_cached, beams to ours_beam): "
          + ", ".join(f"{k} {v:.0%}" for k, v in match.items()))
    print(f"uptime: {uptime()}")
    if args.json:
        out = {"config": {"preset": args.preset, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
                          "vocab_size": config.vocab_size},
               "threads": args.threads, "batch": args.batch, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "reps": args.reps, "beams": args.beams,
               "results": results, "ratios": ratios, "tokens_match": match, "uptime": uptime(),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "jax_devices": [str(d) for d in jax.devices()]}}
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
