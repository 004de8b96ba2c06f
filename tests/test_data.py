"""Tests for alexnet_jax.data: the built-in set, sources, and the grain pipelines."""

import collections
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from alexnet_jax import configs, errors
from alexnet_jax.data import builtin, catalog, pipeline, records

from helpers import ListSource, gradient_image, interrupt_on_call

TINY = dict(num_train=64, num_val=24, image_size=40, seed=0)


def _cfg(data_dir, **overrides):
  return configs.dataset_config(
      **{'name': 'builtin_shapes', 'data_dir': str(data_dir), **TINY, **overrides})


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('builtin')
  return builtin.ensure_builtin(str(root), progress=False, **TINY)


def _read_shard_bytes(directory):
  meta = json.load(open(os.path.join(directory, 'metadata.json')))
  return {
      shard: open(os.path.join(directory, shard), 'rb').read() for split in meta['splits'].values()
      for shard in split['shards']
  }


def _indexed_source(n, size=12):
  """Labels are the record indices; images are a gradient."""
  return ListSource([(gradient_image(size, size), i) for i in range(n)])


# ---------------------------------------------------------------------------
# Record format
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('codec', ['raw', 'png', 'jpeg'])
def test_record_roundtrip(codec):
  image = gradient_image(9, 13)
  record = records.encode_record(image, 7, codec)
  assert record[:4] == b'AXJ1'
  out, label = records.decode_record(record)
  assert label == 7 and out.dtype == np.uint8 and out.shape == (9, 13, 3)
  if codec == 'jpeg':
    assert np.abs(out.astype(int) - image).mean() < 3
  else:
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('record', [
    b'', b'AXJ1', b'XXXX' + bytes(16) + b'abc',
    records.encode_record(gradient_image(4, 4), 1, 'png')[:30]
])
def test_decode_record_rejects_garbage(record):
  with pytest.raises(records.CorruptRecordError):
    records.decode_record(record)


# ---------------------------------------------------------------------------
# Built-in generator
# ---------------------------------------------------------------------------


def test_generator_is_deterministic_and_order_free(tiny_dir, tmp_path):
  a, la = builtin.generate_example(0, 0, 5, 40)
  b, lb = builtin.generate_example(0, 0, 5, 40)
  np.testing.assert_array_equal(a, b)
  assert la == lb == 5
  assert not np.array_equal(a, builtin.generate_example(1, 0, 5, 40)[0])  # seed matters
  assert not np.array_equal(a, builtin.generate_example(0, 1, 5, 40)[0])  # split matters
  # A second generation, with 2 worker processes and other shard sizes, has the
  # same records, and with the same sharding the very same bytes.
  other = builtin.ensure_builtin(str(tmp_path / 'again'), progress=False, num_workers=2, **TINY)
  assert _read_shard_bytes(other) == _read_shard_bytes(tiny_dir)
  sharded = builtin.ensure_builtin(str(tmp_path / 'sharded'), progress=False, examples_per_shard=10,
                                   **TINY)
  assert len(_read_shard_bytes(sharded)) == 7 + 3
  s1 = catalog.open_record_directory(tiny_dir, 'validation')
  s2 = catalog.open_record_directory(sharded, 'validation')
  for i in range(len(s1)):
    np.testing.assert_array_equal(s1[i]['image'], s2[i]['image'])


def test_builtin_content(tiny_dir):
  src = catalog.open_source(_cfg(os.path.dirname(os.path.dirname(tiny_dir))), 'train',
                            progress=False)
  assert len(src) == 64 and src.num_classes == 10
  assert src.class_names == builtin.CLASS_NAMES and len(set(src.class_names)) == 10
  items = [src[i] for i in range(len(src))]
  labels = np.array([it['label'] for it in items])
  assert labels.dtype == np.int32
  counts = collections.Counter(labels.tolist())
  assert sorted(counts) == list(range(10))
  assert max(counts.values()) - min(counts.values()) <= 1
  images = np.stack([it['image'] for it in items])
  assert images.shape == (64, 40, 40, 3) and images.dtype == np.uint8
  assert images.reshape(64, -1).std(axis=1).min() > 10  # no flat images
  assert len({im.tobytes() for im in images}) == 64  # all different
  val = catalog.open_source(_cfg(os.path.dirname(os.path.dirname(tiny_dir))), 'validation',
                            progress=False)
  assert len(val) == 24 and val.info.split == 'validation'
  assert val.info.image_size == 40


