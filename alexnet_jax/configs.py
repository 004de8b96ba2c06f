"""The one place config defaults live: the paper's AlexNet recipe on ImageNet.

Config files in ``configs/`` call ``base_config()`` and change what differs (a model other than
AlexNet: ``c.model = model_config('vgg', variant='E')``); every field can also be overridden on the
command line (``--config.optim.learning_rate=0.02``). Code reads fields directly, never with a
default of its own. ``config.model``'s fields and defaults are those of the model's spec
(``models.spec_defaults``), so each field has exactly one default there too.

``check_fields`` refuses a config that names a field no code reads (a typo in a config file would
otherwise be ignored); entry points lock the config, so a command-line override naming one is
refused by ml_collections itself.
"""

from __future__ import annotations

import ml_collections

from alexnet_jax import models
from alexnet_jax.errors import ConfigError

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
# The paper's pixel scale: raw values minus the mean (its N(0, 0.01) weights and LRN's k = 2 are
# tuned to inputs of that size), no division by a standard deviation.
RAW_PIXEL_SCALE = (1.0, 1.0, 1.0)


def model_config(name: str = 'alexnet', **overrides) -> ml_collections.ConfigDict:
  """``config.model`` for the model ``name``: its spec's fields with their defaults, then
  ``overrides`` (which must be fields of that spec)."""
  fields = models.spec_defaults(name)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ConfigError(f'model {name!r} has no field {unknown[0]!r}; its fields: '
                      f'{", ".join(fields)}')
  return ml_collections.ConfigDict(dict(name=name, **{**fields, **overrides}))


def dataset_config(**overrides) -> ml_collections.ConfigDict:
  """``config.dataset`` with ``overrides``, for code that opens a data set without a config."""
  c = base_config().dataset
  c.update(**overrides)
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = model_config('alexnet')

  # data x model devices; data=-1 takes every device left. The model axis carries the towers.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=2))
  # On a machine with only a CPU, split it into this many XLA devices (0: leave it alone).
  c.emulate_cpu_devices = 0

  c.dataset = ml_collections.ConfigDict(
      dict(
          name='imagenet2012',
          data_dir=ml_collections.FieldReference(None, field_type=str),
          train_split='train',
          eval_split='validation',
          # Only for the built-in set: how many images to generate, and their size.
          num_train=10000,
          num_val=2000,
          image_size=112,
          seed=0,
          max_bad_fraction=0.01))

  # The paper's input recipe (data.augment, steps.normalize): shorter side to 256 and the central
  # square (once at prepare time; at read time for TFDS sets), subtract the training set's mean
  # image (mean_image=False: mean_rgb instead), random crops (random_crop=False: central ones) and
  # their reflections, PCA colour shifts with alpha ~ N(0, pca_lighting_std) (0: off), and
  # evaluation on the 10 views ('ten') or the centre crop ('center'). Pixels are then divided by
  # std_rgb: (1, 1, 1) keeps the paper's raw pixel scale (IMAGENET_STD_RGB gives the unit-variance
  # inputs of later recipes). Batches travel as uint8 and are normalised on the device;
  # prefetch_batches wait there ahead of the step.
  c.input = ml_collections.ConfigDict(
      dict(
          mean_rgb=IMAGENET_MEAN_RGB,
          std_rgb=RAW_PIXEL_SCALE,
          workers=4,
          prefetch_batches=2,
          resize_to=ml_collections.FieldReference(256, field_type=int),
          mean_image=True,
          random_crop=True,
          flip=True,
          pca_lighting_std=0.1,
          eval_views='ten',
          # How training input workers share the CPU with the steps
          # (data.pipeline.WORKER_PRIORITIES): 'normal', 'low' (nice 19) or 'idle' (SCHED_IDLE:
          # only the cycles the compute leaves idle;
          # for CPU training, see configs/demo.py).
          worker_priority='low'))

  c.batch_size = 128  # global, over all devices and hosts
  c.eval_batch_size = 256
  c.num_epochs = 90
  c.compute_dtype = 'float32'

  c.optim = ml_collections.ConfigDict(
      dict(
          learning_rate=0.01,
          momentum=0.9,
          weight_decay=0.0005,
          decay_biases=True,
          schedule='plateau',  # plateau | step | cosine
          plateau_factor=0.1,
          plateau_patience=1,
          plateau_threshold=1e-3,
          max_drops=3,
          step_epochs=(30, 60, 80),
          step_factor=0.1,
          warmup_epochs=0,
          # > 0: after every update, rescale each conv filter whose RMS exceeds this (ZFNet: 0.1).
          filter_rms_clip=0.0))

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  # keep_epochs: checkpoints kept for good at these epochs (Zeiler & Fergus's feature evolution).
  c.checkpoint = ml_collections.ConfigDict(
      dict(every_epochs=1, keep=3, keep_best=True, async_save=True,
           keep_epochs=(1, 2, 5, 10, 20, 30, 40, 64)))
  # Every N epochs (0: never) write the first-layer filters and a few deconvnet projections to
  # <workdir>/visualize/ and TensorBoard, to watch the features form.
  c.visualize = ml_collections.ConfigDict(dict(every_epochs=0, images=4))
  return c


def check_fields(config) -> None:
  """Refuses (``ConfigError``, one line) a config naming a field that ``base_config`` does not
  have, or lacking one that it has. ``config.model`` may leave out fields (its spec's defaults
  fill them) but may name only fields of the model's spec."""
  models.spec_from_config(config.model)
  _compare(config, base_config(), 'config')


def _compare(config, reference, path: str) -> None:
  extra = sorted(set(config.keys()) - set(reference.keys()))
  if extra:
    raise ConfigError(f'{path}.{extra[0]} is not a config field; the fields of {path}: '
                      f'{", ".join(reference.keys())}')
  missing = sorted(set(reference.keys()) - set(config.keys()))
  if missing:
    raise ConfigError(f'{path} lacks the field {missing[0]!r}: build configs with '
                      'configs.base_config()')
  for key in reference.keys():
    if key == 'model' and path == 'config':
      continue  # checked against the model's spec
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f'{path}.{key} must be a section of fields, got {config[key]!r}')
      _compare(config[key], reference[key], f'{path}.{key}')
