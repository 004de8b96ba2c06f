"""Tests for alexnet_jax.tools.prepare and data.statistics: a folder of images → a prepared set."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from alexnet_jax import configs, errors
from alexnet_jax.data import augment, catalog, pipeline, prepare, records, statistics
from alexnet_jax.tools import bench_input

from helpers import interrupt_on_call

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo_crops():
  return [data.chelsea(), data.astronaut(), data.coffee()]


def make_folder(root, per_class=5, seed=0):
  """3 classes of JPEG/PNG crops of real photos at assorted sizes, plus files that must be
  skipped: a truncated JPEG, a text file, and (for a small --max_pixels) an oversized PNG.
  Returns the number of good images."""
  rng = np.random.default_rng(seed)
  photos = _photo_crops()
  good = 0
  for c, name in enumerate(['cat', 'astronaut', 'coffee']):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
      top = int(rng.integers(0, photos[c].shape[0] - h))
      left = int(rng.integers(0, photos[c].shape[1] - w))
      img = Image.fromarray(photos[c][top:top + h, left:left + w])
      if i == 1:
        img = img.convert('L')  # greyscale is converted to RGB
      if i % 2:
        img.save(os.path.join(root, name, f'{i}.png'))
      else:
        img.save(os.path.join(root, name, f'{i}.jpg'), quality=92)
      good += 1
  # Bad files.
  Image.fromarray(photos[0]).save(os.path.join(root, 'cat', 'truncated.jpg'))
  path = os.path.join(root, 'cat', 'truncated.jpg')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 3])
  open(os.path.join(root, 'coffee', 'notes.txt'), 'w').write('not an image')
  Image.new('RGB', (700, 700), (10, 20, 30)).save(os.path.join(root, 'astronaut', 'huge.png'))
  open(os.path.join(root, 'coffee', '.hidden'), 'w').write('ignored')
  return good


SMALL_LIMIT = 300_000  # the 700 x 700 image exceeds it; the photo crops (< 200 x 200) do not


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('photos'))
  return root, make_folder(root)


@pytest.fixture(scope='module')
def prepared(folder, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('prepared'))
  directory = prepare.prepare(folder[0], 'photos', data_dir=data_dir, val_fraction=0.2,
                              image_size=64, examples_per_shard=4, workers=0, progress=False,
                              max_pixels=SMALL_LIMIT)
  return data_dir, directory


def _all_records(directory, split):
  src = catalog.open_record_directory(directory, split)
  return [src[i] for i in range(len(src))]


def test_prepare_from_folder(folder, prepared):
  root, good = folder
  data_dir, directory = prepared
  meta = json.load(open(os.path.join(directory, 'metadata.json')))
  assert meta['class_names'] == ['astronaut', 'cat', 'coffee'] and meta['num_classes'] == 3
  counts = {k: v['num_examples'] for k, v in meta['splits'].items()}
  assert counts['train'] + counts['validation'] == good == 15
  # 20 % of each class's 6 files (one bad among them) went to validation, before decoding.
  assert 1 <= counts['validation'] <= 3
  report = json.load(open(os.path.join(directory, prepare.REPORT)))
  entries = [s for v in report['skipped'].values() for s in v]
  skipped = {os.path.basename(s['file']): s['reason'] for s in entries}
  assert report['num_skipped'] == 3
  assert set(skipped) == {'truncated.jpg', 'notes.txt', 'huge.png'}
  assert 'too many pixels' in skipped['huge.png']
  assert 'UnidentifiedImageError' in skipped['notes.txt']
  # No bookkeeping left behind; the set opens by name like any other.
  assert sorted(f for f in os.listdir(directory) if f.startswith('.') or 'plan' in f) == []
  cfg = configs.dataset_config(name='photos', data_dir=data_dir)
  train = catalog.open_source(cfg, 'train')
  assert len(train) == counts['train'] and train.class_names == ('astronaut', 'cat', 'coffee')
  for i in range(len(train)):
    item = train[i]
    assert item['image'].shape == (64, 64, 3) and item['image'].dtype == np.uint8
  assert train.num_bad_records == 0


def test_prepared_pixels_are_the_rescaled_central_square(folder, prepared):
  """Every stored image is the shorter-side-64, central-square version of its file."""
  root, _ = folder
  _, directory = prepared
  plan_images = []
  for name in ['astronaut', 'cat', 'coffee']:
    for f in sorted(os.listdir(os.path.join(root, name))):
      try:
        with Image.open(os.path.join(root, name, f)) as img:
          if img.size[0] * img.size[1] > SMALL_LIMIT:
            continue
          plan_images.append(augment.rescale_center_square(np.asarray(img.convert('RGB')), 64))
      except Exception:  # the bad files
        continue
  stored = _all_records(directory, 'train') + _all_records(directory, 'validation')
  assert len(stored) == len(plan_images)
  for item in stored:  # each stored image matches one original up to JPEG error
    errors = [np.abs(item['image'].astype(int) - ref).mean() for ref in plan_images]
    assert min(errors) < 8.0  # JPEG twice and reduced-scale decoding; a wrong window: > 25


def test_statistics_match_numpy(prepared):
  _, directory = prepared
  stats = statistics.load(os.path.join(directory, statistics.FILENAME))
  images = np.stack([it['image'] for it in _all_records(directory, 'train')]).astype(np.float64)
  np.testing.assert_allclose(stats.mean_image, images.mean(axis=0), rtol=0, atol=1e-3)
  pixels = images.reshape(-1, 3)
  cov = np.cov(pixels, rowvar=False, bias=True)
  np.testing.assert_allclose(stats.rgb_mean, pixels.mean(axis=0), rtol=1e-10)
  np.testing.assert_allclose(stats.rgb_cov, cov, rtol=1e-9)
  vals, vecs = np.linalg.eigh(cov)
  np.testing.assert_allclose(stats.eigvals, vals[::-1], rtol=1e-9)
  # Eigenvectors up to sign, and really eigenvectors of the covariance.
  np.testing.assert_allclose(np.abs(stats.eigvecs), np.abs(vecs[:, ::-1]), atol=1e-8)
  np.testing.assert_allclose(cov @ stats.eigvecs, stats.eigvecs * stats.eigvals, atol=1e-6)
  assert stats.num_images == len(images)
  # The generic one-pass computation over a source agrees with the per-shard sums of prepare.
  again = statistics.compute(catalog.open_record_directory(directory, 'train'), 64, progress=False)
  np.testing.assert_allclose(again.mean_image, stats.mean_image, atol=1e-4)
  np.testing.assert_allclose(again.eigvals, stats.eigvals, rtol=1e-9)


def test_a_raw_set_holds_the_squares_themselves(folder, prepared, tmp_path):
  """``codec='raw'``: the same files in the same records, each the rescaled central square
  exactly as prepare cut it (the JPEG set holds it up to JPEG's loss), with the statistics of
  those pixels; training reads it like any other set."""
  root, _ = folder
  jpeg_dir = prepared[1]
  raw_dir = prepare.prepare(root, 'photos_raw', data_dir=str(tmp_path), val_fraction=0.2,
                            image_size=64, examples_per_shard=4, workers=0, progress=False,
                            max_pixels=SMALL_LIMIT, codec='raw')
  meta = json.load(open(os.path.join(raw_dir, 'metadata.json')))
  assert meta['codec'] == 'raw'
  assert json.load(open(os.path.join(jpeg_dir, 'metadata.json')))['codec'] == 'jpeg'
  plan = prepare.make_plan(root, name='photos_raw', val_fraction=0.2, val_dir=None, image_size=64,
                           jpeg_quality=90, examples_per_shard=4, seed=0, max_pixels=SMALL_LIMIT,
                           codec='raw')
  readable = [(path, label)
              for shard in plan['splits']['train']
              for path, label in shard['files']
              if not path.endswith(('truncated.jpg', 'notes.txt', 'huge.png'))]
  raw, jpeg = _all_records(raw_dir, 'train'), _all_records(jpeg_dir, 'train')
  assert len(raw) == len(jpeg) == len(readable)
  for (path, label), r, j in zip(readable, raw, jpeg):
    square = augment.square_of(Image.fromarray(records.read_image_file(path, min_side=64)), 64)
    np.testing.assert_array_equal(r['image'], np.asarray(square))
    assert r['label'] == j['label'] == label
    assert 0 < np.abs(r['image'].astype(int) -
                      j['image']).mean() < 8  # JPEG's loss; a wrong image: > 25
  stats = statistics.load(os.path.join(raw_dir, statistics.FILENAME))
  images = np.stack([r['image'] for r in raw]).astype(np.float64)
  np.testing.assert_allclose(stats.mean_image, images.mean(axis=0), atol=1e-3)
  cfg = configs.dataset_config(name='photos_raw', data_dir=str(tmp_path))
  batch = next(
      iter(
          pipeline.train_dataset(catalog.open_source(cfg, 'train'), global_batch_size=4,
                                 crop_size=56, seed=0, resize_to=64)))
  assert batch['image'].shape == (4, 56, 56, 3) and batch['image'].dtype == np.uint8
  with pytest.raises(errors.PrepareError, match="--codec='png': choose one of jpeg, raw"):
    prepare.prepare(root, 'photos_png', data_dir=str(tmp_path), codec='png', progress=False)
  assert not os.path.exists(os.path.join(str(tmp_path), 'photos_png'))


def test_accumulator_merge_is_order_free():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
  one = statistics.Accumulator(5)
  for im in images:
    one.add(im)
  a, b = statistics.Accumulator(5), statistics.Accumulator(5)
  for im in images[:3]:
    a.add(im)
  for im in images[:2:-1]:
    b.add(im)
  b.merge(a)
  s1, s2 = one.finalize(), b.finalize()
  np.testing.assert_allclose(s1.rgb_cov, s2.rgb_cov, rtol=1e-12)
  np.testing.assert_allclose(s1.mean_image, s2.mean_image, rtol=1e-6)
  with pytest.raises(ValueError):
    one.add(images[0, :4])


def test_resume_after_interruption(folder, prepared, tmp_path, monkeypatch):
  """An interrupted preparation resumes: finished shards are kept, the result is identical."""
  root, _ = folder
  _, reference = prepared
  kwargs = dict(data_dir=str(tmp_path), val_fraction=0.2, image_size=64, examples_per_shard=4,
                workers=0, progress=False, max_pixels=SMALL_LIMIT)
  real = prepare.process_file
  interrupt_on_call(monkeypatch, prepare, 'process_file', 10)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(root, 'photos', **kwargs)
  directory = os.path.join(str(tmp_path), 'photos')
  assert not os.path.exists(os.path.join(directory, 'metadata.json'))
  with pytest.raises(errors.DatasetNotFoundError, match='metadata.json'):
    catalog.open_record_directory(directory, 'train')
  done = sorted(f for f in os.listdir(directory) if f.endswith('.done.json'))
  assert len(done) == 2  # shards of 4 files; the 10th file was in the third
  stamps = {f: os.stat(os.path.join(directory, f[1:-len('.done.json')])).st_mtime_ns for f in done}

  # Another source or options: refused, nothing damaged.
  with pytest.raises(errors.PrepareError, match='unfinished preparation'):
    prepare.prepare(root, 'photos', **{**kwargs, 'image_size': 32})

  counted = []
  monkeypatch.setattr(prepare, 'process_file', lambda t: counted.append(t) or real(t))
  assert prepare.prepare(root, 'photos', **kwargs) == directory
  assert len(counted) == 18 - 8  # only the unfinished shards were redone
  for f, stamp in stamps.items():
    assert os.stat(os.path.join(directory, f[1:-len('.done.json')])).st_mtime_ns == stamp
  for split in ('train', 'validation'):
    a, b = _all_records(reference, split), _all_records(directory, split)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x['image'], y['image'])
      assert x['label'] == y['label']
  assert (json.load(open(os.path.join(directory, prepare.REPORT)))['num_skipped'] == 3)


def test_val_dir_and_bad_arguments(folder, tmp_path):
  root, _ = folder
  val = tmp_path / 'val'
  os.makedirs(val / 'cat')
  Image.fromarray(_photo_crops()[0][:80, :90]).save(val / 'cat' / 'a.jpg')
  directory = prepare.prepare(root, 'withval', data_dir=str(tmp_path), val_dir=str(val),
                              image_size=32, workers=0, progress=False, max_pixels=SMALL_LIMIT)
  v = catalog.open_record_directory(directory, 'validation')
  assert len(v) == 1 and v[0]['label'] == 1  # 'cat' is class 1 of the training folder
  with pytest.raises(errors.PrepareError, match='not both'):
    prepare.prepare(root, 'x', data_dir=str(tmp_path), val_dir=str(val), val_fraction=0.1)
  os.makedirs(val / 'zebra')
  with pytest.raises(errors.PrepareError, match='zebra'):
    prepare.prepare(root, 'y', data_dir=str(tmp_path), val_dir=str(val))
  with pytest.raises(errors.DatasetNotFoundError, match='class subfolders'):
    prepare.prepare(str(tmp_path / 'val' / 'cat'), 'z', data_dir=str(tmp_path))


def test_cli_reports_and_fails_in_one_line(folder, tmp_path):
  root, _ = folder
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = lambda *a: subprocess.run([sys.executable, '-m', 'alexnet_jax.tools.prepare', *a], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=120)
  ok = run(f'--source={root}', '--name=cli', f'--data_dir={tmp_path}', '--image_size=32',
           '--workers=2', f'--max_pixels={SMALL_LIMIT}')
  assert ok.returncode == 0, ok.stderr
  assert '3 files skipped' in ok.stdout and '--config.dataset.name=cli' in ok.stdout
  bad = run(f'--source={tmp_path}/missing', '--name=cli2', f'--data_dir={tmp_path}')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith('error:') and 'missing' in bad.stderr


def test_bench_input_times_every_pipeline(tmp_path):
  """bench_input's folder → prepared set → figures path, on a few ImageNet-like JPEGs."""
  jpegs, data_dir = str(tmp_path / 'jpegs'), str(tmp_path / 'tfds')
  bench_input.make_folder(jpegs, 20, classes=2)
  sizes = [
      Image.open(os.path.join(jpegs, 'class_000', f)).size
      for f in sorted(os.listdir(os.path.join(jpegs, 'class_000')))
  ]
  assert len(sizes) == 10 and all(300 <= max(s) <= 600 for s in sizes)
  prepare.prepare(jpegs, 'bench', data_dir=data_dir, val_fraction=0.2, workers=0, progress=False)
  r = bench_input.measure_pipelines(data='bench', data_dir=data_dir, folder=jpegs, workers=0,
                                    batch_size=4, crop=64, batches=2, warmup=1, repeats=1,
                                    use_torch=True)
  ips = r['images_per_second']
  assert {'grain, prepared set', 'grain, original JPEGs'} <= set(ips)
  assert all(v > 0 for v in ips.values())
  if 'torch, original JPEGs' in ips:  # the bench extra is installed
    assert set(r['ratios_vs_torch']) == {'grain, prepared set', 'grain, original JPEGs'}
    assert 'PIL transforms' in r['torch_baseline'] or 'torchvision' in r['torch_baseline']
