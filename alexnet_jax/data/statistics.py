"""The training set's mean image and RGB principal components, in one streaming pass.

The paper subtracts the mean image (per pixel, over the training set) and shifts colours along the
principal components of the RGB values of all training pixels. Both come from running sums kept
in float64, so any number of images, visited in any order or in pieces (shards, processes), gives
the same result as one big NumPy computation:

  sum_image (S, S, 3)   Σ images                    → mean image; summed over pixels, RGB mean
  sum_outer (3, 3)      Σ pixel pixelᵀ              → RGB covariance = E[x xᵀ] − μ μᵀ

Sums are of pixels minus 128 (exact in float64, and it keeps E[x xᵀ] − μ μᵀ free of cancellation).
Stored beside the data set as ``statistics.npz`` (see `path_for`).
"""

from __future__ import annotations

import dataclasses
import io
import os

import grain
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from alexnet_jax import storage
from alexnet_jax.data import augment, pipeline

FILENAME = 'statistics.npz'
_SHIFT = 128.0


@dataclasses.dataclass(frozen=True)
class Statistics:
  mean_image: np.ndarray  # float32 (S, S, 3), 0-255 units
  rgb_mean: np.ndarray  # float64 (3,)
  rgb_cov: np.ndarray  # float64 (3, 3), over all pixels of all images
  eigvals: np.ndarray  # float64 (3,), descending, variances (0-255 units squared)
  eigvecs: np.ndarray  # float64 (3, 3), eigenvectors as columns, matching eigvals
  num_images: int

  @property
  def size(self) -> int:
    return int(self.mean_image.shape[0])


class Accumulator:
  """Running sums over uint8 (S, S, 3) images; `merge` combines partial results."""

  def __init__(self, size: int):
    self.size = int(size)
    self.count = 0
    self.sum_image = np.zeros((self.size, self.size, 3), np.float64)
    self.sum_outer = np.zeros((3, 3), np.float64)

  def add(self, image: np.ndarray) -> None:
    if image.shape != (self.size, self.size, 3):
      raise ValueError(f'statistics need ({self.size}, {self.size}, 3) images, got {image.shape}')
    x = image.astype(np.float64) - _SHIFT
    self.sum_image += x
    pixels = x.reshape(-1, 3)
    self.sum_outer += pixels.T @ pixels
    self.count += 1

  def merge(self, other: 'Accumulator') -> None:
    if other.size != self.size:
      raise ValueError(f'cannot merge statistics of {other.size}px images into {self.size}px')
    self.count += other.count
    self.sum_image += other.sum_image
    self.sum_outer += other.sum_outer

  def state(self) -> dict[str, np.ndarray]:
    return dict(count=np.int64(self.count), sum_image=self.sum_image, sum_outer=self.sum_outer)

  @classmethod
  def from_state(cls, state) -> 'Accumulator':
    acc = cls(state['sum_image'].shape[0])
    acc.count = int(state['count'])
    acc.sum_image = np.array(state['sum_image'], np.float64)
    acc.sum_outer = np.array(state['sum_outer'], np.float64)
    return acc

  def finalize(self) -> Statistics:
    if self.count == 0:
      raise ValueError('no images: statistics need at least one training image')
    pixels = self.count * self.size * self.size
    centred_mean = self.sum_image.sum(axis=(0, 1)) / pixels  # the RGB sum, derived
    cov = self.sum_outer / pixels - np.outer(centred_mean, centred_mean)
    cov = (cov + cov.T) / 2
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    # A sign convention, so that the same data always gives the same vectors.
    eigvecs = eigvecs * np.where(eigvecs.sum(axis=0) < 0, -1.0, 1.0)
    return Statistics(mean_image=(self.sum_image / self.count + _SHIFT).astype(np.float32),
                      rgb_mean=centred_mean + _SHIFT, rgb_cov=cov, eigvals=eigvals, eigvecs=eigvecs,
                      num_images=self.count)


