"""Trains a network: ``python -m alexnet_jax.main --config=configs/two_gpu.py --workdir=DIR``.

Any config field can be overridden: ``--config.batch_size=256 --config.mesh.data=4``. A workdir that
already holds checkpoints is resumed from the latest one.

The data flow, each step in its own module: config (``configs``) → processes and devices
(``distributed``) → mesh, model, state and compiled steps (``program``) → the loop (``train``),
with the data (``data.inputs``) and the checkpoints (``checkpointing``) on the side. Hooks the loop
runs after each epoch come from here.
"""

from __future__ import annotations

import sys

from absl import app, flags

from alexnet_jax import cli, distributed, preemption, train
from alexnet_jax.visualize import snapshots

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and plots: a local path, or a gs:// URL '
    "(needs the gcs extra: pip install 'alexnet_jax[gcs]').")
cli.define_config_flag()
cli.define_huge_pages_flag()


def epoch_hooks(config) -> list[train.Hook]:
  """What runs after each epoch besides training's own evaluation and checkpoint."""
  hooks = []
  if config.visualize.every_epochs:
    hooks.append(snapshots.every_epochs(config.visualize.every_epochs, config.visualize.images))
  return hooks


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # The config and the workdir are checked before distributed.initialize acts on the config and
  # before anything is compiled: a bad value or an unusable workdir ends here in one line.
  config = cli.config_or_usage_error('configs/demo.py')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required, e.g. --workdir=/tmp/alexnet_demo')
  cli.writable_directory(_WORKDIR.value, '--workdir')
  distributed.initialize(config)
  cli.quiet_orbax_info()  # a line per checkpoint saved would drown the training log
  try:
    final = train.train_and_evaluate(config, _WORKDIR.value, hooks=epoch_hooks(config))
  except preemption.Preempted as stopped:
    print(stopped, file=sys.stderr, flush=True)
    sys.exit(preemption.REQUEUE_STATUS)
  print(
      f'final validation: top-1 error {100 * final["top1_error"]:.2f}%, '
      f'top-5 error {100 * final["top5_error"]:.2f}%', flush=True)


if __name__ == '__main__':
  cli.run(main)
