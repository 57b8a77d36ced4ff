#!/usr/bin/env bash
# The dress rehearsal of a pod: N processes on this machine, each with M fake CPU devices,
# joined by jax.distributed on loopback, running the same diffusion-jax command.
#
#   launch/multiprocess_local.sh [--dry-run] [--processes=2] [--devices-per-process=4]
#       [--port=12355] -- --config=configs/digits.py:smoke --workdir=/tmp/mp [--config.x=y ...]
#
# Process i's output is prefixed with [p<i>]. SIGTERM/SIGINT to this script are passed to
# every process (they checkpoint and exit 0); the script fails if any process fails.
set -euo pipefail

processes=2
devices=4
port=12355
dry_run=0
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --processes=*) processes=${1#*=} ;;
    --devices-per-process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --) shift; break ;;
    *) echo "unknown option $1 (put diffusion-jax arguments after --)" >&2; exit 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "usage: $0 [options] -- <diffusion-jax arguments>" >&2; exit 2; }

quoted_args=$(printf ' %q' "$@")
pids=()
for ((i = 0; i < processes; i++)); do
  env_line="JAX_PLATFORMS=cpu XLA_FLAGS='--xla_force_host_platform_device_count=$devices${XLA_FLAGS:+ $XLA_FLAGS}'"
  env_line+=" JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$processes"
  env_line+=" JAX_PROCESS_ID=$i"
  cmd="$env_line $python -m diffusion_jax$quoted_args"
  if [ "$dry_run" = 1 ]; then
    echo "$cmd"
    continue
  fi
  (eval "exec env $cmd" 2>&1 | sed -u "s/^/[p$i] /") &
  pids+=($!)
done
[ "$dry_run" = 1 ] && exit 0

forward() {
  for pid in "${pids[@]}"; do pkill -"$1" -P "$pid" -f "diffusion_jax" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for pid in "${pids[@]}"; do
  while :; do
    rc=0
    wait "$pid" || rc=$?
    # A trapped signal interrupts `wait` (rc > 128) while the process goes on saving.
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  [ "$rc" -eq 0 ] || status=$rc
done
exit $status