def test_ensure_builtin_is_atomic_and_idempotent(tmp_path, monkeypatch):
  root = str(tmp_path)
  final = builtin.builtin_directory(root, **TINY)
  real_encode, real_write = builtin._encode_example, builtin._write_set
  interrupt_on_call(monkeypatch, builtin, '_encode_example', 40)
  with pytest.raises(KeyboardInterrupt):
    builtin.ensure_builtin(root, progress=False, num_workers=0, **TINY)
  assert not os.path.exists(final)
  assert not builtin.is_complete(final)
  assert os.listdir(os.path.dirname(final)) == []  # the temporary directory is gone

  monkeypatch.setattr(builtin, '_encode_example', real_encode)
  assert builtin.ensure_builtin(root, progress=False, **TINY) == final
  assert builtin.is_complete(final)
  meta = json.load(open(os.path.join(final, 'metadata.json')))
  assert meta['num_classes'] == 10 and meta['image_size'] == 40
  assert meta['splits']['train']['num_examples'] == 64
  assert meta['splits']['validation']['num_examples'] == 24
  stamp = os.stat(os.path.join(final, 'metadata.json')).st_mtime_ns

  def boom(*args, **kwargs):
    raise AssertionError('a complete set must not be regenerated')

  monkeypatch.setattr(builtin, '_write_set', boom)
  assert builtin.ensure_builtin(root, progress=False, **TINY) == final
  assert os.stat(os.path.join(final, 'metadata.json')).st_mtime_ns == stamp

  # A directory without metadata.json (e.g. damaged by hand) is not taken as complete:
  # it is regenerated and replaced.
  os.remove(os.path.join(final, 'metadata.json'))
  assert not builtin.is_complete(final)
  with pytest.raises(AssertionError, match='must not be regenerated'):
    builtin.ensure_builtin(root, progress=False, **TINY)
  monkeypatch.setattr(builtin, '_write_set', real_write)
  assert builtin.ensure_builtin(root, progress=False, **TINY) == final
  assert builtin.is_complete(final)
  assert sorted(os.listdir(os.path.dirname(final))) == [os.path.basename(final)]


# ---------------------------------------------------------------------------
# Training pipeline
# ---------------------------------------------------------------------------


def test_train_batches_shape_dtype(tiny_dir):
  src = catalog.open_record_directory(tiny_dir, 'train')
  ds = pipeline.train_dataset(src, global_batch_size=16, crop_size=32, seed=0)
  it = iter(ds)
  for _ in range(6):  # more than one epoch (64 / 16 = 4 batches)
    batch = next(it)
    assert set(batch) == {'image', 'label', 'crop', 'alpha'}
    assert batch['crop'].shape == (16, 3) and batch['crop'].dtype == np.int32
    assert batch['alpha'].shape == (16, 3) and not batch['alpha'].any()  # PCA off by default
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
    assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
  with pytest.raises(ValueError):
    pipeline.train_dataset(src, global_batch_size=10, crop_size=32, seed=0, shards=4,
                           host_shards=(0,))


def test_train_crop_windows_and_flips():
  size, crop = 12, 8
  src = ListSource([(gradient_image(size, size), i % 3) for i in range(20)])
  ds = pipeline.train_dataset(src, global_batch_size=10, crop_size=crop, seed=3)
  it = iter(ds)
  seen_flip, seen_plain, tops, lefts = 0, 0, set(), set()
  for _ in range(10):
    for image in next(it)['image']:
      rows, cols = image[..., 0].astype(int) // 5, image[..., 1].astype(int) // 5
      top = rows[0, 0]
      np.testing.assert_array_equal(rows, top + np.arange(crop)[:, None].repeat(crop, 1))
      left = cols[0].min()
      window = left + np.arange(crop)
      if cols[0, 0] == left:
        seen_plain += 1
        np.testing.assert_array_equal(cols, np.broadcast_to(window, (crop, crop)))
      else:
        seen_flip += 1
        np.testing.assert_array_equal(cols, np.broadcast_to(window[::-1], (crop, crop)))
      assert 0 <= top <= size - crop and 0 <= left <= size - crop
      tops.add(int(top))
      lefts.add(int(left))
  assert seen_flip > 20 and seen_plain > 20  # p = 0.5 over 100 crops
  assert len(tops) == len(lefts) == size - crop + 1  # every offset is used


