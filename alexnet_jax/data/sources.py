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
from array_record.python.array_record_module import ArrayRecordReader
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


class DamagedShardError(TooManyBadRecordsError):
  """A shard of a prepared or built-in set is missing, cannot be opened (truncated, overwritten)
  or holds another number of records than the set's metadata.json says."""


class ArrayRecordImageSource(ImageSource):
  """Reads records written with `encode_record` from ArrayRecord shards via grain.

  Every shard is opened (and its records counted) here, one at a time, so that a damaged one is
  reported by name (`DamagedShardError`, whose message ends with ``remedy``: how to rebuild the
  set) instead of failing in the middle of training.
  """

  def __init__(self, paths: list[str], info: DatasetInfo, *, max_bad_fraction: float = 0.01,
               remedy: str = ''):
    remedy = remedy or f'delete {info.location} and prepare the set again'
    where = f'{info.name}/{info.split}'
    # grain's "path[start:end]" form: it takes the counts as given and does not open every
    # shard a second time.
    counted = [f'{path}[0:{_count_records(path, where, remedy)}]' for path in paths]
    self._records = grain.sources.ArrayRecordDataSource(counted)
    if len(self._records) != info.num_examples:
      raise DamagedShardError(
          f'{where}: the shards in {info.location} hold {len(self._records)} records, its '
          f'metadata.json says {info.num_examples}; {remedy}')
    super().__init__(info, max_bad_fraction=max_bad_fraction)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    return decode_record(self._records[index])


def _count_records(path: str, where: str, remedy: str) -> int:
  if not os.path.isfile(path):
    raise DamagedShardError(f'{where}: shard {path} is missing; {remedy}')
  try:
    # array_record's C++ reader turns every failed status into a bare RuntimeError: here, on
    # one file that exists, that is the file's content (truncated, overwritten, not ArrayRecord).
    # An empty message is common: the status of a failed open is raised by close().
    reader = ArrayRecordReader(path)
    try:
      count = reader.num_records()
    finally:
      reader.close()
  except RuntimeError as e:
    detail = ' '.join(str(e).split()) or 'no ArrayRecord index found'
    raise DamagedShardError(f'{where}: shard {path} is damaged (truncated or overwritten: '
                            f'{detail}); {remedy}') from None
  return count


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
  """(sorted class names, [(path relative to root, label)]) of a folder of class subfolders: the
  `scan_class_folder` of ``root``."""
  folder = scan_class_folder(root)
  return folder.class_names, folder.files


@dataclasses.dataclass(frozen=True)
class ClassFolder:
  """What `scan_class_folder` found in a folder of class subfolders."""
  class_names: list[str]
  files: list[tuple[str, int]]  # (path relative to the root, label)
  # (st_dev, st_ino) of each file; None where it cannot be stat'ed (a dangling link: listed, so
  # that it is reported as unreadable).
  file_ids: list[tuple[int, int] | None]
  # (path, path listed instead): files reached again by another path (a symlink or hard link to
  # a file already listed), counted once.
  repeated_files: list[tuple[str, str]]
  # Links to folders already listed (loops, second links to one folder), not walked again.
  repeated_folders: list[str]


