"""What every entry point shares: the ``--config`` flag, the host set-up, and the one-line report
of bad input. Flags are defined only when a program runs (``define_*``), so that the modules can
also be imported as libraries side by side."""

from __future__ import annotations

import ast
import contextlib
import logging as pylogging
import os
import re
import runpy
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import configs, host, storage, trained
from alexnet_jax.errors import ConfigError, DirectoryError, UserError


def define_config_flag() -> None:
  """``--config``, locked: an override naming a field the config lacks is refused."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)


def define_config_flag_from_checkpoint(argv=None, checkpoint_flag: str = 'checkpoint') -> None:
  """``--config`` for the commands that use a trained network: without ``--config``, the config
  stored with the checkpoint named by ``--<checkpoint_flag>`` (the first of a comma-separated
  list), so that ``--config.field=value`` overrides apply to it; with ``--config``, that file.
  Looks at the command line before absl parses it, which is what a flag's default needs."""
  argv = sys.argv if argv is None else argv
  if _argument(argv, 'config') is None:
    path = _argument(argv, checkpoint_flag)
    values = trained.peek_config(path.split(',')[0]) if path else None
    if values is not None:
      try:
        config = configs.from_dict(values)
      except ConfigError:
        config = None  # reported by trained.config_for when the command asks for it
      if config is not None:
        config_flags.DEFINE_config_dict(
            'config', config, 'Config (default: the one stored with the checkpoint); '
            '--config.field=value overrides a field.', lock_config=True)
        return
  define_config_flag()


def config_from_checkpoint() -> bool:
  """Whether ``--config`` holds a checkpoint's stored config (not a file the user named)."""
  return 'config' in flags.FLAGS and isinstance(flags.FLAGS['config'].default,
                                                ml_collections.ConfigDict)


def checkpoint_config(path: str, step: int | None = None):
  """The config a command uses the checkpoint of ``path`` with: ``--config`` (with its overrides)
  whether it is a file the user named or the checkpoint's stored config; where there is neither,
  ``trained.config_for``'s one line saying to pass ``--config``."""
  config = flags.FLAGS.config
  if config is not None:
    configs.check_fields(config)
  return trained.config_for(path, step, config)


def override_values() -> dict:
  """The ``--config.field=value`` overrides of the checkpoint's stored config, by dotted field path;
  none where ``--config`` is a file (ml_collections applied them to it) or there is no config at
  all (the flag was then never parsed, and asking it raises)."""
  if not config_from_checkpoint():
    return {}
  return dict(config_flags.get_override_values(flags.FLAGS['config']))


