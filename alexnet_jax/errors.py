"""Bad input, told apart from bugs.

Every exception here subclasses ``UserError``: something the user gave (a config value, a flag, a
data set, a checkpoint) is wrong, and the message says what and how to fix it. Entry points report
these in one ``error:`` line with exit status 2 (``cli.user_errors_exit``); any other exception is
a bug of ours and keeps its traceback. Raise them only for input the user controls: an internal
invariant that fails is a bug, whatever its type.

The subclasses also derive from the built-in type that describes them (``ValueError`` for bad
values), so code that catches those keeps working.
"""


class UserError(Exception):
  """Bad input: reported in one line, exit status 2."""


class ConfigError(UserError, ValueError):
  """A config field or command-line flag that does not exist or has an impossible value."""


class UnknownModelError(ConfigError):
  """``config.model.name`` names no model of the registry."""


class MeshError(ConfigError):
  """An impossible mesh / batch / device combination."""


class DatasetNotFoundError(UserError, ValueError):
  """The configured data set or split is missing or not prepared (the message says how to)."""


class TooManyBadRecordsError(UserError, RuntimeError):
  """The data on disk is damaged beyond ``dataset.max_bad_fraction``."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that is missing or exists but cannot be restored."""


class PrepareError(UserError, ValueError):
  """Bad arguments to ``prepare`` or a source folder that cannot be prepared."""


class DivergedError(UserError, FloatingPointError):
  """Training produced a NaN or infinite loss or parameter (the message says at which step, what
  was kept and what to try)."""


class DirectoryError(UserError, ValueError):
  """A directory named on the command line (``--workdir``, ``--out``) that is a file, lies under
  one, or cannot be written."""
