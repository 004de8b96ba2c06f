"""A trained network's activations for every image of a split, written to disk as NumPy files:

    python -m alexnet_jax.features --checkpoint=WORKDIR --out=DIR --layers=fc7[,conv5,...] \
        [--pool=none|max|mean] [--split=train] [--views=center|ten] [--descriptor] [--scales=...]

``DIR`` then holds ``<layer>.npy`` (float32 or float16, one row per image), ``labels.npy``,
``index.npy`` (each row's record index in the split) and ``features.json`` (what was extracted,
from which checkpoint and data). Each array is written batch by batch as it is computed, so a split
of any size fits; read it back whole, memory-mapped, or in chunks (``FeatureSet``):

    feats = np.load('DIR/fc7.npy', mmap_mode='r')     # rows are read when touched
    for start, rows in FeatureSet('DIR').chunks('fc7', 10_000): ...

``--descriptor`` is VGG's (Simonyan & Zisserman, Appendix B): the last hidden layer averaged over
the ten views at each of ``--scales`` (shorter side; VGG: 256, 384, 512), then L2-normalised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from alexnet_jax import cli, distributed, inference, storage, trained
from alexnet_jax.data import catalog
from alexnet_jax.errors import ConfigError

META = 'features.json'
DTYPES = ('float32', 'float16')


class _NpyWriter:
  """One ``.npy`` file written row block by row block: the header (whose shape needs the row
  count, known beforehand, and the row width, known from the first block), then the raw rows.
  Written under a temporary name and renamed when complete, so an interrupted run never leaves a
  file that loads as if whole."""

  def __init__(self, path: str, rows: int, dtype: str):
    self.path, self.rows, self.dtype = path, rows, np.dtype(dtype)
    self.partial = path + '.partial'
    self._file = None
    self.written = 0

  def write(self, block: np.ndarray) -> None:
    block = np.ascontiguousarray(block.reshape(len(block), -1), dtype=self.dtype)
    if self._file is None:
      self._file = storage.path(self.partial).open('wb')
      header = dict(descr=np.lib.format.dtype_to_descr(self.dtype), fortran_order=False,
                    shape=(self.rows, block.shape[1]))
      np.lib.format.write_array_header_2_0(self._file, header)
    self._file.write(block.tobytes())
    self.written += len(block)

  def close(self) -> None:
    if self._file is None:
      self.write(np.zeros((0, 0), self.dtype))
    self._file.close()
    if self.written != self.rows:
      raise RuntimeError(f'{self.path}: wrote {self.written} rows of {self.rows}')
    storage.move(self.partial, self.path)


def l2_normalise(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, np.finfo(np.float32).tiny)


def what_to_extract(net: trained.Trained, layers: Sequence[str], *, pool: str, views: str,
                    descriptor: bool, scales: Sequence[int]) -> inference.Pass:
  """The pass for the layers asked for; the descriptor's is the last hidden layer, spatially
  averaged where it is a map, at every scale's ten views."""
  if descriptor:
    layer = inference.penultimate_layer(net.program.model)
    if layers and list(layers) != [layer]:
      raise ConfigError(f'--descriptor is the last hidden layer ({layer}); leave --layers out or '
                        f'name {layer}')
    return inference.Pass(views='ten', layers=(layer,), pool='mean', probabilities=False,
                          scales=tuple(scales))
  if not layers:
    raise ConfigError('name the layers to extract: --layers=fc7 (or --descriptor)')
  return inference.Pass(views=views, layers=tuple(layers), pool=pool, probabilities=False)


def extract(net: trained.Trained, source, what: inference.Pass, out_dir: str, *,
            dtype: str = 'float32', descriptor: bool = False,
            extra_meta: dict | None = None) -> dict:
  """Runs ``what`` over ``source`` and writes its layers, labels and indices into ``out_dir``
  (process 0 writes; every process computes). Returns the metadata written."""
  if dtype not in DTYPES:
    raise ConfigError(f'--dtype={dtype!r}: choose one of {", ".join(DTYPES)}')
  n = len(source)
  writing = jax.process_index() == 0
  if writing:
    storage.makedirs(out_dir)
  writers = {
      layer: _NpyWriter(os.path.join(out_dir, f'{layer}.npy'), n, dtype) for layer in what.layers
  }
  labels = np.zeros(n, np.int32)
  widths = {}
  timing = {}
  start_time = time.perf_counter()
  for start, out in inference.passes(net, source, what, timing=timing):
    labels[start:start + len(out['label'])] = out['label']
    for layer, w in writers.items():
      block = l2_normalise(out[layer]) if descriptor else out[layer]
      widths[layer] = int(block.shape[1])
      if writing:
        w.write(block)
  seconds = time.perf_counter() - start_time - timing.get('compile_seconds', 0.0)
  layer_files = {layer: dict(file=f'{layer}.npy', width=widths.get(layer, 0)) for layer in writers}
  meta = dict(checkpoint=net.path, step=net.step, model=net.config.model.name,
              dataset=net.config.dataset.name, split=source.info.split, count=n, layers=layer_files,
              pool=what.pool, views=what.views, scales=list(what.scales), descriptor=descriptor,
              dtype=dtype, class_names=list(source.class_names), images_per_second=n / seconds,
              compile_seconds=timing.get('compile_seconds'), **(extra_meta or {}))
  if writing:
    for w in writers.values():
      w.close()
    _save_npy(os.path.join(out_dir, 'labels.npy'), labels)
    _save_npy(os.path.join(out_dir, 'index.npy'), np.arange(n, dtype=np.int64))
    storage.write_text(os.path.join(out_dir, META), json.dumps(meta, indent=1) + '\n', atomic=True)
  return meta


