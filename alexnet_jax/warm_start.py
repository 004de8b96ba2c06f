"""Fine-tuning: a training run that starts from another run's weights (``config.init``).

``warm_start`` takes the freshly initialised ``TrainState`` of a run without checkpoints of its own
and copies into it the parameters and batch-norm statistics of checkpoint ``init.step`` of
``init.checkpoint``, tensor by tensor where their names and shapes match. The source is read with
the config it was trained with (stored in its checkpoints, ``trained.stored_config``), through a
program of that config on this run's mesh: every array is verified against its checksum
(``checkpointing.restore``) and lands directly on this run's sharding (a checkpoint of any mesh
restores onto any other). The classifier — the model's last layer and every tensor whose shape
follows the class count (GoogLeNet's auxiliary classifiers' last layers) — follows
``init.classifier``. Any other tensor that is missing, extra or of another shape is refused in one
line. The optimiser state (momentum) and the step start afresh; the run's own seed draws its
dropout. Frozen layers (``init.freeze_through``) are the optimiser's business (``optim``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import checkpointing, optim, trained
from alexnet_jax import program as program_lib
from alexnet_jax.errors import CheckpointError, ConfigError
from alexnet_jax.models import create_model

# config.init.classifier: copy it where its shapes fit (else initialise it afresh), require it to
# fit, or always initialise it afresh. configs.CHOICES lists the same (tests/test_finetune.py).
CLASSIFIER_MODES = ('auto', 'copy', 'reset')


@dataclasses.dataclass(frozen=True)
class Summary:
  """What a warm start did, for the one line the training log gets."""
  source: str | None  # the checkpoint directory, None for a random initialisation
  step: int | None
  source_model: str | None
  copied: tuple[str, ...]  # the layers whose tensors were copied (some or all), in run order
  copied_aside: tuple[str, ...]  # and the parts outside the run order (GoogLeNet's aux1, aux2)
  tensors: int  # tensors copied (parameters and batch-norm statistics)
  reset: tuple[str, ...]  # the classifier's modules initialised afresh (fc8; fc, aux1.fc2, ...)
  reason: str  # why the classifier was initialised afresh ('' when copied)
  frozen: tuple[str, ...]  # frozen layers, in run order

  def line(self) -> str:
    frozen = _span(self.frozen) or 'nothing'
    if self.source is None:
      return f'random initialisation; frozen: {frozen}'
    reset = (f'; initialised afresh: {", ".join(self.reset)} ({self.reason})'
             if self.reset else '; the classifier copied too')
    return (f'fine-tuning from {self.source} at step {self.step} ({self.source_model}): copied '
            f'{self.tensors} tensors of {", ".join((_span(self.copied), *self.copied_aside))}'
            f'{reset}; frozen: {frozen}; the '
            'optimiser state and the step start afresh')


def _span(layers) -> str:
  """Consecutive layers of the run order, ``conv1..fc7`` (or the one or two of them)."""
  return f'{layers[0]}..{layers[-1]}' if len(layers) > 2 else ', '.join(layers)


def _name(path) -> str:
  """``fc8.kernel``, ``conv2_1.bns.0.scale``: a tensor's path in the parameter tree."""
  parts = []
  for key in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '.'.join(parts)


def _flat(tree) -> dict[str, Any]:
  return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def classifier_tensors(model_cfg) -> set[str]:
  """The names (``_name``) of the classifier's parameters: those of the model's last layer
  (``layer_names[-1]``: ``fc8``, ``fc``) and every other one whose shape follows
  ``num_classes`` (GoogLeNet's ``aux1.fc2``, ``aux2.fc2``)."""

  def params(cfg):
    model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0)))
    return model, _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  model, shapes = params(model_cfg)
  other_cfg = dict(model_cfg)
  other_cfg['num_classes'] = model_cfg['num_classes'] + model.spec.towers  # still divisible
  _, other = params(other_cfg)
  last = model.layer_names[-1]
  names = {n for n in shapes if optim.layer_of(n.split('.')[0], model.layer_names) == last}
  return names | {n for n, x in shapes.items() if other[n].shape != x.shape}


def _model_difference(source_model, model) -> str:
  """Why the source's tensors may not fit: its network, or the first fields it was trained with
  that differ from this run's (beside the class count)."""
  if source_model.name != model.name:
    return (f'the checkpoint holds model.name={source_model.name!r} and this run trains '
            f'model.name={model.name!r}: start from a checkpoint of this network')
  differ = [
      k for k in model.keys() if k not in ('name', 'num_classes') and k in source_model and
      _plain(source_model[k]) != _plain(model[k])
  ]
  if not differ:
    return 'start from a checkpoint of this network'
  shown = ', '.join(
      f'model.{k}={_plain(source_model[k])!r} (this run: {_plain(model[k])!r})' for k in differ[:3])
  return (f'the checkpoint was trained with {shown}: pass the same --config.model fields, or '
          'start from a checkpoint of this network')