def scan_class_folder(root: str, *, allow_empty_classes: bool = False) -> ClassFolder:
  """The classes and files of ``root``, one subfolder per class (like torchvision's ImageFolder).

  Every regular file counts (sorted, like ImageFolder without its extension filter), so that
  non-image files are reported as bad rather than silently dropped; hidden files and folders
  (starting with '.') are ignored. Symbolic links to folders are followed (a class's images may
  live elsewhere), but each real folder and each real file (told by st_dev and st_ino) is listed
  once: a link back to a folder already listed (a loop, or to ``root`` or above) is not walked
  again, and a second path to a file already listed (a symlink or hard link) is not counted again
  (both are logged and returned on the result).

  Raises:
    DatasetNotFoundError: ``root`` has no class subfolders or no files; a class subfolder holds no
      file (each subfolder is a class and takes a label, so an empty one would be a class without
      examples that still changes the class count; not raised with ``allow_empty_classes``, for a
      validation folder, whose labels come from the training folder); one folder or file is
      reached from two classes (its images would have two labels); a folder cannot be read.
  """
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f'{root} is not a directory')
  class_names = sorted(
      d for d in os.listdir(root) if not d.startswith('.') and os.path.isdir(os.path.join(root, d)))
  if not class_names:
    raise DatasetNotFoundError(
        f'{root} has no class subfolders: expected {root}/<class name>/<image files>')

  # Each real folder reached so far → the label of the class it belongs to; root and the folders
  # above it → None (a link to one of them is a loop).
  folder_class: dict[tuple[int, int], int | None] = {}
  path = os.path.realpath(root)
  while True:
    folder_class[_file_id(path)] = None
    if os.path.dirname(path) == path:
      break
    path = os.path.dirname(path)
  first_path: dict[tuple[int, int], str] = {}  # of each real folder, relative to root
  for label, name in enumerate(class_names):
    key = _file_id(os.path.join(root, name))
    if key in folder_class:
      other = folder_class[key]
      what = f'the same folder as {class_names[other]!r}' if other is not None else (
          f'{root} or a folder above it')
      raise DatasetNotFoundError(f'class folder {os.path.join(root, name)} is {what} (a link?): '
                                 'give each class a folder of its own')
    folder_class[key], first_path[key] = label, name

  def unreadable(error: OSError):
    raise DatasetNotFoundError(f'cannot list {error.filename}: {error.strerror}; make it '
                               'readable or move it out of the class folder')

  files, file_ids, repeated_files, repeated_folders = [], [], [], []
  file_listed: dict[tuple[int, int], tuple[str, int]] = {}  # real file → (path, label) listed
  for label, name in enumerate(class_names):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True,
                                                onerror=unreadable):
      rel = os.path.relpath(dirpath, root)
      names = sorted(d for d in dirnames if not d.startswith('.'))
      walk = set()
      # Real subfolders claim their folder before links beside them do, so that files are listed
      # by their real paths where that is up to this folder.
      for d in sorted(names, key=lambda d: os.path.islink(os.path.join(dirpath, d))):
        key = _file_id(os.path.join(dirpath, d))
        if key not in folder_class:
          folder_class[key], first_path[key] = label, os.path.join(rel, d)
          walk.add(d)
        elif folder_class[key] in (None, label):
          repeated_folders.append(os.path.join(rel, d))
        else:
          raise DatasetNotFoundError(
              f'{os.path.join(root, rel, d)} (class {name!r}) is the folder '
              f'{os.path.join(root, first_path[key])} of class '
              f'{class_names[folder_class[key]]!r} (a link?): its images would have two labels; '
              'remove the link or the folder from one of the classes')
      dirnames[:] = [d for d in names if d in walk]
      for f in sorted(filenames):
        if f.startswith('.'):
          continue
        path = os.path.join(rel, f)
        try:
          key = _file_id(os.path.join(dirpath, f))
        except OSError:  # a dangling link: listed, and reported when it cannot be read
          key = None
        if key in file_listed:
          kept, kept_label = file_listed[key]
          if kept_label != label:
            raise DatasetNotFoundError(
                f'{os.path.join(root, path)} (class {name!r}) is the file '
                f'{os.path.join(root, kept)} of class {class_names[kept_label]!r} (a link?): it '
                'would have two labels; keep it in one class folder')
          repeated_files.append((path, kept))
          continue
        if key is not None:
          file_listed[key] = (path, label)
        files.append((path, label))
        file_ids.append(key)
  if not files:
    raise DatasetNotFoundError(f'the class subfolders of {root} hold no files')
  if not allow_empty_classes:
    found = {label for _, label in files}
    empty = [name for label, name in enumerate(class_names) if label not in found]
    if empty:
      shown = ', '.join(empty[:5]) + (f' and {len(empty) - 5} more' if len(empty) > 5 else '')
      raise DatasetNotFoundError(
          f'{len(empty)} class folder(s) of {root} hold no files: {shown}; each subfolder is a '
          'class (and a label), so add its images or remove it')
  if repeated_files or repeated_folders:
    logging.warning(
        '%s: %d files and %d folders reached again through links (or hard links) were counted '
        'once (first: %s)', root, len(repeated_files), len(repeated_folders),
        (repeated_files and repeated_files[0][0]) or repeated_folders[0])
  return ClassFolder(class_names, files, file_ids, repeated_files, repeated_folders)


def _file_id(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_dev, st.st_ino
