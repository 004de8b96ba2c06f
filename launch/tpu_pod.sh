#!/usr/bin/env bash
# TPU pod slice: copies this checkout's tracked files (as they are now, uncommitted edits included;
# `git add` a new file to send it) to ~/alexnet_jax on every worker, installs them there
# (pip install -e '.[tpu,gcs]': JAX for TPUs, gs:// paths) and runs the same command on each
# worker. ALEXNET_JAX_DISTRIBUTED=auto makes every process call jax.distributed.initialize()
# without arguments, which finds the other workers from the TPU VM's metadata.
#   create: gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b \
#             --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
#   run:    launch/tpu_pod.sh my-tpu us-central2-b configs/pod.py gs://bucket/alexnet_pod \
#             --config.dataset.data_dir=gs://bucket/tfds
#           launch/tpu_pod.sh my-tpu us-central2-b configs/zfnet.py gs://bucket/zf_no34 \
#             --config.model.remove='(3,4)'   # any override, quoted as on a local shell
#   stop:   gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all \
#             --command="pkill -TERM -f 'alexnet_jax[.]main'"  # saves a checkpoint, exits 75
#   delete: gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b
# The same run command again resumes from the latest checkpoint (stop the last run first: a TPU
# serves one process). CONFIG is relative to the repository root; WORKDIR and the data must be
# reachable from every worker (gs://). Every argument reaches python unchanged. Exit status: the
# first failing worker's (gcloud's), 75 after a stop.
# GCLOUD: the gcloud program (default: gcloud on the PATH); PROJECT: the Cloud project, if not
# gcloud's default.
set -euo pipefail
TPU=${1:?TPU name}
ZONE=${2:?zone}
CONFIG=${3:?config file (a path inside the repository)}
WORKDIR=${4:?workdir (a gs:// path all workers reach)}
shift 4
tpu_vm=("${GCLOUD:-gcloud}" ${PROJECT:+"--project=$PROJECT"} compute tpus tpu-vm)
cd "$(dirname "$0")/.."
tarball=$(mktemp "${TMPDIR:-/tmp}/alexnet_jax.XXXXXX")
trap 'rm -f "$tarball"' EXIT
git ls-files -z | while IFS= read -r -d '' f; do
  if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi  # tracked but deleted: left out
done | tar --null -czf "$tarball" -T -
echo "tpu_pod.sh: copying the tracked files (HEAD $(git rev-parse --short HEAD)) to $TPU" >&2
"${tpu_vm[@]}" scp "$tarball" "$TPU:alexnet_jax.tar.gz" --zone="$ZONE" --worker=all
# printf %q quotes each argument for the workers' shell (bash), whatever characters it holds.
printf -v main '%q ' python3 -m alexnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
"${tpu_vm[@]}" ssh "$TPU" --zone="$ZONE" --worker=all --command="set -e
  rm -rf ~/alexnet_jax.new && mkdir ~/alexnet_jax.new && tar -xzf ~/alexnet_jax.tar.gz -C ~/alexnet_jax.new
  rm -rf ~/alexnet_jax && mv ~/alexnet_jax.new ~/alexnet_jax && cd ~/alexnet_jax  # no stale files
  python3 -m pip install -q -e '.[tpu,gcs]'
  ALEXNET_JAX_DISTRIBUTED=auto exec $main"
