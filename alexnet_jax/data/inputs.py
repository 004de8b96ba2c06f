"""A config's data, ready for the loop: the sources, the input statistics, and the batches.

``open_inputs(config)`` opens the configured splits and checks them against the config;
``train_batches`` / ``eval_batches`` build the grain pipelines ``config.input`` describes, the
training batches arriving on the mesh ahead of the step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from alexnet_jax import sharding
from alexnet_jax.data import catalog, pipeline, statistics
from alexnet_jax.data.sources import ImageSource
from alexnet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inputs:
  train_source: ImageSource
  eval_source: ImageSource
  # The training set's mean image and RGB PCA, when config.input uses them (else None).
  stats: statistics.Statistics | None
  # The mean image the steps subtract (config.input.mean_image), else None: they subtract the
  # mean colour.
  mean_image: np.ndarray | None


def open_inputs(config) -> Inputs:
  """Opens ``config.dataset``'s training and evaluation splits, checks them against the model, and
  computes (once, stored beside the data set) the statistics the input recipe needs."""
  resize_to = config.input.resize_to
  progress = jax.process_index() == 0
  train_source = catalog.open_source(config.dataset, config.dataset.train_split, min_side=resize_to,
                                     progress=progress)
  eval_source = catalog.open_source(config.dataset, config.dataset.eval_split, min_side=resize_to,
                                    progress=progress)
  check_data(config, train_source)
  stats = input_statistics(config, train_source)
  mean_image = stats.mean_image if stats is not None and config.input.mean_image else None
  return Inputs(train_source=train_source, eval_source=eval_source, stats=stats,
                mean_image=mean_image)


def uses_statistics(input_cfg) -> bool:
  """Whether the input recipe needs the training set's statistics (mean image or PCA lighting)."""
  return bool(input_cfg.mean_image) or input_cfg.pca_lighting_std > 0


def input_statistics(config, train_source) -> statistics.Statistics | None:
  """The training set's mean image and RGB PCA when ``config.input`` asks for them (computed in one
  pass and stored beside the data set on first use), else None."""
  inp = config.input
  if not uses_statistics(inp):
    return None
  side = inp.resize_to or train_source.info.image_size
  if side is None:
    raise ConfigError(
        f'data set {config.dataset.name!r} has images of different sizes, so the '
        'mean image needs them rescaled: set --config.input.resize_to=256 (the '
        'paper), or --config.input.mean_image=False --config.input.pca_lighting_std=0')
  if side < config.model.image_size:
    raise ConfigError(f'images are {side}px, smaller than the {config.model.image_size}px crops: '
                      f'set --config.input.resize_to to at least {config.model.image_size}')
  return statistics.ensure(train_source, side, progress=jax.process_index() == 0,
                           workers=inp.workers)


def check_data(config, train_source) -> None:
  """The data set fits the config: as many classes as the model has outputs, at least a batch."""
  classes = train_source.num_classes
  if classes != config.model.num_classes:
    raise ConfigError(f'data set {config.dataset.name!r} has {classes} classes but '
                      f'model.num_classes={config.model.num_classes}; set '
                      f'--config.model.num_classes={classes}')
  if len(train_source) < config.batch_size:
    raise ConfigError(f'the training split has {len(train_source)} examples, fewer than one '
                      f'batch of {config.batch_size}; lower --config.batch_size')


def train_batches(config, train_source, mesh, start_step: int = 0) -> pipeline.DevicePrefetch:
  """This process's training batches with ``config.input``'s augmentation from the one after step
  ``start_step`` on (the same for any process count), arriving on ``mesh`` ``prefetch_batches``
  ahead of the step."""
  inp = config.input
  return pipeline.DevicePrefetch(
      iter(
          pipeline.train_dataset(train_source, global_batch_size=config.batch_size,
                                 crop_size=config.model.image_size, seed=config.seed,
                                 start_batch=start_step, shards=mesh.shape[sharding.DATA],
                                 host_shards=sharding.host_shards(mesh), workers=inp.workers,
                                 resize_to=inp.resize_to, random_crop=inp.random_crop,
                                 flip=inp.flip, pca_std=inp.pca_lighting_std,
                                 worker_priority=inp.worker_priority)),
      put=lambda b: sharding.put_batch(b, mesh), size=inp.prefetch_batches)


def eval_batches(config, eval_source, mesh):
  """This process's rows of the evaluation batches on ``mesh`` (views, padding masks): iterate it
  afresh for every pass."""
  inp = config.input
  return pipeline.eval_dataset(eval_source, global_batch_size=config.eval_batch_size,
                               crop_size=config.model.image_size, shards=mesh.shape[sharding.DATA],
                               host_shards=sharding.host_shards(mesh), workers=inp.workers,
                               resize_to=inp.resize_to, views=inp.eval_views)
