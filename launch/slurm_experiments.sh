#!/usr/bin/env bash
# A suite of experiments (python -m alexnet_jax.experiments) as one SLURM job array: one array
# element per variant x seed, each an ordinary training run in WORKDIR/<variant>/seed_<k>, then a
# collect job that writes the suite's report once every element has ended.
# Run it on the login node, from the repository root, with the project's environment active:
#   launch/slurm_experiments.sh alexnet runs/alexnet_ablations --scale=paper --seeds=3 \
#       --set=dataset.data_dir=/data/tfds
# The arguments after WORKDIR are `experiments run`'s flags. It checks the suite, counts its tasks,
# and submits `sbatch --array=0-(N-1)` of itself plus the collect job (--dependency=afterany).
# GPUS: GPUs per array element (default 2: the two-tower AlexNet's mesh); SBATCH_ARGS: further
# sbatch options for both jobs (partition, time limit, account). WORKDIR must be shared by the
# nodes. Each element's log is slurm-ARRAYJOB_TASK.out. An element stopped by SIGTERM (the time
# limit, preemption) saves a checkpoint, exits 75 and requeues itself; one that failed is listed
# by collect, which exits 1 saying which --array indices to resubmit.
# PYTHON: the interpreter (default: python on the PATH).
#SBATCH --job-name=alexnet_jax_experiments
#SBATCH --ntasks=1
#SBATCH --output=slurm-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
SUITE=${1:?suite (a built-in name or a suite file)}
WORKDIR=${2:?workdir (shared by the nodes)}
shift 2
PYTHON=${PYTHON:-python}

if [[ -n ${ALEXNET_EXPERIMENTS_COLLECT:-} ]]; then  # the collect job
  exec "$PYTHON" -m alexnet_jax.experiments collect "$WORKDIR"
fi

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then  # on the login node: submit the array and collect
  count=$("$PYTHON" -m alexnet_jax.experiments list "$SUITE" --count "$@")
  # shellcheck disable=SC2086 # SBATCH_ARGS is a list of options
  array=$(sbatch --parsable --array="0-$((count - 1))" --gpus="${GPUS:-2}" ${SBATCH_ARGS:-} \
    "$0" "$SUITE" "$WORKDIR" "$@")
  array=${array%%;*}
  # shellcheck disable=SC2086
  # collect evaluates the reference's seeds as an ensemble: on GPUs too.
  collect=$(sbatch --parsable --dependency="afterany:$array" --gpus="${GPUS:-2}" \
    --export=ALL,ALEXNET_EXPERIMENTS_COLLECT=1 --job-name=alexnet_jax_collect \
    --output="slurm-%j.out" ${SBATCH_ARGS:-} \
    "$0" "$SUITE" "$WORKDIR" "$@")
  echo "submitted $count runs as job array $array and the report as job ${collect%%;*}"
  exit 0
fi

trap 'echo "slurm_experiments.sh: SIGTERM: the run saves a checkpoint and stops" >&2' TERM
status=0
"$PYTHON" -m alexnet_jax.experiments run "$SUITE" --workdir="$WORKDIR" \
  --task="$SLURM_ARRAY_TASK_ID" "$@" || status=$?
if [[ $status -eq 75 ]]; then  # stopped by a signal with a checkpoint saved: run it again
  element="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_$SLURM_ARRAY_TASK_ID"
  echo "slurm_experiments.sh: stopped with a checkpoint saved; requeueing $element" >&2
  scontrol requeue "$element" ||
    echo "slurm_experiments.sh: scontrol requeue failed; resubmit --array=$SLURM_ARRAY_TASK_ID" >&2
fi
exit "$status"