def _save_npy(path: str, array: np.ndarray) -> None:
  with storage.path(path).open('wb') as f:
    np.save(f, array)


@dataclasses.dataclass
class FeatureSet:
  """A folder ``extract`` wrote: its metadata, labels, indices and layers (memory-mapped where it
  is local, so nothing is read until it is used)."""
  path: str

  def __post_init__(self):
    meta = os.path.join(self.path, META)
    if not storage.path(meta).exists():
      raise ConfigError(f'{self.path} holds no features ({META} is missing): write them with '
                        'python -m alexnet_jax.features')
    self.meta = json.loads(storage.read_text(meta))

  def _load(self, name: str, mmap: bool = True) -> np.ndarray:
    path = os.path.join(self.path, name)
    if storage.is_local(path) and mmap:
      return np.load(path, mmap_mode='r')
    with storage.path(path).open('rb') as f:
      return np.load(f)

  @property
  def labels(self) -> np.ndarray:
    return self._load('labels.npy', mmap=False)

  @property
  def index(self) -> np.ndarray:
    return self._load('index.npy', mmap=False)

  def array(self, layer: str) -> np.ndarray:
    if layer not in self.meta['layers']:
      raise ConfigError(f'{self.path} holds no layer {layer!r}; it holds '
                        f'{", ".join(self.meta["layers"])}')
    return self._load(self.meta['layers'][layer]['file'])

  def chunks(self, layer: str, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` blocks of at most ``size`` rows, each read when it is reached."""
    data = self.array(layer)
    for start in range(0, len(data), size):
      yield start, np.asarray(data[start:start + size])


# -- command line ---------------------------------------------------------------------------------


def _define_flags():
  cli.define_config_flag_from_checkpoint()
  cli.define_huge_pages_flag()
  flags.DEFINE_string('checkpoint', None, 'The training workdir (local path or gs:// URL).')
  flags.DEFINE_string('out', None, 'Output folder for <layer>.npy, labels.npy, index.npy, '
                      f'{META}.')
  flags.DEFINE_list('layers', None, "Layers to extract (the model's layer names, e.g. fc7).")
  flags.DEFINE_enum('pool', 'none', list(inference.POOLS),
                    'Maps: none (flattened), or their spatial max or mean per map.')
  flags.DEFINE_string('split', None, 'The split (default: config.dataset.eval_split).')
  flags.DEFINE_enum('views', 'center', ['center', 'ten'], 'centre crop, or the ten views averaged.')
  flags.DEFINE_bool(
      'descriptor', False, "VGG's descriptor: the last hidden layer over the ten "
      'views at every --scales, averaged, L2-normalised.')
  flags.DEFINE_list(
      'scales', None, '--descriptor: shorter sides (default: the input size times '
      "256/224, 384/224, 512/224 — VGG's 256, 384, 512 at 224).")
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Stored precision.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', lower_bound=0)


def default_scales(image_size: int) -> tuple[int, ...]:
  return tuple(round(image_size * q / 224) for q in (256, 384, 512))


def _scales(values, image_size: int) -> tuple[int, ...]:
  if not values:
    return default_scales(image_size)
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ConfigError(f'--scales={",".join(values)}: write comma-separated integers') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f.checkpoint or not f.out:
    raise app.UsageError('--checkpoint=the training workdir and --out=a folder are required')
  config = cli.checkpoint_config(f.checkpoint, f.step)
  cli.writable_directory(f.out, '--out')
  distributed.initialize(config)
  cli.quiet_orbax_info()
  net = trained.load(config, f.checkpoint, f.step)
  what = what_to_extract(net, f.layers or (), pool=f.pool, views=f.views, descriptor=f.descriptor,
                         scales=_scales(f.scales, config.model.image_size))
  split = f.split or config.dataset.eval_split
  source = catalog.open_source(config.dataset, split, min_side=config.input.resize_to,
                               progress=jax.process_index() == 0)
  meta = extract(net, source, what, f.out, dtype=f.dtype, descriptor=f.descriptor)
  logging.info('%d images at %.1f images/s', meta['count'], meta['images_per_second'])
  if jax.process_index() == 0:
    for layer, info in meta['layers'].items():
      print(
          f'{os.path.join(f.out, info["file"])}: {meta["count"]} x {info["width"]} '
          f'{meta["dtype"]}', flush=True)
    print(
        f'{meta["count"]} images of {meta["dataset"]}/{meta["split"]} at '
        f'{meta["images_per_second"]:.1f} images/s', flush=True)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
