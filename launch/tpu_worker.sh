#!/usr/bin/env bash
# The per-worker half of launch/tpu_pod.sh: runs on each TPU VM worker (the pod script ships this
# checkout to ~/vllama_jax and calls it there through `gcloud compute tpus tpu-vm ssh --worker=all`).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_worker.sh [--dry-run] setup
       launch/tpu_worker.sh [--dry-run] run [--mount BUCKET]... -- TRAINER_ARGS...

  setup   a venv at $VLLAMA_VENV (default ~/vllama_venv) with this package, jax[tpu] (within the
          package's jax pin) and gcsfs (GCS for orbax/etils); gcsfuse from Google's apt repository
  run     mounts each BUCKET read-only at /gcs/BUCKET (gcsfuse), then execs
          python -m vllama_jax.train.cli --jax_distributed TRAINER_ARGS (one process per worker;
          jax.distributed.initialize() reads the slice topology from the TPU VM metadata)
  --dry-run prints the commands instead of running them
EOF
}

PROG=tpu_worker.sh
DRY_RUN=0
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLAMA_VENV:-$HOME/vllama_venv}"
GCSFUSE_KEY=/usr/share/keyrings/cloud.google.asc

setup() {
  run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install --upgrade pip
  # One resolver call, so jax[tpu] stays inside the package's own jax pin.
  run "$VENV/bin/pip" install -e "$REPO" "jax[tpu]" gcsfs google-cloud-storage
  if ! command -v gcsfuse >/dev/null || ((DRY_RUN)); then
    local codename
    codename="$(lsb_release -cs 2>/dev/null || echo jammy)"
    run sudo curl -fsSL -o "$GCSFUSE_KEY" https://packages.cloud.google.com/apt/doc/apt-key.gpg
    run sudo sh -c "echo 'deb [signed-by=$GCSFUSE_KEY] https://packages.cloud.google.com/apt gcsfuse-$codename main' > /etc/apt/sources.list.d/gcsfuse.list"
    run sudo apt-get update -q
    run sudo apt-get install -y -q gcsfuse
  fi
  run "$VENV/bin/python" -c "import jax; print(jax.process_index(), jax.local_devices())"
}

mount_bucket() {
  local bucket="$1" dir="/gcs/$1"
  [[ "$bucket" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "--mount: '$bucket' is not a bucket name"
  if ((DRY_RUN)) || ! mountpoint -q "$dir"; then
    run sudo mkdir -p "$dir"
    run sudo chown "$(id -u):$(id -g)" "$dir"
    run gcsfuse --implicit-dirs -o ro "$bucket" "$dir"
  fi
}

train() {
  local -a buckets=()
  while (($#)); do
    case "$1" in
      --mount) buckets+=("${2:?--mount needs a bucket}"); shift 2 ;;
      --) shift; break ;;
      *) die "run: unknown argument '$1' (trainer arguments go after --)" ;;
    esac
  done
  local bucket
  for bucket in "${buckets[@]}"; do mount_bucket "$bucket"; done
  cd "$REPO"
  run "$VENV/bin/python" -m vllama_jax.train.cli --jax_distributed "$@"
}

main() {
  [[ "${1:-}" == --dry-run ]] && { DRY_RUN=1; shift; }
  case "${1:-}" in
    setup) shift; (($# == 0)) || die "setup takes no arguments"; setup ;;
    run) shift; train "$@" ;;
    -h|--help) usage ;;
    *) usage >&2; die "expected 'setup' or 'run', got '${1:-}'" ;;
  esac
}

main "$@"
