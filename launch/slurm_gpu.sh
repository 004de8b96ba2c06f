#!/usr/bin/env bash
# Multi-node GPU training under SLURM, every GPU of every node in the mesh. Submit from the
# repository root with the project's environment active (sbatch passes it on to the job).
#   one process per node, driving all of its GPUs (the default):
#     sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/pod.py runs/alexnet_pod
#   one process per GPU:
#     sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm_gpu.sh configs/pod.py \
#       runs/alexnet_pod
# Other layouts (e.g. 2 tasks on a node of 8 GPUs) would leave GPUs idle and stop at start-up
# with one line naming both fixes. Further arguments are config overrides; WORKDIR must be shared
# by all nodes. The log, every task's output together, is slurm-JOBID.out in the directory sbatch
# ran in, appended to when the job requeues; each process first logs its layout, e.g.
#   process 0 of 4: 8 local NVIDIA H100 80GB HBM3 device(s) (ids 0,...,7) of 32 in all; mesh 16x2
# PYTHON: the interpreter (default: python on the PATH).
#SBATCH --job-name=alexnet_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
# 120 s before the time limit (and on preemption) every task gets SIGTERM: the run saves a
# checkpoint at the next step and exits 75, and the job requeues itself to resume from it.
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?workdir (shared by all nodes)}
shift 2
# jax.distributed.initialize() reads SLURM's variables (coordinator, process count and id) itself;
# alexnet_jax.distributed.slurm_local_devices chooses the GPUs of each process.
# On preemption SLURM signals this shell too: it must live on to see srun's status and requeue.
# (A handler, not SIG_IGN, which srun would inherit.)
trap 'echo "slurm_gpu.sh: SIGTERM: the tasks save a checkpoint and stop" >&2' TERM
status=0
srun "${PYTHON:-python}" -m alexnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" ||
  status=$?
if [[ $status -eq 75 && -n ${SLURM_JOB_ID:-} ]]; then  # 75: stopped by a signal, checkpoint saved
  echo "slurm_gpu.sh: stopped with a checkpoint saved; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID" ||
    echo "slurm_gpu.sh: scontrol requeue failed (SLURM may have requeued the job itself); resubmit to resume" >&2
fi
exit "$status"