def test_small_images_are_resized_up():
  src = ListSource([(gradient_image(20, 30), 0)] * 4)
  batch = next(iter(pipeline.train_dataset(src, global_batch_size=4, crop_size=32, seed=0)))
  assert batch['image'].shape == (4, 32, 32, 3)
  ev = next(iter(pipeline.eval_dataset(src, global_batch_size=4, crop_size=32)))
  assert ev['image'].shape == (4, 32, 32, 3)
  # resize_to: shorter side to 16, central 16x16, then the crop.
  ev = next(iter(pipeline.eval_dataset(src, global_batch_size=4, crop_size=12, resize_to=16)))
  assert ev['image'].shape == (4, 12, 12, 3)


def test_processes_share_every_epoch_once():
  n, count, global_batch = 24, 4, 8
  src = _indexed_source(n)
  seen = []
  for p in range(count):
    ds = pipeline.train_dataset(src, global_batch_size=global_batch, crop_size=8, seed=5,
                                shards=count, host_shards=(p,))
    it = iter(ds)
    # Local batch 2, 3 global batches per epoch: the processes' first 3 batches are one epoch.
    seen.extend(np.concatenate([next(it)['label'] for _ in range(3)]).tolist())
  assert sorted(seen) == list(range(n))


@pytest.mark.parametrize('workers', [0, 2])
def test_iterator_state_restores_exactly(tiny_dir, workers):
  src = catalog.open_record_directory(tiny_dir, 'train')
  ds = pipeline.train_dataset(src, global_batch_size=8, crop_size=32, seed=11, workers=workers)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # a checkpoint round trip
  expected = [next(it) for _ in range(6)]  # crosses the epoch border (8 batches/epoch)
  if workers:
    it.close()
  it2 = iter(ds)
  it2.set_state(state)
  got = [next(it2) for _ in range(6)]
  if workers:
    it2.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Different seeds give different streams.
  other = next(iter(pipeline.train_dataset(src, global_batch_size=8, crop_size=32, seed=12)))
  first = next(iter(pipeline.train_dataset(src, global_batch_size=8, crop_size=32, seed=11)))
  assert not np.array_equal(other['image'], first['image'])


# ---------------------------------------------------------------------------
# Evaluation pipeline
# ---------------------------------------------------------------------------


