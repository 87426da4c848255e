"""Hardware targets and the (data, fsdp, tensor) mesh chosen for each Video-LLaMA workload on them.

Used three ways:

  vllama-plan --config configs/stage1_vicuna7b.py --mesh v4-32      # check before renting
  vllama-train --config 'configs/mesh_presets.py:stage1_vicuna7b,v4-32' --workdir gs://...
  launch/*.sh --config 'configs/mesh_presets.py:stage2_llama2_13b,8xh100' ...

(the second form is the config file `configs/mesh_presets.py`, which loads `configs/<name>.py`,
`name[:arg]` as for any config file, and applies the target's preset with `apply`: its mesh and
its SETTINGS; `--config.x=y` overrides still win over both). The tables live here, inside the
package, so `vllama-plan` reads them from an installed package too.

How the splits were chosen. The numbers every choice has to respect:

* Global batch: stage 1 (captions) 256 = the reference 32/GPU x 8 GPUs; stage 2 (instructions) 32
  = 4/GPU x 8. A batch is split over `data x fsdp`, so `data * fsdp` must divide it (with
  `accum_steps`, the micro-batch).
* `fsdp` shards every `embed`-annotated weight dim: LLaMA 4096 (7B) / 5120 (13B), EVA ViT-g 1408
  (= 2^7 * 11), Q-Formers 768, so `fsdp` must divide gcd = 128. Past 128 devices the rest goes to
  `data` (params replicated there, which costs little: each fsdp shard of the frozen towers is tiny
  by then).
* `tensor` shards heads/mlp/vocab: LLaMA-7B 32 heads, 13B 40 heads (so tensor <= 8 for 13B),
  EVA ViT-g 16 heads, the Q-Formers 12 heads (tensor 8 leaves them uneven: GSPMD pads those small
  layers), vocab 32000, mlp 11008 / 13824 / 6144. Tensor parallelism costs two all-reduces per layer
  on activations, so it is used only where the batch cannot cover the devices.
* Per device, bf16 compute: frozen weights ~15.6 GB (7B + ViT-g + Q-Former) / ~28 GB (13B)
  divided by `fsdp * tensor`; the LLaMA backward's activations (the soft video tokens are
  trainable inputs, so the frozen LLM is differentiated through) grow with the tokens per device,
  (batch / (data * fsdp)) x 72 (stage 1) or x 408 (stage 2); the frozen ViT-g runs forward only
  (8 frames per row). `vllama-plan` measures all of this from the compiled step; SETTINGS below
  adds remat where it is needed.

Device counts are JAX devices: one per TPU chip (v4/v5p megacore: the number in 'v4-32' and
'v5p-128' counts TensorCores, two per chip), one per GPU. GPU HBM is what JAX may use with the
launch scripts' `XLA_PYTHON_CLIENT_MEM_FRACTION=0.90` (the default 0.75 leaves 60 GiB of 80).
"""
from __future__ import annotations

import dataclasses
import os

MeshShape = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str            # 'tpu' | 'gpu'
    num_devices: int         # JAX devices in the whole job
    num_hosts: int           # processes with the launch scripts' defaults (one per host / node)
    hbm_gib: float           # usable accelerator memory per device
    peak_tflops: float       # dense bf16 per device, for a lower bound on step time
    accelerator_type: str = ""   # gcloud --accelerator-type
    runtime_version: str = ""    # gcloud --version (TPU VM software image)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("v4-32", "tpu", 16, 4, 32.0, 275.0, "v4-32", "tpu-ubuntu2204-base"),
    Target("v5e-256", "tpu", 256, 32, 16.0, 197.0, "v5litepod-256", "v2-alpha-tpuv5-lite"),
    Target("v5p-128", "tpu", 64, 16, 95.0, 459.0, "v5p-128", "v2-alpha-tpuv5"),
    Target("8xa100", "gpu", 8, 1, 72.0, 312.0),    # A100 SXM 80 GB
    Target("8xh100", "gpu", 8, 1, 72.0, 989.0),    # H100 SXM 80 GB
    Target("4x8xa100", "gpu", 32, 4, 72.0, 312.0),  # 4 nodes x 8 A100, InfiniBand between nodes
    Target("4x8xh100", "gpu", 32, 4, 72.0, 989.0),
)}

