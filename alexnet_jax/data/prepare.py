"""Prepares a folder of labelled images once, the paper's way, for training (the command is
``python -m alexnet_jax.tools.prepare``).

``DIR`` holds one subfolder per class (JPEG, PNG, ... of any size; the ImageNet train tarball
unpacked is one). Every image is rescaled so its shorter side is 256 and its central 256 x 256
square is kept (the paper's preprocessing, done once, so training decodes small JPEGs and the
originals are not needed afterwards), and stored as JPEG (or, with ``--codec=raw``, as the
pixels themselves: see ``CODECS``) in ArrayRecord shards under
``D/NAME/`` with the class names; then the training split's mean image and RGB principal
components are stored beside them (`data.statistics`). Train with
``--config.dataset.name=NAME --config.dataset.data_dir=D``.

Robust and resumable:
- files that are not images, are truncated or corrupt, or are larger than ``--max_pixels``
  (decompression bombs) are skipped, counted, and listed in ``D/NAME/prepare_report.json``;
- every numeric option is checked before anything is read or written; an empty class folder is
  refused (it would be a class without images, which changes the class count and labels);
- folders reached through symlinks are read, each real folder and file once (loops and second
  links are counted once and listed in the report); 16-bit images are scaled to 8 bits
  (`records.load_rgb`);
- each shard is written to a temporary file, renamed into place and then marked done; an
  interrupted run started again with the same arguments redoes only the unfinished shards;
- ``metadata.json`` is written last: until then the set cannot be opened by mistake.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import warnings

import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from tqdm.auto import tqdm

from alexnet_jax.data import augment, builtin, catalog, records, sources, statistics
from alexnet_jax.errors import PrepareError

FORMAT_VERSION = 1
REPORT = 'prepare_report.json'
PLAN = 'prepare_plan.json'
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (about 0.25 GB of RGB pixels)
# How the squares are stored. 'jpeg' decodes every image every epoch (libjpeg-turbo: the largest
# cost of a training image on the host). 'raw' stores the decoded pixels, so training only reads
# and crops them: about 1.35x the images per host core of libjpeg-turbo's path (2.1-2.3x PIL's;
# tools/bench_input --raw_data measures it), for about 196 KB a 256² image on disk
# and in the page cache instead of the 15-40 KB of its JPEG (ImageNet's 1.28 M: about 250 GB).
# The raw pixels are the square before any JPEG loss.
CODECS = ('jpeg', 'raw')
# One record per chunk: random access reads one record. ArrayRecord compresses chunks by default;
# raw pixels are left uncompressed, since decompressing them would cost more than the JPEG
# decode they replace (measured: about 0.6 ms of a 256² image's read against 0.04 ms).
_WRITER_OPTIONS = {'jpeg': 'group_size:1', 'raw': 'group_size:1,uncompressed'}

# ---------------------------------------------------------------------------
# One file (runs in worker processes)
# ---------------------------------------------------------------------------


def process_file(task: tuple[str, int, int, int, int, str]):
  """(path, label, size, jpeg_quality, max_pixels, codec) → ('ok', record, stored pixels) or
  ('bad', reason). Never raises for a bad file."""
  path, label, size, quality, max_pixels, codec = task
  previous_limit = Image.MAX_IMAGE_PIXELS
  try:
    with warnings.catch_warnings():
      # Between max_pixels and 2 x max_pixels PIL only warns; refuse those too.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      Image.MAX_IMAGE_PIXELS = max_pixels
      image = records.read_image_file(path, min_side=size)
      square = augment.square_of(Image.fromarray(image), size)
    record = records.encode_record(np.asarray(square, np.uint8), label, codec, jpeg_quality=quality)
    # The statistics are of what training will decode, not of the pixels before JPEG.
    pixels, _ = records.decode_record(record)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    return 'bad', f'refused, too many pixels (limit {max_pixels:,}): {e}'
  except Exception as e:  # pylint: disable=broad-except  (PIL raises a zoo of types)
    return 'bad', f'{type(e).__name__}: {e}'
  finally:
    Image.MAX_IMAGE_PIXELS = previous_limit
  return 'ok', record, pixels


# ---------------------------------------------------------------------------
# The plan: which file goes to which split and shard (deterministic, so a resumed run agrees)
# ---------------------------------------------------------------------------


def _split_files(files, num_classes: int, val_fraction: float, seed: int):
  """Per class, a random ``val_fraction`` of the files (rounded) goes to validation."""
  rng = np.random.default_rng(seed)
  train, val = [], []
  for label in range(num_classes):
    mine = [f for f in files if f[1] == label]
    take = int(round(val_fraction * len(mine)))
    chosen = set(rng.permutation(len(mine))[:take].tolist())
    for i, f in enumerate(mine):
      (val if i in chosen else train).append(f)
  return train, val


def _shards(split: str, files: list, examples_per_shard: int) -> list[dict]:
  n = max(1, math.ceil(len(files) / examples_per_shard))
  per = math.ceil(len(files) / n)
  return [
      dict(name=f'{split}.array_record-{k:05d}-of-{n:05d}', files=files[k * per:(k + 1) * per])
      for k in range(n)
  ]


def check_arguments(*, val_fraction: float | None, val_dir: str | None, image_size: int,
                    jpeg_quality: int, examples_per_shard: int, workers: int | None, seed: int,
                    max_pixels: int, codec: str = 'jpeg') -> None:
  """Refuses impossible options (`PrepareError`, named as the flags of the command) before any
  file is listed or written."""
  if codec not in CODECS:
    raise PrepareError(f'--codec={codec!r}: choose one of {", ".join(CODECS)} (jpeg: small '
                       'files, decoded every epoch; raw: the pixels, about 1.35x the training '
                       'images per host core, about 196 KB a 256² image)')
  if val_fraction is not None and val_dir is not None:
    raise PrepareError('give either --val_fraction or --val_dir, not both')
  if val_fraction is not None and not 0.0 <= val_fraction < 1.0:  # NaN fails too
    raise PrepareError(f'--val_fraction={val_fraction}: must be in [0, 1) (the fraction of each '
                       'class held out for validation)')
  ranges = [
      # The records store sides as uint16, and JPEG allows at most 65,500 pixels a side.
      ('image_size', image_size, 1, 65_500, 'the side of the stored square images'),
      ('jpeg_quality', jpeg_quality, 1, 100, "PIL's JPEG quality scale"),
      ('examples_per_shard', examples_per_shard, 1, None, 'images per shard'),
      ('workers', workers, 0, None, 'decoding processes; 0 or 1 decode in this process'),
      ('seed', seed, 0, None, "numpy's seeds are non-negative"),
      ('max_pixels', max_pixels, 1, None, 'the largest image accepted, in pixels'),
  ]
  for flag, value, low, high, what in ranges:
    if value is None and flag == 'workers':  # all cores
      continue
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
      bounds = f'from {low:,} to {high:,}' if high is not None else f'at least {low}'
      raise PrepareError(f'--{flag}={value}: must be an integer {bounds} ({what})')


def make_plan(source: str, *, name: str, val_fraction: float | None, val_dir: str | None,
              image_size: int, jpeg_quality: int, examples_per_shard: int, seed: int,
              max_pixels: int, codec: str = 'jpeg') -> dict:
  check_arguments(val_fraction=val_fraction, val_dir=val_dir, image_size=image_size,
                  jpeg_quality=jpeg_quality, examples_per_shard=examples_per_shard, workers=None,
                  seed=seed, max_pixels=max_pixels, codec=codec)
  source = os.path.abspath(source)
  scanned = sources.scan_class_folder(source)
  class_names = scanned.class_names
  files = [(os.path.join(source, p), label) for p, label in scanned.files]
  counted_once = {'source': _counted_once(scanned)}
  if val_dir is not None:
    val_dir = os.path.abspath(val_dir)
    # A class without validation images is harmless: the labels come from the training folder.
    val_scanned = sources.scan_class_folder(val_dir, allow_empty_classes=True)
    val_classes = val_scanned.class_names
    unknown = sorted(set(val_classes) - set(class_names))
    if unknown:
      raise PrepareError(f'--val_dir {val_dir} has classes that --source lacks: '
                         f'{", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}')
    train_ids = set(scanned.file_ids) - {None}
    shared = [p for p, key in zip(val_scanned.files, val_scanned.file_ids) if key in train_ids]
    if shared:
      raise PrepareError(
          f'{len(shared)} files of --val_dir {val_dir} are also files of --source {source} '
          f'(e.g. {os.path.join(val_dir, shared[0][0])}; links?): validation images must not be '
          'trained on; give folders that share no file')
    index = {c: i for i, c in enumerate(class_names)}
    train = files
    val = [(os.path.join(val_dir, p), index[val_classes[label]]) for p, label in val_scanned.files]
    counted_once['val_dir'] = _counted_once(val_scanned)
  else:
    val_fraction = 0.1 if val_fraction is None else float(val_fraction)
    train, val = _split_files(files, len(class_names), val_fraction, seed)
  if not train:
    raise PrepareError(f'no training files left in {source}')
  splits = {'train': _shards('train', train, examples_per_shard)}
  if val:
    splits['validation'] = _shards('validation', val, examples_per_shard)
  return dict(format_version=FORMAT_VERSION, name=name, source=source, val_dir=val_dir,
              val_fraction=val_fraction, seed=seed, image_size=image_size, codec=codec,
              jpeg_quality=jpeg_quality, max_pixels=max_pixels, class_names=class_names,
              splits=splits, counted_once=counted_once)


def _counted_once(scanned: sources.ClassFolder) -> dict:
  """For the report: what the listing saw twice (through links) and counted once."""
  return dict(files=[dict(file=p, same_as=kept) for p, kept in scanned.repeated_files],
              folders=scanned.repeated_folders)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _done_path(directory: str, shard: str) -> str:
  return os.path.join(directory, f'.{shard}.done.json')


def _stats_path(directory: str, shard: str) -> str:
  return os.path.join(directory, f'.{shard}.stats.npz')


def _write_shard(directory: str, split: str, shard: dict, plan: dict, results, bar) -> dict:
  """Writes one shard from an iterator of `process_file` results; returns its completion record."""
  final = os.path.join(directory, shard['name'])
  tmp = final + '.tmp'
  acc = statistics.Accumulator(plan['image_size']) if split == 'train' else None
  bad, count = [], 0
  writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS[plan['codec']])
  try:
    for (path, _), result in zip(shard['files'], results):
      if result[0] == 'ok':
        writer.write(result[1])
        count += 1
        if acc is not None:
          acc.add(result[2])
      else:
        bad.append(dict(file=path, reason=result[1]))
        bar.set_postfix(skipped=bar.skipped + len(bad), refresh=False)
      bar.update(1)
  finally:
    writer.close()
  os.replace(tmp, final)
  if acc is not None:
    np.savez(_stats_path(directory, shard['name']), **acc.state())
  done = dict(num_examples=count, bad=bad)
  _write_json(_done_path(directory, shard['name']), done)  # last: marks the shard finished
  return done


def prepare(source: str, name: str, *, data_dir: str | None = None,
            val_fraction: float | None = None, val_dir: str | None = None, image_size: int = 256,
            jpeg_quality: int = 90, examples_per_shard: int = 1024, workers: int | None = None,
            seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, codec: str = 'jpeg',
            progress: bool = True) -> str:
  """Prepares ``source`` as ``{data_dir}/{name}``; returns that directory (see the module doc).

  Raises:
    PrepareError: an option out of range (checked first, before anything is listed or written),
      a name already taken, an unwritable ``data_dir``.
    DatasetNotFoundError: ``source`` or ``val_dir`` is not a folder of class subfolders, or one
      of its class subfolders is empty (refused rather than skipped: dropping a class would
      silently change the class count and the labels of the others; see
      `sources.scan_class_folder`).
  """
  check_arguments(val_fraction=val_fraction, val_dir=val_dir, image_size=image_size,
                  jpeg_quality=jpeg_quality, examples_per_shard=examples_per_shard, workers=workers,
                  seed=seed, max_pixels=max_pixels, codec=codec)
  if not name or os.sep in name or name.startswith('.') or name == builtin.NAME:
    raise PrepareError(f'--name={name!r}: give a plain folder name (not {builtin.NAME!r})')
  data_dir = os.path.expanduser(data_dir or catalog.default_data_dir())
  directory = os.path.join(data_dir, name)
  if os.path.isfile(os.path.join(directory, 'metadata.json')):
    logging.info('%s is already prepared', directory)
    return directory
  plan = make_plan(source, name=name, val_fraction=val_fraction, val_dir=val_dir,
                   image_size=image_size, jpeg_quality=jpeg_quality,
                   examples_per_shard=examples_per_shard, seed=seed, max_pixels=max_pixels,
                   codec=codec)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # a data_dir the user cannot write to
    raise PrepareError(f'cannot create {directory}: {e}; choose a writable --data_dir') from None
  plan_path = os.path.join(directory, PLAN)
  if os.path.isfile(plan_path):
    with open(plan_path) as f:
      if json.load(f) != json.loads(json.dumps(plan)):
        raise PrepareError(
            f'{directory} holds an unfinished preparation of other files or options; run the '
            f'same command as before to resume it, or delete {directory} to start over')
    logging.info('resuming the preparation in %s', directory)
  elif os.listdir(directory):
    raise PrepareError(f'{directory} exists and is not a preparation in progress; choose another '
                       f'--name or --data_dir, or delete it')
  else:
    _write_json(plan_path, plan)

  todo = [(split, shard)
          for split, shards in plan['splits'].items()
          for shard in shards
          if not (os.path.isfile(_done_path(directory, shard['name'])) and
                  os.path.isfile(os.path.join(directory, shard['name'])))]
  total = sum(len(s['files']) for shards in plan['splits'].values() for s in shards)
  remaining = sum(len(shard['files']) for _, shard in todo)
  if workers is None:
    workers = os.cpu_count() or 1
  tasks = ((path, label, image_size, jpeg_quality, max_pixels, codec)
           for _, shard in todo
           for path, label in shard['files'])
  pool = None
  if workers > 1 and remaining > 64:
    # spawn, not fork: the caller may run JAX (threads), which forking would break.
    pool = multiprocessing.get_context('spawn').Pool(workers)
    results = pool.imap(process_file, tasks, chunksize=16)
  else:
    results = map(process_file, tasks)
  bar = tqdm(total=total, initial=total - remaining, desc=f'preparing {name}', unit='img',
             disable=not progress)
  bar.skipped = 0
  try:
    for split, shard in todo:
      done = _write_shard(directory, split, shard, plan, results, bar)
      bar.skipped += len(done['bad'])
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()
      pool.join()
  return _finish(directory, plan)


def _finish(directory: str, plan: dict) -> str:
  splits, bad, acc = {}, {}, None
  for split, shards in plan['splits'].items():
    count = 0
    for shard in shards:
      with open(_done_path(directory, shard['name'])) as f:
        done = json.load(f)
      count += done['num_examples']
      bad.setdefault(split, []).extend(done['bad'])
      if split == 'train':
        with np.load(_stats_path(directory, shard['name'])) as z:
          part = statistics.Accumulator.from_state(z)
        if acc is None:
          acc = part
        else:
          acc.merge(part)
    if count == 0:
      raise PrepareError(f'none of the {split} files of {plan["source"]} could be read; see '
                         f'{os.path.join(directory, REPORT)}')
    splits[split] = dict(num_examples=count, shards=[s['name'] for s in shards])
  num_bad = sum(len(v) for v in bad.values())
  unreadable = {entry['file'] for entry in bad.get('train', [])}
  trained = {
      label for part in plan['splits']['train'] for path, label in part['files']
      if path not in unreadable
  }
  # Every class folder held files (scan_class_folder refuses empty ones), but all of a class's
  # may have been unreadable: kept as a class (its label is fixed), and said.
  no_images = [c for label, c in enumerate(plan['class_names']) if label not in trained]
  if no_images:
    logging.warning('%s: no readable training image for the classes %s; see %s', directory,
                    ', '.join(no_images), os.path.join(directory, REPORT))
  _write_json(
      os.path.join(directory, REPORT),
      dict(source=plan['source'], val_dir=plan['val_dir'],
           num_examples={k: v['num_examples'] for k, v in splits.items()}, num_skipped=num_bad,
           skipped={k: v for k, v in bad.items() if v}, classes_without_training_images=no_images,
           counted_once=plan.get('counted_once', {})))
  statistics.save(acc.finalize(), os.path.join(directory, statistics.FILENAME))
  meta = dict(name=plan['name'], format_version=FORMAT_VERSION,
              num_classes=len(plan['class_names']), class_names=plan['class_names'],
              image_size=plan['image_size'], codec=plan['codec'], jpeg_quality=plan['jpeg_quality'],
              source=plan['source'], record_format='records.encode_record', splits=splits)
  _write_json(os.path.join(directory, 'metadata.json'), meta)  # last: the set is complete
  for shards in plan['splits'].values():  # the resumption bookkeeping is no longer needed
    for shard in shards:
      for path in (_done_path(directory, shard['name']), _stats_path(directory, shard['name'])):
        if os.path.exists(path):
          os.remove(path)
  os.remove(os.path.join(directory, PLAN))
  return directory
