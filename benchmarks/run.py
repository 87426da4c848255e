"""All benchmarks in one command: a table on stdout and every number in one JSON file.

    python -m benchmarks.run                      # writes benchmarks/results.json
    python -m benchmarks.run --quick              # fewer timed steps (a smoke run)
    python -m benchmarks.run --only train_step --only feature_cache --json /tmp/r.json

Each part runs in its own process (the decode benchmark pins XLA to one thread before importing
jax; the loader spawns workers) and writes its JSON; this script collects them:

  train_step      compile time, s/step, examples/s, XLA-counted FLOP/s as a fraction of the matmul
                  peak measured in the same process (benchmarks/train_step.py), configs tiny + small
  feature_cache   cached vs uncached step on the same params/batch, speed-up and loss difference
  efficiency      scan_layers compile time, remat policies, donation, dot_product_attention
  loader          grain pipeline examples/s on synthetic 224 px shards, and against the uncached
                  tiny_224 train step timed in the same process (benchmarks/loader_throughput.py)
  packing         stage-2 step on packed vs padded batches (LLaVA-Instruct-derived lengths), chunked vs
                  full-logits loss, the packed step's fraction of the matmul peak (benchmarks/packing.py)
  torch_step      our step vs the same composite in PyTorch (same weights and batch) and the cached
                  step (benchmarks/torch_step.py; when torch and transformers are installed)
  decode          KV-cache generate tokens/s vs uncached and HF (benchmarks/decode.py, when present)
  media           8 frames + 8 audio clips of a 720p h264 clip: ours vs decord and ImageBind's audio
                  path, same process (benchmarks/media_decode.py; needs decord, the test extra's)

On a shared machine absolute numbers move with the load; `uptime` is recorded before and after
each part, and the ratios inside one part are the figures to compare.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parts(quick: bool) -> dict[str, list[str]]:
    """Part name -> command (without --json), run from the repository root."""
    steps, rounds = ("1", "2") if quick else ("2", "3")
    py = sys.executable
    out = {
        "train_step": [py, "-m", "benchmarks.train_step", "--config", "tiny", "--config", "small",
                       "--steps", steps, "--rounds", rounds],
        "feature_cache": [py, "-m", "benchmarks.feature_cache", "--steps", "3", "--rounds", rounds],
        "efficiency": [py, "-m", "benchmarks.efficiency", "--steps", steps, "--rounds", "2"],
        "loader": [py, "benchmarks/loader_throughput.py", "--read-threads", "2", "--workers", "0",
                   "--num-examples", "32", "--batches", "3" if quick else "6",
                   "--against-step", "tiny_224", "--rounds", rounds],
    }
    out["packing"] = [py, "-m", "benchmarks.packing", "--steps", steps, "--rounds", rounds]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        out["torch_step"] = [py, "-m", "benchmarks.torch_step", "--config", "small", "--steps", steps,
                             "--rounds", rounds]
    if os.path.isfile(os.path.join(ROOT, "benchmarks", "decode.py")):
        out["decode"] = [py, "benchmarks/decode.py", "--reps", "3"]
    out["media"] = [py, "benchmarks/media_decode.py", "--reps", "5", "--seconds", "6" if quick else "10"]
    return out


def run_part(name: str, cmd: list[str], timeout: float) -> dict:
    from benchmarks.common import uptime
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.json")
        before, start = uptime(), time.perf_counter()
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        try:
            proc = subprocess.run(cmd + ["--json", path], cwd=ROOT, timeout=timeout, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            log, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        wall = time.perf_counter() - start
        result = {"wall_s": wall, "uptime_before": before, "uptime_after": uptime(), "returncode": rc}
        if rc == 0 and os.path.isfile(path):
            with open(path) as f:
                result["result"] = json.load(f)
        else:
            result["log_tail"] = log[-3000:]
            print(f"   {name} failed ({rc}); last output:\n{log[-1500:]}", flush=True)
        print(f"   {name}: {wall:.0f} s", flush=True)
        return result


# ------------------------------------------------------------------------------------ table

def table(results: dict) -> str:
    rows = []

    def add(*cells):
        rows.append(tuple(str(c) for c in cells))

    def get(part):
        return (results.get(part) or {}).get("result")

    add("benchmark", "figure", "value")
    for c in get("train_step") or []:
        tag = f"train step, {c['config']} (B={c['batch_size']}, T={c['num_frames']}, L={c['seq_len']})"
        add(tag, "compile", f"{c['compile_s']:.1f} s")
        add(tag, "step (median)", f"{c['median_s'] * 1e3:.1f} ms")
        add(tag, "examples/s", f"{c['examples_per_s']:.2f}")
        add(tag, "GFLOP/s (XLA-counted)", f"{c['gflop_per_s']:.1f} of {c['peak_gflop_per_s']:.1f} peak")
        add(tag, "fraction of matmul peak", f"{c['fraction_of_peak']:.1%} (best step {c['fraction_of_peak_best']:.1%})")
    for c in get("feature_cache") or []:
        tag = f"feature cache, {c['config']} (B={c['batch_size']}, T={c['num_frames']})"
        add(tag, "step uncached / cached", f"{c['uncached_s_per_step'] * 1e3:.1f} / {c['cached_s_per_step'] * 1e3:.1f} ms")
        add(tag, "speed-up", f"{c['speedup']:.1f}x")
        add(tag, "first-step loss |diff|", f"{c['loss_abs_diff']:.1e} (loss {c['first_step_loss_uncached']:.4f})")
    eff = get("efficiency") or {}
    if "scan" in eff:
        e = eff["scan"]
        add(f"scan_layers, {e['what']}", "compile unrolled / scan",
            f"{e['compile_s_unrolled']:.1f} / {e['compile_s_scan']:.1f} s ({e['compile_speedup']:.2f}x)")
        add(f"scan_layers, {e['what']}", "param init compile unrolled / scan",
            f"{e['init_compile_s_unrolled']:.1f} / {e['init_compile_s_scan']:.1f} s ({e['init_compile_speedup']:.2f}x)")
        add(f"scan_layers, {e['what']}", "step unrolled / scan",
            f"{e['step_s_unrolled'] * 1e3:.0f} / {e['step_s_scan'] * 1e3:.0f} ms ({e['step_speedup']:.2f}x)")
    if "remat" in eff:
        e = eff["remat"]
        add("remat (small, frozen LLaMA)", "step none / full / dots",
            f"{e['step_s_no_remat'] * 1e3:.0f} / {e['step_s_remat_full'] * 1e3:.0f} / "
            f"{e['step_s_remat_dots'] * 1e3:.0f} ms")
        add("donation (small)", "step without / with", f"{e['step_s_no_donation'] * 1e3:.0f} / "
            f"{e['step_s_no_remat'] * 1e3:.0f} ms ({e['donation_speedup']:.2f}x)")
    if "attention" in eff:
        e = eff["attention"]
        add(f"attention {e['what']}", "einsum / dot_product_attention",
            f"{e['s_einsum'] * 1e3:.1f} / {e['s_dot_product_attention'] * 1e3:.1f} ms "
            f"({e['dot_product_attention_speedup']:.2f}x)")
    loader = get("loader")
    if loader:
        for k, v in loader["examples_per_s"].items():
            add(f"loader (B={loader['batch_size']}, T={loader['num_frames']}, {loader['image_size']} px, "
                f"train transforms)", k, f"{v:.1f} examples/s")
        # Issue 5's figure: does the pipeline keep up with a step that reads raw media? The
        # uncached tiny_224 step has the loader's geometry (224 px, 8 frames) and is timed in the
        # loader's process, rounds alternating (a step trained from the feature cache reads no media).
        step = loader.get("against_step")
        if step:
            add(f"loader vs uncached train step, {step['config']} (same process)", "loader / step consumption",
                f"{step['loader_examples_per_s']:.1f} / {step['step_examples_per_s']:.1f} examples/s "
                f"({step['loader_over_step']:.2f}x)")
            add(f"loader vs uncached train step, {step['config']} (same process)", "step fed by loader / fixed batch",
                f"{step['step_fed_examples_per_s']:.1f} / {step['step_examples_per_s']:.1f} examples/s "
                f"({step['fed_over_fixed']:.2f})")
    pk = get("packing")
    if pk:
        tag = (f"stage-2 packing, {pk['config']} (B={pk['batch_size']}, L={pk['seq_len']}, "
               f"{pk['media_per_batch']} media slots)")
        add(tag, "step padded / packed", f"{pk['step_s']['padded'] * 1e3:.0f} / {pk['step_s']['packed'] * 1e3:.0f} ms")
        add(tag, "non-pad tokens/step padded / packed",
            f"{pk['stream_padded_tokens']:.0f} / {pk['stream_packed_tokens']:.0f}")
        add(tag, "non-pad tokens/s packed / padded", f"{pk['packed_over_padded_tokens_per_s']:.2f}x"
            + (f" (tokens/step cap {pk['cap_tokens_per_step']:.2f}x)" if "cap_tokens_per_step" in pk else ""))
        add(tag, "step memory padded / packed", f"{pk['memory_bytes']['padded'] / 2**20:.0f} / "
            f"{pk['memory_bytes']['packed'] / 2**20:.0f} MiB")
        add(tag, "packed: fraction of matmul peak", f"{pk['packed_fraction_of_peak']:.1%} "
            f"({pk['packed_gflop_per_s']:.0f} of {pk['peak_gflop_per_s']:.0f} GFLOP/s)")
        add(tag, "step memory full logits / chunked loss",
            f"{pk['memory_bytes']['padded_full_logits'] / 2**20:.0f} / {pk['memory_bytes']['padded'] / 2**20:.0f} MiB "
            f"(time {pk['full_logits_over_chunked_step_s']:.2f}x)")
    ts = get("torch_step")
    if ts:
        tag = f"vs PyTorch, {ts['config']} (B={ts['batch_size']}, T={ts['num_frames']}, L={ts['seq_len']})"
        add(tag, "eval loss |ours - torch|", f"{ts['eval_loss_abs_diff']:.1e} (loss {ts['eval_loss_ours']:.4f})")
        add(tag, "step torch / ours / ours cached", f"{ts['step_s']['torch'] * 1e3:.0f} / "
            f"{ts['step_s']['ours'] * 1e3:.0f} / {ts['step_s']['ours_cached'] * 1e3:.0f} ms")
        add(tag, "torch / ours", f"{ts['torch_over_ours']:.2f}x (cached: {ts['torch_over_ours_cached']:.1f}x)")
    decode = get("decode")
    if decode:
        for k, v in decode["results"].items():
            add(f"decode (LLaMA {decode['config']['preset']}, B={decode['batch']}, {decode['new_tokens']} new)",
                k, f"{v['tokens_per_s']:.0f} tokens/s")
    elif "decode" not in results:
        add("decode", "tokens/s", "benchmarks/decode.py absent (hook: add it to run.parts)")
    media = get("media")
    for clip, m in ((media or {}).get("clips") or {}).items():
        tag = f"media, 720p {clip}, 8 frames + 8 audio clips"
        med = m["median_s"]
        add(tag, "frames decord / ours", f"{med['decord_frames'] * 1e3:.0f} / {med['ours_frames'] * 1e3:.0f} ms "
            f"({m['frames_ratio_decord_over_ours']:.2f}x, max diff {m['frames_max_abs_levels_vs_decord']:.0f} levels)")
        add(tag, "audio original / ours", f"{med['original_audio'] * 1e3:.0f} / {med['ours_audio'] * 1e3:.0f} ms "
            f"({m['audio_ratio_original_over_ours']:.2f}x)")
        add(tag, "both, original / ours", f"{m['total_ratio']:.2f}x")
    for name, r in results.items():
        if r.get("returncode") != 0:
            add(name, "status", f"FAILED ({r.get('returncode')})")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.common import uptime
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results.json"))
    ap.add_argument("--only", action="append", help="run only these parts (repeatable)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per part")
    args = ap.parse_args(argv)
    todo = parts(args.quick)
    unknown = sorted(set(args.only or ()) - set(todo))
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {sorted(todo)}")
    results = {"uptime_start": uptime(), "cpus": os.cpu_count()}
    parts_out = {}
    for name, cmd in todo.items():
        if args.only and name not in args.only:
            continue
        parts_out[name] = run_part(name, cmd, args.timeout)
    results.update(parts_out)
    results["uptime_end"] = uptime()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(table(parts_out))
    print(f"\nuptime at start: {results['uptime_start']}\nuptime at end:   {results['uptime_end']}")
    print(f"wrote {args.json}")
    return 0 if all(r.get("returncode") == 0 for r in parts_out.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
