#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it, install this repository on every
# worker, run the same diffusion-jax command on all of them, and stream the logs.
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=v4-32]
#       [--version=tpu-ubuntu2204-base] [--project=P] [--spot] [--queued]
#       [--repo=https://github.com/you/diffusion_jax.git] [--ref=main]
#       -- --config=configs/cifar10.py --workdir=gs://BUCKET/runs/c10 [--config.x=y ...]
#
# On a pod every worker runs one process; jax.distributed finds its peers by itself. The
# workdir must be shared by all workers: a gs:// bucket (orbax writes there directly).
# Preemption (spot/queued): the workers get SIGTERM, save a checkpoint and exit 0; run the
# same command again and training resumes from it.
set -euo pipefail

name="" zone="" type="v4-32" version="tpu-ubuntu2204-base" project="" spot=0 queued=0
repo="${DIFFUSION_JAX_REPO:-https://github.com/diffusion-jax/diffusion_jax.git}" ref="main"
dry_run=0
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
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --) shift; break ;;
    *) echo "unknown option $1 (put diffusion-jax arguments after --)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$name" ] && [ -n "$zone" ] || { echo "--name and --zone are required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "give the diffusion-jax arguments after --" >&2; exit 2; }

gcloud_tpu="gcloud compute tpus tpu-vm"
common="--zone=$zone${project:+ --project=$project}"
run() {
  echo "+ $*"
  [ "$dry_run" = 1 ] || eval "$@"
}

args=$(printf ' %q' "$@")
if [ "$queued" = 1 ]; then
  create="gcloud compute tpus queued-resources create $name-qr --node-id=$name $common"
  create+=" --accelerator-type=$type --runtime-version=$version"
  [ "$spot" = 1 ] && create+=" --spot"
else
  create="$gcloud_tpu create $name $common --accelerator-type=$type --version=$version"
  [ "$spot" = 1 ] && create+=" --spot"
fi
if [ "$dry_run" = 1 ] || ! $gcloud_tpu describe "$name" $common >/dev/null 2>&1; then
  run "$create"
fi
install="set -e; [ -d diffusion_jax ] || git clone $repo diffusion_jax; cd diffusion_jax;"
install+=" git fetch -q origin && git checkout -q $ref && git pull -q || true;"
install+=" python3 -m pip install -q -e '.[tpu]'"
run "$gcloud_tpu ssh $name $common --worker=all --command=\"$install\""
train="cd diffusion_jax && DIFFUSION_JAX_DISTRIBUTED=1 python3 -m diffusion_jax$args"
run "$gcloud_tpu ssh $name $common --worker=all --command=\"$train\" 2>&1 | tee -a $name.log"
