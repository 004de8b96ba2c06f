"""Imports a network another framework released into this framework's checkpoint format:

    python -m alexnet_jax.import_weights --file=bvlc_alexnet.caffemodel --workdir=runs/bvlc_alexnet
    python -m alexnet_jax.import_weights --file=resnet50-0676ba61.pth --workdir=runs/resnet50

``--source`` (caffe | torchvision) is read from the file's suffix and ``--model`` (the release,
``weights.layouts.RELEASES``) from its tensor names unless given. The workdir then holds one
checkpoint (step 0) whose config is the release's exact architecture (its widths and class
count read from the file) and the input convention it was trained with — channel order, pixel
scale and mean, crop size — so ``evaluate``, ``features``, ``transfer``, ``visualize`` and
``main`` (fine-tuning through ``config.init``) read it like any checkpoint of ours and normalise
its input as it was trained.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from alexnet_jax import checkpointing, cli, configs, distributed, optim, steps, storage
from alexnet_jax import program as program_lib
from alexnet_jax.errors import ConfigError, DirectoryError
from alexnet_jax.weights import WeightFileError, caffe_format, layouts, tensor_files

SOURCES = ('caffe', 'torchvision')
_SUFFIXES = {
    '.caffemodel': 'caffe', '.pth': 'torchvision', '.pt': 'torchvision', '.bin': 'torchvision',
    '.safetensors': 'torchvision'
}


def source_for(path: str, source: str | None) -> str:
  if source:
    if source not in SOURCES:
      raise ConfigError(f'--source={source}: choose one of {", ".join(SOURCES)}')
    return source
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _SUFFIXES:
    raise ConfigError(f'cannot tell the source of {path} from its suffix: pass --source='
                      f'{"|".join(SOURCES)}')
  return _SUFFIXES[suffix]


def read_tensors(path: str, source: str) -> dict[str, np.ndarray]:
  """The file's tensors by name: torchvision's state-dict keys, or Caffe's ``<layer> blobs[i]``."""
  if source == 'torchvision':
    return tensor_files.read_state_dict(path)
  net = caffe_format.read_caffemodel(path)
  order = [layer.name for layer in net.layers]
  if 'pool1' in order and 'norm1' in order and order.index('pool1') < order.index('norm1'):
    # bvlc_reference_caffenet: AlexNet's tensors, names and shapes, but pooling before its
    # normalisation; imported as bvlc_alexnet it would compute another function.
    raise WeightFileError(f'{path} pools before it normalises (pool1 before norm1): it is '
                          "Caffe's CaffeNet (bvlc_reference_caffenet), not bvlc_alexnet, and this "
                          'importer has no CaffeNet model')
  return {
      f'{layer.name} blobs[{i}]': b for layer in net.with_blobs() for i, b in enumerate(layer.blobs)
  }


def release_for(source: str, model: str | None, tensors: dict) -> layouts.Release:
  if model is None:
    model = layouts.detect(source, tensors)
    if model is None:
      raise WeightFileError(f'this file is none of the {source} releases this importer knows '
                            f'(its first tensor: {next(iter(tensors), "none")!r}); if it is one, '
                            f'name it with --model ({", ".join(layouts.names(source))})')
  release = layouts.RELEASES.get(model)
  if release is None or release.source != source:
    raise ConfigError(f'--model={model} is not a {source} release; choose from '
                      f'{", ".join(layouts.names(source))}')
  return release


def release_config(release: layouts.Release, tensors: dict):
  """The config of the release: its model, widths and class count as the file has them, and its
  input convention."""
  c = configs.base_config()
  fields = dict(release.model)
  name = fields.pop('name')
  first = layouts.rows(release, tensors, release.first)
  fields['width'] = first / release.base_width
  fields['num_classes'] = layouts.rows(release, tensors, release.classifier)
  if name == 'googlenet':
    fields['aux_heads'] = 'loss1/conv blobs[0]' in tensors
  c.model = configs.model_config(name, **fields)
  towers = int(c.model.get('towers', 1))
  c.mesh.data, c.mesh.model = -1, towers
  # A CPU-only host splits itself into the towers' devices; accelerators are left as they are.
  c.emulate_cpu_devices = towers if towers > 1 else 0
  c.input.update(**release.input)
  c.eval_batch_size = 64 * towers
  c.batch_size = 64 * towers
  return c


def file_digest(path: str) -> str:
  h = hashlib.sha256()
  with storage.path(path).open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      h.update(chunk)
  return h.hexdigest()


