"""grain input pipelines: infinite shuffled training batches and exact evaluation passes.

Both take a random-access source whose items are `{'image': uint8 (H, W, 3), 'label':
int}` (see `catalog.open_source`) and yield host-local batches of numpy arrays:

- train: `{'image': uint8 (local_batch, crop, crop, 3), 'label': int32 (local_batch,),
  'crop': int32 (local_batch, 3), 'alpha': float32 (local_batch, 3)}`: each window's (top,
  left, flipped) and PCA colour coefficients, applied on the device (`augment`, `steps`).
  No mask (every train example is real). Endless; batches run across epoch borders.
- eval:  image, label and crop (with views='ten' an extra views axis after the batch axis:
  image (local_batch, 10, crop, crop, 3)), plus `'mask': float32 (local_batch,)`, 1.0 for
  real examples and 0.0 for padding (zero images, label 0) that fills the last batch, so
  shapes stay static.

Multi-host: the global batch is split over the mesh's data axis into `shards` equal blocks of
rows, and a process supplies the blocks its devices hold (`host_shards`, see
`sharding.host_shards`): every block where the model axis stays within a host, and the same blocks
as the other processes of its model group where that axis crosses hosts. Training and evaluation
both read one global sequence (see `train_dataset`, `eval_dataset`), so a process reads only its
own rows and the global batch is the same whatever the processes. Images stay uint8:
normalisation belongs on the device.

Randomness (shuffle order, crop offsets, flips, colour shifts) derives from `seed` and the
example's position in the global stream only, so it depends neither on thread timing nor on the
number of processes, and a run resumes at global batch `start_batch` (the step it reached) with no
iterator state to store.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import threading
import time

import grain
import numpy as np
from absl import flags

from alexnet_jax.data import augment
from alexnet_jax.errors import ConfigError

__all__ = [
    'train_dataset', 'eval_dataset', 'steps_per_epoch', 'eval_steps', 'TrainAugment',
    'EvalTransform', 'host_rows', 'DevicePrefetch'
]


def _check_shards(global_batch_size: int, shards: int, host_shards) -> tuple[int, ...]:
  host_shards = tuple(sorted(int(i) for i in host_shards))
  if global_batch_size <= 0 or shards <= 0:
    raise ValueError(f'need positive global_batch_size and shards, got {global_batch_size}, '
                     f'{shards}')
  if global_batch_size % shards:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by the {shards} '
                     'data shards')
  if not host_shards or len(
      set(host_shards)) != len(host_shards) or not all(0 <= i < shards for i in host_shards):
    raise ValueError(f'host_shards {host_shards} must be distinct indices in [0, {shards})')
  return host_shards


def host_rows(global_batch_size: int, shards: int = 1, host_shards=(0,)) -> int:
  """Rows of every global batch a process supplies: its data shards' share."""
  host_shards = _check_shards(global_batch_size, shards, host_shards)
  return global_batch_size // shards * len(host_shards)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps that show (about) every example once: floor(N / global batch), >= 1."""
  return max(1, num_examples // global_batch_size)


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Batches `eval_dataset` yields on every process (the same number on all of them): the
  examples padded to whole global batches."""
  return max(1, math.ceil(num_examples / global_batch_size))


# ---------------------------------------------------------------------------
# Per-example transforms (module-level classes, so worker processes can unpickle them)
# ---------------------------------------------------------------------------


class TrainAugment(grain.transforms.RandomMap):
  """The paper's training augmentation, on uint8: a random crop_size² window, reflected with
  p = 0.5, and PCA colour coefficients α ~ N(0, pca_std) per image and presentation.

  With `resize_to` set (the paper's 256) images are first rescaled so the shorter side is
  `resize_to` and centre-cropped square (a no-op for prepared sets, stored that way); images
  smaller than the crop are scaled up so the crop fits. Emits, beside image and label, the
  window (`crop`: top, left, flipped) and `alpha`, which the device uses to subtract the
  matching window of the mean image and to shift the colours (`steps.normalize`).

  With `resize_to` set, `train_dataset` draws the windows per example (`draw`) but cuts them in
  the batch (`CutWindows`), straight into its rows: one copy of the pixels between decoder and
  batch, not two. (Without it an image may be of any size, and holding a batch of them whole
  could take many times the memory of their windows: those are cut per example and stacked, as
  are those of a subclass with ``cut_in_batch = False``.)
  """

  cut_in_batch = True

  def __init__(self, crop_size: int, resize_to: int | None = None, *, random_crop: bool = True,
               flip: bool = True, pca_std: float = 0.0):
    self.crop_size = int(crop_size)
    self.resize_to = resize_to
    self.random_crop, self.flip, self.pca_std = bool(random_crop), bool(flip), float(pca_std)

  def draw(self, element, rng: np.random.Generator) -> dict:
    """The example with its window and colour coefficients drawn, its (fitted) image not cut."""
    c = self.crop_size
    image = augment.fit_for_crop(element['image'], c, self.resize_to)
    top, left, flipped = augment.random_window(rng, *image.shape[:2], c,
                                               random_crop=self.random_crop, flip=self.flip)
    alpha = (rng.normal(0.0, self.pca_std, 3) if self.pca_std > 0 else np.zeros(3))
    return {
        'image': image, 'label': np.int32(element['label']),
        'crop': np.array([top, left, flipped], np.int32), 'alpha': alpha.astype(np.float32)
    }

  def random_map(self, element, rng: np.random.Generator):
    example = self.draw(element, rng)
    top, left, flipped = (int(v) for v in example['crop'])
    example['image'] = self.crop(example['image'], top, left, bool(flipped))
    return example

  def crop(self, image: np.ndarray, top: int, left: int, flipped: bool,
           out: np.ndarray | None = None) -> np.ndarray:
    """The window's pixels, into ``out`` where given (``bench_input`` overrides it with the copy
    this replaced)."""
    return augment.crop_flip(image, top, left, self.crop_size, flipped, out=out)


class _Drawn(grain.transforms.RandomMap):
  """A TrainAugment's `draw` as the per-example transform: the window is cut later, in
  `CutWindows`."""

  def __init__(self, augment_: TrainAugment):
    self.augment = augment_

  def random_map(self, element, rng: np.random.Generator):
    return self.augment.draw(element, rng)


class CutWindows:
  """grain batch function for `_Drawn` examples: each example's window cut straight into its row
  of the image batch (the other fields stacked), so no example's crop is copied again."""

  def __init__(self, augment_: TrainAugment):
    self.augment = augment_

  def __call__(self, examples):
    c = self.augment.crop_size
    first = examples[0]['image']
    images = np.empty((len(examples), c, c) + first.shape[2:], first.dtype)
    for row, example in zip(images, examples):
      top, left, flipped = (int(v) for v in example['crop'])
      self.augment.crop(example['image'], top, left, bool(flipped), out=row)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != 'image'}
    return {'image': images, **batch}


