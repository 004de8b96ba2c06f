"""Training and evaluating on part of a data set: ``dataset.classes`` (some classes, relabelled),
``dataset.subset_file`` (chosen records of the data set's splits), ``source.labels()`` (every
label without decoding an image), and what reads a part: the pipelines, their worker processes,
the statistics, and the entry point's one error line."""

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from alexnet_jax import configs, errors, host
from alexnet_jax.data import builtin, catalog, inputs, pipeline, records, sources, statistics

from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_train=40, num_val=20, image_size=16, seed=0)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('subsets')
  builtin.ensure_builtin(str(root), progress=False, **TINY)
  return str(root)


def _cfg(data_dir, **overrides):
  return configs.dataset_config(
      **{'name': 'builtin_shapes', 'data_dir': data_dir, **TINY, **overrides})


def _subset_file(tmp_path, content, name='subset.json'):
  path = tmp_path / name
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  return str(path)


def _decoded_labels(source):
  return np.array([source[i]['label'] for i in range(len(source))], np.int64)


def test_classes_keep_their_examples_relabelled_in_the_order_given(data_dir):
  full = catalog.open_source(_cfg(data_dir), 'train', progress=False)
  part = catalog.open_source(_cfg(data_dir, classes=(7, 2)), 'train', progress=False)
  assert isinstance(part, sources.SubsetImageSource)
  kept = [i for i in range(len(full)) if full[i]['label'] in (7, 2)]  # builtin: label = i % 10
  assert len(part) == part.info.num_examples == len(kept) == 8
  assert part.num_classes == part.info.num_classes == 2
  assert part.class_names == (builtin.CLASS_NAMES[7], builtin.CLASS_NAMES[2])
  assert part.info.image_size == full.info.image_size and part.info.location == full.info.location
  for j, i in enumerate(kept):
    np.testing.assert_array_equal(part[j]['image'], full[i]['image'])
    assert part[j]['label'] == (0 if full[i]['label'] == 7 else 1)
  np.testing.assert_array_equal(part.labels(), _decoded_labels(part))
  # The evaluation split is cut the same way.
  val = catalog.open_source(_cfg(data_dir, classes=(7, 2)), 'validation', progress=False)
  assert len(val) == 4 and set(_decoded_labels(val)) == {0, 1}


def test_a_subset_file_pools_records_of_two_splits_in_its_order(data_dir, tmp_path):
  path = _subset_file(tmp_path, {'train': {'validation': [5, 0, 5], 'train': [13, 1]}})
  train = catalog.open_source(_cfg(data_dir), 'train', progress=False)
  val = catalog.open_source(_cfg(data_dir), 'validation', progress=False)
  part = catalog.open_source(_cfg(data_dir, subset_file=path), 'train', progress=False)
  expected = [val[5], val[0], val[5], train[13], train[1]]
  assert len(part) == 5 and part.info.split == 'train' and part.num_classes == 10
  for got, want in zip((part[i] for i in range(len(part))), expected):
    np.testing.assert_array_equal(got['image'], want['image'])
    assert got['label'] == want['label']
  np.testing.assert_array_equal(part.labels(), [5, 0, 5, 3, 1])
  # A split the file does not name is read whole, as before.
  assert isinstance(catalog.open_source(_cfg(data_dir, subset_file=path), 'validation'),
                    sources.ArrayRecordImageSource)
  # classes apply after the subset: (1, 5) keeps val 5, val 5, train 1 → labels 1, 1, 0.
  both = catalog.open_source(_cfg(data_dir, subset_file=path, classes=(1, 5)), 'train')
  np.testing.assert_array_equal(_decoded_labels(both), [1, 1, 0])
  np.testing.assert_array_equal(both[2]['image'], train[1]['image'])
  assert both.class_names == (builtin.CLASS_NAMES[1], builtin.CLASS_NAMES[5])


def test_labels_of_array_records_come_from_the_headers(data_dir, monkeypatch):
  full = catalog.open_source(_cfg(data_dir), 'train', progress=False)
  expected = _decoded_labels(full)
  fresh = catalog.open_source(_cfg(data_dir), 'train', progress=False)

  def no_decoding(*args):
    raise AssertionError('an image was decoded')

  monkeypatch.setattr(sources, 'decode_record', no_decoding)
  labels = fresh.labels()
  np.testing.assert_array_equal(labels, expected)
  assert labels.dtype == np.int64 and not labels.flags.writeable
  assert fresh.labels() is labels  # kept on the source
  assert pickle.loads(pickle.dumps(fresh))._labels is None  # workers do not carry them


