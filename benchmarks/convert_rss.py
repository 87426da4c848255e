"""Peak host memory of `vllama-convert import` / `export --hf` against checkpoint size (issue 23).

    python -m benchmarks.convert_rss --layers 2 --layers 8 --layers 32 --json /tmp/convert_rss.json
    python -m benchmarks.convert_rss --width tiny --layers 2        # a smoke run (seconds)

For each depth it writes a LLaMA-7B-shaped HF checkpoint (vocab 32000, hidden 4096, MLP 11008, 32
heads; `--layers` of them) with random fp16 weights as HF lays it out (`model-0000i-of-0000n.safetensors`
shards of at most `--shard-gb`, an index, config.json), then runs, each in a fresh child process:

  import   `vllama-convert import OUT --preset vicuna7b --llama HF` (safetensors -> orbax params)
  export   `vllama-convert export OUT --hf BACK`                      (orbax -> safetensors)

and the child reports its own peak RSS as the kernel counts it (`VmHWM` of /proc/self/status, the
high-water mark of its address space; not `ru_maxrss`, which after a fork + exec starts from the
parent's resident size: this script's, after it wrote the checkpoint). The same two
commands on a tiny-width checkpoint give the fixed overhead (the interpreter, jax, orbax, torch as
imported). The bound checked: peak <= overhead + 2 x the largest tensor (here `embed_tokens` /
`lm_head`, 32000 x 4096 fp16 = 262 MB). Every directory is deleted as soon as it has been read (HF
after the import, orbax after the export), so the disk holds at most two copies of one checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def llama_config(width: str, layers: int):
    from vllama_jax.models.llama import LlamaConfig

    if width == "7b":
        return LlamaConfig.preset("llama_7b", num_layers=layers)
    return LlamaConfig.preset("tiny", num_layers=layers)


def write_hf(path: str, config, shard_bytes: int, seed: int = 0) -> dict:
    """A random fp16 HF checkpoint written tensor by tensor (the writer never holds the model either)."""
    from vllama_jax.convert import hf_llama
    from vllama_jax.convert.common import set_path
    from vllama_jax.convert.params_checkpoint import LazyArray

    params: dict = {}
    for i, spec in enumerate(hf_llama.key_map(config).values()):
        shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape

        def make(shape=shape, i=i):
            rng = np.random.default_rng([seed, i])
            return ((rng.random(shape, dtype=np.float32) - 0.5) * 0.04).astype(np.float16)
        set_path(params, spec.path, LazyArray(shape, np.float16, make, "/".join(spec.path)))
    hf_llama.save_hf(params, config, path, max_shard_size=shard_bytes, progress=False)
    sizes = [int(np.prod(s.hf_shape)) * 2 for s in hf_llama.key_map(config).values()]
    return {"bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "tensors": len(sizes),
            "files": sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))}


# Runs `vllama-convert ARGS` and writes its peak RSS (VmHWM, kB) to the file named first.
_CHILD = """
import sys
from vllama_jax.convert.cli import main
try:
    rc = main(sys.argv[2:])
finally:
    status = open("/proc/self/status").read().split("\\n")
    with open(sys.argv[1], "w") as f:
        f.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
sys.exit(rc)
"""


def measure(args: list[str]) -> dict:
    """`vllama-convert ARGS` in a fresh child: its peak RSS (the child's VmHWM) and wall time."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, hwm.name, *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"vllama-convert {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        return {"peak_rss_bytes": int(hwm.read()) * 1024, "wall_s": wall}


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def one_depth(width: str, layers: int, workdir: str, shard_bytes: int) -> dict:
    config = llama_config(width, layers)
    hf, ck, back = (os.path.join(workdir, n) for n in ("hf", "ck", "back"))
    row = {"width": width, "layers": layers, "uptime_before": _uptime()}
    try:
        t = time.perf_counter()
        row["checkpoint"] = write_hf(hf, config, shard_bytes)
        row["write_hf_s"] = time.perf_counter() - t
        row["import"] = measure(["import", ck, "--preset", "vicuna7b", "--llama", hf, "--no-progress"])
        row["orbax_bytes"] = _du(ck)
        shutil.rmtree(hf)
        row["export"] = measure(["export", ck, "--hf", back, "--no-progress"])
        row["exported_bytes"] = _du(back)
    finally:
        for d in (hf, ck, back):
            shutil.rmtree(d, ignore_errors=True)
    row["uptime_after"] = _uptime()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, action="append", help="depths to measure (repeatable; default 2 and 8)")
    ap.add_argument("--width", choices=("7b", "tiny"), default="7b")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="max safetensors shard size (HF's default: 5 GB)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir here)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    depths = args.layers or [2, 8]
    base = args.workdir or tempfile.mkdtemp(prefix="convert_rss-")
    os.makedirs(base, exist_ok=True)
    rows = []
    try:
        overhead = one_depth("tiny", 2, os.path.join(base, "tiny"), int(args.shard_gb * 1e9))
        fixed = {k: overhead[k]["peak_rss_bytes"] for k in ("import", "export")}
        print(f"fixed overhead (tiny width, 2 layers): import {fixed['import'] / MB:.0f} MB, "
              f"export {fixed['export'] / MB:.0f} MB peak RSS", flush=True)
        if args.width == "tiny":
            rows.append(overhead)
        for layers in ([] if args.width == "tiny" else depths):
            row = one_depth(args.width, layers, os.path.join(base, f"d{layers}"), int(args.shard_gb * 1e9))
            largest = row["checkpoint"]["largest_tensor_bytes"]
            for k in ("import", "export"):
                bound = fixed[k] + 2 * largest
                row[k]["bound_bytes"] = bound
                row[k]["within_bound"] = row[k]["peak_rss_bytes"] <= bound
                # The peak above the fixed overhead, in largest tensors (the bound: 2).
                row[k]["largest_tensors_above_overhead"] = (row[k]["peak_rss_bytes"] - fixed[k]) / largest
            rows.append(row)
            c = row["checkpoint"]
            print(f"{layers:3d} layers: checkpoint {c['bytes'] / MB:8.0f} MB in {len(c['files'])} shard(s), largest "
                  f"tensor {largest / MB:.0f} MB | import peak RSS {row['import']['peak_rss_bytes'] / MB:6.0f} MB "
                  f"(overhead + {row['import']['largest_tensors_above_overhead']:.2f}x largest, "
                  f"{row['import']['wall_s']:.0f} s) | export peak RSS {row['export']['peak_rss_bytes'] / MB:6.0f} MB "
                  f"(overhead + {row['export']['largest_tensors_above_overhead']:.2f}x, "
                  f"{row['export']['wall_s']:.0f} s) | bound {row['import']['bound_bytes'] / MB:.0f} / "
                  f"{row['export']['bound_bytes'] / MB:.0f} MB | {row['uptime_after']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    result = {"fixed_overhead_bytes": fixed, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = all(r[k].get("within_bound", True) for r in rows for k in ("import", "export"))
    print("within bound" if ok else "OVER THE BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