def _argument(argv, name: str) -> str | None:
  """The value of ``--name=value`` or ``--name value`` in ``argv`` (the last one given)."""
  value = None
  for i, arg in enumerate(argv):
    if re.match(rf'^--?{name}=', arg):
      value = arg.split('=', 1)[1]
    elif re.match(rf'^--?{name}$', arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


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
    _report(str(e))


def run(main) -> None:
  """``app.run(main)`` with the host flags applied and bad input reported by
  ``user_errors_exit``, a bad command line included (``_parse_flags``)."""

  def guarded(argv):
    with user_errors_exit():
      if 'config' in flags.FLAGS and flags.FLAGS.config is not None:
        # A bad value ends the program here, not after a restart for huge pages.
        configs.check_fields(flags.FLAGS.config)
    apply_host_flags()
    with user_errors_exit():
      return main(argv)

  app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parsing, with a bad command line told in one ``error:`` line and status 2: a
  ``--config`` file that is missing or does not compile, overrides without ``--config``, an
  override naming no field of a locked config (ml_collections' bare ``AttributeError``), a
  ``ConfigError`` raised by the config file, and absl's own one-line complaints (an unknown flag,
  a value of the wrong type or out of a flag's bounds). A config file that fails in any other way
  keeps its traceback: that is a bug, in the file or in our code."""
  try:
    if 'config' in flags.FLAGS and not config_from_checkpoint():
      check_config_argument(flags.FLAGS.read_flags_from_files(argv, force_gnu=False))
    return flags.FLAGS(argv)
  except UserError as e:
    _report(str(e))
  except flags.Error as e:
    raised_by_config = _innermost_user_error(e)
    if raised_by_config is not None:
      _report(f'--config: {raised_by_config}')
    if '\n' in str(e):
      raise  # absl's message carries a traceback from get_config(): not a flag value's fault
    _report(f'{e} (see --helpshort)')
  except (AttributeError, KeyError):
    problem = unknown_override(argv)
    if problem is None:
      raise  # not a misspelt override: a bug, or an error in the config file itself
    _report(problem)


def _report(message: str):
  # One write of the whole line: the processes of a multi-host run share a terminal, and a
  # print's separate write of the newline lets their lines run into each other.
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  sys.exit(2)


def _innermost_user_error(e: BaseException) -> UserError | None:
  """The ``UserError`` deepest in ``e``'s chain: ml_collections re-raises a config file's
  ``ValueError`` as one of the same type whose message is the traceback; absl wraps that again."""
  found = None
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, UserError):
      found = e
    e = e.__cause__ or e.__context__
  return found


def check_config_argument(argv) -> None:
  """Refuses (``ConfigError``) ``--config.*`` overrides without ``--config``, and a ``--config``
  file that cannot be read or does not compile, before ml_collections loads it (it would defer a
  missing file to the first access of the config, and let a ``SyntaxError`` out as a traceback
  of its loader)."""
  value = None
  for i, arg in enumerate(argv):
    if re.match(r'^--?config=', arg):
      value = arg.split('=', 1)[1]
    elif re.match(r'^--?config$', arg) and i + 1 < len(argv):
      value = argv[i + 1]
  if value is None:
    override = next((a for a in argv if re.match(r'^--?(no)?config\.', a)), None)
    if override is not None:
      raise ConfigError(f'{override.split("=", 1)[0]} overrides a field of the config, and '
                        '--config is required to name the config file, e.g. '
                        '--config=configs/demo.py')
    return
  path = value.split(':', 1)[0]  # after the colon: the argument of get_config
  try:
    with open(path, 'rb') as f:
      source = f.read()
  except OSError as e:
    raise ConfigError(f'--config={path}: cannot read the config file ({e.strerror}); name a '
                      'config file, e.g. --config=configs/demo.py') from None
  try:
    tree = ast.parse(source, path)
  except SyntaxError as e:
    text = f': {e.text.strip()!r}' if e.text and e.text.strip() else ''
    raise ConfigError(f'--config={path}: the config file does not compile: {e.msg} '
                      f'(line {e.lineno}{text})') from None
  if 'get_config' not in _top_level_names(tree):
    raise ConfigError(f'--config={path} defines no get_config(): a config file is a Python file '
                      'whose get_config() returns the ConfigDict (see configs/demo.py)')


def _top_level_names(tree: ast.Module) -> set[str]:
  """Names a module binds at its top level (definitions, assignments, imports)."""
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split('.')[0] for a in node.names)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names.update(t.id for t in targets if isinstance(t, ast.Name))
  return names


def writable_directory(path: str, flag: str) -> None:
  """Refuses (``DirectoryError``) a directory ``path``, named by ``flag``, that could not be
  created or written: a file, a path under a file, one in a directory without write permission,
  or a mistyped URL (``gs:/bucket``: a local directory "gs:"). Checked before any work starts, so
  that a run does not end in an ``OSError`` after compiling, or hours later at its first
  checkpoint; nothing is created here.

  A URL (``gs://bucket/run``) is checked as far as it can be without touching the storage: its
  scheme is one the program writes to and its storage library is installed
  (``storage.check_url``); credentials and the bucket are that library's to tell."""
  if not storage.is_local(path):
    storage.check_url(path, flag)
    return
  storage.check_local(path, flag)
  target = os.path.abspath(path)
  existing = target
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    if existing == target:
      raise DirectoryError(f'{flag}={path} is not a directory (a file of that name exists); '
                           'name a directory, or a path where one can be created')
    raise DirectoryError(f'{flag}={path} lies under {existing}, which is a file, not a '
                         'directory; name a path under a directory')
  if not os.access(existing, os.W_OK | os.X_OK):
    where = 'is' if existing == target else f'would be created in {existing}, which is'
    raise DirectoryError(f'{flag}={path} {where} not writable; name a directory you can write '
                         'to, or give yourself write permission (chmod u+w)')


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
  warnings and errors still show, each in one line: when a write fails (a full disk), its
  background threads log the same traceback many times over before the loop reports the failure
  in its own line (``checkpointing.wait``)."""

  def one_line(record) -> bool:
    # asyncio's "exception was never retrieved" records come from orbax's writer tasks too.
    if 'orbax' not in record.pathname and record.name != 'asyncio':
      return True
    if record.levelno < pylogging.WARNING:
      return False
    if record.exc_info or record.exc_text:
      reason = record.exc_info[1] if record.exc_info else None
      record.msg = f'{record.getMessage().splitlines()[0]}: {str(reason).splitlines()[0][:300]}'
      record.args, record.exc_info, record.exc_text = (), None, None
    return True

  logging.get_absl_handler().addFilter(one_line)
  sys.unraisablehook = _without_event_loop_noise(sys.unraisablehook)


def _without_event_loop_noise(hook):
  """``sys.unraisablehook`` less two messages orbax's asyncio writers leave when a save or a
  restore failed (already reported): tensorstore completing a write on an event loop that orbax
  closed, and coroutines finalised while the interpreter shuts down."""

  def filtered(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    if isinstance(e, ImportError) and 'Python is likely shutting down' in str(e):
      return
    hook(unraisable)

  return filtered
