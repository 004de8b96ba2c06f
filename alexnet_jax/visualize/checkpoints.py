"""Trained networks from checkpoints: a training workdir's steps, restored through the very program
that trained them (``program.build_program``'s abstract state, so a checkpoint from any mesh
restores), with the input normalisation training used.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from alexnet_jax import checkpointing, trained
from alexnet_jax import program as program_lib
from alexnet_jax.data import catalog, statistics
from alexnet_jax.errors import ConfigError
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


def checkpoint_steps(config, path: str) -> list[int]:
  del config  # the steps are the checkpoint directory's
  return trained.checkpoint_steps(path)


def load_network(config, path: str, step: int | None = None, *,
                 functions: CompiledFunctions | None = None) -> Network:
  """The network of ``config`` with the parameters of checkpoint ``step`` (default: the latest).
  ``functions``: shared with the other networks of this session (default: its own)."""
  step = trained.resolve_step(path, step)
  prog = program_lib.build_program(config, steps_per_epoch=1)
  with trained.read_only_manager(path) as manager:
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
