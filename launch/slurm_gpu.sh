#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, every GPU of every node in the mesh.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/pod.py runs/alexnet_pod
#SBATCH --job-name=alexnet_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# 120 s before the time limit (and on preemption) every task gets SIGTERM: the run saves a
# checkpoint at the next step and exits 75, and the job requeues itself to resume from it.
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?workdir (shared by all nodes)}
shift 2
# jax.distributed.initialize() reads SLURM's variables (coordinator, process count and id) itself.
status=0
srun python -m alexnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" || status=$?
if [[ $status -eq 75 && -n ${SLURM_JOB_ID:-} ]]; then  # 75: stopped by a signal, checkpoint saved
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
