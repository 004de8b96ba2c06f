"""Random-access sources of ``(image, label)`` examples: ArrayRecord shards, TFDS sets, folders.

Each is a grain-compatible random-access source (``__len__``, ``__getitem__``) whose items are
``{'image': uint8 (H, W, 3), 'label': int32 scalar}``, with the data set's facts on ``source.info``
(and ``num_classes`` / ``class_names`` as shortcuts), and ``source.labels()``: every record's label,
read without decoding an image. ``data.catalog.open_source`` finds the one a config names; a
`SubsetImageSource` (``select``) is chosen records of one or more of them, some classes only,
relabelled.

Reading never crashes on a single bad record: a record that cannot be read or decoded is counted
on the source (``source.num_bad_records``), logged once, and replaced by the next good record
(deterministically, so checkpointed iterators still resume exactly). If more than
``max_bad_fraction`` of the split turns out bad, ``TooManyBadRecordsError`` is raised. The counters
live on the source object in the process that reads: with grain ``mp_prefetch`` workers each worker
counts its own.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any, SupportsIndex

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader

from alexnet_jax.data.records import (
    CorruptRecordError,
    decode_image_bytes,
    decode_label,
    decode_record,
    read_image_file,
)
from alexnet_jax.errors import DatasetNotFoundError, TooManyBadRecordsError

# Records read at once for `ImageSource.labels`.
_LABEL_CHUNK = 4096


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
  # A short digest of the records and classes chosen from the data set (`SubsetImageSource`);
  # '' for a whole split. Such a part has statistics of its own (`statistics.path_for`).
  selection: str = ''


class ImageSource:
  """Base class: robust random access over `(image, label)` examples.

  Subclasses implement `_read(index) -> (uint8 HxWx3, int)` and may raise anything
  on a bad record. The base class handles replacement, counting and the threshold. They may
  implement `_read_labels` (every label without decoding the images; the default decodes every
  record) and `_open` (what must succeed before any record is read: a failure there is an error,
  not a bad record).
  """

  # How many following records to try before giving up on a replacement.
  _MAX_REPLACEMENT_PROBES = 1000
  # Sources that decode image files: JPEGs through libjpeg-turbo's own interface where it can
  # (`records.fast_jpeg`, the same pixels); False sends every image through PIL (what
  # ``bench_input`` compares with).
  fast_jpeg = True

  def __init__(self, info: DatasetInfo, *, max_bad_fraction: float = 0.01):
    self.info = info
    self.max_bad_fraction = float(max_bad_fraction)
    self._bad: dict[int, str] = {}
    self._lock = threading.Lock()
    self._labels: np.ndarray | None = None  # `labels()`, once read

  # -- to implement ---------------------------------------------------------
  def _read(self, index: int) -> tuple[np.ndarray, int]:
    raise NotImplementedError

  def _read_labels(self) -> tuple[np.ndarray, dict[int, BaseException]]:
    """(int64 (len,) labels, {index: error} of the records whose label cannot be read; their
    entries are ignored). This default decodes every record: override it where a label can be
    read alone."""
    labels, bad = np.zeros(len(self), np.int64), {}
    for i in range(len(self)):
      try:
        labels[i] = self._read(i)[1]
      except Exception as e:  # pylint: disable=broad-except
        bad[i] = e
    return labels, bad

  def _open(self) -> None:
    """Opens what reading needs (a no-op here)."""

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

  def labels(self) -> np.ndarray:
    """The label of every record, int64 (len,), read-only, without decoding the images (read once,
    then kept on this object). A record whose label cannot be read is counted as bad and takes the
    label of the next readable one, as `__getitem__` replaces it (a record whose header is sound
    but whose image is not has its own label here, the next record's there)."""
    if self._labels is None:
      self._open()
      labels, bad = self._read_labels()
      labels = np.array(labels, np.int64)
      if labels.shape != (len(self),):
        raise AssertionError(f'{self!r}: {labels.shape} labels for {len(self)} records')
      for i in sorted(bad):
        self._note_bad(i, bad[i])
      probes = min(len(self), self._MAX_REPLACEMENT_PROBES)
      for i in sorted(bad):
        following = ((i + probe) % len(self) for probe in range(probes))
        good = next((j for j in following if j not in bad), None)
        if good is None:
          raise TooManyBadRecordsError(
              f'{self.info.name}/{self.info.split}: no readable label among {probes} consecutive '
              f'records from index {i} (in {self.info.location})')
        labels[i] = labels[good]
      labels.setflags(write=False)
      self._labels = labels
    return self._labels

  def __getitem__(self, record_key: SupportsIndex) -> dict[str, Any]:
    self._open()  # failing to open the set is an error, not a bad record
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
    state['_labels'] = None  # read again where needed: grain workers only read records
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
    return decode_record(self._records[index], fast=self.fast_jpeg)

  def _read_labels(self) -> tuple[np.ndarray, dict[int, BaseException]]:
    # Each record is read (ArrayRecord has no partial reads) but only its header is parsed.
    return _labels_in_chunks(len(self), self._records.__getitems__, decode_label)


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
  """A prepared TFDS data set in ArrayRecord format, decoded as `records.decode_image_bytes` does
  (no TensorFlow).

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

  def _open(self) -> None:
    self._data_source()

  def _read_labels(self) -> tuple[np.ndarray, dict[int, BaseException]]:
    # The data source skips the image's decoding: its label is all that is parsed of an example.
    return _labels_in_chunks(len(self), self._data_source().__getitems__, self._label_of)

  def _label_of(self, example) -> int:
    return int(example[self._label_key])

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
      image = decode_image_bytes(bytes(data), self._min_side, fast=self.fast_jpeg)
    return image, self._label_of(example)

  def __getstate__(self):
    state = super().__getstate__()
    state['_ds'] = None
    del state['_open_lock']
    return state

  def __setstate__(self, state):
    super().__setstate__(state)
    self._open_lock = threading.Lock()


class MultiLabelTfdsSource(TfdsImageSource):
  """A TFDS set whose examples carry a set of labels (PASCAL VOC's ``labels``, a sequence of class
  labels): ``label_matrix()`` holds them. For the pipelines, which read its images, every
  example's single label is 0."""

  def _label_of(self, example) -> int:
    del example
    return 0

  def label_matrix(self) -> np.ndarray:
    """``(examples, classes)`` uint8: 1 where the class is among the example's labels."""
    out = np.zeros((len(self), self.num_classes), np.uint8)
    read = self._data_source().__getitems__
    for start in range(0, len(self), 256):
      rows = read(list(range(start, min(start + 256, len(self)))))
      for i, example in enumerate(rows):
        out[start + i, np.asarray(example[self._label_key], np.int64).reshape(-1)] = 1
    return out


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
    return read_image_file(os.path.join(self.info.location, path), self._min_side,
                           fast=self.fast_jpeg), label

  def _read_labels(self) -> tuple[np.ndarray, dict[int, BaseException]]:
    return np.array([label for _, label in self._files], np.int64), {}


def _labels_in_chunks(n: int, read_many, label_of) -> tuple[np.ndarray, dict[int, BaseException]]:
  """`ImageSource._read_labels` for a source whose records ``read_many(indices)`` reads at once
  and ``label_of(record)`` parses the label of; a chunk that fails to read is read again one
  record at a time, so that only its bad records are bad."""
  labels, bad = np.zeros(n, np.int64), {}
  for start in range(0, n, _LABEL_CHUNK):
    indices = list(range(start, min(n, start + _LABEL_CHUNK)))
    try:
      chunk = read_many(indices)
    except Exception:  # pylint: disable=broad-except
      chunk = None
    for k, i in enumerate(indices):
      try:
        labels[i] = label_of(chunk[k] if chunk is not None else read_many([i])[0])
      except Exception as e:  # pylint: disable=broad-except
        bad[i] = e
  return labels, bad


class SubsetImageSource(ImageSource):
  """Chosen records of one or more sources (splits of one data set), in the order given, and
  optionally only the examples of some classes, relabelled 0..k-1 in the order the classes are
  given: what ``config.dataset.subset_file`` and ``config.dataset.classes`` make of a split
  (`select` builds one). Behaves like any other source: its items, ``info`` (its own
  ``num_examples``, ``num_classes``, ``class_names``, and a ``selection`` digest), ``labels()``,
  and pickling to grain workers (the sources it draws from travel with it).

  A bad record is replaced by the next record of the subset (so by an example of a kept class),
  and counted here, against ``max_bad_fraction`` of the subset.
  """

  def __init__(self, parts: Sequence[tuple[ImageSource, np.ndarray]], info: DatasetInfo, *,
               label_map: np.ndarray | None = None, max_bad_fraction: float = 0.01):
    """``parts``: (source, int indices of its records) in order; ``label_map``: the new label of
    each of the sources' labels (-1: not kept), None to keep them."""
    super().__init__(info, max_bad_fraction=max_bad_fraction)
    self._sources = [source for source, _ in parts]
    self._indices = [np.asarray(indices, np.int64) for _, indices in parts]
    self._starts = np.cumsum([0] + [len(i) for i in self._indices[:-1]]).tolist()
    self._label_map = None if label_map is None else np.asarray(label_map, np.int64)
    if sum(len(i) for i in self._indices) != info.num_examples:
      raise AssertionError(f'{info.num_examples} examples in the info, '
                           f'{sum(len(i) for i in self._indices)} chosen')

  @property
  def sources(self) -> list[ImageSource]:
    """The sources drawn from, in order."""
    return list(self._sources)

  def _relabel(self, labels: np.ndarray) -> np.ndarray:
    if self._label_map is None:
      return labels
    inside = (labels >= 0) & (labels < len(self._label_map))
    return np.where(inside, self._label_map[np.where(inside, labels, 0)], -1)

  def _open(self) -> None:
    for source in self._sources:
      source._open()  # pylint: disable=protected-access

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    part = bisect.bisect_right(self._starts, index) - 1
    record = int(self._indices[part][index - self._starts[part]])
    image, label = self._sources[part]._read(record)  # pylint: disable=protected-access
    new = int(self._relabel(np.array([label], np.int64))[0])
    if new < 0:  # labels() said otherwise: the record's label is damaged
      raise CorruptRecordError(f'record {record} of {self._sources[part].info.split!r} has label '
                               f'{label}, not one of the selected classes')
    return image, new

  def _read_labels(self) -> tuple[np.ndarray, dict[int, BaseException]]:
    labels = self._relabel(
        np.concatenate([s.labels()[i] for s, i in zip(self._sources, self._indices)]))
    return labels, {}

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(name={self.info.name!r}, split={self.info.split!r}, '
            f'num_examples={self.info.num_examples}, num_classes={self.info.num_classes}, '
            f'selection={self.info.selection!r}, location={self.info.location!r})')


def select(parts: Sequence[tuple[ImageSource, Sequence[int]]], split: str, *,
           classes: Sequence[int] = (), max_bad_fraction: float = 0.01) -> SubsetImageSource:
  """A `SubsetImageSource` of the records ``parts`` name ((source, record indices), in order: the
  sources are splits of one data set), then, with ``classes``, only the examples of those classes
  (read with ``labels()``), relabelled 0..k-1 in the order given. ``split``: its name.

  Raises:
    ValueError: an index or class out of range (callers check them first, to say which input).
  """
  if not parts:
    raise ValueError('no parts to select from')
  first = parts[0][0]
  chosen = []
  for source, indices in parts:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
      raise ValueError(f'record indices outside 0..{len(source) - 1} of {source!r}')
    chosen.append((source, indices))
  num_classes, class_names = first.num_classes, first.class_names
  label_map = None
  classes = tuple(int(c) for c in classes)
  digest = hashlib.sha256()
  for source, indices in chosen:
    digest.update(f'{source.info.split}:{len(indices)}:'.encode())
    digest.update(indices.tobytes())
  if classes:
    if any(not 0 <= c < num_classes for c in classes) or len(set(classes)) != len(classes):
      raise ValueError(f'classes {classes} are not distinct classes of 0..{num_classes - 1}')
    label_map = np.full(num_classes, -1, np.int64)
    label_map[list(classes)] = np.arange(len(classes))
    kept = []
    for source, indices in chosen:
      labels = source.labels()[indices]
      inside = (labels >= 0) & (labels < num_classes)
      keep = inside & (label_map[np.where(inside, labels, 0)] >= 0)
      kept.append((source, indices[keep]))
    chosen = kept
    num_classes, class_names = len(classes), tuple(class_names[c] for c in classes)
    digest.update(f'classes:{classes}'.encode())
  sizes = {source.info.image_size for source, _ in chosen}
  info = dataclasses.replace(first.info, split=split, num_examples=sum(len(i) for _, i in chosen),
                             num_classes=num_classes, class_names=tuple(class_names),
                             image_size=sizes.pop() if len(sizes) == 1 else None,
                             selection=digest.hexdigest()[:12])
  return SubsetImageSource(chosen, info, label_map=label_map, max_bad_fraction=max_bad_fraction)


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
