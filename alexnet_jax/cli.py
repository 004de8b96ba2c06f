"""What every entry point shares: the ``--config`` flag, the host set-up, and the one-line report
of bad input. Flags are defined only when a program runs (``define_*``), so that the modules can
also be imported as libraries side by side."""

from __future__ import annotations

import contextlib
import logging as pylogging
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import configs, host
from alexnet_jax.errors import UserError


def define_config_flag() -> None:
  """``--config``, locked: an override naming a field the config lacks is refused."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)


def define_tool_flags(json_help: str = 'Print JSON instead of a table.') -> None:
  define_config_flag()
  flags.DEFINE_bool('json', False, json_help)


def define_huge_pages_flag() -> None:
  """``--huge_pages`` for the programs that run training steps (``alexnet_jax.host``)."""
  flags.DEFINE_bool(
      'huge_pages', True, "Restart once with glibc's transparent-huge-pages "
      'tunable when it is not set (faster CPU steps; see alexnet_jax/host.py).')


def apply_host_flags() -> None:
  """Acts on ``--huge_pages`` where the program defines it; call it first thing in ``main``."""
  if 'huge_pages' in flags.FLAGS and flags.FLAGS.huge_pages:
    host.reexec_with_huge_pages()


def config_or_usage_error(example: str = 'configs/two_gpu.py'):
  """The ``--config`` given, its fields checked (``configs.check_fields``)."""
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError(f'--config is required, e.g. --config={example}')
  configs.check_fields(config)
  return config


@contextlib.contextmanager
def user_errors_exit():
  """Bad input (``errors.UserError``: unknown names, impossible meshes, missing data, broken
  checkpoints, invalid config values) ends the program with one ``error:`` line and status 2;
  every other exception is a bug and keeps its traceback."""
  try:
    yield
  except UserError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run(main) -> None:
  """``app.run(main)`` with the host flags applied and bad input reported by
  ``user_errors_exit``, an override naming no config field included."""

  def guarded(argv):
    apply_host_flags()
    with user_errors_exit():
      return main(argv)

  app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parsing, with ml_collections' bare ``AttributeError`` for an override of a locked
  config's missing field turned into one line that names it."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    problem = unknown_override(argv)
    if problem is None:
      raise  # not a misspelt override: a bug, or an error in the config file itself
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(2)


def unknown_override(argv) -> str | None:
  """The first ``--config.a.b=v`` of ``argv`` whose field the config file's config lacks, said
  in a sentence (None when every override names a field)."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None:
    return None
  file, _, arg = path.partition(':')
  get_config = runpy.run_path(file)['get_config']
  config = get_config(arg) if arg else get_config()
  for a in argv:
    if not a.startswith('--config.'):
      continue
    keys = a[len('--config.'):].split('=', 1)[0].split('.')
    node, where = config, 'config'
    for key in keys:
      if not hasattr(node, 'keys') or key not in node.keys():
        fields = ', '.join(node.keys()) if hasattr(node, 'keys') else 'none'
        return (f'{a.split("=", 1)[0]}: {where} has no field {key!r} (its fields: {fields}); '
                'check its spelling (the fields of config.model are those of the model it names)')
      node, where = node[key], f'{where}.{key}'
  return None


def quiet_orbax_info() -> None:
  """Keep orbax's INFO records (one per checkpoint step opened or saved) out of the log; its
  warnings and errors still show."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= pylogging.WARNING or 'orbax' not in r.pathname)
