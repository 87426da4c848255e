#!/usr/bin/env bash
# Train on all GPUs of one host: one process drives every local GPU (JAX's single-controller
# model), so no jax.distributed is needed; the config's mesh spans the local devices.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_host.sh --config CONFIG --workdir DIR [options] [-- TRAINER_ARGS...]

  --config CONFIG        trainer config, e.g. 'configs/mesh_presets.py:stage1_vicuna7b,8xh100'
  --workdir DIR          checkpoints and TensorBoard logs (a local path or gs://...)
  --gpus LIST            CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)
  --mem-fraction F       XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90: the mesh presets' HBM
                         budgets assume it; JAX's own default 0.75 leaves 20 GB of 80 unused)
  --dry-run              print the command instead of running it
  -h, --help             this text

TRAINER_ARGS go to vllama-train (e.g. --config.train.accum_steps=2). $PYTHON picks the
interpreter (default python3); it needs this package with its GPU extra, which brings the CUDA
build of jax:   pip install -e ".[gpu]"
Before training, the script checks that jax sees a GPU and stops (exit 2) when it does not
(a CPU-only jax would otherwise train on the CPU); JAX_PLATFORMS=cpu skips the check.
EOF
}

PROG=gpu_single_host.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
  local config="" workdir="" gpus="" mem_fraction="0.90" dry_run=0
  local -a trainer_args=()
  while (($#)); do
    case "$1" in
      --config) config="${2:?--config needs a value}"; shift 2 ;;
      --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
      --gpus) gpus="${2:?--gpus needs a value}"; shift 2 ;;
      --mem-fraction) mem_fraction="${2:?--mem-fraction needs a value}"; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; trainer_args=("$@"); break ;;
      *) usage >&2; die "unknown argument '$1'" ;;
    esac
  done
  [[ -n "$config" ]] || die "--config is required"
  [[ -n "$workdir" ]] || die "--workdir is required"
  [[ "$gpus" =~ ^([0-9]+(,[0-9]+)*)?$ ]] || die "--gpus must be a comma-separated list of GPU ids, got '$gpus'"
  [[ "$mem_fraction" =~ ^0?\.[0-9]+$|^1(\.0*)?$ ]] || die "--mem-fraction must be in (0, 1], got '$mem_fraction'"

  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # The latency-hiding scheduler overlaps FSDP's weight all-gathers with compute.
  local xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
  local -a cmd=(env XLA_PYTHON_CLIENT_MEM_FRACTION="$mem_fraction" XLA_FLAGS="$xla_flags")
  [[ -n "$gpus" ]] && cmd+=(CUDA_VISIBLE_DEVICES="$gpus")
  cmd+=("${PYTHON:-python3}" -m vllama_jax.train.cli --config="$config" --workdir="$workdir"
        "${trainer_args[@]}")

  cd "$repo"
  if ((!dry_run)) && [[ "${JAX_PLATFORMS:-}" != "cpu" ]]; then
    local backend
    backend="$(env ${gpus:+CUDA_VISIBLE_DEVICES="$gpus"} "${PYTHON:-python3}" -c \
      'import jax; print(jax.default_backend())' 2>/dev/null | tail -n 1)" || backend="none (jax failed to import)"
    [[ "$backend" == "gpu" ]] || die "jax sees no GPU (its backend: ${backend:-unknown}): install the CUDA build with" \
      "pip install -e \".[gpu]\" (and check nvidia-smi), or set JAX_PLATFORMS=cpu to run on the CPU anyway"
  fi
  if ((dry_run)); then
    quote "${cmd[@]}"
    printf '\n'
  else
    exec "${cmd[@]}"
  fi
}

main "$@"