def _plain(value):
  return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fits(sharding: NamedSharding, shape) -> bool:
  """Whether each dimension of ``shape`` splits evenly over the mesh axes ``sharding`` names."""
  for size, axes in zip(shape, sharding.spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    devices = 1
    for axis in axes:
      devices *= sharding.mesh.shape[axis]
    if size % devices:
      return False
  return True


def _placed(source_abstract, target_abstract, mesh):
  """The source's abstract state with each array placed where it is needed on ``mesh``: where this
  run has an array of the same path and shape, on that array's sharding (so a copied tensor needs
  no move); else on the source's own sharding where it fits, else replicated."""
  target = _flat(target_abstract)

  def place(path, leaf):
    want = target.get(_name(path))
    if want is not None and tuple(want.shape) == tuple(leaf.shape):
      sharding = want.sharding
    elif _fits(leaf.sharding, leaf.shape):
      sharding = leaf.sharding
    else:
      sharding = NamedSharding(mesh, P())
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(place, source_abstract)


def _source(path: str, step: int | None):
  """The checkpoint directory, step and stored config of ``config.init``'s source."""
  try:
    directory = trained.checkpoint_directory(path)
  except CheckpointError:
    raise CheckpointError(
        f'config.init.checkpoint={path!r} is no checkpoint directory: pass the '
        '--workdir of the run to start from (or its checkpoints/ folder)') from None
  step = trained.resolve_step(directory, step)
  source_config = trained.stored_config(directory, step)
  if source_config is None:
    raise CheckpointError(f'the checkpoint {directory}/{step} stores no config (written by an '
                          'older version): fine-tuning reads the network with the config it was '
                          'trained with, so start from a checkpoint written by this version')
  return directory, step, source_config


def _restore_config(source_config, mesh):
  """The source's config as a program restoring it on ``mesh`` needs it: its own, with batches that
  split over ``mesh`` (no step of it ever runs)."""
  config = source_config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = config.eval_batch_size = int(mesh.devices.size)
  return config


def _compare(source: dict, target: dict, classifier: set[str], source_config, config, where: str):
  """Refuses (``ConfigError``) the first tensor outside the classifier that is missing, extra or of
  another shape; returns the first classifier tensor that does not fit (None when all do), as
  ``(name, source shape, target shape)``."""
  model = config.model.name
  hint = _model_difference(source_config.model, config.model)
  for name, want in target.items():
    got = source.get(name)
    if name in classifier:
      continue
    if got is None:
      raise ConfigError(f"cannot fine-tune from {where}: this run's {model} has {name} (shape "
                        f'{tuple(want.shape)}) and the checkpoint has none; {hint}')
    if tuple(got.shape) != tuple(want.shape):
      raise ConfigError(f'cannot fine-tune from {where}: its {name} has shape {tuple(got.shape)} '
                        f"where this run's {model} needs {tuple(want.shape)}; {hint}")
  for name, got in source.items():
    if name not in target and name not in classifier:
      raise ConfigError(f'cannot fine-tune from {where}: it has {name} (shape {tuple(got.shape)}), '
                        f"which this run's {model} has not; {hint}")
  for name in sorted(classifier, key=list(target).index):
    got, want = source.get(name), target[name]
    if got is None or tuple(got.shape) != tuple(want.shape):
      return name, None if got is None else tuple(got.shape), tuple(want.shape)
  return None


def check_input_convention(source_config, config, where: str) -> None:
  """The weights were learnt on inputs normalised the source's way. Another channel order would
  feed the first layer the wrong colours: refused. Another mean or scale (a new data set's
  statistics, say) can be meant: said in a warning with the source's values."""
  src, run = source_config.input, config.input
  if src.channel_order != run.channel_order:
    raise ConfigError(f'{where} reads its colour channels as {src.channel_order.upper()}, this run '
                      f'as {run.channel_order.upper()}: pass --config.input.channel_order='
                      f'{src.channel_order}')
  fields = ('mean_rgb', 'std_rgb', 'mean_image')
  differ = [f for f in fields if _plain(src[f]) != _plain(run[f])]
  if differ:
    logging.warning(
        '%s was trained on inputs normalised with %s; this run uses %s (to match it: %s)', where,
        ', '.join(f'{f}={_plain(src[f])}' for f in differ),
        ', '.join(f'{f}={_plain(run[f])}' for f in differ),
        ' '.join(f"--config.input.{f}='{_plain(src[f])}'" for f in differ))


# Model fields a fine-tuning run may well set otherwise: they change training, not the function the
# weights compute.
_TRAINING_ONLY = ('num_classes', 'dropout', 'aux_dropout', 'aux_loss_weight', 'init', 'weight_std',
                  'bn_momentum')


def warn_model_differences(source_config, config, where: str) -> None:
  """Fields such as LRN's constant or where a bottleneck strides leave every tensor's shape as
  it is, so the copy cannot notice them: the weights would compute another function. Said, with
  the flags that match the source (a run may mean it)."""
  src, run = source_config.model, config.model
  if src.name != run.name:
    return
  differ = [
      f for f in src.keys()
      if f in run and f not in _TRAINING_ONLY and f != 'name' and _plain(src[f]) != _plain(run[f])
  ]
  if differ:
    logging.warning('%s was trained as %s; this run builds %s (to match it: %s)', where,
                    ', '.join(f'model.{f}={_plain(src[f])}' for f in differ),
                    ', '.join(f'model.{f}={_plain(run[f])}' for f in differ),
                    ' '.join(f"--config.model.{f}='{_plain(src[f])}'" for f in differ))


def warm_start(config, prog: program_lib.Program, state) -> tuple[Any, Summary | None]:
  """``state`` (this run's freshly initialised ``TrainState``, of ``prog``) with the weights of
  ``config.init``'s checkpoint, and what was done (None: nothing to say — no source, nothing
  frozen).

  Raises:
    ConfigError: a tensor of the source does not fit this run's network (or the classifier does
      not, with ``init.classifier='copy'``).
    CheckpointError: the source is missing, holds no such step, no config, or is damaged.
  """
  init = config.init
  frozen = optim.frozen_layers(config.model, init.freeze_through)[0]
  if not init.checkpoint:
    if not frozen:
      return state, None
    return state, Summary(source=None, step=None, source_model=None, copied=(), copied_aside=(),
                          tensors=0, reset=(), reason='', frozen=frozen)
  if init.classifier not in CLASSIFIER_MODES:  # configs.check_values refuses it first
    raise ConfigError(f'config.init.classifier={init.classifier!r} is not one of: '
                      f'{", ".join(map(repr, CLASSIFIER_MODES))}')
  directory, step, source_config = _source(init.checkpoint, init.step)
  where = f'{directory} (step {step})'
  check_input_convention(source_config, config, where)
  warn_model_differences(source_config, config, where)
  mesh = prog.mesh
  source_prog = program_lib.build_program(_restore_config(source_config, mesh), steps_per_epoch=1,
                                          mesh=mesh)
  abstract = source_prog.abstract_state
  kinds = ('params', 'batch_stats')
  source = {k: _flat(getattr(abstract, k)) for k in kinds}
  target = {k: _flat(getattr(prog.abstract_state, k)) for k in kinds}
  classifier = classifier_tensors(config.model)
  source_classes, classes = source_config.model.num_classes, config.model.num_classes
  misfit = None
  for kind in kinds:
    found = _compare(source[kind], target[kind], classifier if kind == 'params' else set(),
                     source_config, config, where)
    misfit = misfit or found
  if misfit is not None and init.classifier == 'copy':
    name, got, want = misfit
    raise ConfigError(
        f"config.init.classifier='copy', but the classifier of {where} does not fit: its {name} "
        f'has shape {got} where this run needs {want} ({source_classes} classes there, {classes} '
        "here); pass --config.init.classifier=auto (or 'reset') to initialise it afresh, or "
        f'--config.model.num_classes={source_classes}')
  reset = init.classifier == 'reset' or misfit is not None
  if init.classifier == 'reset':
    reason = "config.init.classifier='reset'"
  elif misfit is not None and source_classes != classes:
    reason = f'{source_classes} classes in the checkpoint, {classes} here'
  elif misfit is not None:
    reason = f'its {misfit[0]} has shape {misfit[1]}, this run needs {misfit[2]}'
  else:
    reason = ''

  with trained.read_only_manager(directory) as manager:
    restored = checkpointing.restore(manager, step, _placed(abstract, prog.abstract_state, mesh))
  copied_names: list[str] = []

  def take(kind):

    def pick(path, fresh):
      name = _name(path)
      if kind == 'params' and name in classifier and reset:
        return fresh
      copied_names.append(name)
      value = restored_flat[kind][name]
      return value if value.dtype == fresh.dtype else value.astype(fresh.dtype)

    return jax.tree_util.tree_map_with_path(pick, getattr(state, kind))

  restored_flat = {k: _flat(getattr(restored.state, k)) for k in kinds}
  new_state = state.replace(params=take('params'), batch_stats=take('batch_stats'))
  copied, aside = _layers(copied_names, prog.model.layer_names)
  # The classifier by its modules: fc8, or fc, aux1.fc2, aux2.fc2.
  modules = dict.fromkeys(
      n.rsplit('.', 1)[0] for n in sorted(classifier, key=list(target['params']).index))
  return new_state, Summary(source=directory, step=step,
                            source_model=f'{source_config.model.name}, {source_classes} classes',
                            copied=copied, copied_aside=aside, tensors=len(copied_names),
                            reset=tuple(modules) if reset else (), reason=reason, frozen=frozen)


def _layers(names, layer_names) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The layers (in run order) that tensors ``names`` belong to, and the parts outside the run
  order (GoogLeNet's auxiliary classifiers)."""
  tops = dict.fromkeys(n.split('.')[0] for n in names)
  owners = {optim.layer_of(t, layer_names) for t in tops}
  return (tuple(l for l in layer_names if l in owners),
          tuple(t for t in tops if optim.layer_of(t, layer_names) is None))
