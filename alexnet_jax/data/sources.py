"""Random-access sources of ``(image, label)`` examples: ArrayRecord shards, TFDS sets, folders.

Each is a grain-compatible random-access source (``__len__``, ``__getitem__``) whose items are
``{'image': uint8 (H, W, 3), 'label': int32 scalar}``, with the data set's facts on ``source.info``
(and ``num_classes`` / ``class_names`` as shortcuts). ``data.catalog.open_source`` finds the one a
config names.

Reading never crashes on a single bad record: a record that cannot be read or decoded is counted
on the source (``source.num_bad_records``), logged once, and replaced by the next good record
(deterministically, so checkpointed iterators still resume exactly). If more than
``max_bad_fraction`` of the split turns out bad, ``TooManyBadRecordsError`` is raised. The counters
live on the source object in the process that reads: with grain ``mp_prefetch`` workers each worker
counts its own.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, SupportsIndex

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from alexnet_jax.data.records import CorruptRecordError, decode_image_bytes, decode_record, load_rgb
from alexnet_jax.errors import DatasetNotFoundError, TooManyBadRecordsError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about one split of a data set, as a training loop needs them."""
  name: str
  split: str  # the split actually read (may differ from the one asked for)
  num_examples: int
  num_classes: int
  class_names: tuple[str, ...]
  image_size: int | None = None  # stored side length when all images are square & equal
  location: str = ''  # directory the data is read from


class ImageSource:
  """Base class: robust random access over `(image, label)` examples.

  Subclasses implement `_read(index) -> (uint8 HxWx3, int)` and may raise anything
  on a bad record. The base class handles replacement, counting and the threshold.
  """

  # How many following records to try before giving up on a replacement.
  _MAX_REPLACEMENT_PROBES = 1000

  def __init__(self, info: DatasetInfo, *, max_bad_fraction: float = 0.01):
    self.info = info
    self.max_bad_fraction = float(max_bad_fraction)
    self._bad: dict[int, str] = {}
    self._lock = threading.Lock()

  # -- to implement ---------------------------------------------------------
  def _read(self, index: int) -> tuple[np.ndarray, int]:
    raise NotImplementedError

  # -- public ---------------------------------------------------------------
  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.info.class_names

  @property
  def num_bad_records(self) -> int:
    """Distinct records that failed to read in this process."""
    return len(self._bad)

  @property
  def bad_records(self) -> dict[int, str]:
    """Index -> error message of every record that failed in this process."""
    with self._lock:
      return dict(self._bad)

  def __len__(self) -> int:
    return self.info.num_examples

  def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
    n = len(self)
    index = record_key.__index__()
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f'index {record_key} out of range for {n} records')
    for probe in range(min(n, self._MAX_REPLACEMENT_PROBES)):
      i = (index + probe) % n
      try:
        image, label = self._read(i)
      except Exception as e:  # pylint: disable=broad-except
        self._note_bad(i, e)
        continue
      return {'image': image, 'label': np.int32(label)}
    raise TooManyBadRecordsError(
        f'{self.info.name}/{self.info.split}: no readable record among '
        f'{min(n, self._MAX_REPLACEMENT_PROBES)} consecutive records from index {index} '
        f'(in {self.info.location})')

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(name={self.info.name!r}, split={self.info.split!r}, '
            f'num_examples={self.info.num_examples}, location={self.info.location!r})')

  # -- helpers --------------------------------------------------------------
  def _note_bad(self, index: int, error: BaseException) -> None:
    message = f'{type(error).__name__}: {error}'
    with self._lock:
      first_time = index not in self._bad
      self._bad[index] = message
      count = len(self._bad)
    if first_time:
      logging.warning('%s/%s: skipping bad record %d (%s); %d bad so far, using the next one',
                      self.info.name, self.info.split, index, message, count)
    limit = self.max_bad_fraction * len(self)
    if count > limit:
      raise TooManyBadRecordsError(
          f'{self.info.name}/{self.info.split}: {count} of {len(self)} records are '
          f'unreadable, more than max_bad_fraction={self.max_bad_fraction:g}; the data in '
          f'{self.info.location} looks damaged, re-prepare it (last error at record '
          f'{index}: {message})')

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class ArrayRecordImageSource(ImageSource):
  """Reads records written with `encode_record` from ArrayRecord shards via grain."""

  def __init__(self, paths: list[str], info: DatasetInfo, *, max_bad_fraction: float = 0.01):
    self._records = grain.sources.ArrayRecordDataSource(list(paths))
    if len(self._records) != info.num_examples:
      raise CorruptRecordError(
          f'{info.name}/{info.split}: shards hold {len(self._records)} records, metadata '
          f'says {info.num_examples} (in {info.location}); delete the directory to regenerate')
    super().__init__(info, max_bad_fraction=max_bad_fraction)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    return decode_record(self._records[index])


