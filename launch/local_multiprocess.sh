#!/usr/bin/env bash
# N processes on this machine, each a "host" with its own emulated CPU devices: exercises the
# multi-host code paths (per-process data shards, global batch assembly) without a cluster.
#   launch/local_multiprocess.sh 2 configs/demo.py /tmp/alexnet_mp
# The mesh's data axis spans every process's devices (--config.mesh.data=-1; later arguments
# override it). A free port is chosen unless PORT is set. When one process fails the others are
# stopped (they would wait for it forever) and the script exits with the first failure's status.
# PYTHON: the interpreter to run (default: python on the PATH).
set -euo pipefail
N=${1:?number of processes}
CONFIG=${2:?config file}
WORKDIR=${3:?workdir}
shift 3
PORT=${PORT:-$("${PYTHON:-python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < N; i++)); do
  # exec: $! is the process itself (no shell in between), so signals reach it.
  (exec env JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu "${PYTHON:-python}" -m alexnet_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --config.mesh.data=-1 "$@") &
  pids+=($!)
done
stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  sleep 10
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
# SIGTERM / SIGINT to the script go to every process: each saves and exits 75 (see README).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
declare -A running
for pid in "${pids[@]}"; do running[$pid]=1; done
status=0
while ((${#running[@]})); do
  rc=0
  unset finished
  wait -n -p finished "${!running[@]}" || rc=$?
  # A signal to this script (trapped above) interrupts the wait, with no process finished: the
  # processes got the signal too and are saving; wait for them.
  if [[ -z ${finished:-} ]]; then continue; fi
  unset "running[$finished]"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    if [[ $rc -ne 75 ]]; then
      echo "local_multiprocess.sh: process $finished exited with status $rc; stopping the others" >&2
      stop_all &
    fi
  fi
done
exit $status
