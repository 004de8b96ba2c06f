#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize() finds the others.
#   launch/tpu_pod.sh my-tpu us-central2-b configs/pod.py gs://bucket/alexnet_pod
set -euo pipefail
TPU=${1:?TPU name}
ZONE=${2:?zone}
CONFIG=${3:?config file}
WORKDIR=${4:?workdir (a gs:// path all workers reach)}
shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/alexnet_jax && pip install -q -e '.[tpu]' &&
  python -m alexnet_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