class EvalTransform(grain.transforms.Map):
  """Test-time views (after the same optional resizing as training) and mask = 1.

  views='center': the central window, image (crop, crop, 3), crop (3,);
  views='ten': the paper's 4 corners + centre and their reflections, image (10, crop, crop, 3),
  crop (10, 3).
  """

  def __init__(self, crop_size: int, resize_to: int | None = None, views: str = 'center'):
    self.crop_size = int(crop_size)
    self.resize_to = resize_to
    self.views = views
    augment.view_windows(crop_size, crop_size, crop_size, views)  # validates `views`

  def map(self, element):
    c = self.crop_size
    image = augment.fit_for_crop(element['image'], c, self.resize_to)
    windows = augment.view_windows(*image.shape[:2], c, self.views)
    # Every view is cut from the one decoded image, straight into its row.
    crops = np.empty((len(windows), c, c, image.shape[2]), image.dtype)
    for row, (t, l, f) in zip(crops, windows):
      augment.crop_flip(image, t, l, c, f, out=row)
    crop = np.array(windows, np.int32)
    if self.views == 'center':
      crops, crop = crops[0], crop[0]
    return {
        'image': crops, 'label': np.int32(element['label']), 'crop': crop, 'mask': np.float32(1.0)
    }


class _Padding(grain.transforms.Map):
  """Maps any index to a padding example (zeros, label 0, mask 0) shaped like the views."""

  def __init__(self, crop_size: int, views: str = 'center'):
    c = int(crop_size)
    views_axis = () if views == 'center' else (len(augment.view_windows(c, c, c, views)),)
    self.shape = views_axis + (c, c, 3)

  @classmethod
  def like(cls, example: dict) -> _Padding:
    padding = cls.__new__(cls)
    padding.shape = tuple(example['image'].shape)
    return padding

  def map(self, element):
    del element
    return {
        'image': np.zeros(self.shape, np.uint8), 'label': np.int32(0),
        'crop': np.zeros(self.shape[:-3] + (3,), np.int32), 'mask': np.float32(0.0)
    }


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags (profiling switches); outside an absl
  app (tests, notebooks) nobody parsed them, so mark them parsed with their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# How the training input's worker processes share the CPU with the training process. Where the