def test_eval_covers_each_example_once_with_mask():
  n = 23
  src = _indexed_source(n, size=12)
  ds = pipeline.eval_dataset(src, global_batch_size=10, crop_size=8)
  for _ in range(2):  # iterable again for the next evaluation
    batches = list(ds)
    assert len(batches) == 3 == pipeline.eval_steps(n, 10)
    for b in batches:
      assert b['image'].shape == (10, 8, 8, 3) and b['image'].dtype == np.uint8
      assert b['mask'].dtype == np.float32 and b['label'].dtype == np.int32
    mask = np.concatenate([b['mask'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(mask, [1.0] * n + [0.0] * 7)
    assert labels[mask == 1].tolist() == list(range(n))  # in order, each once
    images = np.concatenate([b['image'] for b in batches])
    assert (images[mask == 0] == 0).all()
    # Centre crop of a 12px gradient at crop 8 starts at row/column 2, unflipped.
    np.testing.assert_array_equal(images[0, :, :, 0] // 5, (2 + np.arange(8))[:, None].repeat(8, 1))
    np.testing.assert_array_equal(images[0, :, :, 1] // 5, (2 + np.arange(8))[None, :].repeat(8, 0))


@pytest.mark.parametrize(
    'layout',
    [
        [(0,), (1,), (2,), (3,)],  # the data axis over 4 hosts
        [(0, 1), (2, 3)],  # 2 hosts of 2 data shards each
        [(0, 2), (1, 3)],  # hosts whose shards interleave (a TPU mesh can)
        [(0, 1), (0, 1), (2, 3), (2, 3)],  # the model axis across pairs of hosts
    ])
def test_eval_multi_process_lock_step(layout):
  """Every host yields the same number of batches; its rows are those of its data shards; over
  the distinct shard sets each example is counted exactly once; hosts with the same shards (the
  model axis across hosts) read the same rows."""
  n, shards, global_batch = 25, 4, 8
  src = _indexed_source(n)
  seen, lengths, rows = [], set(), {}
  for host in layout:
    batches = list(
        pipeline.eval_dataset(src, global_batch_size=global_batch, crop_size=8, shards=shards,
                              host_shards=host))
    lengths.add(len(batches))
    for b in batches:
      assert b['image'].shape == (2 * len(host), 8, 8, 3)
    labels = [b['label'][b['mask'] == 1].tolist() for b in batches]
    if host in rows:
      assert rows[host] == labels
      continue
    rows[host] = labels
    for step, b in enumerate(labels):  # global batch `step`, rows of shard i: 8·step + 2·i …
      expected = [r for i in host for r in range(8 * step + 2 * i, 8 * step + 2 * i + 2) if r < n]
      assert b == expected
      seen.extend(b)
  assert lengths == {pipeline.eval_steps(n, global_batch)} == {4}  # ceil(25/8)
  assert sorted(seen) == list(range(n))


def test_step_helpers():
  assert pipeline.steps_per_epoch(10000, 128) == 78
  assert pipeline.steps_per_epoch(10, 128) == 1
  assert pipeline.eval_steps(2000, 128) == 16
  assert pipeline.eval_steps(0, 128) == 1
  assert pipeline.host_rows(128, 4, (1, 2)) == 64
  with pytest.raises(ValueError):
    pipeline.host_rows(10, 4)
  with pytest.raises(ValueError):
    pipeline.host_rows(8, 4, (4,))


# ---------------------------------------------------------------------------
# Errors: missing sets, corrupt records
# ---------------------------------------------------------------------------


def test_missing_imagenet_explains_how_to_prepare(tmp_path):
  cfg = _cfg(tmp_path, name='imagenet2012')
  with pytest.raises(errors.DatasetNotFoundError) as info:
    catalog.open_source(cfg, 'train', progress=False)
  message = str(info.value)
  assert '\n' not in message
  assert 'imagenet2012' in message and str(tmp_path) in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'tfds build imagenet2012 --file_format=array_record' in message
  assert isinstance(info.value, ValueError)


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(errors.DatasetNotFoundError) as info:
    catalog.open_source(_cfg(tmp_path, name='no_such_dataset_xyz'), 'train', progress=False)
  message = str(info.value)
  assert 'no_such_dataset_xyz' in message and str(tmp_path) in message
  assert 'tfds build no_such_dataset_xyz --file_format=array_record' in message
  assert '\n' not in message


def _rewrite_shard(path, replace):
  reader = ArrayRecordReader(path)
  stored = list(reader.read_all())
  reader.close()
  for index, data in replace.items():
    stored[index] = data
  writer = ArrayRecordWriter(path, 'group_size:1')
  for r in stored:
    writer.write(r)
  writer.close()


def test_corrupt_records_are_skipped_and_counted(tiny_dir, tmp_path, caplog):
  directory = str(tmp_path / 'copy')
  shutil.copytree(tiny_dir, directory)
  meta = json.load(open(os.path.join(directory, 'metadata.json')))
  shard = os.path.join(directory, meta['splits']['validation']['shards'][0])
  good = catalog.open_record_directory(tiny_dir, 'validation')
  truncated = records.encode_record(good[7]['image'], 7, 'png')[:200]
  _rewrite_shard(shard, {3: b'definitely not a record', 7: truncated})

  src = catalog.open_record_directory(directory, 'validation', max_bad_fraction=0.1)
  with caplog.at_level('WARNING'):
    item = src[3]
  np.testing.assert_array_equal(item['image'], good[4]['image'])  # the next good one
  assert item['label'] == good[4]['label']
  assert src.num_bad_records == 1 and 3 in src.bad_records
  assert 'bad record 3' in caplog.text
  src[3]
  assert src.num_bad_records == 1  # counted once per record
  # A whole evaluation pass goes through; replacements keep shapes static.
  batches = list(pipeline.eval_dataset(src, global_batch_size=8, crop_size=32))
  assert sum(b['mask'].sum() for b in batches) == 24
  assert src.num_bad_records == 2 and set(src.bad_records) == {3, 7}
  # Pickling (as grain workers do) keeps the source usable.
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[0]['image'], good[0]['image'])

  # Over the threshold (2 of 24 > 5 %): a clear error.
  strict = catalog.open_record_directory(directory, 'validation', max_bad_fraction=0.05)
  strict[3]
  with pytest.raises(errors.TooManyBadRecordsError, match='max_bad_fraction'):
    strict[7]


# ---------------------------------------------------------------------------
# TFDS sets (ArrayRecord, read without TensorFlow)
# ---------------------------------------------------------------------------


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def _tfds_builder_class():

  class TinyShapesForTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = 'alexnet_jax_tiny_test_set'
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3)),
              'label': tfds.features.ClassLabel(names=['zero', 'one', 'two'])
          }), supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(9, 0), 'test': self._generate_examples(4, 100)}

    def _generate_examples(self, n, offset):
      for i in range(n):
        # Encoded bytes: encoding arrays would need TensorFlow.
        image = np.full((10 + i, 12, 3), offset + i, np.uint8)
        image[0, 0, 0] = i % 3
        yield offset + i, {'image': _png(image), 'label': i % 3}

  return TinyShapesForTest


