#!/usr/bin/env bash
# Train fttw_jax on a Cloud TPU VM: one host (v4-8, v5litepod-8, ...) or a pod
# slice of several hosts (v4-32, ...). Every command below acts on all workers.
#
# Usage: launch/tpu_vm.sh [--dry_run] COMMAND [options] [-- more main.py flags]
#
# Commands:
#   create   create the TPU VM
#   setup    copy this repository (git HEAD) to every worker, build .venv there
#   run      python main.py --distributed on every worker (needs --config, --workdir)
#   logs     follow train.log of one worker (after run --background)
#   delete   delete the TPU VM
#
# Options (--opt=value or --opt value):
#   --name NAME              TPU VM name (default fttw-jax)
#   --zone ZONE              zone (default $CLOUDSDK_COMPUTE_ZONE; required)
#   --project PROJECT        GCP project (default: gcloud's configured one)
#   --accelerator_type TYPE  e.g. v4-8, v4-32, v5litepod-16, v6e-8 (default v4-8)
#   --version VERSION        TPU software image (default: chosen from the type)
#   --spot                   create a Spot VM (cheaper, may be preempted)
#   --config FILE[:ARG]      run: experiment config, relative to the repository
#   --workdir DIR            run: gs://bucket/path (every worker must see it)
#   --background             run: detach (nohup) and write ~/fttw_jax/train.log
#   --worker N               logs: which worker (default 0)
#   --dry_run                print the commands instead of running them
#
# Example:
#   launch/tpu_vm.sh create --zone=us-central2-b --accelerator_type=v4-32
#   launch/tpu_vm.sh setup  --zone=us-central2-b
#   launch/tpu_vm.sh run    --zone=us-central2-b --config=configs/imagenet_resnet18_dense.py \
#       --workdir=gs://my-bucket/fttw/run1 -- --config.data_dir=gs://my-bucket/tfds
#   launch/tpu_vm.sh delete --zone=us-central2-b

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=fttw_jax  # relative to the workers' home directories

DRY_RUN=0
COMMAND=
NAME=fttw-jax
ZONE="${CLOUDSDK_COMPUTE_ZONE:-}"
PROJECT=
ACCELERATOR_TYPE=v4-8
VERSION=
SPOT=0
CONFIG=
WORKDIR=
BACKGROUND=0
WORKER=0
EXTRA=()

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

# The newest images of each generation (see `gcloud compute tpus tpu-vm versions list`).
default_version() {
  case "$1" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

parse_args() {
  parse_options "name zone project accelerator_type version config workdir worker" \
    "dry_run spot background" "$@"
  ((${#POSITIONAL[@]} <= 1)) || die "one command only, got '${POSITIONAL[0]}' and '${POSITIONAL[1]}'"
  COMMAND="${POSITIONAL[0]:-}"
}

# Flags every gcloud tpu-vm call takes.
location() {
  LOCATION=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOCATION+=("--project=$PROJECT")
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

cmd_create() {
  local args=(--accelerator-type="$ACCELERATOR_TYPE" --version="${VERSION:-$(default_version "$ACCELERATOR_TYPE")}")
  if ((SPOT)); then
    args+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" "${args[@]}"
}

# jax 0.10 needs Python >= 3.11, newer than the TPU images' own: uv provides one.
cmd_setup() {
  local jax_version tarball
  jax_version="$(sed -n 's/^jax==//p' "$REPO/requirements.txt")"
  [[ -n "$jax_version" ]] || die "no jax==VERSION pin in requirements.txt"
  tarball="${TMPDIR:-/tmp}/fttw_jax_src.tar.gz"
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:fttw_jax_src.tar.gz" "${LOCATION[@]}" \
    --worker=all
  ssh_all "$(quote mkdir -p "$REMOTE_DIR") && $(quote tar -xzf fttw_jax_src.tar.gz -C "$REMOTE_DIR") \
&& cd $(quote "$REMOTE_DIR") && python3 -m pip install --user --quiet uv \
&& python3 -m uv venv --python 3.11 .venv \
&& python3 -m uv pip install --python .venv/bin/python -r requirements.txt $(quote "jax[tpu]==$jax_version")"
}

cmd_run() {
  [[ -n "$CONFIG" ]] || die "run needs --config"
  [[ -n "$WORKDIR" ]] || die "run needs --workdir"
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "tpu_vm.sh: warning: --workdir=$WORKDIR is local to each worker; a slice of" \
      "several hosts needs one they all share (gs://...)." >&2
  fi
  local main
  main="$(quote .venv/bin/python main.py "--config=$CONFIG" "--workdir=$WORKDIR" --distributed \
    "${EXTRA[@]}")"
  if ((BACKGROUND)); then
    main="nohup $main > train.log 2>&1 < /dev/null &"
  fi
  ssh_all "cd $(quote "$REMOTE_DIR") && $main"
}

cmd_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
    --command="tail -n 200 -F $(quote "$REMOTE_DIR/train.log")"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
}

main() {
  parse_args "$@"
  [[ -n "$COMMAND" ]] || { usage; exit 2; }
  [[ -n "$ZONE" ]] || die "--zone is required (or set CLOUDSDK_COMPUTE_ZONE)"
  location
  case "$COMMAND" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    delete) cmd_delete ;;
    *) die "unknown command '$COMMAND'" ;;
  esac
}

main "$@"