def test_labels_of_a_folder_come_from_its_file_list(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  for name, count in (('cat', 2), ('dog', 3), ('eel', 1)):
    (tmp_path / name).mkdir()
    for k in range(count):
      Image.fromarray(rng.integers(0, 256, (6, 7, 3), np.uint8)).save(tmp_path / name / f'{k}.png')
  folder = sources.FolderImageSource(str(tmp_path))
  expected = _decoded_labels(folder)
  np.testing.assert_array_equal(expected, [0, 0, 1, 1, 1, 2])
  monkeypatch.setattr(sources, 'read_image_file', lambda *a, **k: pytest.fail('an image was read'))
  np.testing.assert_array_equal(sources.FolderImageSource(str(tmp_path)).labels(), expected)


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


class _TinyTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  name = 'alexnet_jax_subset_test_set'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=['a', 'b', 'c', 'd'])
        }), supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(11, 0), 'test': self._generate_examples(5, 100)}

  def _generate_examples(self, n, offset):
    for i in range(n):
      label = (i * 7 + offset) % 4
      image = np.full((8, 9, 3), label, np.uint8)  # the label in every pixel
      yield offset + i, {'image': _png(image), 'label': label}


def test_labels_of_a_tfds_set_skip_the_images_and_its_splits_pool(tmp_path, monkeypatch):
  _TinyTfds(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = configs.dataset_config(name=_TinyTfds.name, data_dir=str(tmp_path))
  train = catalog.open_source(cfg, 'train', progress=False)
  expected = _decoded_labels(train)
  np.testing.assert_array_equal(expected, [train[i]['image'][0, 0, 0] for i in range(len(train))])
  fresh = catalog.open_source(cfg, 'train', progress=False)
  with monkeypatch.context() as m:
    m.setattr(sources, 'decode_image_bytes', lambda *a: pytest.fail('an image was decoded'))
    np.testing.assert_array_equal(fresh.labels(), expected)
  # Caltech-101's way: TFDS's train and test pooled, then cut into other splits.
  path = _subset_file(tmp_path,
                      {'train': {'train': [0, 10], 'test': [4, 1]}, 'test': {'test': [0]}})
  cfg = configs.dataset_config(name=_TinyTfds.name, data_dir=str(tmp_path), subset_file=path,
                               classes=(3, 0, 1, 2))
  part = catalog.open_source(cfg, 'train', progress=False)
  test = catalog.open_source(cfg, 'test', progress=False)
  tfds_test = catalog.open_source(
      configs.dataset_config(name=_TinyTfds.name, data_dir=str(tmp_path)), 'test')
  pixels = [part[i]['image'][0, 0, 0] for i in range(len(part))]
  np.testing.assert_array_equal(
      pixels, [expected[0], expected[10], tfds_test[4]['label'], tfds_test[1]['label']])
  np.testing.assert_array_equal(part.labels(), [(3, 0, 1, 2).index(p) for p in pixels])
  np.testing.assert_array_equal(part.labels(), _decoded_labels(part))
  assert len(test) == 1 and test.class_names == ('d', 'a', 'b', 'c')


def test_a_grain_worker_process_reads_the_subset(data_dir, tmp_path):
  path = _subset_file(tmp_path, {'validation': {'validation': [3, 2, 17], 'train': [9, 22, 7]}})
  part = catalog.open_source(_cfg(data_dir, subset_file=path, classes=(7, 2, 9)), 'validation',
                             progress=False)
  assert len(part) == 5  # record 3 of the validation split is of class 3

  def read(workers):
    batches = list(pipeline.eval_dataset(part, global_batch_size=4, crop_size=12, workers=workers))
    rows = np.concatenate([b['mask'] for b in batches]) > 0
    return (np.concatenate([b['image'] for b in batches])[rows],
            np.concatenate([b['label'] for b in batches])[rows])

  images, labels = read(workers=1)
  np.testing.assert_array_equal(labels, part.labels())
  np.testing.assert_array_equal(labels, [1, 0, 2, 1, 0])
  in_process_images, _ = read(workers=0)
  np.testing.assert_array_equal(images, in_process_images)


def test_a_part_has_statistics_of_its_own(data_dir, tmp_path):
  full = catalog.open_source(_cfg(data_dir), 'train', progress=False)
  part = catalog.open_source(_cfg(data_dir, classes=(7, 2)), 'train', progress=False)
  again = catalog.open_source(_cfg(data_dir, classes=(7, 2)), 'train', progress=False)
  other = catalog.open_source(_cfg(data_dir, classes=(2, 7)), 'train', progress=False)
  chosen = catalog.open_source(
      _cfg(data_dir, subset_file=_subset_file(tmp_path, {'train': {'train': list(range(40))}})),
      'train', progress=False)
  paths = {statistics.path_for(s) for s in (full, part, other, chosen)}
  assert len(paths) == 4 and statistics.path_for(again) == statistics.path_for(part)
  assert statistics.path_for(full) == os.path.join(full.info.location, statistics.FILENAME)
  assert all(os.path.dirname(p) == full.info.location for p in paths)
  whole = statistics.ensure(full, 16, progress=False)
  stored = open(statistics.path_for(full), 'rb').read()
  own = statistics.ensure(part, 16, progress=False)
  assert own.num_images == 8 and whole.num_images == 40
  assert os.path.isfile(statistics.path_for(part))
  assert open(statistics.path_for(full), 'rb').read() == stored
  np.testing.assert_allclose(
      own.mean_image, np.mean([part[i]['image'] for i in range(len(part))], axis=0,
                              dtype=np.float64), atol=1e-4)


def test_open_inputs_trains_a_model_of_as_many_classes(data_dir):
  config = tiny_config()
  config.dataset.update(name='builtin_shapes', data_dir=data_dir, classes=(0, 1, 2, 3, 4), **TINY)
  config.batch_size = 8
  with pytest.raises(
      errors.ConfigError, match='has 5 classes but model.num_classes=10; set '
      '--config.model.num_classes=5'):
    inputs.open_inputs(config)
  config.model.num_classes = 5
  data = inputs.open_inputs(config)
  assert len(data.train_source) == 20 and len(data.eval_source) == 10
  assert set(data.eval_source.labels()) == set(range(5))


# (classes, subset file content (None: none), split, error type, what the line says)
BAD = [
    ((7, 7), None, 'train', errors.ConfigError, 'names class 7 twice'),
    ((10,), None, 'train', errors.ConfigError,
     "names class 10, but 'builtin_shapes' has 10 classes"),
    ((-1,), None, 'train', errors.ConfigError, '-1 is not a class index'),
    ((), 'not json', 'train', errors.ConfigError, 'is not valid JSON'),
    ((), [1, 2], 'train', errors.ConfigError, 'must hold a JSON object of splits'),
    ((), {'train': [1]}, 'train', errors.ConfigError, "split 'train' must be an object"),
    ((), {'train': {'train': 3}}, 'train', errors.ConfigError, 'not a list of record indices'),
    ((), {'train': {'train': [1, 'x']}}, 'train', errors.ConfigError, 'not a record index'),
    ((), {'train': {'train': [-1]}}, 'train', errors.ConfigError, 'not a record index'),
    ((), {'train': {'train': []}}, 'train', errors.ConfigError, "split 'train' lists no record"),
    ((), {'train': {'train': [0, 40]}}, 'train', errors.ConfigError,
     "lists record 40 of 'train', which has 40 records (indices 0..39)"),
    ((), {'train': {'tain': [0]}}, 'train', errors.DatasetNotFoundError,
     "draws from the split 'tain', which fails to open: builtin_shapes: no split 'tain'"),
    ((), {'test': {'validation': [0]}}, 'validation', errors.ConfigError,
     "names the split 'test', not the 'validation' that is read"),
    ((3,), {'train': {'train': [0, 1]}}, 'train', errors.ConfigError,
     'hold no example of these classes'),
]


@pytest.mark.parametrize('classes, content, split, error, message', BAD,
                         ids=[m.split(',')[0][:40] for *_, m in BAD])
def test_bad_input_is_one_line(data_dir, tmp_path, classes, content, split, error, message):
  path = _subset_file(tmp_path, content) if content is not None else None
  with pytest.raises(error) as raised:
    catalog.open_source(_cfg(data_dir, classes=classes, subset_file=path), split, progress=False)
  assert message in str(raised.value) and '\n' not in str(raised.value)


def test_a_missing_subset_file_is_one_line_before_any_data_is_generated(tmp_path):
  with pytest.raises(errors.DatasetNotFoundError, match='does not exist: write the records'):
    catalog.open_source(_cfg(str(tmp_path), subset_file=str(tmp_path / 'no.json')), 'train')
  with pytest.raises(errors.DatasetNotFoundError, match='cannot be read'):
    catalog.open_source(_cfg(str(tmp_path), subset_file=str(tmp_path)), 'train')
  assert os.listdir(tmp_path) == []  # the built-in set was not generated
  # The entry point: status 2, one error line, no traceback, before anything is generated.
  env = dict(host.environ_with_huge_pages(os.environ), JAX_PLATFORMS='cpu')
  proc = subprocess.run([
      sys.executable, '-m', 'alexnet_jax.main', '--config=configs/demo.py',
      f'--workdir={tmp_path}/run', '--config.dataset.subset_file=/nonexistent.json',
      f'--config.dataset.data_dir={tmp_path}/data', '--config.dataset.classes=(0,1,2,3,4)'
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and '/nonexistent.json does not exist' in lines[0], proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'data') and not os.path.exists(tmp_path / 'run')


def test_labels_of_a_damaged_header_are_replaced_like_its_record(data_dir, tmp_path):
  """A record whose header cannot be read is counted bad and takes the next record's label, as
  reading it gives the next record."""
  full = catalog.open_source(_cfg(data_dir), 'validation', progress=False)
  good = [records.encode_record(full[i]['image'], int(full[i]['label'])) for i in range(4)]
  good[1] = b'XXXX' + good[1][4:]
  shard = tmp_path / 'shard.array_record'
  writer = ArrayRecordWriter(str(shard), 'group_size:1')
  for record in good:
    writer.write(record)
  writer.close()
  info = sources.DatasetInfo('x', 'train', 4, 10, builtin.CLASS_NAMES, location=str(tmp_path))
  source = sources.ArrayRecordImageSource([str(shard)], info, max_bad_fraction=0.5)
  np.testing.assert_array_equal(source.labels(), [0, 2, 2, 3])
  assert source.num_bad_records == 1
  np.testing.assert_array_equal(_decoded_labels(source), source.labels())