def test_tfds_array_record_source(tmp_path):
  builder = _tfds_builder_class()(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare()
  cfg = _cfg(tmp_path, name='alexnet_jax_tiny_test_set')
  train = catalog.open_source(cfg, 'train', progress=False)
  assert len(train) == 9 and train.num_classes == 3
  assert train.class_names == ('zero', 'one', 'two')
  for i in range(len(train)):
    item = train[i]
    image = item['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[1:] == (12, 3)
    assert item['label'] == image[0, 0, 0]  # pixel and label were stored together
  # The set has no 'validation' split: 'test' stands in.
  val = catalog.open_source(cfg, 'validation', progress=False)
  assert val.info.split == 'test' and len(val) == 4
  # Pickled copies reopen the data lazily (grain worker processes).
  clone = pickle.loads(pickle.dumps(val))
  np.testing.assert_array_equal(clone[2]['image'], val[2]['image'])
  batches = list(pipeline.eval_dataset(val, global_batch_size=4, crop_size=8))
  assert len(batches) == 1 and batches[0]['mask'].sum() == 4
  with pytest.raises(errors.DatasetNotFoundError, match='no split'):
    catalog.open_source(cfg, 'extra', progress=False)


class _PrioritySource:
  """Each example's label tells how the process that read it is scheduled: its niceness, and
  100 more under SCHED_IDLE."""

  def __len__(self):
    return 8

  def __getitem__(self, i):
    idle = os.sched_getscheduler(0) == os.SCHED_IDLE
    return {'image': np.zeros((8, 8, 3), np.uint8), 'label': np.int32(os.nice(0) + 100 * idle)}


@pytest.mark.parametrize('priority, niceness, idle', [('normal', 0, 0), ('low', 19, 0),
                                                      ('idle', 19, 1)])
def test_input_workers_run_at_the_configured_priority(priority, niceness, idle):
  ds = pipeline.train_dataset(_PrioritySource(), global_batch_size=4, crop_size=8, seed=0,
                              workers=1, worker_priority=priority)
  it = iter(ds)
  labels = next(it)['label']
  it.close()
  np.testing.assert_array_equal(labels, min(os.nice(0) + niceness, 19) + 100 * idle)
  with pytest.raises(ValueError, match="unknown input.worker_priority 'high'"):
    pipeline.train_dataset(_PrioritySource(), global_batch_size=4, crop_size=8, seed=0, workers=1,
                           worker_priority='high')
