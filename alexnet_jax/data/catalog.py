"""Finding a data set by name: the built-in set, a set prepared by ``prepare``, or a TFDS set.

``open_source(dataset_cfg, split)`` is the one entry point; it returns a
``data.sources.ImageSource``: a whole split, or, with ``dataset.subset_file`` or
``dataset.classes``, a ``sources.SubsetImageSource`` of chosen records and classes.
"""

from __future__ import annotations

import json
import numbers
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from alexnet_jax import storage
from alexnet_jax.data import builtin, sources
from alexnet_jax.data.sources import (
    ArrayRecordImageSource,
    DatasetInfo,
    ImageSource,
    MultiLabelTfdsSource,
    TfdsImageSource,
)
from alexnet_jax.errors import ConfigError, DatasetNotFoundError

# How ``dataset.subset_file`` is laid out, for its error messages.
SUBSET_LAYOUT = '{"<split>": {"<split of the data set>": [record indices, ...], ...}, ...}'


def default_data_dir() -> str:
  """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def open_source(dataset_cfg, split: str, *, min_side: int | None = None,
                progress: bool = True) -> ImageSource:
  """Opens one split of the configured data set.

  The name is looked up as the built-in set, then as a set prepared by ``prepare``
  (``{data_dir}/{name}/metadata.json``), then as a TFDS set.

  With ``dataset_cfg.subset_file`` naming ``split``, the split is the records the file lists, of
  the data set's splits it names (in that order); with ``dataset_cfg.classes``, only the examples
  of those classes, relabelled 0..k-1 in the order given (after the subset). Both are checked
  before the data set is opened (or generated) as far as they can be without it.

  Args:
    dataset_cfg: ``config.dataset`` (``configs.dataset_config``): ``name``, ``data_dir`` (None:
      TFDS's default), ``max_bad_fraction``, ``classes``, ``subset_file``, and for the built-in set
      ``num_train``, ``num_val``, ``image_size``, ``seed``.
    split: a split name, normally ``dataset_cfg.train_split`` or ``dataset_cfg.eval_split``.
      'validation' and 'test' stand in for each other when a set has only one (not in the subset
      file: there a split is named as the config names it).
    min_side: the pipeline rescales images so their shorter side is this long (the paper's
      256): TFDS JPEGs are then decoded at reduced scale where that keeps enough pixels.
    progress: show a progress bar while the built-in set is generated.

  Raises:
    DatasetNotFoundError: the set or split is unknown or not prepared; the message
      says where it looked and how to prepare it. Also: the subset file is missing or unreadable,
      or a split it names is not one of the data set's.
    ConfigError: ``classes`` names a class twice or out of range; the subset file is not JSON,
      not laid out as ``SUBSET_LAYOUT``, lists a record out of range, or selects nothing.
  """
  classes = _selected_classes(dataset_cfg.classes)
  subset_file = dataset_cfg.subset_file or ''
  draws = subset_split(read_subset_file(subset_file), split, subset_file) if subset_file else None
  if draws is None and not classes:
    return _open_split(dataset_cfg, split, min_side=min_side, progress=progress)
  parts = []
  for base_split, indices in (draws or {split: None}).items():
    try:
      source = _open_split(dataset_cfg, base_split, min_side=min_side, progress=progress)
    except DatasetNotFoundError as e:
      if draws is None:
        raise
      raise DatasetNotFoundError(
          f'config.dataset.subset_file {subset_file}: split {split!r} draws '
          f'from the split {base_split!r}, which fails to open: {e}') from None
    progress = False  # a built-in set is generated once
    if indices is None:
      indices = np.arange(len(source))
    elif indices.size and indices.max() >= len(source):
      raise ConfigError(f'config.dataset.subset_file {subset_file}: split {split!r} lists record '
                        f'{int(indices.max())} of {base_split!r}, which has {len(source)} records '
                        f'(indices 0..{len(source) - 1}); fix the file')
    parts.append((source, indices))
  num_classes = parts[0][0].num_classes
  outside = [c for c in classes if c >= num_classes]
  if outside:
    raise ConfigError(
        f'config.dataset.classes={classes} names class {outside[0]}, but {dataset_cfg.name!r} '
        f'has {num_classes} classes (indices 0..{num_classes - 1})')
  selected = sources.select(parts, split if draws is not None else parts[0][0].info.split,
                            classes=classes, max_bad_fraction=float(dataset_cfg.max_bad_fraction))
  if not len(selected):
    where = f'the records {subset_file} lists for {split!r}' if draws else f'split {split!r}'
    raise ConfigError(f'config.dataset.classes={classes}: {where} hold no example of these '
                      'classes; choose other classes')
  logging.info('%s/%s: %d examples of %d classes selected (%s)', selected.info.name,
               selected.info.split, len(selected), selected.num_classes, selected.info.selection)
  return selected


def _selected_classes(classes) -> tuple[int, ...]:
  """``dataset.classes`` as a tuple of distinct non-negative ints (their upper bound is the data
  set's, checked once it is open)."""
  if isinstance(classes, (str, bytes)) or not hasattr(classes, '__iter__'):
    raise ConfigError(f'config.dataset.classes={classes!r} must be a tuple of class indices, e.g. '
                      "--config.dataset.classes='(0,1,2)' (() : every class)")
  classes = tuple(classes)
  for c in classes:
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
      raise ConfigError(f'config.dataset.classes={classes!r}: {c!r} is not a class index (an '
                        'integer >= 0)')
  classes = tuple(int(c) for c in classes)
  repeated = [c for i, c in enumerate(classes) if c in classes[:i]]
  if repeated:
    raise ConfigError(f'config.dataset.classes={classes} names class {repeated[0]} twice: give '
                      'each class once')
  return classes


def read_subset_file(path: str) -> dict[str, dict[str, np.ndarray]]:
  """The subset file ``path`` (``dataset.subset_file``, laid out as ``SUBSET_LAYOUT``), checked:
  {split: {split of the data set: int64 record indices}}. Whether the indices exist is checked
  against the data set (``open_source``).

  Raises:
    DatasetNotFoundError: the file is missing or cannot be read.
    ConfigError: it is not JSON, or not so laid out.
  """
  what = f'config.dataset.subset_file {path}'
  try:
    text = storage.read_text(path)
  except FileNotFoundError:
    raise DatasetNotFoundError(
        f'{what} does not exist: write the records of each split there as JSON, '
        f'{SUBSET_LAYOUT}, or pass --config.dataset.subset_file= to read whole splits') from None
  except OSError as e:
    raise DatasetNotFoundError(f'{what} cannot be read ({e.strerror or e}): make it a readable '
                               'file, or pass --config.dataset.subset_file= to read whole '
                               'splits') from None
  except UnicodeDecodeError as e:
    raise ConfigError(f'{what} is not text ({e}); it must be JSON: {SUBSET_LAYOUT}') from None
  try:
    subsets = json.loads(text)
  except ValueError as e:
    raise ConfigError(f'{what} is not valid JSON ({e}); it must be {SUBSET_LAYOUT}') from None
  if not isinstance(subsets, dict) or not subsets:
    raise ConfigError(f'{what} must hold a JSON object of splits, {SUBSET_LAYOUT}; it holds '
                      f'{_json_kind(subsets)}')
  checked = {}
  for split, draws in subsets.items():
    if not isinstance(draws, dict) or not draws:
      raise ConfigError(f'{what}: split {split!r} must be an object naming the splits of the data '
                        f'set it draws from, {SUBSET_LAYOUT}; it is {_json_kind(draws)}')
    checked[split] = {}
    for base_split, indices in draws.items():
      where = f'{what}: split {split!r} draws from {base_split!r}'
      if not isinstance(indices, list):
        raise ConfigError(f'{where} {_json_kind(indices)}, not a list of record indices, as in '
                          f'{SUBSET_LAYOUT}')
      for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
          raise ConfigError(f'{where} the record {_json_kind(i)}, not a record index (an integer '
                            '>= 0)')
      checked[split][base_split] = np.array(indices, np.int64)
    if not sum(len(i) for i in checked[split].values()):
      raise ConfigError(f'{what}: split {split!r} lists no record; list some, or leave the split '
                        'out of the file to read it whole')
  return checked


def _json_kind(value) -> str:
  shown = json.dumps(value)
  shown = shown if len(shown) <= 40 else shown[:37] + '...'
  return f'{shown} ({type(value).__name__})' if not isinstance(value, (dict, list)) else shown


def subset_split(subsets: dict[str, dict[str, np.ndarray]], split: str,
                 path: str) -> dict[str, np.ndarray] | None:
  """What the subset file ``path`` (read by `read_subset_file`) makes of ``split``: {split of the
  data set: record indices}, or None where it does not name it (the split is then read whole).

  Raises:
    ConfigError: the file names 'test' and ``split`` is 'validation' or the other way round (a
      split the data set lacks stands in for the other; here that would be a guess).
  """
  if split in subsets:
    return subsets[split]
  other = {'validation': 'test', 'test': 'validation'}.get(split)
  if other in subsets:
    raise ConfigError(f'config.dataset.subset_file {path} names the split {other!r}, not the '
                      f'{split!r} that is read: name the same split in the config (e.g. '
                      f'--config.dataset.eval_split={other}) and in the file')
  return None


def _open_split(dataset_cfg, split: str, *, min_side: int | None, progress: bool) -> ImageSource:
  """A whole split of the configured data set (`open_source` without a selection)."""
  name = dataset_cfg.name
  if not name:
    raise DatasetNotFoundError("config.dataset.name is empty: set it to 'builtin_shapes' "
                               "or the name of a prepared TFDS data set")
  data_dir = os.path.expanduser(str(dataset_cfg.data_dir or default_data_dir()))
  max_bad_fraction = float(dataset_cfg.max_bad_fraction)
  if name == builtin.NAME:
    directory = builtin.ensure_builtin(data_dir, num_train=int(dataset_cfg.num_train),
                                       num_val=int(dataset_cfg.num_val),
                                       image_size=int(dataset_cfg.image_size),
                                       seed=int(dataset_cfg.seed), progress=progress)
    return open_record_directory(directory, split, max_bad_fraction=max_bad_fraction)
  prepared = os.path.join(data_dir, name)
  if os.path.isfile(os.path.join(prepared, 'metadata.json')):
    return open_record_directory(prepared, split, max_bad_fraction=max_bad_fraction)
  return _open_tfds(name, split, data_dir, max_bad_fraction, min_side)


def open_record_directory(directory: str, split: str, *,
                          max_bad_fraction: float = 0.01) -> ArrayRecordImageSource:
  """Opens a split of a directory of `encode_record` shards with a metadata.json: the built-in
  set (as `ensure_builtin` returns) or a set written by `alexnet_jax.tools.prepare`.

  Raises:
    DatasetNotFoundError: no (or a damaged) metadata.json, or no such split.
    sources.DamagedShardError: a shard of the split is missing, truncated or overwritten, or the
      shards hold another number of records than the metadata says; the message names the shard
      and how to rebuild the set.
  """
  meta_path = os.path.join(directory, 'metadata.json')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise DatasetNotFoundError(
        f'no metadata.json in {directory}: not a finished set; the built-in set is created on '
        f'first use, a folder of images by `python -m alexnet_jax.tools.prepare`') from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a damaged file
    raise DatasetNotFoundError(
        f'{meta_path} is damaged ({e}); {_remedy(directory, None)}') from None
  splits = meta['splits']
  resolved = _resolve_split(split, list(splits))
  if resolved is None:
    raise DatasetNotFoundError(
        f"{meta['name']}: no split {split!r} in {directory} (it has {sorted(splits)})")
  entry = splits[resolved]
  info = DatasetInfo(name=meta['name'], split=resolved, num_examples=int(entry['num_examples']),
                     num_classes=int(meta['num_classes']), class_names=tuple(meta['class_names']),
                     image_size=int(meta['image_size']), location=directory)
  paths = [os.path.join(directory, shard) for shard in entry['shards']]
  return ArrayRecordImageSource(paths, info, max_bad_fraction=max_bad_fraction,
                                remedy=_remedy(directory, meta))


def _remedy(directory: str, meta: dict | None) -> str:
  """How to rebuild the set in ``directory``, said for its error messages."""
  directory = os.path.normpath(directory)
  if os.path.basename(os.path.dirname(directory)) == builtin.NAME:
    return f'delete {directory} and run again: the built-in set is then generated anew'
  source = meta.get('source') if isinstance(meta, dict) else None
  command = ('python -m alexnet_jax.tools.prepare '
             f'--source={source or "DIR"} --name={os.path.basename(directory)} '
             f'--data_dir={os.path.dirname(directory)}')
  return f'delete {directory} and prepare it again (`{command}`)'


def _resolve_split(split: str, available: list[str]) -> str | None:
  """Returns the split to read, allowing 'validation' <-> 'test' and TFDS slicing."""
  base, bracket, rest = split.partition('[')
  if base in available:
    return split
  for a, b in (('validation', 'test'), ('test', 'validation')):
    if base == a and b in available:
      logging.info('split %r not present; using %r instead', base, b)
      return b + bracket + rest
  return None


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  base = name.split('/')[0].split(':')[0]
  if base == 'imagenet2012':
    return (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            f"{os.path.join(data_dir, 'downloads', 'manual')} and run `tfds build imagenet2012 "
            f"--file_format=array_record --data_dir={data_dir}` (the build step needs "
            f"TensorFlow installed; reading does not)")
  return (f'run `tfds build {base} --file_format=array_record --data_dir={data_dir}` '
          f'(the build step may need TensorFlow installed; reading does not)')


def open_multilabel(dataset_cfg, split: str, *, label_key: str = 'labels',
                    min_side: int | None = None) -> MultiLabelTfdsSource:
  """One split of a multi-label TFDS set (PASCAL VOC: ``voc/2012``, whose ``labels`` feature is the
  sequence of the classes an image shows), with its label matrix.

  Raises:
    ConfigError: the set is the built-in set or a prepared folder (single-label sets).
    DatasetNotFoundError: as ``open_source``; a TFDS set without the multi-label feature.
  """
  data_dir = os.path.expanduser(str(dataset_cfg.data_dir or default_data_dir()))
  name = dataset_cfg.name
  if name == builtin.NAME or os.path.isfile(os.path.join(data_dir, str(name), 'metadata.json')):
    raise ConfigError(f'{name!r} is a single-label data set (one class per image): the '
                      f'multi-label protocol needs a TFDS set with a {label_key!r} feature, a '
                      'sequence of class labels (PASCAL VOC: voc/2012)')
  return _open_tfds(dataset_cfg.name, split, data_dir, float(dataset_cfg.max_bad_fraction),
                    min_side, label_key=label_key)


def _open_tfds(name: str, split: str, data_dir: str, max_bad_fraction: float,
               min_side: int | None = None, label_key: str | None = None) -> ImageSource:
  hint = _tfds_prepare_hint(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f"data set {name!r} is neither '{builtin.NAME}', a registered TFDS name, nor "
        f"prepared under {data_dir}; to prepare a folder of images (one subfolder per class): "
        f"`python -m alexnet_jax.tools.prepare --source=DIR --name={name} --data_dir={data_dir}`; "
        f"to prepare a TFDS set: {hint}") from None
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f'TFDS data set {name!r} is not prepared in {builder.data_dir} (looked under '
        f'data_dir={data_dir}); to prepare it: {hint}')
  info = builder.info
  formats = {f.value for f in info.available_file_formats()}
  if 'array_record' not in formats:
    raise DatasetNotFoundError(
        f'TFDS data set {name!r} in {builder.data_dir} is stored as {sorted(formats)}, '
        f'but random access needs ArrayRecord; rebuild it: {hint}')
  resolved = _resolve_split(split, list(info.splits.keys()))
  if resolved is None:
    raise DatasetNotFoundError(
        f'TFDS data set {name!r} in {builder.data_dir} has no split {split!r} '
        f'(it has {sorted(info.splits.keys())})')

  multilabel = label_key is not None
  image_key, label_key = 'image', label_key or 'label'
  if not multilabel and info.supervised_keys and all(
      isinstance(k, str) for k in info.supervised_keys[:2]):
    image_key, label_key = info.supervised_keys[:2]
  features = info.features
  if multilabel and image_key in features and label_key not in features:
    raise DatasetNotFoundError(
        f'TFDS data set {name!r} has no {label_key!r} feature (it has '
        f'{sorted(features.keys())}): it is not a multi-label set (PASCAL VOC is: voc/2012)')
  if image_key not in features or label_key not in features:
    raise DatasetNotFoundError(
        f'TFDS data set {name!r} has no ({image_key!r}, {label_key!r}) features '
        f'(it has {sorted(features.keys())}); an image-classification set is needed')
  label_feature = features[label_key]
  if multilabel:  # a sequence of class labels
    label_feature = getattr(label_feature, 'feature', None)
    if not isinstance(label_feature, tfds.features.ClassLabel):
      raise DatasetNotFoundError(
          f'TFDS data set {name!r}: its {label_key!r} feature is not a sequence of class labels, '
          "so it is not a multi-label set (PASCAL VOC's is: voc/2012)")
  num_classes = int(getattr(label_feature, 'num_classes', 0) or 0)
  names = getattr(label_feature, 'names', None) or [str(i) for i in range(num_classes)]
  image_shape = getattr(features[image_key], 'shape', (None, None, 3))
  image_size = (image_shape[0]
                if image_shape[0] is not None and image_shape[0] == image_shape[1] else None)
  num_examples = int(info.splits[resolved].num_examples)
  src_info = DatasetInfo(name=name, split=resolved, num_examples=num_examples,
                         num_classes=num_classes, class_names=tuple(names), image_size=image_size,
                         location=os.fspath(builder.data_dir))
  kind = MultiLabelTfdsSource if multilabel else TfdsImageSource
  return kind(os.fspath(builder.data_dir), resolved, image_key, label_key, src_info,
              max_bad_fraction=max_bad_fraction, min_side=min_side)
