"""What a suite is: named variants of one base config, each with the paper's figures for its row.

A variant is a set of overrides, by dotted config path (``'model.activation': 'tanh'``), applied to
the suite's base config for a scale (``'demo'`` or ``'paper'``). ``'model.name'`` switches the
network: the new model's spec fields start at their defaults, take the base model's values of the
fields the two specs share (class count, image size, width, initialisation), then the variant's
other ``model.*`` overrides.

``build_configs`` applies every variant (and the command line's ``--set`` overrides, which apply to
every variant) and checks the results with ``configs.check_fields``: an override naming no config
field, of the wrong type or out of range is refused in one line, naming the suite and the variant,
before anything trains.

Suites are data. The built-in ones (``experiments.papers``) reproduce the papers' comparisons; a
suite file is a Python file whose ``get_suite()`` returns a ``Suite`` (the way ``configs/*.py``
return a config), so a user's own comparison runs, resumes and reports as the built-in ones do.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import runpy
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from alexnet_jax import configs
from alexnet_jax.errors import ConfigError

SCALES = ('demo', 'paper')
# The figures a variant's ``paper`` mapping may hold, in %: absolute error rates of its row, or
# their differences to the paper's own reference row where the paper gives only those.
PAPER_FIELDS = ('train', 'top1', 'top5', 'd_top1', 'd_top5')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of a suite: ``overrides`` on the base config, and what the paper reports for it."""
  name: str
  description: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  paper: Mapping[str, float] = dataclasses.field(default_factory=dict)
  # The paper's claim in words, where it gives no figure for this row (or as well as one).
  claim: str = ''


@dataclasses.dataclass(frozen=True)
class Suite:
  """A comparison: variants of one base config, one of them the ``reference`` the others are
  measured against. ``bases`` builds the base config for each scale it supports; ``data`` says in
  words what each scale trains on (the report prints it, so a table says where it came from);
  ``threshold``, by scale: the training error (fraction) whose first epoch the report gives per
  variant (the paper's Fig. 1 measured epochs to 25 % training error). ``ensemble``: the paper's
  ensemble row (``row``, ``top1``, ``top5``, ``networks``) beside the report's ensemble of the
  reference variant's seeds."""
  name: str
  title: str
  source: str
  reference: str
  variants: tuple[Variant, ...]
  bases: Mapping[str, Callable[[], ml_collections.ConfigDict]]
  data: Mapping[str, str]
  threshold: Mapping[str, float] = dataclasses.field(default_factory=dict)
  ensemble: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def variant(self, name: str) -> Variant:
    for v in self.variants:
      if v.name == name:
        return v
    raise ConfigError(f'suite {self.name!r} has no variant {name!r}; its variants: '
                      f'{", ".join(v.name for v in self.variants)}')

  def check(self) -> None:
    """Refuses (``ConfigError``) a suite that is malformed as data: names, the reference, the
    paper's fields. The overrides are checked by ``build_configs``."""
    where = f'suite {self.name!r}'
    names = [v.name for v in self.variants]
    if not names:
      raise ConfigError(f'{where} has no variants')
    bad = [n for n in names if not n or not all(ch.isalnum() or ch in '_-.' for ch in n)]
    if bad:
      raise ConfigError(f'{where}: variant name {bad[0]!r} must be letters, digits, _ - or . '
                        '(it names the run folders)')
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ConfigError(f'{where} names the variant {repeated[0]!r} twice')
    if self.reference not in names:
      raise ConfigError(f'{where}: its reference {self.reference!r} is not one of its variants '
                        f'({", ".join(names)})')
    for v in self.variants:
      unknown = sorted(set(v.paper) - set(PAPER_FIELDS))
      if unknown:
        raise ConfigError(f'{where}, variant {v.name!r}: paper figure {unknown[0]!r} is not one '
                          f'of {", ".join(PAPER_FIELDS)}')
    unknown = sorted(set(self.bases) - set(SCALES))
    if unknown or not self.bases:
      raise ConfigError(f'{where}: its bases must be among the scales {", ".join(SCALES)}, got '
                        f'{", ".join(self.bases) or "none"}')


