# The part of launch/tpu_pod.sh that runs on every TPU worker. tpu_pod.sh sends it over ssh
# with this launch's settings (repo, ref, python_version and the diffusion-jax args) put in
# front, as ~/diffusion_jax_run/launch.sh, and runs one step of it:
#
#   install  the code in ~/diffusion_jax (a clone of $repo at $ref, or the tree shipped as
#            ~/diffusion_jax.tgz) and diffusion_jax[tpu] in ~/diffusion_jax_venv, a virtual
#            environment with Python $python_version made by uv; a run still going is
#            stopped first (it saves), once the ref is known to exist
#   start    stop whatever holds the TPU, then start `run` in a session of its own; returns
#   run      python -m diffusion_jax, logging to ~/diffusion_jax_run/run.log, a copy of which
#            goes to <workdir>/logs/<worker>.log when the workdir is gs://
#   follow   print what the run logs until it ends; exit with its status
set -euo pipefail

code=$HOME/diffusion_jax
venv=$HOME/diffusion_jax_venv
dir=$HOME/diffusion_jax_run
log=$dir/run.log
host=$(hostname)
# Seconds between copies of the log to the bucket, and that a previous run gets to save.
log_copy_seconds=${TPU_LOG_COPY_SECONDS:-60}
stop_grace_seconds=${TPU_STOP_GRACE_SECONDS:-600}  # a large model's save to a bucket
# The TPU's device files (/dev/accel* up to v4, /dev/vfio/* from v5) and libtpu's lock; a
# test points them elsewhere.
tpu_devices=${TPU_DEVICE_FILES:-/dev/accel* /dev/vfio/[0-9]*}
libtpu_lockfile=${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}

workdir=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --workdir=*) workdir=${args[i]#--workdir=} ;;
    --workdir) workdir=${args[i + 1]:-} ;;
  esac
done
bucket_log=""
case "$workdir" in gs://*) bucket_log=${workdir%/}/logs/$host.log ;; esac

step_install() {
  if [ -n "$ref" ]; then
    [ -d "$code/.git" ] || { rm -rf "$code"; git clone -q "$repo" "$code"; }
    cd "$code"
    git remote set-url origin "$repo"
    git fetch -q --tags --force origin
    local commit
    commit=$(git rev-parse -q --verify "origin/$ref^{commit}" || git rev-parse -q --verify "$ref^{commit}") ||
      { echo "$host: error: --ref=$ref is no branch, tag or commit of $repo" >&2; exit 2; }
    # A run still going imports modules lazily: its code must not change under it.
    mkdir -p "$dir"
    stop_previous
    git checkout -q --force --detach "$commit"
    echo "$host: $repo at $ref, commit $(git rev-parse --short HEAD)"
  else
    mkdir -p "$dir"
    stop_previous
    rm -rf "$code"
    mkdir -p "$code"
    tar -xzf "$HOME/diffusion_jax.tgz" -C "$code"
    echo "$host: the shipped tree"
  fi
  export PATH=$HOME/.local/bin:$PATH
  if ! command -v uv >/dev/null; then
    # Images whose system Python is marked externally managed refuse a plain --user install.
    python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
  fi
  # The TPU images ship Python 3.10; current jax, flax and orbax need >= 3.11, and pip would
  # quietly pick their old releases. uv fetches a standalone Python $python_version instead.
  [ -x "$venv/bin/python" ] || uv venv -q --python "$python_version" "$venv"
  uv pip install -q --python "$venv/bin/python" -e "${code}[tpu]"
}

stop_previous() {
  local pgid
  if [ -f "$dir/run.pid" ] && pgid=$(cat "$dir/run.pid") && kill -0 -- "-$pgid" 2>/dev/null; then
    echo "$host: stopping the previous run (SIGTERM: it saves; SIGKILL after ${stop_grace_seconds}s)"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for ((s = 0; s < stop_grace_seconds; s++)); do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  # Anything else holding the TPU (a run whose ssh session dropped, one started by hand or
  # by another user) makes the new run fail with "TPU already in use"; so does a stale lock.
  local devices holders
  shopt -s nullglob
  # shellcheck disable=SC2206 # the globs are meant to expand
  devices=($tpu_devices)
  shopt -u nullglob
  if [ ${#devices[@]} -gt 0 ]; then
    holders=$(sudo lsof -t -w "${devices[@]}" | sort -u | tr '\n' ' ') || true
    if [ -n "${holders// /}" ]; then
      echo "$host: killing the processes holding the TPU: $holders"
      # shellcheck disable=SC2086 # one pid per word
      sudo kill -9 $holders || true
    fi
  fi
  sudo rm -f "$libtpu_lockfile"
}

step_start() {
  mkdir -p "$dir"
  stop_previous
  # `follow` prints the log from here on: earlier runs stay above it, in the same file.
  stat -c %s "$log" 2>/dev/null >"$dir/run.offset" || echo 0 >"$dir/run.offset"
  rm -f "$dir/run.pid" "$dir/run.status"
  # A session of its own: the run outlives this ssh connection and a Ctrl-C on the laptop.
  setsid nohup bash "$0" run </dev/null >/dev/null 2>&1 &
  for ((s = 0; s < 100; s++)); do [ -s "$dir/run.pid" ] && break; sleep 0.1; done
  [ -s "$dir/run.pid" ] || { echo "$host: error: the run did not start; see $log" >&2; exit 1; }
  echo "$host: started; log $log${bucket_log:+, copied to $bucket_log}"
}

copy_log() {
  [ -n "$bucket_log" ] || return 0
  gcloud storage cp --quiet "$log" "$bucket_log" >/dev/null 2>&1 ||
    echo "$host: could not copy this log to $bucket_log" >>"$log"
}

step_run() {
  echo $$ >"$dir/run.pid"  # the session's leader: its id is the process group's, for `start`
  cd "$code"
  # A preemption's SIGTERM reaches python, which saves; this script lives on to copy the log.
  trap 'echo "$host: SIGTERM" >>"$log"' TERM
  echo "=== $(date -u '+%F %T') UTC $host: python -m diffusion_jax ${args[*]}" >>"$log"
  (while sleep "$log_copy_seconds"; do copy_log; done) &
  local copier=$! status=0
  DIFFUSION_JAX_DISTRIBUTED=1 "$venv/bin/python" -m diffusion_jax "${args[@]}" >>"$log" 2>&1 || status=$?
  kill "$copier" 2>/dev/null || true
  echo "=== $(date -u '+%F %T') UTC $host: exit status $status" >>"$log"
  copy_log
  echo "$status" >"$dir/run.status"
}

step_follow() {
  local pid offset
  pid=$(cat "$dir/run.pid")
  offset=$(cat "$dir/run.offset")
  # --pid: stop once the run has ended (tail checks every second).
  tail -c +"$((offset + 1))" -F --pid="$pid" "$log" 2>/dev/null || true
  if [ -f "$dir/run.status" ]; then exit "$(cat "$dir/run.status")"; fi
  echo "$host: the run ended without an exit status (killed?); see $log" >&2
  exit 1
}

case "${1:-}" in
  install | start | run | follow) "step_$1" ;;
  *) echo "usage: $0 install|start|run|follow" >&2; exit 2 ;;
esac
