"""Images to look at a network with: the config's evaluation split, scikit-image's photographs, or
files and folders, each as the centre square at the network's input size; and a split of the data
set read in padded chunks (``chunks``) for the analyses that stream a whole split through the
network."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import grain
import numpy as np
from PIL import Image

from alexnet_jax.data import catalog, pipeline
from alexnet_jax.errors import ConfigError, DatasetNotFoundError

SKIMAGE_PHOTOS = ('chelsea', 'astronaut', 'coffee')


@dataclasses.dataclass
class Images:
  pixels: np.ndarray  # uint8 (N, S, S, 3)
  labels: np.ndarray | None  # int (N,), or None when the images carry no labels
  names: list[str]
  class_names: Sequence[str] = ()

  def class_name(self, c: int) -> str:
    return self.class_names[c] if 0 <= c < len(self.class_names) else f'class {c}'


def centre_square(image: np.ndarray, size: int) -> np.ndarray:
  """Rescale the shorter side to ``size`` and keep the central square (the eval recipe)."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def _read_file(path: str) -> np.ndarray:
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert('RGB'))
  except (OSError, ValueError) as e:
    raise ConfigError(f'cannot read image {path}: {e}') from None


def open_split(config, split: str):
  """One split of the config's data set, opened as training and evaluation open it."""
  return catalog.open_source(config.dataset, split, min_side=config.input.resize_to)


def eval_crop(config) -> pipeline.EvalTransform:
  """The evaluation's central view at the network's input size (after its optional resizing)."""
  return pipeline.EvalTransform(int(config.model.image_size), config.input.resize_to)


def dataset_class_names(config) -> tuple[str, ...]:
  """The class names of the data set the network was trained on; () where it is not at hand (the
  analyses then name classes by number)."""
  try:
    return tuple(open_split(config, config.dataset.eval_split).class_names)
  except DatasetNotFoundError:
    return ()


def read_examples(config, source, indices) -> tuple[np.ndarray, np.ndarray]:
  """``(pixels (N, S, S, 3) uint8, labels (N,))`` of ``source[indices]``, evaluation's crop."""
  crop = eval_crop(config)
  items = [crop.map(source[int(i)]) for i in indices]
  size = int(config.model.image_size)
  if not items:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
  return np.stack([x['image'] for x in items]), np.array([int(x['label']) for x in items])


def chunks(config, source, count: int, chunk: int, *, threads: int = 4,
           prefetch: int = 4) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The first ``count`` examples of ``source`` in evaluation's crop, ``chunk`` at a time:
  ``(pixels (chunk, S, S, 3) uint8, index (chunk,) int32)``, the last chunk padded with copies of
  its last image at index -1. A grain pipeline reads them, ``threads`` chunks at once and at most
  ``prefetch`` (≥ ``threads``) ahead: only those are ever held, whatever the size of the split."""
  if count <= 0:
    return
  crop = eval_crop(config)
  ds = grain.MapDataset.source(source)[:count].map_with_index(
      lambda i, x: dict(image=crop.map(x)['image'], index=np.int32(i))).batch(chunk)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  for batch in it:
    pixels, index = batch['image'], batch['index']
    real = len(index)
    if real < chunk:
      pixels = np.concatenate([pixels, np.repeat(pixels[-1:], chunk - real, axis=0)])
      index = np.concatenate([index, np.full(chunk - real, -1, np.int32)])
    yield pixels, index


def load_images(config, spec: str | None, count: int, seed: int = 0) -> Images:
  """Images at the network's input size.

  ``spec``: ``None`` or ``'dataset'`` — ``count`` images of the config's evaluation split (centre
  crops, with labels); ``'skimage'`` — scikit-image's photographs; otherwise comma-separated image
  files or folders of them.
  """
  size = int(config.model.image_size)
  if spec in (None, '', 'dataset'):
    source = open_split(config, config.dataset.eval_split)
    n = min(count, len(source))
    indices = np.sort(np.random.default_rng(seed).choice(len(source), n, replace=False))
    pixels, labels = read_examples(config, source, indices)
    return Images(pixels=pixels, labels=labels,
                  names=[f'{config.dataset.eval_split}[{i}]' for i in indices],
                  class_names=tuple(source.class_names))
  if spec == 'skimage':
    try:
      import skimage.data  # noqa: PLC0415  (optional dependency)
    except ImportError:
      raise ConfigError('--images=skimage needs scikit-image: pip install scikit-image') from None
    photos = [(name, getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS][:max(count, 1)]
    return Images(pixels=np.stack([centre_square(p, size) for _, p in photos]), labels=None,
                  names=[name for name, _ in photos])
  paths = []
  for part in spec.split(','):
    part = os.path.expanduser(part.strip())
    if os.path.isdir(part):
      paths += sorted(
          os.path.join(part, f)
          for f in os.listdir(part)
          if f.lower().endswith(('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')))
    elif os.path.isfile(part):
      paths.append(part)
    else:
      raise ConfigError(
          f'--images: {part!r} is neither dataset, skimage, an image file nor a folder')
  if not paths:
    raise ConfigError(f'--images={spec!r} names no image files')
  return Images(pixels=np.stack([centre_square(_read_file(p), size) for p in paths]), labels=None,
                names=[os.path.basename(p) for p in paths])
