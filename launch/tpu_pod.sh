#!/usr/bin/env bash
# Train on a Cloud TPU VM slice, or on several (--num-slices): get the TPUs (waiting for a
# queued request), put the code and a Python >= 3.11 environment on every worker, start the
# same diffusion-jax command on all of them, detached, and follow worker 0's log.
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=v5p-32] [--version=RUNTIME]
#       [--project=P] [--spot] [--queued [--num-slices=N]] [--ref=REF [--repo=URL]]
#       [--python=3.12] [--no-follow]
#       -- --config=configs/cifar10.py --workdir=gs://BUCKET/runs/c10 [--config.x=y ...]
#
# Code: without --ref, this checkout as it is (uncommitted changes included, ignored files
# left out) is copied to every worker; with --ref, every worker checks out that branch, tag
# or commit of --repo (default: this checkout's `origin`), and an unknown ref stops here.
# The diffusion-jax arguments reach the workers verbatim ($, quotes and spaces included).
#
# Run the same command again at any time, e.g. after a preemption: a PREEMPTED node or a
# SUSPENDED (or FAILED) queued resource is deleted and created anew, a live one is reused,
# a run still holding the TPUs is stopped (SIGTERM, so it saves), and training resumes from
# the newest checkpoint in the workdir, which every worker must see: a gs:// bucket. The
# run's log is ~/diffusion_jax_run/run.log on each worker, and <workdir>/logs/<worker>.log.
#
# TPU_POD_POLL_SECONDS (30) and TPU_POD_MAX_WAIT_SECONDS (7 days) bound the wait for TPUs.
set -euo pipefail

root=$(cd -P "$(dirname "$0")/.." && pwd)  # -P: through a symlinked launch/ to the checkout
name="" zone="" type="v5p-32" version="" project="" spot=0 queued=0 slices=1
repo="" ref="" python_version=3.12 follow=1 dry_run=0
poll_seconds=${TPU_POD_POLL_SECONDS:-30}
max_wait_seconds=${TPU_POD_MAX_WAIT_SECONDS:-604800}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --num-slices=*) slices=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --python=*) python_version=${1#*=} ;;
    --no-follow) follow=0 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (put diffusion-jax arguments after --)" >&2; exit 2 ;;
  esac
  shift
done
die() { echo "error: $*" >&2; exit 2; }
[ -n "$name" ] && [ -n "$zone" ] || die "--name and --zone are required"
[ $# -gt 0 ] || die "give the diffusion-jax arguments after --"
[ "$slices" = 1 ] || [ "$queued" = 1 ] || die "--num-slices needs --queued (multislice is a queued resource)"
if [ -n "$ref" ] && [ -z "$repo" ]; then
  repo=$(git -C "$root" remote get-url origin 2>/dev/null) || die "--ref needs --repo (this checkout has no origin)"
fi
# An unknown ref stops here, before TPUs are asked for (a queued request can wait for days).
# A branch or tag is looked up in the repo; a commit must be one this checkout knows.
if [ -n "$ref" ] && [ "$dry_run" = 0 ]; then
  git ls-remote --exit-code "$repo" "$ref" >/dev/null 2>&1 ||
    git -C "$root" cat-file -e "$ref^{commit}" 2>/dev/null ||
    die "--ref=$ref is no branch, tag or commit of $repo"
fi
# The runtime images that match each TPU generation; all have Python 3.10, so the workers
# get a virtual environment with Python $python_version from uv (tpu_worker.sh).
if [ -z "$version" ]; then
  case "$type" in
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

flags=(--zone="$zone")
[ -z "$project" ] || flags+=(--project="$project")
qr=$name-qr
nodes=("$name")
if [ "$slices" -gt 1 ]; then
  nodes=()
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done  # --node-prefix names them so
fi

run() {  # print a command, then run it unless --dry-run
  echo "+ $*"
  [ "$dry_run" = 1 ] || "$@"
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
describe() {  # the state a gcloud describe prints; empty when the resource does not exist
  [ "$dry_run" = 0 ] || return 0
  gcloud "$@" 2>"$tmp/errors" && return
  grep -q NOT_FOUND "$tmp/errors" && return
  cat "$tmp/errors" >&2
  return 1
}
qr_state() { describe compute tpus queued-resources describe "$qr" "${flags[@]}" --format='value(state.state)'; }
node_state() { describe compute tpus tpu-vm describe "$name" "${flags[@]}" --format='value(state)'; }

wait_for() {  # wait_for WHAT STATE-FUNCTION READY-STATE: poll until ready; fail on a dead end
  local what=$1 get=$2 ready=$3 state last="" start=$SECONDS
  while :; do
    # A transient gcloud error (a dropped connection) must not end a wait of days.
    local tries=0
    until state=$($get); do
      tries=$((tries + 1))
      [ "$tries" -lt 5 ] || { echo "error: could not read the state of $what" >&2; exit 1; }
      sleep "$poll_seconds"
    done
    [ "$state" = "$last" ] || echo "$what: ${state:-gone}"
    last=$state
    case "$state" in
      "$ready") return 0 ;;
      FAILED) echo "error: $what failed: $(gcloud compute tpus queued-resources describe "$qr" \
        "${flags[@]}" --format='value(state.failedData.error.message)')" >&2; exit 1 ;;
      SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED | "")
        echo "error: $what is ${state:-gone} while waiting for it; run the same command again" >&2
        exit 1 ;;
    esac
    if [ $((SECONDS - start)) -ge "$max_wait_seconds" ]; then
      echo "error: $what is still $state after ${max_wait_seconds}s; run the same command again to wait on" >&2
      exit 1
    fi
    sleep "$poll_seconds"
  done
}

