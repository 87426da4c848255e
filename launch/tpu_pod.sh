#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice with JAX's own multi-host runtime.
#
# Each worker runs one `vllama-train --jax_distributed` process; jax.distributed.initialize()
# finds the slice's coordinator and process ids from the TPU VM metadata. Checkpoints and
# TensorBoard logs go straight to the gs:// workdir (orbax / tensorboardX write GCS); data shards
# given as gs:// paths are read through a read-only gcsfuse mount of their bucket at /gcs/BUCKET
# on every worker (ArrayRecord readers need a file system path).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/RUN
                         [options] [-- TRAINER_ARGS...]

Runs, in order (each step only when asked for, `run` by default):
  --create   gcloud compute tpus tpu-vm create NAME (--accelerator-type, --version, --spot)
  --setup    pack this checkout's HEAD (git archive), copy it to every worker, and install it
             there (venv with jax[tpu], gcsfs, gcsfuse) via launch/tpu_worker.sh setup
  run        launch/tpu_worker.sh run on every worker: mounts the data buckets, then trains
  --delete   gcloud compute tpus tpu-vm delete NAME after the run

Options:
  --tpu NAME              TPU VM name (required)
  --zone ZONE             e.g. us-central2-b (required)
  --project PROJECT       default: gcloud's configured project
  --config CONFIG         trainer config, relative to the repository root, e.g.
                          'configs/mesh_presets.py:stage1_vicuna7b,v4-32' (required unless --no-run)
  --workdir gs://B/RUN    checkpoints and TensorBoard logs (required unless --no-run)
  --accelerator-type T    with --create (default v4-32)
  --version V             TPU VM runtime with --create (default: by generation, e.g.
                          tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e)
  --spot                  with --create: a Spot VM (preemptible; the trainer saves on SIGTERM)
  --no-run                only create / set up / delete
  --detach                start training in the background on each worker (log in ~/vllama_train.log)
  --dry-run               print every command, one per line, instead of running it
  -h, --help              this text

TRAINER_ARGS go to vllama-train, e.g. --config.train.batch_size=512. A --config.data.*=gs://B/...
value is rewritten to /gcs/B/... and bucket B is mounted on every worker.

Example:
  launch/tpu_pod.sh --tpu vllama-v4 --zone us-central2-b --create --setup \
      --config 'configs/mesh_presets.py:stage1_vicuna7b,v4-32' --workdir gs://my-bucket/runs/s1 \
      -- '--config.data.dataset_shards.webvid=gs://my-bucket/shards/webvid-*.array_record' \
         --config.paths.llama_model=/gcs/my-bucket/models/vicuna-7b
EOF
}

PROG=tpu_pod.sh
DRY_RUN=0
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

default_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type '$1'; pass --version" ;;
  esac
}

main() {
  local tpu="" zone="" project="" config="" workdir="" accel="v4-32" version="" spot=0
  local create=0 setup=0 do_run=1 delete=0 detach=0
  local -a trainer_args=()
  while (($#)); do
    case "$1" in
      --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
      --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
      --project) project="${2:?--project needs a value}"; shift 2 ;;
      --config) config="${2:?--config needs a value}"; shift 2 ;;
      --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
      --accelerator-type) accel="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --version) version="${2:?--version needs a value}"; shift 2 ;;
      --spot) spot=1; shift ;;
      --create) create=1; shift ;;
      --setup) setup=1; shift ;;
      --no-run) do_run=0; shift ;;
      --delete) delete=1; shift ;;
      --detach) detach=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; trainer_args=("$@"); break ;;
      *) usage >&2; die "unknown argument '$1'" ;;
    esac
  done
  [[ -n "$tpu" ]] || die "--tpu NAME is required"
  [[ -n "$zone" ]] || die "--zone ZONE is required"
  if ((do_run)); then
    [[ -n "$config" ]] || die "--config is required (or --no-run)"
    [[ "$workdir" == gs://?* ]] ||
      die "--workdir must be a gs:// path (every worker writes its checkpoint shards there), got '$workdir'"
  fi

  local -a where=(--zone="$zone")
  [[ -n "$project" ]] && where+=(--project="$project")
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

  if ((create)); then
    [[ -n "$version" ]] || version="$(default_version "$accel")"
    local -a create_cmd=(gcloud compute tpus tpu-vm create "$tpu" "${where[@]}"
                         --accelerator-type="$accel" --version="$version")
    ((spot)) && create_cmd+=(--spot)
    run "${create_cmd[@]}"
  fi

  if ((setup)); then
    if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
      echo "tpu_pod.sh: warning: uncommitted changes are not copied (the workers get HEAD)" >&2
    fi
    local tarball
    tarball="${TMPDIR:-/tmp}/vllama_jax-$(git -C "$repo" rev-parse --short HEAD).tar.gz"
    run git -C "$repo" archive --format=tar.gz --prefix=vllama_jax/ -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="rm -rf ~/vllama_jax"
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu":vllama_jax.tar.gz "${where[@]}" --worker=all
    run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
      --command="tar xzf ~/vllama_jax.tar.gz -C ~ && bash ~/vllama_jax/launch/tpu_worker.sh setup"
  fi

  if ((do_run)); then
    # gs:// data paths -> /gcs/BUCKET/... on the workers, each bucket mounted once.
    local -a worker_args=() mounts=()
    local arg bucket
    for arg in "${trainer_args[@]}"; do
      if [[ "$arg" =~ ^(--config\.data\.[^=]+=)gs://([^/]+)(/.*)?$ ]]; then
        bucket="${BASH_REMATCH[2]}"
        arg="${BASH_REMATCH[1]}/gcs/${bucket}${BASH_REMATCH[3]}"
        [[ " ${mounts[*]} " == *" --mount $bucket "* ]] || mounts+=(--mount "$bucket")
      fi
      worker_args+=("$arg")
    done
    # The '~' stays literal here: the worker's shell expands it to the worker's home.
    local remote
    remote="bash ~/vllama_jax/launch/tpu_worker.sh run $(quote "${mounts[@]}" -- \
      --config="$config" --workdir="$workdir" "${worker_args[@]}")"
    if ((detach)); then
      remote="nohup $remote > ~/vllama_train.log 2>&1 < /dev/null &"
    fi
    run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="$remote"
  fi

  if ((delete)); then
    run gcloud compute tpus tpu-vm delete "$tpu" "${where[@]}" --quiet
  fi
}

main "$@"
