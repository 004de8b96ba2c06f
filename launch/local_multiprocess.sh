#!/usr/bin/env bash
# N processes on this machine, each a "host" with its own emulated CPU devices: exercises the
# multi-host code paths (per-process data shards, global batch assembly) without a cluster.
#   launch/local_multiprocess.sh 2 configs/demo.py /tmp/alexnet_mp
set -euo pipefail
N=${1:?number of processes}
CONFIG=${2:?config file}
WORKDIR=${3:?workdir}
shift 3
PORT=${PORT:-12355}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu python -m alexnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