def write_checkpoint(config, converted: dict, workdir: str, imported: dict) -> None:
  """One checkpoint at step 0 in ``workdir`` with the converted parameters, as training writes
  them (its program's shardings, its checksums, the config in its meta)."""
  prog = program_lib.build_program(config, steps_per_epoch=1)
  # The state a run starting from these weights would have, built without running the model's
  # initialiser (compiling it for a full-size network takes longer than the rest of the import).
  params = jax.device_put(converted['params'], prog.state_shardings.params)
  state = steps.TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), prog.state_shardings.step), params=params,
      opt_state=jax.device_put(prog.tx.init(params), prog.state_shardings.opt_state),
      rng=jax.device_put(jax.random.key_data(jax.random.key(config.seed + 1)),
                         prog.state_shardings.rng),
      batch_stats=jax.device_put(converted['batch_stats'], prog.state_shardings.batch_stats))
  plateau = optim.PlateauController(factor=config.optim.plateau_factor,
                                    patience=config.optim.plateau_patience,
                                    threshold=config.optim.plateau_threshold,
                                    max_drops=config.optim.max_drops)
  meta = dict(epoch=0, step=0, plateau=plateau.state_dict(), val={}, config=configs.to_dict(config),
              imported=imported)
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), config.checkpoint, 1)
  try:
    checkpointing.save(manager, 0, state, meta)
    checkpointing.wait(manager)
  finally:
    manager.close()


def abstract_variables(config) -> dict:
  model = nnx.eval_shape(lambda: program_lib.create_model(config.model, nnx.Rngs(0)))
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return dict(params=nnx.to_pure_dict(params), batch_stats=nnx.to_pure_dict(stats))


def _refuse_existing(workdir: str) -> None:
  directory = storage.path(workdir) / 'checkpoints'
  if directory.exists() and any(directory.iterdir()):
    raise DirectoryError(f'--workdir={workdir} already holds checkpoints; import into a new '
                         'directory (nothing was changed)')


def import_tensors(tensors: dict, release: layouts.Release, path: str, workdir: str) -> dict:
  """Converts and writes; returns what was imported (also stored in the checkpoint's meta) and
  the config."""
  config = release_config(release, tensors)
  configs.check_fields(config)
  converted = layouts.convert(release, dict(config.model), tensors, abstract_variables(config))
  imported = dict(source=release.source, model=release.name, description=release.description,
                  file=os.path.abspath(path) if storage.is_local(path) else path,
                  sha256=file_digest(path), tensors=len(tensors),
                  parameters=int(sum(np.size(x) for x in jax.tree.leaves(converted['params']))))
  write_checkpoint(config, converted, workdir, imported)
  return dict(imported, config=config)


def import_file(path: str, workdir: str, *, source: str | None = None,
                model: str | None = None) -> dict:
  """``import_tensors`` of the file ``path``: its source from its suffix and its release from its
  tensor names unless given."""
  source = source_for(path, source)
  _refuse_existing(workdir)
  tensors = read_tensors(path, source)
  return import_tensors(tensors, release_for(source, model, tensors), path, workdir)


_FILE = flags.DEFINE_string(
    'file', None, 'The released weights: a .caffemodel, .pth or '
    '.safetensors file (a local path or a URL).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where to write the checkpoint (a new directory).')
_SOURCE = flags.DEFINE_enum('source', None, list(SOURCES), 'caffe or torchvision (default: from '
                            "the file's suffix).")
_MODEL = flags.DEFINE_string(
    'model', None,
    'The release (default: read from the tensor names): ' + ', '.join(layouts.RELEASES))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _FILE.value or not _WORKDIR.value:
    raise app.UsageError('--file=the released weights and --workdir=a new directory are required')
  cli.writable_directory(_WORKDIR.value, '--workdir')
  source = source_for(_FILE.value, _SOURCE.value)
  _refuse_existing(_WORKDIR.value)
  # The towers' devices are set up before JAX starts, from the release the file is.
  tensors = read_tensors(_FILE.value, source)
  release = release_for(source, _MODEL.value, tensors)
  distributed.initialize(release_config(release, tensors))
  cli.quiet_orbax_info()
  done = import_tensors(tensors, release, _FILE.value, _WORKDIR.value)
  config = done['config']
  logging.info('imported %s', done)
  print(
      f'{done["description"]} ({done["parameters"]:,} parameters, {config.model.num_classes} '
      f'classes, input {config.model.image_size}² {config.input.channel_order.upper()}) → '
      f'{_WORKDIR.value}', flush=True)


if __name__ == '__main__':
  cli.run(main)
