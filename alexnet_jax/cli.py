"""Flags shared by the tools (summary, comm_map, bench), defined only when a tool runs as a program
so that the modules can also be imported as libraries side by side."""

import contextlib
import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def define_tool_flags(json_help: str = 'Print JSON instead of a table.') -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=False)
  flags.DEFINE_bool('json', False, json_help)


def define_huge_pages_flag() -> None:
  """``--huge_pages`` for the programs that run training steps (``alexnet_jax.host``)."""
  flags.DEFINE_bool('huge_pages', True, 'Restart once with glibc\'s transparent-huge-pages '
                    'tunable when it is not set (faster CPU steps; see alexnet_jax/host.py).')


def apply_host_flags() -> None:
  """Acts on ``--huge_pages`` where the program defines it; call it first thing in ``main``."""
  if 'huge_pages' in flags.FLAGS and flags.FLAGS.huge_pages:
    from alexnet_jax import host  # pylint: disable=g-import-not-at-top
    host.reexec_with_huge_pages()


def config_or_usage_error():
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/two_gpu.py')
  return config


@contextlib.contextmanager
def user_errors_exit():
  """Bad input (``errors.USER_ERRORS``: unknown names, impossible meshes, missing data, broken
  checkpoints, invalid config values) ends the program with one ``error:`` line and status 2
  instead of a traceback."""
  from alexnet_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    yield
  except errors.USER_ERRORS as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run(main) -> None:
  """``app.run(main)`` with bad input reported by ``user_errors_exit``."""

  def guarded(argv):
    apply_host_flags()
    with user_errors_exit():
      return main(argv)

  app.run(guarded)


def quiet_orbax_info() -> None:
  """Keep orbax's INFO records (one per checkpoint step opened or saved) out of the log; its
  warnings and errors still show."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= pylogging.WARNING or 'orbax' not in r.pathname)
