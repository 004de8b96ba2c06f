"""Random-access data sources: the built-in shapes set and TFDS ArrayRecord sets.

`open_source(dataset_cfg, split)` is the one entry point. It returns an `ImageSource`:
a grain-compatible random-access source (`__len__`, `__getitem__`) whose items are
`{'image': uint8 (H, W, 3), 'label': int32 scalar}`, with the data set's facts on
`source.info` (and `num_classes` / `class_names` as shortcuts).

Reading never crashes on a single bad record: a record that cannot be read or
decoded is counted on the source (`source.num_bad_records`), logged once, and
replaced by the next good record (deterministically, so checkpointed iterators
still resume exactly). If more than `max_bad_fraction` of the split turns out bad,
`TooManyBadRecordsError` is raised. The counters live on the source object in the
process that reads: with grain `mp_prefetch` workers each worker counts its own.

Record format of the built-in set (`encode_record` / `decode_record`)::

    offset  size  field
    0       4     magic b"AXJ1"
    4       8     label, int64 little-endian
    12      2     height, uint16 little-endian
    14      2     width, uint16 little-endian
    16      1     codec: 0 = raw uint8 HxWx3 bytes, 1 = PNG, 2 = JPEG
    17      3     zero padding
    20      ...   the image payload
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import struct
import threading
from typing import Any, SupportsIndex

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

BUILTIN_NAME = "builtin_shapes"

# ---------------------------------------------------------------------------
# Record format
# ---------------------------------------------------------------------------

RECORD_MAGIC = b"AXJ1"
_HEADER = struct.Struct("<4sqHHB3x")
HEADER_SIZE = _HEADER.size  # 20 bytes
CODECS = {"raw": 0, "png": 1, "jpeg": 2}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}


class CorruptRecordError(ValueError):
  """A record that cannot be parsed or whose image cannot be decoded."""


class DatasetNotFoundError(ValueError):
  """The requested data set (or split) is unknown or not prepared on disk."""


class TooManyBadRecordsError(RuntimeError):
  """More records failed to read than the configured `max_bad_fraction` allows."""


def encode_record(image: np.ndarray, label: int, codec: str = "png",
                  *, png_compress_level: int = 6, jpeg_quality: int = 95) -> bytes:
  """Serialises one (uint8 HxWx3 image, int label) example; see the module doc."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
  height, width = image.shape[:2]
  if codec == "raw":
    payload = np.ascontiguousarray(image).tobytes()
  elif codec == "png":
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=png_compress_level)
    payload = buf.getvalue()
  elif codec == "jpeg":
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    payload = buf.getvalue()
  else:
    raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
  return _HEADER.pack(RECORD_MAGIC, int(label), height, width, CODECS[codec]) + payload


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  """Inverse of `encode_record`. Raises `CorruptRecordError` on any inconsistency."""
  if len(record) < HEADER_SIZE:
    raise CorruptRecordError(f"record of {len(record)} bytes is shorter than the header")
  magic, label, height, width, codec = _HEADER.unpack_from(record)
  if magic != RECORD_MAGIC:
    raise CorruptRecordError(f"bad magic {magic!r} (expected {RECORD_MAGIC!r})")
  if codec not in _CODEC_NAMES:
    raise CorruptRecordError(f"unknown codec id {codec}")
  payload = memoryview(record)[HEADER_SIZE:]
  if _CODEC_NAMES[codec] == "raw":
    if len(payload) != height * width * 3:
      raise CorruptRecordError(
          f"raw payload has {len(payload)} bytes, expected {height * width * 3}")
    image = np.frombuffer(payload, np.uint8).reshape(height, width, 3).copy()
  else:
    image = decode_image_bytes(bytes(payload))
    if image.shape[:2] != (height, width):
      raise CorruptRecordError(
          f"decoded image is {image.shape[:2]}, header says {(height, width)}")
  return image, int(label)


def decode_image_bytes(data: bytes, min_side: int | None = None) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 RGB (H, W, 3) with PIL (no TensorFlow).

  With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
  several times faster) as long as its shorter side stays at least ``min_side``.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      image = np.asarray(load_rgb(img, min_side), dtype=np.uint8)
  except Exception as e:  # PIL raises a zoo of exception types on bad data.
    raise CorruptRecordError(f"undecodable image ({type(e).__name__}: {e})") from e
  if image.ndim != 3 or image.shape[2] != 3:
    raise CorruptRecordError(f"decoded image has shape {image.shape}")
  return image


