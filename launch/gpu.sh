#!/usr/bin/env bash
# Train fttw_jax on GPUs. One machine: a single process drives all its GPUs (the
# 'data' mesh spans them). Several machines: run this script once per machine with
# the same --coordinator_address and --num_processes and its own --process_id.
#
# Usage: launch/gpu.sh [--dry_run] --config FILE[:ARG] --workdir DIR [options]
#                      [-- more main.py flags]
#
# Options (--opt=value or --opt value):
#   --gpus LIST                  CUDA_VISIBLE_DEVICES for this process (default: all)
#   --coordinator_address H:P    several machines: host:port of process 0
#   --num_processes N            several machines: how many (one per machine)
#   --process_id I               several machines: this machine's index, 0..N-1
#   --distributed                let JAX find the cluster itself (e.g. under SLURM srun)
#   --dry_run                    print the command instead of running it
#
# Relative --config and --workdir paths are relative to the current directory.
# Environment: PYTHON (default: the repository's .venv/bin/python, else python3).
#
# Examples:
#   launch/gpu.sh --config=configs/default.py:ftwt --workdir=workdirs/demo
#   # two machines, 8 GPUs each; on machine 0 (10.0.0.1) and machine 1:
#   launch/gpu.sh --config=configs/cifar10_resnet56_dense.py --workdir=gs://b/run1 \
#       --coordinator_address=10.0.0.1:12345 --num_processes=2 --process_id=0
#   launch/gpu.sh --config=configs/cifar10_resnet56_dense.py --workdir=gs://b/run1 \
#       --coordinator_address=10.0.0.1:12345 --num_processes=2 --process_id=1

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY_RUN=0
CONFIG=
WORKDIR=
GPUS=
COORDINATOR_ADDRESS=
NUM_PROCESSES=
PROCESS_ID=
DISTRIBUTED=0
EXTRA=()

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

parse_args() {
  parse_options "config workdir gpus coordinator_address num_processes process_id" \
    "dry_run distributed" "$@"
  ((${#POSITIONAL[@]} == 0)) || die "unknown argument ${POSITIONAL[0]}"
}

# Several machines: all three flags or none, with a process id in range.
cluster_flags() {
  CLUSTER=()
  if [[ -z "$COORDINATOR_ADDRESS$NUM_PROCESSES$PROCESS_ID" ]]; then
    if ((DISTRIBUTED)); then
      CLUSTER=(--distributed)
    fi
    return
  fi
  [[ -n "$COORDINATOR_ADDRESS" && -n "$NUM_PROCESSES" && -n "$PROCESS_ID" ]] \
    || die "several machines need all of --coordinator_address, --num_processes, --process_id"
  [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--num_processes=$NUM_PROCESSES is not a positive int"
  if ! [[ "$PROCESS_ID" =~ ^[0-9]+$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
    die "--process_id=$PROCESS_ID must be in [0, $NUM_PROCESSES)"
  fi
  CLUSTER=(--distributed "--coordinator_address=$COORDINATOR_ADDRESS" "--num_processes=$NUM_PROCESSES"
    "--process_id=$PROCESS_ID")
}

python_bin() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$REPO/.venv/bin/python" ]]; then
    echo "$REPO/.venv/bin/python"
  else
    echo python3
  fi
}

main() {
  parse_args "$@"
  [[ -n "$CONFIG" ]] || die "--config is required"
  [[ -n "$WORKDIR" ]] || die "--workdir is required"
  cluster_flags
  if [[ -n "$NUM_PROCESSES" && "$NUM_PROCESSES" != 1 && "$WORKDIR" != gs://* ]]; then
    echo "gpu.sh: warning: with several machines --workdir must be storage they all" \
      "share (gs://... or a shared file system)." >&2
  fi
  local cmd=()
  if [[ -n "$GPUS" ]]; then
    cmd+=(env "CUDA_VISIBLE_DEVICES=$GPUS")
  fi
  cmd+=("$(python_bin)" "$REPO/main.py" "--config=$CONFIG" "--workdir=$WORKDIR" "${CLUSTER[@]}"
    "${EXTRA[@]}")
  run "${cmd[@]}"
}

main "$@"
