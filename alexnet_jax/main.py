"""Trains a network: ``python -m alexnet_jax.main --config=configs/two_gpu.py --workdir=DIR``.

Any config field can be overridden: ``--config.batch_size=256 --config.mesh.data=4``. A workdir that
already holds checkpoints is resumed from the latest one.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from alexnet_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
cli.define_huge_pages_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required, e.g. --workdir=/tmp/alexnet_demo')
  cli.apply_host_flags()
  distributed.initialize(config)
  cli.quiet_orbax_info()  # a line per checkpoint saved would drown the training log
  # Imported after the device set-up above: importing them is harmless, but keep JAX untouched.
  from alexnet_jax import train  # pylint: disable=g-import-not-at-top
  with cli.user_errors_exit():
    final = train.train_and_evaluate(config, _WORKDIR.value)
  print(f'final validation: top-1 error {100 * final["top1_error"]:.2f}%, '
        f'top-5 error {100 * final["top5_error"]:.2f}%', flush=True)


if __name__ == '__main__':
  app.run(main)