def load(name_or_file: str, builtin: Mapping[str, Callable[[], Suite]]) -> Suite:
  """The built-in suite ``name_or_file``, or the one a suite file's ``get_suite()`` returns."""
  if name_or_file in builtin:
    suite = builtin[name_or_file]()
  elif name_or_file.endswith('.py'):
    if not os.path.isfile(name_or_file):
      raise ConfigError(f'suite file {name_or_file} does not exist')
    module = runpy.run_path(name_or_file)
    if 'get_suite' not in module:
      raise ConfigError(f'suite file {name_or_file} defines no get_suite() returning a Suite')
    suite = module['get_suite']()
    if not isinstance(suite, Suite):
      raise ConfigError(f'get_suite() of {name_or_file} returned {type(suite).__name__}, not an '
                        'alexnet_jax.experiments.suite.Suite')
  else:
    raise ConfigError(f'unknown suite {name_or_file!r}: the built-in suites are '
                      f'{", ".join(builtin)}, or give a suite file (a .py file with get_suite())')
  suite.check()
  return suite


def base_config(suite: Suite, scale: str) -> ml_collections.ConfigDict:
  if scale not in SCALES:
    raise ConfigError(f'unknown scale {scale!r}; choose one of {", ".join(SCALES)}')
  if scale not in suite.bases:
    raise ConfigError(f'suite {suite.name!r} has no {scale!r} scale; it has '
                      f'{", ".join(suite.bases)}')
  return suite.bases[scale]()


def build_configs(suite: Suite, scale: str, common: Mapping[str, Any] = (),
                  seeds: int = 1) -> dict[tuple[str, int], ml_collections.ConfigDict]:
  """Every (variant, seed)'s config: the base for ``scale``, the variant's overrides, then
  ``common`` (the command line's, for every variant) and ``config.seed`` = the seed, each checked
  (``configs.check_fields``); the first problem found is refused in one line."""
  common = dict(common)
  out = {}
  for v in suite.variants:
    where = f'suite {suite.name!r}, variant {v.name!r}'
    config = base_config(suite, scale)
    for source, overrides in (('', v.overrides), (' (from --set)', common)):
      try:
        apply_overrides(config, overrides)
      except ConfigError as e:
        raise ConfigError(f'{where}{source}: {e}') from None
    try:
      configs.check_fields(config)
    except ConfigError as e:
      raise ConfigError(f'{where}: {e}') from None
    for seed in range(seeds):
      c = config.copy_and_resolve_references()
      c.seed = seed
      out[v.name, seed] = c
  devices = {int(c.emulate_cpu_devices) for c in out.values()}
  if len(devices) > 1:
    raise ConfigError(f'suite {suite.name!r}: its variants emulate different CPU device counts '
                      f'({sorted(devices)}); one process trains them all, so they must agree')
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets each dotted path of ``overrides`` in ``config`` (``model.name`` first, see the module
  doc); a path naming no field, or a value of the wrong type, is a ``ConfigError``."""
  overrides = dict(overrides)
  if 'model.name' in overrides:
    _switch_model(config, overrides.pop('model.name'))
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    section = config
    for i, key in enumerate(parents):
      if not isinstance(section, ml_collections.ConfigDict) or key not in section:
        raise ConfigError(f'{path} is not a config field (no section '
                          f'config.{".".join(parents[:i + 1])})')
      section = section[key]
    if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
      known = ', '.join(section.keys()) if isinstance(section, ml_collections.ConfigDict) else ''
      raise ConfigError(f'{path} is not a config field; the fields of '
                        f'config{"." if parents else ""}{".".join(parents)}: {known}')
    if isinstance(section[leaf], ml_collections.ConfigDict):
      raise ConfigError(f'{path} is a section of fields: override its fields one by one')
    if isinstance(section[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      section[leaf] = value
    except TypeError as e:
      raise ConfigError(f'{path}={value!r} has the wrong type: {e}') from None


def _switch_model(config: ml_collections.ConfigDict, name: str) -> None:
  old = config.model
  fresh = configs.model_config(name)
  for key in fresh.keys():
    if key != 'name' and key in old and type(old[key]) is type(fresh[key]):
      fresh[key] = old[key]
  config.model = fresh


def parse_assignments(items: list[str]) -> dict[str, Any]:
  """``['model.width=0.5', "dataset.name='x'"]`` → {path: value}: each value read as a Python
  literal (a bare word is a string)."""
  out = {}
  for item in items or ():
    path, sep, text = item.partition('=')
    if not sep or not path.strip():
      raise ConfigError(f'--set {item!r} must read PATH=VALUE, e.g. --set=dataset.data_dir=/data')
    out[path.strip()] = literal(text.strip())
  return out


def literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
