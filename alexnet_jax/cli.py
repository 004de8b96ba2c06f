"""Flags shared by the tools (summary, comm_map, bench), defined only when a tool runs as a program
so that the modules can also be imported as libraries side by side."""

from absl import app, flags
from ml_collections import config_flags


def define_tool_flags(json_help: str = 'Print JSON instead of a table.') -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=False)
  flags.DEFINE_bool('json', False, json_help)


def config_or_usage_error():
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/two_gpu.py')
  return config