# (target, LLaMA size, stage) -> (data, fsdp, tensor).
MESHES: dict[tuple[str, str, int], MeshShape] = {
    # v4-32, 16 chips x 32 GiB: pure FSDP over the 3-D torus; 16 divides both batches (16 / 2 rows
    # per chip). The activations fit only with remat: see SETTINGS.
    **{("v4-32", size, stage): (1, 16, 1) for size in ("7b", "13b") for stage in (1, 2)},
    # v5e-256, 256 chips x 16 GiB. Stage 1: fsdp stops at 128 (ViT-g width 1408 = 128 * 11), so
    # data=2; one row per chip. Stage 2: 32 rows cannot cover 256 chips with batch parallelism, so
    # 32-way fsdp x 8-way tensor (LLaMA 32/40 heads and ViT-g 16 divide by 8; the 12-head
    # Q-Formers are padded). A slice this large is wasteful for stage 2: raise train.batch_size
    # (to 256: use the stage-1 split) if the recipe allows.
    **{("v5e-256", size, 1): (2, 128, 1) for size in ("7b", "13b")},
    **{("v5e-256", size, 2): (1, 32, 8) for size in ("7b", "13b")},
    # v5p-128, 64 chips x 95 GiB: FSDP over all 64 chips in stage 1 (4 rows each). Stage 2's 32 rows
    # cover 32 chips; the remaining factor 2 goes to tensor (divides every head count).
    **{("v5p-128", size, 1): (1, 64, 1) for size in ("7b", "13b")},
    **{("v5p-128", size, 2): (1, 32, 2) for size in ("7b", "13b")},
    # One 8-GPU host: the reference setup, 32 (stage 1) / 4 (stage 2) rows per GPU, FSDP over NVLink.
    **{(t, size, stage): (1, 8, 1) for t in ("8xa100", "8xh100")
       for size in ("7b", "13b") for stage in (1, 2)},
    # 4 nodes x 8 GPUs: FSDP inside a node (NVLink carries the per-layer weight all-gathers), data
    # parallel across nodes, so only the small trainable gradients (~22M params) cross the slower
    # inter-node network. Stage 1: 8 rows per GPU; stage 2: 1 row per GPU.
    **{(t, size, stage): (4, 8, 1) for t in ("4x8xa100", "4x8xh100")
       for size in ("7b", "13b") for stage in (1, 2)},
}

# Config fields a workload needs on a target besides the mesh (dotted path -> value): where the
# LLaMA backward's activations do not fit, rematerialise the blocks (`model.remat`: ~12% more
# FLOPs per step). Measured with vllama-plan (XLA:CPU, 16 fake devices): Vicuna-7B stage 1 on
# v4-32 peaks at 32.2 GiB per chip without remat (1152 tokens per chip, ~28 MiB per token) and
# at 14.0 GiB with it. The other entries scale that by tokens per device (stage 1: rows x 72,
# stage 2: rows x 408) and by width x depth (13B: x1.56), and keep 35% of HBM spare, as the
# CPU compiler's numbers are estimates. (`train.accum_steps` cuts activations without the
# recompute, but with XLA:CPU's default scheduler the scan over 2 micro-batches peaked higher,
# not lower: 58.7 GiB.)
_REMAT = {"model.remat": True}
SETTINGS: dict[tuple[str, str, int], dict[str, object]] = {
    **{("v4-32", size, stage): _REMAT for size in ("7b", "13b") for stage in (1, 2)},
    **{("v5e-256", size, 2): _REMAT for size in ("7b", "13b")},
    **{(t, size, stage): _REMAT for t in ("8xa100", "8xh100") for size in ("7b", "13b") for stage in (1, 2)},
}

# LLaMA presets (vllama_jax.models.llama.PRESETS) by the size class the table is keyed on.
LLAMA_SIZES = {"llama_7b": "7b", "llama2_7b": "7b", "llama2_13b": "13b"}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {sorted(TARGETS)}")
    return TARGETS[name]


def stage_of(config) -> int:
    """Stage 1 (caption pretraining: short texts) or 2 (instruction tuning: long dialogues).

    The stage configs differ in `model.max_txt_len` (32 vs 320 / 512), and that, with the batch,
    is what sizes the step; `config.stage`, if a config sets it, wins.
    """
    if "stage" in config:
        return int(config.stage)
    return 1 if int(config.model.max_txt_len) <= 64 else 2


def _key(target_name: str, config, stage: int | None) -> tuple[str, str, int]:
    target(target_name)
    llama = str(config.model.llama)
    if llama not in LLAMA_SIZES:
        raise ValueError(f"no mesh presets for LLaMA preset {llama!r} (config.model.llama); presets "
                         f"exist for {sorted(LLAMA_SIZES)}: pass an explicit mesh shape instead")
    key = (target_name, LLAMA_SIZES[llama], stage or stage_of(config))
    if key not in MESHES:
        raise ValueError(f"no mesh preset for {key}")
    return key


def mesh_for(target_name: str, config, stage: int | None = None) -> MeshShape:
    """The preset mesh shape of `config` (its LLaMA size and stage) on a target."""
    return MESHES[_key(target_name, config, stage)]


def apply(config, target_name: str, stage: int | None = None, keep=()):
    """Sets `config.mesh.shape` and the preset's settings, except the dotted paths in `keep`
    (fields the user set explicitly); returns the config."""
    key = _key(target_name, config, stage)
    config.mesh.shape = MESHES[key]
    for path, value in SETTINGS.get(key, {}).items():
        if path in keep:
            continue
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def preset_config(arg: str, configs_dir: str):
    """`NAME[:ARG],TARGET` -> `configs_dir/NAME.py`'s config (`get_config(ARG)`) with TARGET's
    preset applied: what the config file `configs/mesh_presets.py` returns."""
    from vllama_jax import config_loader

    name, sep, target_name = arg.rpartition(",")
    if not sep or not name:
        raise ValueError(f"expected 'configs/mesh_presets.py:CONFIG_NAME,TARGET' "
                         f"(e.g. stage1_vicuna7b,v4-32), "
                         f"got {arg!r}; targets: {sorted(TARGETS)}")
    file, colon, config_arg = name.partition(":")
    spec = os.path.join(configs_dir, f"{file}.py") + (f":{config_arg}" if colon else "")
    return apply(config_loader.load_file(spec), target_name)