class TfdsImageSource(ImageSource):
  """A prepared TFDS data set in ArrayRecord format, decoded with PIL (no TensorFlow).

  Opens the TFDS data source lazily and drops it when pickled, so the object travels
  cheaply to grain worker processes, which reopen it from the prepared directory.
  """

  def __init__(self, builder_dir: str, tfds_split: str, image_key: str, label_key: str,
               info: DatasetInfo, *, max_bad_fraction: float = 0.01, min_side: int | None = None):
    super().__init__(info, max_bad_fraction=max_bad_fraction)
    self._min_side = min_side
    self._builder_dir = builder_dir
    self._tfds_split = tfds_split
    self._image_key = image_key
    self._label_key = label_key
    self._ds = None
    self._open_lock = threading.Lock()

  def _data_source(self):
    if self._ds is None:
      with self._open_lock:
        if self._ds is None:
          builder = tfds.builder_from_directory(self._builder_dir)
          self._ds = builder.as_data_source(split=self._tfds_split,
                                            decoders={self._image_key: tfds.decode.SkipDecoding()})
    return self._ds

  def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
    self._data_source()  # failing to open the set is an error, not a bad record
    return super().__getitem__(record_key)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    example = self._data_source()[index]
    data = example[self._image_key]
    if isinstance(data, np.ndarray):  # already decoded (e.g. a custom feature)
      image = data
      if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise CorruptRecordError(f'image has dtype {image.dtype} shape {image.shape}')
    else:
      image = decode_image_bytes(bytes(data), self._min_side)
    return image, int(example[self._label_key])

  def __getstate__(self):
    state = super().__getstate__()
    state['_ds'] = None
    del state['_open_lock']
    return state

  def __setstate__(self, state):
    super().__setstate__(state)
    self._open_lock = threading.Lock()


class FolderImageSource(ImageSource):
  """A folder with one subfolder of images per class, read directly (no preparation): what
  torchvision's ImageFolder reads. Used to compare with it; training reads prepared sets."""

  def __init__(self, root: str, *, max_bad_fraction: float = 0.01, min_side: int | None = None):
    class_names, files = list_class_folder(root)
    info = DatasetInfo(name=os.path.basename(os.path.normpath(root)), split='train',
                       num_examples=len(files), num_classes=len(class_names),
                       class_names=tuple(class_names), location=root)
    super().__init__(info, max_bad_fraction=max_bad_fraction)
    self._files = files
    self._min_side = min_side

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    path, label = self._files[index]
    with Image.open(os.path.join(self.info.location, path)) as img:
      return np.asarray(load_rgb(img, self._min_side), dtype=np.uint8), label


def list_class_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(sorted class names, [(path relative to root, label)]) of a folder of class subfolders.

  Every regular file counts (sorted, like torchvision's ImageFolder without its extension
  filter), so that non-image files are reported as bad rather than silently dropped; hidden
  files and folders (starting with '.') are ignored.
  """
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f'{root} is not a directory')
  class_names = sorted(
      d for d in os.listdir(root) if not d.startswith('.') and os.path.isdir(os.path.join(root, d)))
  if not class_names:
    raise DatasetNotFoundError(
        f'{root} has no class subfolders: expected {root}/<class name>/<image files>')
  files = []
  for label, name in enumerate(class_names):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      rel = os.path.relpath(dirpath, root)
      files.extend(
          (os.path.join(rel, f), label) for f in sorted(filenames) if not f.startswith('.'))
  if not files:
    raise DatasetNotFoundError(f'the class subfolders of {root} hold no files')
  return class_names, files
