"""Trained networks from checkpoints, for the commands that use one (``evaluate``, ``features``,
``transfer``, ``visualize``, and a training run that starts from another's weights).

Every checkpoint carries the config of the run that wrote it (``meta['config']``, see
``train.py``), so a user names a checkpoint and nothing else; a config given explicitly (older
checkpoints, or to change how the network is used) takes its place. Restoring goes through the
very program that trained the network (``program.build_program``), so a checkpoint from any mesh
restores onto any other, every array verified against its checksum (``checkpointing.restore``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as pylogging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from alexnet_jax import checkpointing, configs, storage
from alexnet_jax import program as program_lib
from alexnet_jax.data import catalog, inputs
from alexnet_jax.errors import CheckpointError


def checkpoint_directory(path: str) -> str:
  """A training workdir or its ``checkpoints`` folder, local or a URL (``storage``) → the folder
  holding the step directories."""
  if storage.is_local(path):
    path = os.path.abspath(os.path.expanduser(path))
  if storage.path(os.path.join(path, 'checkpoints')).is_dir():
    path = os.path.join(path, 'checkpoints')
  if not storage.path(path).is_dir():
    raise CheckpointError(f'no checkpoint directory at {path}: pass --checkpoint=the '
                          'training --workdir (or its checkpoints/ folder)')
  return path


class _DropReadOnlyNotice(pylogging.Filter):
  """Orbax warns 'Given directory is read only' whenever a read-only manager opens: here that is
  the intent (nothing here writes into a training run), not news."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


@contextlib.contextmanager
def read_only_manager(path: str):
  """An orbax manager over the checkpoints of ``path`` that never writes."""
  # save_interval_steps=0 says what read_only implies (else orbax warns that it changes it).
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  notice = _DropReadOnlyNotice()
  logger = pylogging.getLogger('absl')
  logger.addFilter(notice)
  try:
    manager = ocp.CheckpointManager(storage.path(checkpoint_directory(path)), options=options,
                                    item_names=('state', 'data', 'meta'))
  finally:
    logger.removeFilter(notice)
  with manager:
    yield manager


def checkpoint_steps(path: str) -> list[int]:
  """The steps of the finished checkpoints of ``path`` (orbax writes each into a temporary
  directory and renames it to its step when it is complete), read from the directory alone: no
  orbax and no JAX backend, so the command line can use it before ``jax.distributed.initialize``.
  """
  root = storage.path(checkpoint_directory(path))
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
  if not steps:
    raise CheckpointError(f'{root} holds no checkpoint: train first (python -m '
                          'alexnet_jax.main --workdir=...)')
  return steps


def resolve_step(path: str, step: int | None) -> int:
  """``step`` (default: the latest) among the checkpoints of ``path``."""
  steps = checkpoint_steps(path)
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f'no checkpoint at step {step} in {checkpoint_directory(path)}'
                          f'; it holds steps {", ".join(map(str, steps))}')
  return step


def read_meta(path: str, step: int | None = None) -> dict:
  """The ``meta`` item of checkpoint ``step`` (default: the latest): epoch, metrics, config. Read
  as the JSON file orbax writes for it (like ``checkpoint_steps``, without a JAX backend)."""
  step = resolve_step(path, step)
  where = storage.path(checkpoint_directory(path)) / str(step)
  try:
    meta = json.loads((where / 'meta' / 'metadata').read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read the checkpoint {where}: its meta item is unreadable '
                          f'({type(e).__name__}: {str(e).strip()[:200]}) — it is damaged; choose '
                          'another --step, or restore it from a backup') from None
  if not isinstance(meta, dict):
    raise CheckpointError(f'the checkpoint {where} is damaged: its meta item is not a JSON '
                          'object')
  return meta


def stored_config(path: str, step: int | None = None):
  """The config the checkpoint was written with, or None for checkpoints older than that."""
  values = read_meta(path, step).get('config')
  return None if values is None else configs.from_dict(values)


def peek_config(path: str) -> dict | None:
  """The config values stored with the newest checkpoint of ``path`` (the command line is
  parsed with them before ``jax.distributed.initialize``); None where there are none or they
  cannot be read (the command then reports why, through ``config_for``)."""
  try:
    values = read_meta(path).get('config')
  except CheckpointError:
    return None
  return values if isinstance(values, dict) else None


def config_for(path: str, step: int | None = None, given=None):
  """The config to use the checkpoint of ``path`` with: ``given`` when there is one, else the one
  it stores."""
  if given is not None:
    return given
  config = stored_config(path, step)
  if config is None:
    raise CheckpointError(f'the checkpoint in {checkpoint_directory(path)} stores no config '
                          '(written by an older version): pass --config=the config file it was '
                          'trained with, with the same overrides')
  return config


@dataclasses.dataclass
class Trained:
  """A trained network on a mesh: its program (compiled steps, shardings), parameters, batch-norm
  statistics, and where it came from."""
  config: Any
  program: program_lib.Program
  params: Any
  batch_stats: Any
  step: int
  epoch: float | None
  path: str
  meta: dict

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.program.mesh

  @property
  def name(self) -> str:
    epoch = '' if self.epoch is None else f', epoch {self.epoch:g}'
    return f'{self.config.model.name} ({self.path} at step {self.step}{epoch})'


def inference_config(config):
  """``config`` as the inference commands build its program: a training batch of the evaluation
  batch's size (the program checks both against the mesh, and only the evaluation batch is run)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = config.eval_batch_size
  return config


def training_statistics(config):
  """The training set's input statistics when ``config.input`` uses them (the mean image), read
  from beside the data set (computed there by training)."""
  if not inputs.uses_statistics(config.input):
    return None
  source = catalog.open_source(config.dataset, config.dataset.train_split,
                               min_side=config.input.resize_to, progress=False)
  return inputs.input_statistics(config, source)


def _program(config, mesh):
  configs.check_fields(config)
  config = inference_config(config)
  if mesh is None:
    mesh = program_lib.make_mesh(config)
  program_lib.check_batch(config, mesh, 'eval_batch_size')
  return config, program_lib.build_program(config, steps_per_epoch=1, mesh=mesh,
                                           input_stats=training_statistics(config))


def random_init(config, *, mesh=None) -> Trained:
  """The network of ``config`` as training starts it (its initialiser, ``config.seed``), untrained:
  the baseline that tells what training added to the features."""
  config, prog = _program(config, mesh)
  state = prog.init_state()
  return Trained(config=config, program=prog, params=state.params, batch_stats=state.batch_stats,
                 step=0, epoch=None, path=f'random init (seed {config.seed})', meta={})


def load(config, path: str, step: int | None = None, *, mesh=None) -> Trained:
  """The network of ``config`` with the parameters of checkpoint ``step`` (default: the latest)
  of ``path``, on ``mesh`` (default: ``config.mesh``)."""
  configs.check_fields(config)  # a bad config is reported before a missing checkpoint
  step = resolve_step(path, step)
  config, prog = _program(config, mesh)
  with read_only_manager(path) as manager:
    restored = checkpointing.restore(manager, step, prog.abstract_state)
  return Trained(config=config, program=prog, params=restored.state.params,
                 batch_stats=restored.state.batch_stats, step=step,
                 epoch=restored.meta.get('epoch'), path=path, meta=restored.meta)