# host's cores also compute the steps (CPU training), the workers only have to keep the prefetch
# buffer full and should take the compute's idle cycles, not its time slices.
WORKER_PRIORITIES = {
    'normal': 'the same priority as the training process',
    'low': 'nice 19: the scheduler favours the training process',
    'idle': 'SCHED_IDLE (Linux): workers run only on cycles the training process leaves idle',
}


def _init_worker(priority: str, worker_index: int, worker_count: int) -> None:
  """grain's worker start-up: the worker's priority (``WORKER_PRIORITIES``), and a watch that ends
  the worker when the training process is gone, however it ended (even SIGKILL), so no input
  worker outlives its run."""
  del worker_index, worker_count
  if priority in ('low', 'idle'):
    os.nice(19)
  if priority == 'idle' and hasattr(os, 'SCHED_IDLE'):
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:  # re-parented (to init or a subreaper) once the parent is gone
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, name='parent-watch', daemon=True).start()


def default_read_threads(workers: int) -> int:
  """Threads reading batches in each input process. Worker processes are the parallelism: a
  second thread in one costs more in contention for the GIL than it overlaps (2 workers on 2
  cores, prepared 256² JPEGs, batch 128: 2,315 training images/s with 1 thread each, 2,268 with 2,
  1,706 with 4; 1,146, 1,105 and 844 images per CPU-second). Without workers, the threads are the
  only overlap of reading and decoding (both release the GIL) with the training step."""
  return 1 if workers > 0 else 4


def finish(ds: grain.MapDataset, *, workers: int, read_threads: int | None, prefetch_buffer: int,
           worker_priority: str = 'normal') -> grain.IterDataset:
  """``read_threads``: None for ``default_read_threads(workers)``."""
  if worker_priority not in WORKER_PRIORITIES:
    raise ConfigError(f'unknown input.worker_priority {worker_priority!r}; choose one of '
                      f'{", ".join(WORKER_PRIORITIES)}')
  if read_threads is None:
    read_threads = default_read_threads(workers)
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer))
  if workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                              worker_init_fn=functools.partial(_init_worker, worker_priority))
  return it_ds


