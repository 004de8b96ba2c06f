"""Trained networks from checkpoints: a training workdir's steps, restored through the very program
that trained them (``program.build_program``'s abstract state, so a checkpoint from any mesh
restores), with the input normalisation training used.
"""

from __future__ import annotations

import logging as pylogging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from alexnet_jax import checkpointing, storage
from alexnet_jax import program as program_lib
from alexnet_jax.data import catalog, statistics
from alexnet_jax.errors import CheckpointError, ConfigError
from alexnet_jax.visualize.network import CompiledFunctions, Network


def training_mean_image(config) -> np.ndarray | None:
  """The mean image the network of ``config`` was trained with (``config.input.mean_image``), read
  from the ``statistics.npz`` that training stored beside the data set; None when it subtracted
  the mean colour instead."""
  if not config.input.mean_image:
    return None
  source = catalog.open_source(config.dataset, config.dataset.train_split,
                               min_side=config.input.resize_to)
  path = statistics.path_for(source)
  if not statistics.exists(path):
    raise ConfigError(
        f"the network was trained on images minus the training set's mean image "
        f'(config.input.mean_image=True), but {path} does not exist: train on this data '
        'set first (training computes it), or pass --config.input.mean_image=False to '
        'subtract the mean colour instead')
  return np.asarray(statistics.load(path).mean_image, np.float32)


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
  the intent (the analyses never write into a training run), not news."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


def _manager(config, path: str):
  # save_interval_steps=0 says what read_only implies (else orbax warns that it changes it).
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  notice = _DropReadOnlyNotice()
  logger = pylogging.getLogger('absl')
  logger.addFilter(notice)
  try:
    return ocp.CheckpointManager(storage.path(checkpoint_directory(path)), options=options,
                                 item_names=('state', 'data', 'meta'))
  finally:
    logger.removeFilter(notice)


def checkpoint_steps(config, path: str) -> list[int]:
  with _manager(config, path) as manager:
    steps = sorted(manager.all_steps())
  if not steps:
    raise CheckpointError(f'{checkpoint_directory(path)} holds no checkpoint: train '
                          'first (python -m alexnet_jax.main --workdir=...)')
  return steps


def load_network(config, path: str, step: int | None = None, *,
                 functions: CompiledFunctions | None = None) -> Network:
  """The network of ``config`` with the parameters of checkpoint ``step`` (default: the latest).
  ``functions``: shared with the other networks of this session (default: its own)."""
  steps = checkpoint_steps(config, path)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'no checkpoint at step {step} in {checkpoint_directory(path)}'
                          f'; it holds steps {", ".join(map(str, steps))}')
  prog = program_lib.build_program(config, steps_per_epoch=1)
  with _manager(config, path) as manager:
    restored = checkpointing.restore(manager, step, prog.abstract_state)
  return network_from_state(config, prog.graphdef, restored.state, step=step,
                            epoch=restored.meta.get('epoch'),
                            mean_image=training_mean_image(config), functions=functions)


def network_from_state(config, graphdef: nnx.GraphDef, state, *, step: int = 0,
                       epoch: float | None = None, mean_image: np.ndarray | None = None,
                       functions: CompiledFunctions | None = None) -> Network:
  """The network of a training state (``steps.TrainState``, on the devices or the host). Its
  parameters and batch-norm statistics become one pure dict of every variable, the model in
  evaluation mode as the analyses run it. ``mean_image``: see ``training_mean_image``."""
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.batch_stats))
  graphdef, variables = nnx.split(model)
  functions = functions or CompiledFunctions()
  return Network(config=config, apply=functions.apply(graphdef), params=nnx.to_pure_dict(variables),
                 step=step, epoch=epoch, mean_image=mean_image, functions=functions)
