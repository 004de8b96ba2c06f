#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, every GPU of every node in the mesh.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/pod.py runs/alexnet_pod
#SBATCH --job-name=alexnet_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?workdir (shared by all nodes)}
shift 2
# jax.distributed.initialize() reads SLURM's variables (coordinator, process count and id) itself.
srun python -m alexnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
