"""The one place config defaults live: the paper's AlexNet recipe on ImageNet.

Config files in ``configs/`` call ``base_config()`` and change what differs (a model other than
AlexNet: ``c.model = model_config('vgg', variant='E')``); every field can also be overridden on the
command line (``--config.optim.learning_rate=0.02``). Code reads fields directly, never with a
default of its own. ``config.model``'s fields and defaults are those of the model's spec
(``models.spec_defaults``), so each field has exactly one default there too.

``check_fields`` refuses a config that names a field no code reads (a typo in a config file would
otherwise be ignored); entry points lock the config, so a command-line override naming one is
refused by ml_collections itself. It also refuses a value outside the field's declared range
(``VALUE_RANGES``, ``MODEL_RANGES``, ``CHOICES``), before any device, data set or workdir is
touched: a run must not end, hours later or at once, having trained nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

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
          max_bad_fraction=0.01,
          # Part of the data set (data.catalog.open_source), for transfer learning: classes, the
          # class indices to keep (() : all), relabelled 0..k-1 in the order given; subset_file,
          # None or '' (whole splits) or a JSON file {"<split>": {"<split of the data set>":
          # [record indices, ...], ...}, ...}: the split so named is those records, in that order
          # (classes then apply to them). Both are checked against the data set when it is opened.
          classes=(),
          subset_file=ml_collections.FieldReference(None, field_type=str)))

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
          # The order in which the network reads its input's colour channels: 'rgb', or 'bgr' for
          # networks trained with OpenCV-decoded images (Caffe's model zoo). Images travel as RGB
          # and mean_rgb / std_rgb are per R, G, B whatever the order; normalisation reorders.
          channel_order='rgb',
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
  # Fine-tuning (alexnet_jax.warm_start): a run without checkpoints of its own starts from the
  # weights of checkpoint `step` (None: the latest) of another run: `checkpoint`, its workdir or
  # checkpoints/ folder (None or '': random initialisation). `classifier`: 'auto' copies the
  # classifier where its shapes fit and initialises it afresh where the class count differs,
  # 'copy' requires it to fit, 'reset' always initialises it afresh. `freeze_through`: a layer of
  # the model's `layer_names` ('conv5', 'fc7'); it and every layer before it get no updates and no
  # weight decay (None or '': nothing frozen; applies with or without `checkpoint`).
  c.init = ml_collections.ConfigDict(
      dict(checkpoint=ml_collections.FieldReference(None, field_type=str),
           step=ml_collections.FieldReference(None, field_type=int), classifier='auto',
           freeze_through=ml_collections.FieldReference(None, field_type=str)))
  return c


def paper_recipe(name: str) -> ml_collections.ConfigDict:
  """Each paper's own network and training recipe on ImageNet (what ``configs/two_gpu.py``,
  ``zfnet.py``, ``vgg.py``, ``googlenet.py`` and ``resnet.py`` train): ``'alexnet'`` (two towers,
  one per device of a 1 x 2 mesh), ``'zfnet'``, ``'vgg'`` (D), ``'googlenet'``, ``'resnet'`` (50).
  Every device left splits the batch."""
  c = base_config()
  if name == 'alexnet':
    c.mesh.data, c.mesh.model = 1, 2
    return c
  c.mesh.data, c.mesh.model = -1, 1
  if name == 'zfnet':
    c.model = model_config('zfnet', weight_std=0.01, init='paper')
    c.batch_size, c.num_epochs = 128, 70
    c.optim.update(learning_rate=0.01, momentum=0.9, filter_rms_clip=0.1)
  elif name == 'vgg':
    c.model = model_config('vgg', variant='D', init='glorot')
    c.batch_size, c.num_epochs = 256, 74
    c.optim.update(learning_rate=0.01, momentum=0.9, weight_decay=5e-4)
  elif name == 'googlenet':
    c.model = model_config('googlenet', aux_heads=True, aux_loss_weight=0.3)
    c.batch_size, c.num_epochs = 256, 60
    # Szegedy et al.: the learning rate x 0.96 every 8 epochs.
    c.optim.update(learning_rate=0.01, momentum=0.9, weight_decay=2e-4, schedule='step',
                   step_epochs=tuple(range(8, 60, 8)), step_factor=0.96)
  elif name == 'resnet':
    c.model = model_config('resnet', depth=50)
    c.batch_size, c.num_epochs = 256, 90
    c.optim.update(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule='plateau')
  else:
    raise ConfigError(f'no paper recipe for {name!r}; there are: alexnet, zfnet, vgg, googlenet, '
                      'resnet')
  return c


def to_dict(config) -> dict:
  """``config`` as plain JSON values (tuples become lists): what a checkpoint stores of the run
  that wrote it (``from_dict`` reads it back)."""
  return _plain(config.to_dict())


def _plain(value):
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """The config ``to_dict`` wrote, rebuilt on ``base_config()`` (and the named model's spec), so
  its fields have their types (tuples, optional strings) and a field added since it was written
  takes its default. A field it names that no longer exists is refused (``ConfigError``)."""
  config = base_config()
  model = dict(values.get('model', {}))
  config.model = model_config(model.pop('name', 'alexnet'))
  _fill(config, {k: v for k, v in values.items() if k != 'model'}, 'config')
  _fill(config.model, model, 'config.model')
  return config


def _fill(section: ml_collections.ConfigDict, values: dict, path: str) -> None:
  for key, value in values.items():
    if key not in section:
      raise ConfigError(f'the stored config names {path}.{key}, which is not a config field '
                        '(written by another version?): pass --config=the config file it was '
                        'trained with')
    current = section[key]
    if isinstance(current, ml_collections.ConfigDict):
      _fill(current, value, f'{path}.{key}')
    elif isinstance(current, tuple) and isinstance(value, list):
      section[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    else:
      with section.ignore_type():
        section[key] = value


def check_fields(config) -> None:
  """Refuses (``ConfigError``, one line) a config naming a field that ``base_config`` does not
  have, or lacking one that it has, or with a value out of range (``check_values``).
  ``config.model`` may leave out fields (its spec's defaults fill them) but may name only fields of
  the model's spec."""
  models.spec_from_config(config.model)
  _compare(config, base_config(), 'config')
  check_values(config)


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


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a numeric field may take: numbers in ``interval`` (written ``'[0, 1)'``,
  ``'(0, inf)'``; NaN and infinities are never in one), and ``also``, or None where ``none``.
  ``length``: a sequence of exactly that many such numbers; ``sequence``: of any length,
  ``increasing``: each larger than the one before."""
  interval: str
  also: tuple = ()
  none: bool = False
  length: int | None = None
  sequence: bool = False
  increasing: bool = False

  def _bounds(self):
    low, high = (float(b) for b in self.interval[1:-1].split(','))
    return low, high, self.interval[0] == '[', self.interval[-1] == ']'

  def _number_ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
      return False
    if v in self.also:
      return True
    low, high, low_closed, high_closed = self._bounds()
    above = low <= v if low_closed else low < v
    below = v <= high if high_closed else v < high
    return above and below and math.isfinite(v)

  def contains(self, value) -> bool:
    if value is None:
      return self.none
    if not (self.sequence or self.length):
      return self._number_ok(value)
    if isinstance(value, (str, bytes)) or not hasattr(value, '__len__'):
      return False
    if self.length is not None and len(value) != self.length:
      return False
    if self.increasing and any(b <= a for a, b in zip(value, value[1:])):
      return False
    return all(self._number_ok(v) for v in value)

  def __str__(self) -> str:
    low, high, low_closed, high_closed = self._bounds()
    if math.isinf(low) and math.isinf(high):
      allowed = 'a finite number'
    elif math.isinf(high):
      allowed = f'{">=" if low_closed else ">"} {low:g}'
    else:
      allowed = f'in {self.interval}'
    alternatives = [repr(a) for a in self.also] + (['None'] if self.none else [])
    if self.length is not None:
      allowed = f'{self.length} values, each {allowed}'
    elif self.sequence:
      allowed = f'{"increasing values" if self.increasing else "values"}, each {allowed}'
    return ' or '.join(alternatives + [allowed])


_POSITIVE = Range('[1, inf)')  # a count
_NON_NEGATIVE = Range('[0, inf)')
_ABOVE_ZERO = Range('(0, inf)')
_FRACTION = Range('[0, 1)')  # a probability or momentum that must leave something
_SCALE_DOWN = Range('(0, 1]')  # a factor that shrinks (1: keeps) without reaching 0
_SEED = Range('[0, 4294967295]')  # grain takes seeds of 32 bits

# Every numeric field of base_config() outside config.model, by its path below config.
VALUE_RANGES = {
    'seed': _SEED,
    'mesh.data': Range('[1, inf)', also=(-1,)),  # -1: every device left
    'mesh.model': _POSITIVE,
    'emulate_cpu_devices': _NON_NEGATIVE,
    'dataset.num_train': _POSITIVE,
    'dataset.num_val': _POSITIVE,
    'dataset.image_size': _POSITIVE,
    'dataset.seed': _SEED,
    'dataset.max_bad_fraction': Range('[0, 1]'),
    # dataset.classes (() : all) is checked where the data set is opened (data.catalog), against
    # its class count, as dataset.subset_file is against its splits.
    'input.mean_rgb': Range('(-inf, inf)', length=3),
    'input.std_rgb': Range('(0, inf)', length=3),
    'input.workers': _NON_NEGATIVE,
    'input.prefetch_batches': _NON_NEGATIVE,
    'input.resize_to': Range('[1, inf)', none=True),  # None: the images as stored
    'input.pca_lighting_std': _NON_NEGATIVE,
    'batch_size': _POSITIVE,
    'eval_batch_size': _POSITIVE,
    # train.py runs int(num_epochs * steps_per_epoch) steps: an int field, so at least one epoch.
    'num_epochs': _POSITIVE,
    'optim.learning_rate': _ABOVE_ZERO,
    'optim.momentum': _FRACTION,
    'optim.weight_decay': _NON_NEGATIVE,
    'optim.plateau_factor': _SCALE_DOWN,
    'optim.plateau_patience': _NON_NEGATIVE,
    'optim.plateau_threshold': _NON_NEGATIVE,
    'optim.max_drops': _NON_NEGATIVE,
    # Boundaries of a piecewise-constant schedule: a repeated epoch would merge two drops.
    'optim.step_epochs': Range('[0, inf)', sequence=True, increasing=True),
    'optim.step_factor': _SCALE_DOWN,
    'optim.warmup_epochs': _NON_NEGATIVE,
    'optim.filter_rms_clip': _NON_NEGATIVE,  # 0: off
    'log_every_steps': _POSITIVE,
    'eval_every_epochs': _POSITIVE,
    'checkpoint.every_epochs': _POSITIVE,
    'checkpoint.keep': _POSITIVE,
    'checkpoint.keep_epochs': Range('[0, inf)', sequence=True),
    'visualize.every_epochs': _NON_NEGATIVE,  # 0: never
    'visualize.images': _POSITIVE,
    # init.step (None: the latest) is checked against the steps its checkpoint holds
    # (trained.resolve_step), where the checkpoint is read.
}

# The numeric fields of every model's spec, by field name (the same name means the same thing in
# every spec). What depends on the model or on other fields (AlexNet's smallest image, VGG's
# variants, ResNet's depths) is the spec's own ``validate``.
MODEL_RANGES = {
    'towers': _POSITIVE,
    'num_classes': _POSITIVE,
    'image_size': _POSITIVE,
    'width': _ABOVE_ZERO,
    'dropout': _FRACTION,
    'aux_dropout': _FRACTION,
    'aux_loss_weight': _NON_NEGATIVE,
    'weight_std': _ABOVE_ZERO,
    'conv_widths': Range('[1, inf)', length=3),
    'fc_width': _POSITIVE,
    'remove': Range('[1, inf)', sequence=True),
    'depth': _POSITIVE,
    'bn_momentum': _FRACTION,
    'lrn_k': _ABOVE_ZERO,  # LRN's additive constant (AlexNet, GoogLeNet)
    'pool_window': _POSITIVE,  # AlexNet's max-pools
    'pool_stride': _POSITIVE,
}

# The string fields that name one of a few options, and their options. Their owners: optim
# (learning_rate_schedule), program.COMPUTE_DTYPES, data.augment (view_windows),
# data.pipeline.WORKER_PRIORITIES and warm_start.CLASSIFIER_MODES; tests/test_configs.py and
# tests/test_finetune.py check that they agree.
CHOICES = {
    'compute_dtype': ('float32', 'bfloat16'),
    'optim.schedule': ('plateau', 'step', 'cosine'),
    'input.eval_views': ('ten', 'center'),
    'input.channel_order': ('rgb', 'bgr'),
    'input.worker_priority': ('normal', 'low', 'idle'),
    'init.classifier': ('auto', 'copy', 'reset'),
}


def check_values(config) -> None:
  """Refuses (``ConfigError``, one line) a value outside its field's declared range or choices."""
  for path, allowed in CHOICES.items():
    value = _get(config, path)
    if value not in allowed:
      raise ConfigError(f'config.{path}={value!r} is not one of: '
                        f'{", ".join(map(repr, allowed))}')
  checks = [(path, _get(config, path), r) for path, r in VALUE_RANGES.items()]
  checks += [(f'model.{k}', config.model[k], MODEL_RANGES[k])
             for k in config.model.keys()
             if k in MODEL_RANGES]
  for path, value, allowed in checks:
    if not allowed.contains(value):
      raise ConfigError(f'config.{path}={_shown(value)} is out of range: must be {allowed}')


def _get(config, path: str):
  for key in path.split('.'):
    config = config[key]
  return config


def _shown(value) -> str:
  return repr(tuple(value)) if isinstance(value, list) else repr(value)
