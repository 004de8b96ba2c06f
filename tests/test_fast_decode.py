"""The fast JPEG path (libjpeg-turbo through simplejpeg): PIL's pixels exactly, PIL's verdict on
everything it cannot vouch for; the window copies; one decode per example for ten views."""

import copy
import io
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from skimage import data

from alexnet_jax import inference
from alexnet_jax.data import augment, pipeline, prepare, records, sources
from alexnet_jax.tools import bench_input

needs_simplejpeg = pytest.mark.skipif(records.simplejpeg is None, reason='simplejpeg not installed')


def _jpeg(image, **options) -> bytes:
  buf = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(
      buf, format='JPEG', **{'quality': 90, **options})
  return buf.getvalue()


def _pil(data_bytes, min_side=None):
  """The decoding every JPEG had before the fast path."""
  return records.decode_image_bytes(data_bytes, min_side, fast=False)


def _photos():
  return {'chelsea': data.chelsea(), 'astronaut': data.astronaut(), 'coffee': data.coffee()}


# ---------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------


@needs_simplejpeg
def test_fast_path_decodes_pils_pixels_exactly():
  """Measured: libjpeg-turbo with the accurate integer IDCT and smooth upsampling (simplejpeg's
  defaults, fastdct=False, fastupsample=False) agrees with PIL to the last bit (max |diff| 0) on
  the photos at quality 90, full size and as the 256² squares a prepared set stores, at every DCT
  scale; fastdct or fastupsample would differ by up to 7 and 37."""
  for name, photo in _photos().items():
    for image in (photo, augment.rescale_center_square(photo, 256)):
      payload = _jpeg(image)
      for min_side in (None, 256, 120, 64, 20):
        fast, pil = records.fast_jpeg(payload, min_side), _pil(payload, min_side)
        assert fast is not None, (name, image.shape, min_side)
        assert fast.dtype == np.uint8 and fast.shape == pil.shape, (name, min_side)
        assert np.abs(fast.astype(int) - pil).max() == 0, (name, image.shape, min_side)
        np.testing.assert_array_equal(records.decode_image_bytes(payload, min_side), pil)


@needs_simplejpeg
@pytest.mark.parametrize(
    'options', [
        dict(),
        dict(progressive=True),
        dict(subsampling=0),
        dict(subsampling=1),
        dict(keep_rgb=True, subsampling=0),
        dict(quality=50),
        dict(grey=True)
    ], ids=['420', 'progressive', '444', '422', 'rgb_colorspace', 'q50', 'greyscale'])
def test_every_variant_and_scale_matches_pil(options):
  """Sizes from 1 pixel up, each DCT scale PIL's draft picks (and the image shape it gives)."""
  options = dict(options)
  grey = options.pop('grey', False)
  photo = data.astronaut()
  rng = np.random.default_rng(0)
  for _ in range(12):
    h, w = int(rng.integers(1, 400)), int(rng.integers(1, 400))
    image = Image.fromarray(photo[:h, :w])
    payload = _jpeg(image.convert('L') if grey else image, **options)
    for min_side in (None, 1, 5, 33, 100):
      fast = records.fast_jpeg(payload, min_side)
      assert fast is not None, (h, w, min_side)
      np.testing.assert_array_equal(fast, _pil(payload, min_side))


@needs_simplejpeg
def test_prepared_records_decode_as_before(tmp_path):
  """A prepared set's records (256² JPEGs at quality 90, the statistics computed from their PIL
  decoding) decode to the same pixels."""
  folder = tmp_path / 'jpegs'
  bench_input.make_folder(str(folder), 12, classes=2)
  for path in sorted(folder.glob('*/*.jpg'))[:6]:
    status, record, stored = prepare.process_file((str(path), 0, 256, 90, 10**8, 'jpeg'))
    assert status == 'ok'
    image, _ = records.decode_record(record)
    assert image.shape == (256, 256, 3)
    np.testing.assert_array_equal(image, records.decode_record(record, fast=False)[0])
    np.testing.assert_array_equal(image, stored)


def test_other_formats_and_colour_spaces_go_through_pil():
  photo = data.chelsea()
  cmyk = _jpeg(Image.fromarray(photo).convert('CMYK'))
  png = io.BytesIO()
  Image.fromarray(photo).save(png, format='PNG')
  mpo = io.BytesIO()
  Image.fromarray(photo).save(mpo, format='MPO', save_all=True,
                              append_images=[Image.fromarray(data.coffee())])
  for payload, min_side in ((cmyk, None), (png.getvalue(), None), (mpo.getvalue(), 100)):
    assert records.fast_jpeg(payload, min_side) is None
    np.testing.assert_array_equal(records.decode_image_bytes(payload, min_side),
                                  _pil(payload, min_side))
  # PIL does not scale a multi-picture file; unscaled, its first picture is an ordinary JPEG.
  assert records.decode_image_bytes(mpo.getvalue(), 100).shape == photo.shape
  if records.simplejpeg is not None:
    np.testing.assert_array_equal(records.fast_jpeg(mpo.getvalue()), _pil(mpo.getvalue()))


