"""grain input pipelines: infinite shuffled training batches and exact evaluation passes.

Both take a random-access source whose items are `{'image': uint8 (H, W, 3), 'label':
int}` (see `sources.open_source`) and yield host-local batches of numpy arrays:

- train: `{'image': uint8 (local_batch, crop, crop, 3), 'label': int32 (local_batch,)}`,
  no mask (every train example is real). Endless; batches run across epoch borders.
- eval:  the same plus `'mask': float32 (local_batch,)`, 1.0 for real examples and 0.0
  for padding (zero images, label 0) that fills the last batch, so shapes stay static.

`local_batch = global_batch_size // process_count`; each process reads the records
`process_index::process_count`. Images stay uint8: normalisation belongs on the device.

The train iterator is a grain `DatasetIterator`: `it.get_state()` / `it.set_state(s)`
checkpoint and resume it exactly (same following batches), with or without worker
processes. Randomness (shuffle order, crop offsets, flips) derives from `seed`, the
process index and the example position only, so it does not depend on thread timing.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from PIL import Image

__all__ = ["train_dataset", "eval_dataset", "steps_per_epoch", "eval_steps",
           "TrainAugment", "EvalTransform", "local_batch_size"]


def local_batch_size(global_batch_size: int, process_count: int = 1) -> int:
  if global_batch_size <= 0 or process_count <= 0:
    raise ValueError(f"need positive global_batch_size and process_count, got "
                     f"{global_batch_size}, {process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  return global_batch_size // process_count


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps that show (about) every example once: floor(N / global batch), >= 1."""
  return max(1, num_examples // global_batch_size)


def eval_steps(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
  """Batches `eval_dataset` yields on every process (the same number on all of them)."""
  per_process = math.ceil(num_examples / process_count)
  return math.ceil(per_process / local_batch_size(global_batch_size, process_count))


# ---------------------------------------------------------------------------
# Per-example transforms (module-level classes, so worker processes can unpickle them)
# ---------------------------------------------------------------------------


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _prepare(image: np.ndarray, crop_size: int, resize_to: int | None) -> np.ndarray:
  """Optional paper-style rescale + centre square, then grow images smaller than a crop."""
  h, w = image.shape[:2]
  if resize_to is not None and (h, w) != (resize_to, resize_to):
    # Rescale the shorter side to resize_to, keep the central resize_to^2 square.
    scale = resize_to / min(h, w)
    nh, nw = max(resize_to, round(h * scale)), max(resize_to, round(w * scale))
    image = _resize(image, nh, nw)
    top, left = (nh - resize_to) // 2, (nw - resize_to) // 2
    image = image[top:top + resize_to, left:left + resize_to]
    h, w = resize_to, resize_to
  if h < crop_size or w < crop_size:
    scale = crop_size / min(h, w)
    image = _resize(image, max(crop_size, round(h * scale)), max(crop_size, round(w * scale)))
  return image


class TrainAugment(grain.transforms.RandomMap):
  """Random crop_size x crop_size window + horizontal flip with p = 0.5, on uint8.

  With `resize_to` set (e.g. 256, the paper's recipe) images are first rescaled so the
  shorter side is `resize_to` and centre-cropped square; images smaller than the crop
  are scaled up so the crop fits.
  """

  def __init__(self, crop_size: int, resize_to: int | None = None):
    self.crop_size = int(crop_size)
    self.resize_to = resize_to

  def random_map(self, element, rng: np.random.Generator):
    c = self.crop_size
    image = _prepare(element["image"], c, self.resize_to)
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - c + 1))
    left = int(rng.integers(0, w - c + 1))
    image = image[top:top + c, left:left + c]
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": image, "label": np.int32(element["label"])}


class EvalTransform(grain.transforms.Map):
  """Centre crop (after the same optional resizing as training) and mask = 1."""

  def __init__(self, crop_size: int, resize_to: int | None = None):
    self.crop_size = int(crop_size)
    self.resize_to = resize_to

  def map(self, element):
    c = self.crop_size
    image = _prepare(element["image"], c, self.resize_to)
    h, w = image.shape[:2]
    top, left = (h - c) // 2, (w - c) // 2
    return {"image": image[top:top + c, left:left + c],
            "label": np.int32(element["label"]), "mask": np.float32(1.0)}


class _Padding(grain.transforms.Map):
  """Maps any index to a padding example (zeros, label 0, mask 0)."""

  def __init__(self, crop_size: int):
    self.crop_size = int(crop_size)

  def map(self, element):
    del element
    return {"image": np.zeros((self.crop_size, self.crop_size, 3), np.uint8),
            "label": np.int32(0), "mask": np.float32(0.0)}


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


def _process_seed(seed: int, process_index: int) -> int:
  """Distinct, reproducible seed per process (so processes draw independent crops)."""
  return int(np.random.SeedSequence([int(seed), int(process_index)]).generate_state(1)[0])


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags (profiling switches); outside an absl
  app (tests, notebooks) nobody parsed them, so mark them parsed with their defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish(ds: grain.MapDataset, *, workers: int, read_threads: int,
            prefetch_buffer: int) -> grain.IterDataset:
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_buffer))
  if workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it_ds


def train_dataset(source, *, global_batch_size: int, crop_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, workers: int = 0,
                  prefetch_buffer: int = 4, read_threads: int = 4,
                  resize_to: int | None = None) -> grain.IterDataset:
  """Endless, shuffled, augmented training batches for this process.

  source → slice [process_index::process_count] → seed → shuffle (reshuffled every
  epoch) → repeat forever → TrainAugment → batch(local_batch, drop_remainder) →
  to_iter_dataset (read_threads threads, prefetch_buffer batches) → mp_prefetch
  (when workers > 0; each worker keeps its own copy of the source).

  Returns an `IterDataset`; `iter()` of it is a checkpointable `DatasetIterator`.
  """
  local = local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if len(source) < process_count:
    raise ValueError(f"{len(source)} examples cannot be split over {process_count} processes")
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  ds = ds.seed(_process_seed(seed, process_index))
  ds = ds.shuffle()
  ds = ds.repeat(None)
  ds = ds.random_map(TrainAugment(crop_size, resize_to))
  ds = ds.batch(local, drop_remainder=True)
  return _finish(ds, workers=workers, read_threads=read_threads,
                 prefetch_buffer=prefetch_buffer)


def eval_dataset(source, *, global_batch_size: int, crop_size: int, process_index: int = 0,
                 process_count: int = 1, workers: int = 0, prefetch_buffer: int = 4,
                 read_threads: int = 4, resize_to: int | None = None) -> grain.IterDataset:
  """One deterministic pass over this process's slice, centre-cropped, with a mask.

  Every process yields the same number of batches (`eval_steps(len(source), ...)`),
  padding with mask-0 examples, so multi-host evaluation stays in lock step. Each
  example of the source appears exactly once over all processes. The dataset can be
  iterated again for the next evaluation.
  """
  local = local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.map(EvalTransform(crop_size, resize_to))
  padded = eval_steps(len(source), global_batch_size, process_count) * local
  if padded > len(ds):
    pad = grain.MapDataset.range(padded - len(ds)).map(_Padding(crop_size))
    ds = grain.MapDataset.concatenate([ds, pad]) if len(ds) else pad
  ds = ds.batch(local, drop_remainder=True)
  return _finish(ds, workers=workers, read_threads=read_threads,
                 prefetch_buffer=prefetch_buffer)