get_queued_tpus() {
  local state
  state=$(qr_state)
  case "$state" in
    SUSPENDING | SUSPENDED | FAILED)
      # A preempted or failed request is never filled again: it is replaced by a new one.
      echo "queued resource $qr is $state: deleting it and queueing it again"
      run gcloud compute tpus queued-resources delete "$qr" "${flags[@]}" --force --quiet
      state="" ;;
    DELETING) echo "queued resource $qr is being deleted; queueing it again once gone" ;;
  esac
  while [ "$state" = DELETING ]; do sleep "$poll_seconds"; state=$(qr_state); done
  if [ -z "$state" ]; then
    local create=(gcloud compute tpus queued-resources create "$qr" "${flags[@]}"
      --accelerator-type="$type" --runtime-version="$version")
    if [ "$slices" -gt 1 ]; then
      create+=(--node-prefix="$name" --node-count="$slices")
    else
      create+=(--node-id="$name")
    fi
    [ "$spot" = 0 ] || create+=(--spot)
    run "${create[@]}"
  fi
  [ "$dry_run" = 1 ] || wait_for "queued resource $qr" qr_state ACTIVE
}

get_tpu() {
  local state
  state=$(node_state)
  case "$state" in
    PREEMPTED | TERMINATED)
      echo "TPU $name is $state: deleting and creating it again"
      run gcloud compute tpus tpu-vm delete "$name" "${flags[@]}" --quiet
      state="" ;;
    STOPPED) run gcloud compute tpus tpu-vm start "$name" "${flags[@]}" ;;
  esac
  if [ -z "$state" ]; then
    local create=(gcloud compute tpus tpu-vm create "$name" "${flags[@]}"
      --accelerator-type="$type" --version="$version")
    [ "$spot" = 0 ] || create+=(--spot)
    run "${create[@]}"
  fi
  [ "$dry_run" = 1 ] || wait_for "TPU $name" node_state READY
}

pack_tree() {  # this checkout's files as they are on disk (not the deleted, not the ignored)
  (cd "$root" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
    tar --null -T - -czf "$1")
}

# The worker's script: this launch's settings, each quoted for bash to read back exactly
# once, then tpu_worker.sh; base64 carries it through ssh and the remote shell untouched.
script=$({
  echo "#!/usr/bin/env bash"
  printf 'repo=%q ref=%q python_version=%q\n' "$repo" "$ref" "$python_version"
  printf 'args=(%s)\n' "$(printf '%q ' "$@")"
  cat "$root/launch/tpu_worker.sh"
} | base64 | tr -d '\n')
remote() {  # remote NODE WORKER STEP: one step of tpu_worker.sh on a slice's worker(s)
  echo "+ gcloud compute tpus tpu-vm ssh $1 ${flags[*]} --worker=$2 --command=<tpu_worker.sh $3>"
  [ "$dry_run" = 1 ] && return
  # shellcheck disable=SC2088 # the worker's shell expands ~
  local dir='~/diffusion_jax_run'
  gcloud compute tpus tpu-vm ssh "$1" "${flags[@]}" --worker="$2" --command="mkdir -p $dir &&
    echo $script | base64 -d > $dir/launch.sh && bash $dir/launch.sh $3"
}

if [ "$queued" = 1 ]; then get_queued_tpus; else get_tpu; fi
if [ -z "$ref" ]; then
  tarball=$tmp/diffusion_jax.tgz
  [ "$dry_run" = 1 ] || pack_tree "$tarball"
  for node in "${nodes[@]}"; do
    run gcloud compute tpus tpu-vm scp "$tarball" "$node:diffusion_jax.tgz" "${flags[@]}" --worker=all
  done
fi
for node in "${nodes[@]}"; do remote "$node" all install; done
for node in "${nodes[@]}"; do remote "$node" all start; done
if [ "$follow" = 1 ]; then
  echo "following worker 0's log: Ctrl-C stops following, not the run"
  remote "${nodes[0]}" 0 follow
fi