def test_without_simplejpeg_pil_decodes_everything(monkeypatch):
  payload = _jpeg(data.coffee())
  expected = _pil(payload, 100)
  monkeypatch.setattr(records, 'simplejpeg', None)
  assert records.fast_jpeg(payload) is None
  np.testing.assert_array_equal(records.decode_image_bytes(payload, 100), expected)


@needs_simplejpeg
def test_pils_pixel_limit_still_applies(monkeypatch, tmp_path):
  """Over PIL's MAX_IMAGE_PIXELS PIL decides (it warns; over twice that it refuses), as
  prepare's --max_pixels relies on."""
  payload = _jpeg(data.chelsea())  # 135,300 pixels
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 60_000)
  assert records.fast_jpeg(payload) is None
  with pytest.raises(records.CorruptRecordError, match='DecompressionBomb'):
    records.decode_image_bytes(payload)
  path = tmp_path / 'big.jpg'
  path.write_bytes(payload)
  with pytest.raises(Image.DecompressionBombError):
    records.read_image_file(str(path))
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10**6)
  np.testing.assert_array_equal(records.read_image_file(str(path), 100), _pil(payload, 100))


# ---------------------------------------------------------------------------
# Damaged data
# ---------------------------------------------------------------------------


def _damaged(payload: bytes) -> dict[str, bytes]:
  rng = np.random.default_rng(0)
  out = {f'truncated to {f:.0%}': payload[:int(len(payload) * f)] for f in (0.05, 0.5, 0.95)}
  out['no end marker'] = payload[:-2]
  for k in range(2):
    block = bytearray(payload)
    at = int(rng.integers(len(payload) // 4, len(payload) - 3000))
    block[at:at + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    out[f'2000 random bytes at {at}'] = bytes(block)
  out['garbage header'] = payload[:20] + b'\x12' * 200 + payload[220:]
  out['start marker only'] = payload[:3]
  out['empty'] = b''
  return out


def test_damaged_jpegs_are_bad_records_not_garbage():
  """Truncated and overwritten JPEGs are reported (CorruptRecordError, also inside a record), never
  decoded by the fast path into its grey fill; nothing crashes."""
  photo = augment.rescale_center_square(data.astronaut(), 256)
  payload = _jpeg(photo)
  good = records.encode_record(photo, 3, 'jpeg')
  for what, damaged in _damaged(payload).items():
    assert records.fast_jpeg(damaged) is None, what
    with pytest.raises(records.CorruptRecordError, match='undecodable'):
      records.decode_image_bytes(damaged)
    with pytest.raises(records.CorruptRecordError):
      records.decode_record(good[:records.HEADER_SIZE] + damaged)


@needs_simplejpeg
def test_data_libjpeg_only_warns_about_gets_pils_verdict():
  """Stray bytes before the end marker: libjpeg warns, strict decoding refuses, and PIL's decoding
  (which ignores the warning, as it always did) is the answer."""
  payload = _jpeg(data.coffee())
  stray = payload[:-2] + b'\x00' * 10 + payload[-2:]
  assert records.fast_jpeg(stray) is None
  np.testing.assert_array_equal(records.decode_image_bytes(stray), _pil(payload))


def test_damaged_records_are_skipped_by_a_source(tmp_path):
  photo = augment.rescale_center_square(data.chelsea(), 64)
  good = [records.encode_record(photo, label, 'jpeg') for label in range(3)]
  source = _record_source(tmp_path, [good[0], good[1][:len(good[1]) // 2], good[2]])
  assert [int(source[i]['label']) for i in range(3)] == [0, 2, 2]  # the next good record
  assert source.num_bad_records == 1


# ---------------------------------------------------------------------------
# Window copies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(256, 256, 3), (40, 57, 3), (30, 30)])
def test_crop_flip_is_the_reflected_window(shape):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, shape, dtype=np.uint8)
  size = min(shape[:2]) - 3
  batch = np.zeros((2,) + (size, size) + shape[2:], np.uint8)
  for top, left, flip in ((0, 0, False), (3, 1, True), (1, 3, True)):
    expected = image[top:top + size, left:left + size]
    expected = expected[:, ::-1] if flip else expected
    got = augment.crop_flip(image, top, left, size, flip)
    assert got.flags.c_contiguous and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    row = batch[1]
    assert augment.crop_flip(image, top, left, size, flip, out=row) is row
    np.testing.assert_array_equal(batch[1], expected)
  assert not batch[0].any()


def test_the_benchmarks_earlier_path_gives_the_same_batches(tmp_path):
  """bench_input's "before" (PIL, the one-pass copy) and the pipeline now yield identical batches:
  the comparison times the same work."""
  rng = np.random.default_rng(2)
  photo = data.astronaut()
  recs = [
      records.encode_record(augment.rescale_center_square(photo[t:t + 300, t:t + 300], 48), i,
                            'jpeg') for i, t in enumerate(rng.integers(0, 200, 8))
  ]
  source = _record_source(tmp_path, recs)
  before = copy.copy(source)
  before.fast_jpeg = False
  kw = dict(global_batch_size=4, crop_size=40, seed=5, resize_to=48, pca_std=0.1)
  now_it = iter(pipeline.train_dataset(source, **kw))
  before_it = iter(pipeline.train_dataset(before, augment_cls=bench_input.PreviousAugment, **kw))
  flipped = 0
  for _ in range(4):
    a, b = next(now_it), next(before_it)
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    flipped += int(a['crop'][:, 2].sum())
  assert 0 < flipped < 16  # both copies were exercised


def test_measure_decoders_reports_every_path(tmp_path):
  """The comparison's bookkeeping (figures only: timing never gates a test)."""
  jpegs, data_dir = str(tmp_path / 'jpegs'), str(tmp_path / 'tfds')
  bench_input.make_folder(jpegs, 12, classes=2)
  prepare.prepare(jpegs, 'bench', data_dir=data_dir, val_fraction=0.0, workers=0, progress=False)
  prepare.prepare(jpegs, 'bench_raw', data_dir=data_dir, val_fraction=0.0, workers=0,
                  progress=False, codec='raw')
  r = bench_input.measure_decoders(data='bench', data_dir=data_dir, worker_counts=(0,),
                                   batch_size=4, crop=64, batches=2, warmup=1, repeats=1,
                                   raw_data='bench_raw')
  paths = (*bench_input.DECODER_PATHS, bench_input.RAW_PATH)
  assert r['paths'] == paths and set(r['images_per_second']) == {(p, 0) for p in paths}
  assert set(r['ratios']) == set(paths[1:]) and r['ratio'] == r['ratios'][paths[1]]
  assert all(v > 0 for v in r['images_per_second'].values())
  assert r['scaling'] == {}
  if os.path.isdir('/proc/self/task'):
    assert bench_input._tree_cpu_seconds() > 0  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Ten views: one decode per example and pass
# ---------------------------------------------------------------------------


def _record_source(tmp_path, recs) -> sources.ArrayRecordImageSource:
  path = str(tmp_path / f'part-{len(recs)}-{len(os.listdir(tmp_path))}.array_record')
  writer = ArrayRecordWriter(path, 'group_size:1')
  for rec in recs:
    writer.write(rec)
  writer.close()
  info = sources.DatasetInfo(name='tiny', split='train', num_examples=len(recs), num_classes=10,
                             class_names=tuple(str(i) for i in range(10)), location=str(tmp_path))
  return sources.ArrayRecordImageSource([path], info, max_bad_fraction=0.5)


@pytest.mark.parametrize('how', ['ten', 'center', 'scales'])
def test_evaluation_decodes_each_image_once_per_pass(tmp_path, monkeypatch, how):
  photo = data.coffee()
  recs = [
      records.encode_record(augment.rescale_center_square(photo[:, 20 * i:], 40), i, 'jpeg')
      for i in range(5)
  ]
  source = _record_source(tmp_path, recs)
  decoded = []

  def counting(record, **kw):
    image, label = records.decode_record(record, **kw)
    decoded.append(label)
    return image, label

  monkeypatch.setattr(sources, 'decode_record', counting)
  transform = inference.MultiScaleViews(32, (32, 40)) if how == 'scales' else None
  ds = pipeline.eval_dataset(source, global_batch_size=4, crop_size=32,
                             views='center' if how == 'center' else 'ten', transform=transform)
  decoded.clear()  # another transform's padding is shaped by one example, once
  for passes in (1, 2):
    batches = list(ds)
    assert sorted(decoded) == sorted(list(range(5)) * passes), decoded
  views = {'ten': 10, 'center': None, 'scales': 20}[how]
  image = batches[0]['image']
  assert image.shape == ((4, views, 32, 32, 3) if views else (4, 32, 32, 3))
  if how == 'ten':  # the views are the windows of the one decoded image
    full = records.decode_record(recs[0])[0]
    for view, (t, l, f) in zip(image[0], augment.view_windows(40, 40, 32, 'ten')):
      window = full[t:t + 32, l:l + 32]
      np.testing.assert_array_equal(view, window[:, ::-1] if f else window)