def load_rgb(img: Image.Image, min_side: int | None = None) -> Image.Image:
  """Loads an opened PIL image as RGB, at reduced JPEG scale when ``min_side`` allows it."""
  if min_side is not None and img.format == "JPEG":
    w, h = img.size
    scale = min_side / min(w, h)
    if scale < 1:
      # draft keeps both sides >= the requested ones, so the shorter one stays >= min_side.
      img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
  img.load()
  return img if img.mode == "RGB" else img.convert("RGB")


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about one split of a data set, as a training loop needs them."""
  name: str
  split: str            # the split actually read (may differ from the one asked for)
  num_examples: int
  num_classes: int
  class_names: tuple[str, ...]
  image_size: int | None = None  # stored side length when all images are square & equal
  location: str = ""    # directory the data is read from


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
      raise IndexError(f"index {record_key} out of range for {n} records")
    for probe in range(min(n, self._MAX_REPLACEMENT_PROBES)):
      i = (index + probe) % n
      try:
        image, label = self._read(i)
      except Exception as e:  # pylint: disable=broad-except
        self._note_bad(i, e)
        continue
      return {"image": image, "label": np.int32(label)}
    raise TooManyBadRecordsError(
        f"{self.info.name}/{self.info.split}: no readable record among "
        f"{min(n, self._MAX_REPLACEMENT_PROBES)} consecutive records from index {index} "
        f"(in {self.info.location})")

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.info.name!r}, split={self.info.split!r}, "
            f"num_examples={self.info.num_examples}, location={self.info.location!r})")

  # -- helpers --------------------------------------------------------------
  def _note_bad(self, index: int, error: BaseException) -> None:
    message = f"{type(error).__name__}: {error}"
    with self._lock:
      first_time = index not in self._bad
      self._bad[index] = message
      count = len(self._bad)
    if first_time:
      log.warning("%s/%s: skipping bad record %d (%s); %d bad so far, using the next one",
                  self.info.name, self.info.split, index, message, count)
    limit = self.max_bad_fraction * len(self)
    if count > limit:
      raise TooManyBadRecordsError(
          f"{self.info.name}/{self.info.split}: {count} of {len(self)} records are "
          f"unreadable, more than max_bad_fraction={self.max_bad_fraction:g}; the data in "
          f"{self.info.location} looks damaged, re-prepare it (last error at record "
          f"{index}: {message})")

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class ArrayRecordImageSource(ImageSource):
  """Reads records written with `encode_record` from ArrayRecord shards via grain."""

  def __init__(self, paths: list[str], info: DatasetInfo, *, max_bad_fraction: float = 0.01):
    import grain  # pylint: disable=g-import-not-at-top
    self._records = grain.sources.ArrayRecordDataSource(list(paths))
    if len(self._records) != info.num_examples:
      raise CorruptRecordError(
          f"{info.name}/{info.split}: shards hold {len(self._records)} records, metadata "
          f"says {info.num_examples} (in {info.location}); delete the directory to regenerate")
    super().__init__(info, max_bad_fraction=max_bad_fraction)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    return decode_record(self._records[index])


class TfdsImageSource(ImageSource):
  """A prepared TFDS data set in ArrayRecord format, decoded with PIL (no TensorFlow).

  Opens the TFDS data source lazily and drops it when pickled, so the object travels
  cheaply to grain worker processes, which reopen it from the prepared directory.
  """

  def __init__(self, builder_dir: str, tfds_split: str, image_key: str, label_key: str,
               info: DatasetInfo, *, max_bad_fraction: float = 0.01,
               min_side: int | None = None):
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
          import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
          builder = tfds.builder_from_directory(self._builder_dir)
          self._ds = builder.as_data_source(
              split=self._tfds_split,
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
        raise CorruptRecordError(f"image has dtype {image.dtype} shape {image.shape}")
    else:
      image = decode_image_bytes(bytes(data), self._min_side)
    return image, int(example[self._label_key])

  def __getstate__(self):
    state = super().__getstate__()
    state["_ds"] = None
    del state["_open_lock"]
    return state

  def __setstate__(self, state):
    super().__setstate__(state)
    self._open_lock = threading.Lock()


class FolderImageSource(ImageSource):
  """A folder with one subfolder of images per class, read directly (no preparation): what
  torchvision's ImageFolder reads. Used to compare with it; training reads prepared sets."""

  def __init__(self, root: str, *, max_bad_fraction: float = 0.01, min_side: int | None = None):
    class_names, files = list_class_folder(root)
    info = DatasetInfo(name=os.path.basename(os.path.normpath(root)), split="train",
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
    raise DatasetNotFoundError(f"{root} is not a directory")
  class_names = sorted(d for d in os.listdir(root)
                       if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  if not class_names:
    raise DatasetNotFoundError(
        f"{root} has no class subfolders: expected {root}/<class name>/<image files>")
  files = []
  for label, name in enumerate(class_names):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      rel = os.path.relpath(dirpath, root)
      files.extend((os.path.join(rel, f), label) for f in sorted(filenames)
                   if not f.startswith("."))
  if not files:
    raise DatasetNotFoundError(f"the class subfolders of {root} hold no files")
  return class_names, files


# ---------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------


def default_data_dir() -> str:
  """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _cfg_get(cfg, key: str, default=None):
  getter = getattr(cfg, "get", None)
  if getter is not None:
    return getter(key, default)
  return getattr(cfg, key, default)


def open_source(dataset_cfg, split: str, *, min_side: int | None = None) -> ImageSource:
  """Opens one split of the configured data set.

  The name is looked up as the built-in set, then as a set prepared by `alexnet_jax.prepare`
  (``{data_dir}/{name}/metadata.json``), then as a TFDS set.

  Args:
    dataset_cfg: ConfigDict (or anything with `.get`) with `name`, `data_dir` (None →
      TFDS default), and for `builtin_shapes` also `num_train`, `num_val`,
      `image_size`, `seed` (and optionally `progress`, default True). Optional
      `max_bad_fraction` (default 0.01).
    split: a split name, normally `dataset_cfg.train_split` or `dataset_cfg.eval_split`.
      'validation' and 'test' stand in for each other when a set has only one.
    min_side: the pipeline rescales images so their shorter side is this long (the paper's
      256): TFDS JPEGs are then decoded at reduced scale where that keeps enough pixels.

  Raises:
    DatasetNotFoundError: the set or split is unknown or not prepared; the message
      says where it looked and how to prepare it.
  """
  name = _cfg_get(dataset_cfg, "name")
  if not name:
    raise DatasetNotFoundError("dataset_cfg.name is empty: set it to 'builtin_shapes' "
                               "or the name of a prepared TFDS data set")
  data_dir = _cfg_get(dataset_cfg, "data_dir") or default_data_dir()
  data_dir = os.path.expanduser(str(data_dir))
  max_bad_fraction = float(_cfg_get(dataset_cfg, "max_bad_fraction", 0.01))
  if name == BUILTIN_NAME:
    return _open_builtin(dataset_cfg, split, data_dir, max_bad_fraction)
  prepared = os.path.join(data_dir, name)
  if os.path.isfile(os.path.join(prepared, "metadata.json")):
    return open_record_directory(prepared, split, max_bad_fraction=max_bad_fraction)
  return _open_tfds(name, split, data_dir, max_bad_fraction, min_side)


def _open_builtin(cfg, split: str, data_dir: str, max_bad_fraction: float) -> ImageSource:
  from alexnet_jax.data import builtin  # pylint: disable=g-import-not-at-top
  kwargs = {}
  for key in ("num_train", "num_val", "image_size", "seed"):
    value = _cfg_get(cfg, key)
    if value is not None:
      kwargs[key] = int(value)
  directory = builtin.ensure_builtin(
      data_dir, progress=bool(_cfg_get(cfg, "progress", True)), **kwargs)
  return open_builtin_directory(directory, split, max_bad_fraction=max_bad_fraction)


def open_record_directory(directory: str, split: str, *,
                          max_bad_fraction: float = 0.01) -> ArrayRecordImageSource:
  """Opens a split of a directory of `encode_record` shards with a metadata.json: the built-in
  set (as `ensure_builtin` returns) or a set written by `alexnet_jax.prepare`."""
  meta_path = os.path.join(directory, "metadata.json")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise DatasetNotFoundError(
        f"no metadata.json in {directory}: not a finished set; the built-in set is created on "
        f"first use, a folder of images by `python -m alexnet_jax.prepare`") from None
  splits = meta["splits"]
  resolved = _resolve_split(split, list(splits))
  if resolved is None:
    raise DatasetNotFoundError(
        f"{meta['name']}: no split {split!r} in {directory} (it has {sorted(splits)})")
  entry = splits[resolved]
  info = DatasetInfo(
      name=meta["name"], split=resolved, num_examples=int(entry["num_examples"]),
      num_classes=int(meta["num_classes"]), class_names=tuple(meta["class_names"]),
      image_size=int(meta["image_size"]), location=directory)
  paths = [os.path.join(directory, shard) for shard in entry["shards"]]
  return ArrayRecordImageSource(paths, info, max_bad_fraction=max_bad_fraction)


def _resolve_split(split: str, available: list[str]) -> str | None:
  """Returns the split to read, allowing 'validation' <-> 'test' and TFDS slicing."""
  base, bracket, rest = split.partition("[")
  if base in available:
    return split
  for a, b in (("validation", "test"), ("test", "validation")):
    if base == a and b in available:
      log.info("split %r not present; using %r instead", base, b)
      return b + bracket + rest
  return None


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  base = name.split("/")[0].split(":")[0]
  if base == "imagenet2012":
    return (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            f"{os.path.join(data_dir, 'downloads', 'manual')} and run `tfds build imagenet2012 "
            f"--file_format=array_record --data_dir={data_dir}` (the build step needs "
            f"TensorFlow installed; reading does not)")
  return (f"run `tfds build {base} --file_format=array_record --data_dir={data_dir}` "
          f"(the build step may need TensorFlow installed; reading does not)")


def _open_tfds(name: str, split: str, data_dir: str, max_bad_fraction: float,
               min_side: int | None = None) -> ImageSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  hint = _tfds_prepare_hint(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f"data set {name!r} is neither '{BUILTIN_NAME}', a registered TFDS name, nor "
        f"prepared under {data_dir}; to prepare a folder of images (one subfolder per class): "
        f"`python -m alexnet_jax.prepare --source=DIR --name={name} --data_dir={data_dir}`; "
        f"to prepare a TFDS set: {hint}") from None
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f"TFDS data set {name!r} is not prepared in {builder.data_dir} (looked under "
        f"data_dir={data_dir}); to prepare it: {hint}")
  info = builder.info
  formats = {f.value for f in info.available_file_formats()}
  if "array_record" not in formats:
    raise DatasetNotFoundError(
        f"TFDS data set {name!r} in {builder.data_dir} is stored as {sorted(formats)}, "
        f"but random access needs ArrayRecord; rebuild it: {hint}")
  resolved = _resolve_split(split, list(info.splits.keys()))
  if resolved is None:
    raise DatasetNotFoundError(
        f"TFDS data set {name!r} in {builder.data_dir} has no split {split!r} "
        f"(it has {sorted(info.splits.keys())})")

  image_key, label_key = "image", "label"
  if info.supervised_keys and all(isinstance(k, str) for k in info.supervised_keys[:2]):
    image_key, label_key = info.supervised_keys[:2]
  features = info.features
  if image_key not in features or label_key not in features:
    raise DatasetNotFoundError(
        f"TFDS data set {name!r} has no ({image_key!r}, {label_key!r}) features "
        f"(it has {sorted(features.keys())}); an image-classification set is needed")
  label_feature = features[label_key]
  num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
  names = getattr(label_feature, "names", None) or [str(i) for i in range(num_classes)]
  image_shape = getattr(features[image_key], "shape", (None, None, 3))
  image_size = (image_shape[0] if image_shape[0] is not None and image_shape[0] == image_shape[1]
                else None)
  num_examples = int(info.splits[resolved].num_examples)
  src_info = DatasetInfo(
      name=name, split=resolved, num_examples=num_examples, num_classes=num_classes,
      class_names=tuple(names), image_size=image_size, location=os.fspath(builder.data_dir))
  return TfdsImageSource(os.fspath(builder.data_dir), resolved, image_key, label_key,
                         src_info, max_bad_fraction=max_bad_fraction, min_side=min_side)


# Before `prepare` existed the reader had this name.
open_builtin_directory = open_record_directory