def neutral(size: int, mean_rgb, std_rgb) -> Statistics:
  """Stand-in statistics of the right shapes (a flat mean image, axis-aligned colour spread), for
  tools that compile or time the step without a data set."""
  var = np.square(np.asarray(std_rgb, np.float64))
  return Statistics(
      mean_image=np.broadcast_to(np.asarray(mean_rgb, np.float32),
                                 (size, size, 3)).copy(), rgb_mean=np.asarray(mean_rgb, np.float64),
      rgb_cov=np.diag(var), eigvals=var, eigvecs=np.eye(3), num_images=0)


def save(stats: Statistics, path: str) -> None:
  """Writes atomically (a reader never sees half a file), locally or to a ``gs://`` data set
  (``storage``; an object upload is atomic)."""
  buffer = io.BytesIO()
  np.savez(buffer, **dataclasses.asdict(stats))
  if not storage.is_local(path):
    storage.write_bytes(path, buffer.getvalue())
    return
  tmp = f'{path}.tmp-{os.getpid()}'  # per process: every host of a run may store them at once
  with open(tmp, 'wb') as f:
    f.write(buffer.getvalue())
  os.replace(tmp, path)


def exists(path: str) -> bool:
  return storage.path(path).is_file()


def load(path: str) -> Statistics:
  with np.load(io.BytesIO(storage.path(path).read_bytes())) as z:
    return Statistics(mean_image=z['mean_image'], rgb_mean=z['rgb_mean'], rgb_cov=z['rgb_cov'],
                      eigvals=z['eigvals'], eigvecs=z['eigvecs'], num_images=int(z['num_images']))


def path_for(source) -> str:
  """Where a source's statistics live: ``statistics.npz`` in its directory (prepared and built-in
  sets), or ``alexnet_jax_statistics.npz`` in a TFDS set's directory. A part of a split (chosen
  records or classes: ``source.info.selection``, a digest of them) has its own,
  ``statistics-<selection>.npz`` (``alexnet_jax_statistics-<selection>.npz``)."""
  location = str(source.info.location)
  selection = getattr(source.info, 'selection', '')
  stem, ext = os.path.splitext(FILENAME)
  filename = f'{stem}-{selection}{ext}' if selection else FILENAME
  if exists(os.path.join(location, 'metadata.json')):
    return os.path.join(location, filename)
  return os.path.join(location, 'alexnet_jax_' + filename)


class _Square:
  """grain map: an item's image rescaled to the central size x size square (picklable)."""

  def __init__(self, size: int):
    self.size = size

  def __call__(self, item):
    return augment.rescale_center_square(item['image'], self.size)


def compute(source, size: int, *, progress: bool = True, workers: int = 0) -> Statistics:
  """One pass over a source (``{'image': uint8 (H, W, 3)}`` items), each image rescaled to the
  central size x size square as the pipeline does; decoding runs in ``workers`` grain processes,
  the sums in this one."""
  ds = grain.MapDataset.source(source).map(_Square(size)).batch(32)
  ds = pipeline.finish(ds, workers=workers, read_threads=4, prefetch_buffer=4)
  acc = Accumulator(size)
  with tqdm(total=len(source), desc='mean image and RGB PCA', unit='img',
            disable=not progress) as bar:
    for batch in ds:
      for image in batch:
        acc.add(image)
      bar.update(len(batch))
  return acc.finalize()


def ensure(source, size: int, *, progress: bool = True, workers: int = 0) -> Statistics:
  """The source's statistics at ``size``, computed and stored on first use."""
  path = path_for(source)
  if exists(path):
    stats = load(path)
    if stats.size == size:
      return stats
    logging.warning('%s holds statistics of %dpx images, %dpx are needed: recomputing', path,
                    stats.size, size)
  logging.info('computing the mean image and RGB PCA of %s (one pass, stored in %s)',
               source.info.location, path)
  stats = compute(source, size, progress=progress, workers=workers)
  try:
    save(stats, path)
  except OSError as e:
    logging.warning('cannot store the statistics in %s (%s); they will be recomputed next time',
                    path, e)
  return stats