class _HostRows(grain.MapDataset):
  """Item b: the rows of global batch ``start + b`` in the data shards ``host_shards`` of
  ``shards``, from ``chunks``, whose item k is shard ``k mod shards`` of global batch
  ``k div shards`` (a shard's rows). Used where a process's shards are not one aligned block."""

  def __init__(self, chunks: grain.MapDataset, shards: int, host_shards: tuple[int, ...],
               start: int = 0):
    super().__init__(chunks)
    self._shards, self._host_shards, self._start = shards, host_shards, start

  def __len__(self):
    return len(self._parent) // self._shards - self._start

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    first = (self._start + index) * self._shards
    parts = [self._parent[first + i] for i in self._host_shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _select_rows(examples: grain.MapDataset, global_batch_size: int, shards: int,
                 host_shards: tuple[int, ...], start: int = 0, batch_fn=None) -> grain.MapDataset:
  """Global batch b is ``examples[b·B : (b+1)·B]``, split into ``shards`` blocks of rows; item b of
  the result is this process's blocks of global batch ``start + b``, concatenated in shard order
  (the order in which ``jax.make_array_from_process_local_data`` hands them to the devices).
  ``batch_fn``: grain's, making a block of examples a batch (None: stacked)."""
  held = len(host_shards)
  groups = shards // held
  if shards % held == 0 and host_shards == tuple(range(host_shards[0], host_shards[0] + held)) \
      and host_shards[0] % held == 0:
    # One aligned block of shards (every GPU and CPU layout): a strided slice of the batches.
    rows = examples.batch(global_batch_size // groups, drop_remainder=True, batch_fn=batch_fn)
    return rows[start * groups + host_shards[0] // held::groups]
  return _HostRows(
      examples.batch(global_batch_size // shards, drop_remainder=True, batch_fn=batch_fn), shards,
      host_shards, start)


def train_dataset(source, *, global_batch_size: int, crop_size: int, seed: int,
                  start_batch: int = 0, shards: int = 1, host_shards=(0,), workers: int = 0,
                  prefetch_buffer: int = 4, read_threads: int | None = None,
                  resize_to: int | None = None, random_crop: bool = True, flip: bool = True,
                  pca_std: float = 0.0, worker_priority: str = 'normal',
                  augment_cls: type[TrainAugment] = TrainAugment) -> grain.IterDataset:
  """Endless, shuffled, augmented training batches for this process, from global batch
  ``start_batch`` on (a resumed run's position: the steps it has trained).

  One global stream, the same for any number of processes: source → seed → shuffle (a new
  permutation every epoch) → repeat forever → TrainAugment (each example's crop, flip and colour
  shift drawn from the seed and its position in the stream) → global batches (with `resize_to`,
  the windows cut straight into them, `CutWindows`), of which this process takes the rows of its
  ``host_shards`` (of ``shards``, the mesh's data axis): the rows the mesh puts on its devices. So
  the order of examples is a function of the seed and the epoch only, and a run can resume on
  another mesh or process count at the same position. Then to_iter_dataset (``read_threads``
  threads, None: ``default_read_threads``; prefetch_buffer batches) → mp_prefetch (when
  workers > 0; each worker keeps its own copy of the source and runs at ``worker_priority``, one
  of ``WORKER_PRIORITIES``).
  ``augment_cls``: TrainAugment or a subclass (``bench_input``'s record of the copies before).
  """
  host_shards = _check_shards(global_batch_size, shards, host_shards)
  if len(source) < global_batch_size:
    raise ConfigError(f'{len(source)} training examples are fewer than one batch of '
                      f'{global_batch_size}; lower --config.batch_size')
  if start_batch < 0:
    raise ValueError(f'start_batch must be >= 0, got {start_batch}')
  ds = grain.MapDataset.source(source)
  ds = ds.seed(int(seed))
  ds = ds.shuffle()
  ds = ds.repeat(None)
  aug = augment_cls(crop_size, resize_to, random_crop=random_crop, flip=flip, pca_std=pca_std)
  if aug.cut_in_batch and resize_to is not None:
    ds = _select_rows(ds.random_map(_Drawn(aug)), global_batch_size, shards, host_shards,
                      start_batch, batch_fn=CutWindows(aug))
  else:
    ds = _select_rows(ds.random_map(aug), global_batch_size, shards, host_shards, start_batch)
  return finish(ds, workers=workers, read_threads=read_threads, prefetch_buffer=prefetch_buffer,
                worker_priority=worker_priority)


def eval_dataset(source, *, global_batch_size: int, crop_size: int, shards: int = 1,
                 host_shards=(0,), workers: int = 0, prefetch_buffer: int = 4,
                 read_threads: int | None = None, resize_to: int | None = None,
                 views: str = 'center',
                 transform: grain.transforms.Map | None = None) -> grain.IterDataset:
  """One deterministic pass, centre-cropped (or ten views), with a mask: the source in order,
  padded with mask-0 examples to whole global batches (`eval_steps`), of which this process
  takes the rows of its ``host_shards``. Every process yields the same number of batches, so
  multi-host evaluation stays in lock step, and each example is counted exactly once. The dataset
  can be iterated again for the next evaluation.
  """
  host_shards = _check_shards(global_batch_size, shards, host_shards)
  padding = _Padding(crop_size, views)
  if transform is None:
    transform = EvalTransform(crop_size, resize_to, views)
  elif len(source):  # another transform (several scales' views, say): padding shaped like it
    padding = _Padding.like(transform.map(source[0]))
  ds = grain.MapDataset.source(source).map(transform)
  padded = eval_steps(len(source), global_batch_size) * global_batch_size
  if padded > len(ds):
    pad = grain.MapDataset.range(padded - len(ds)).map(padding)
    ds = grain.MapDataset.concatenate([ds, pad]) if len(ds) else pad
  ds = _select_rows(ds, global_batch_size, shards, host_shards)
  return finish(ds, workers=workers, read_threads=read_threads, prefetch_buffer=prefetch_buffer)


class DevicePrefetch:
  """Puts `size` batches on the device ahead of the step that needs them, so host→device
  transfers overlap the computation. Wraps a grain `DatasetIterator`; `put` maps a host batch to
  device arrays. No state to checkpoint: a resumed run builds its pipeline from the step it
  reached (`train_dataset`'s ``start_batch``)."""

  def __init__(self, iterator, put, size: int = 2):
    self._it, self._put, self._size = iterator, put, max(0, int(size))
    self._queue = collections.deque()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) < self._size + 1:
      self._queue.append(self._put(next(self._it)))
    return self._queue.popleft()

  def close(self) -> None:
    """Stops the worker processes (and frees their shared memory)."""
    self._queue.clear()
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()
