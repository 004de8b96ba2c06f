"""The paper's augmentation and test-time views: host windows, device normalisation, 10-view
evaluation, and the determinism and resumption of the augmented stream."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage import data

from alexnet_jax import program, sharding, steps, train
from alexnet_jax.data import (
    augment,
    builtin,
    catalog,
    inputs,
    pipeline,
    records,
    sources,
    statistics,
)

from helpers import GRADIENT_STEP, ListSource, gradient_image, tiny_config

TINY = dict(num_train=48, num_val=20, image_size=72, seed=0)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  return builtin.ensure_builtin(str(tmp_path_factory.mktemp('builtin')), progress=False, **TINY)


def _window_of(image, crop_size):
  """(top, left, flipped) of a crop of `gradient_image`, read back from its pixels."""
  rows = image[..., 0].astype(int) // GRADIENT_STEP
  cols = image[..., 1].astype(int) // GRADIENT_STEP
  np.testing.assert_array_equal(rows, rows[:, :1].repeat(crop_size, 1))
  np.testing.assert_array_equal(np.diff(rows[:, 0]), 1)
  step = np.diff(cols[0])
  assert (step == step[0]).all() and abs(step[0]) == 1
  return int(rows[0, 0]), int(cols[0].min()), bool(step[0] < 0)


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('random_crop, flip', [(True, True), (False, True), (True, False)])
def test_train_windows_match_their_crop_record(random_crop, flip):
  size, crop = 20, 14
  src = ListSource([(gradient_image(size, size), 0)] * 16)
  it = iter(
      pipeline.train_dataset(src, global_batch_size=16, crop_size=crop, seed=1,
                             random_crop=random_crop, flip=flip))
  windows = []
  for _ in range(4):
    batch = next(it)
    for image, record in zip(batch['image'], batch['crop']):
      window = _window_of(image, crop)
      assert window == (int(record[0]), int(record[1]), bool(record[2]))
      assert 0 <= window[0] <= size - crop and 0 <= window[1] <= size - crop
      windows.append(window)
  offsets = {w[:2] for w in windows}
  flips = sum(w[2] for w in windows)
  if random_crop:
    assert len(offsets) > 20  # of the 49 possible
  else:
    assert offsets == {(3, 3)}
  assert (20 < flips < 44) if flip else flips == 0


def test_ten_views_are_corners_centre_and_reflections():
  size, crop = 20, 14
  src = ListSource([(gradient_image(size, size), 3)] * 3)
  batches = list(pipeline.eval_dataset(src, global_batch_size=4, crop_size=crop, views='ten'))
  assert len(batches) == 1
  b = batches[0]
  assert b['image'].shape == (4, 10, crop, crop, 3) and b['crop'].shape == (4, 10, 3)
  np.testing.assert_array_equal(b['mask'], [1, 1, 1, 0])
  assert not b['image'][3].any()
  expected = [(0, 0), (0, 6), (6, 0), (6, 6), (3, 3)]
  expected = [(t, l, f) for f in (False, True) for t, l in expected]
  got = [_window_of(v, crop) for v in b['image'][0]]
  assert got == expected
  assert [tuple(int(x) for x in r) for r in b['crop'][0]] == [(t, l, int(f)) for t, l, f in expected
                                                             ]
  with pytest.raises(ValueError, match='eval views'):
    pipeline.eval_dataset(src, global_batch_size=4, crop_size=crop, views='twelve')


def test_pca_coefficients_are_n_0_sigma_per_image_and_presentation():
  src = ListSource([(gradient_image(16, 16), 0)] * 64)
  it = iter(pipeline.train_dataset(src, global_batch_size=64, crop_size=16, seed=0, pca_std=0.1))
  first, second = next(it)['alpha'], next(it)['alpha']  # two epochs: two presentations
  alphas = np.concatenate([first, second])
  assert alphas.dtype == np.float32 and alphas.shape == (128, 3)
  assert abs(alphas.std() - 0.1) < 0.015 and abs(alphas.mean()) < 0.02
  assert len({tuple(a) for a in alphas}) == 128  # fresh for every image and presentation


def test_reduced_scale_jpeg_decode_keeps_the_shorter_side():
  record = records.encode_record(data.astronaut(), 0, 'jpeg')  # 512 x 512
  payload = record[records.HEADER_SIZE:]
  assert records.decode_image_bytes(payload).shape == (512, 512, 3)
  assert records.decode_image_bytes(payload, min_side=256).shape == (256, 256, 3)  # 1/2 scale
  assert records.decode_image_bytes(payload, min_side=200).shape == (256, 256, 3)  # not 1/4
  assert records.decode_image_bytes(payload, min_side=100).shape == (128, 128, 3)
  full = augment.rescale_center_square(records.decode_image_bytes(payload), 200)
  fast = augment.rescale_center_square(records.decode_image_bytes(payload, min_side=200), 200)
  assert np.abs(full.astype(int) - fast).mean() < 3.0


# ---------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------


def test_normalize_subtracts_the_matching_mean_window_and_shifts_colours():
  rng = np.random.default_rng(0)
  n, side, crop = 5, 12, 8
  mean_image = rng.uniform(0, 255, (side, side, 3)).astype(np.float32)
  images = rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8)
  windows = np.array([[0, 0, 0], [4, 4, 1], [2, 3, 0], [1, 4, 1], [4, 0, 0]], np.int32)
  alpha = rng.normal(0, 0.1, (n, 3)).astype(np.float32)
  eigvals = np.array([3000.0, 200.0, 50.0])
  eigvecs = np.linalg.qr(rng.normal(size=(3, 3)))[0]
  basis = eigvecs * np.sqrt(eigvals)
  std = np.array([50.0, 60.0, 70.0])
  out = steps.normalize(jnp.asarray(images), None, std, jnp.float32,
                        mean_image=jnp.asarray(mean_image), crop=jnp.asarray(windows),
                        alpha=jnp.asarray(alpha), pca_basis=jnp.asarray(basis))
  for i, (t, l, f) in enumerate(windows):
    window = mean_image[t:t + crop, l:l + crop]
    window = window[:, ::-1] if f else window
    shift = augment.pca_shift(alpha[i], eigvals, eigvecs)
    expected = (images[i] + shift - window) / std
    np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-4)
  # The shift's size: |α_i| · sqrt(λ_i) along each principal axis, i.e. about 10 % of the
  # colour spread for α ~ N(0, 0.1).
  shift = augment.pca_shift(alpha[0], eigvals, eigvecs)
  np.testing.assert_allclose(np.abs(eigvecs.T @ shift),
                             np.abs(alpha[0]) * np.sqrt(eigvals), rtol=1e-5)
  # Without crop records, the central window.
  centre = steps.normalize(jnp.asarray(images), None, std, jnp.float32,
                           mean_image=jnp.asarray(mean_image))
  np.testing.assert_allclose(centre[0], (images[0] - mean_image[2:10, 2:10]) / std, rtol=1e-5,
                             atol=1e-4)


@pytest.fixture(scope='module')
def view_program():
  """Tiny two-tower net, towers on two devices and the batch over two, with a mean image."""
  c = tiny_config(data=2, model=2)
  c.input.update(mean_image=True, std_rgb=(60.0,) * 3)
  c.model.init = 'he'  # the input, not the unit biases, decides the (untrained) predictions
  rng = np.random.default_rng(1)
  side = 72
  stats = statistics.Statistics(mean_image=rng.uniform(60, 200, (side, side, 3)).astype(np.float32),
                                rgb_mean=np.zeros(3), rgb_cov=np.eye(3), eigvals=np.ones(3),
                                eigvecs=np.eye(3), num_images=1)
  prog = program.build_program(c, steps_per_epoch=10, input_stats=stats)
  return c, prog, stats


def test_ten_view_evaluation_is_the_average_of_single_view_predictions(view_program):
  c, prog, stats = view_program
  size, crop = 72, c.model.image_size
  rng = np.random.default_rng(2)
  source = ListSource([
      (rng.integers(0, 256, (size, size, 3), dtype=np.uint8), i % 10) for i in range(6)
  ])
  host = next(iter(pipeline.eval_dataset(source, global_batch_size=8, crop_size=crop, views='ten')))
  state = prog.init_state()
  params = state.params
  out = jax.device_get(
      prog.eval_step(params, state.batch_stats, sharding.put_batch(host, prog.mesh)))

  # Reference: each view alone through the plain model on one device (full logits), then the
  # softmax averaged in NumPy.
  device_params = jax.device_put(jax.device_get(params), jax.devices()[0])
  predict = jax.jit(lambda p, x: jax.nn.softmax(nnx.merge(prog.graphdef, p)(x, train=False).logits))

  def single_view(images, crops):
    x = steps.normalize(images, None, c.input.std_rgb, jnp.float32, mean_image=stats.mean_image,
                        crop=crops)
    return np.asarray(predict(device_params, x))

  probs = np.mean([single_view(host['image'][:, v], host['crop'][:, v]) for v in range(10)],
                  axis=0)  # (8, 10)
  labels, mask = host['label'], host['mask']
  label_prob = probs[np.arange(8), labels]
  rank = (probs > label_prob[:, None]).sum(axis=1)
  assert out['count'] == 6 == mask.sum()
  np.testing.assert_allclose(out['loss'], np.sum(-np.log(label_prob) * mask), rtol=1e-4)
  assert out['top1_errors'] == np.sum((rank >= 1) * mask)
  assert out['top5_errors'] == np.sum((rank >= 5) * mask)
  # The views matter: the centre view alone predicts differently, by far more than rounding (an
  # untrained net's probabilities are near 0.1 each, so a few hundredths is a clear difference).
  centre = single_view(host['image'][:, 4], host['crop'][:, 4])
  assert np.abs(centre - probs).max() > 0.01


# ---------------------------------------------------------------------------
# Determinism and resumption: the data is a function of the seed and the step
# ---------------------------------------------------------------------------


def _stream(src, seed, **kw):
  return pipeline.train_dataset(src, global_batch_size=8, crop_size=64, seed=seed, pca_std=0.1,
                                **kw)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_same_seed_same_batches_and_mid_epoch_resume(tiny_dir):
  src = catalog.open_record_directory(tiny_dir, 'train')  # 48 examples: 6 batches per epoch
  identity = lambda b: b
  straight = pipeline.DevicePrefetch(iter(_stream(src, 7)), identity, size=2)
  expected = [next(straight) for _ in range(12)]
  again = pipeline.DevicePrefetch(iter(_stream(src, 7)), identity, size=0)
  for e in expected[:3]:
    _same(e, next(again))  # same seed, same batches (with or without read-ahead)
  assert not np.array_equal(next(iter(_stream(src, 8)))['image'], expected[0]['image'])
  # Epochs are different permutations of the whole set.
  first, second = (np.concatenate([b['label'] for b in expected[i:i + 6]]) for i in (0, 6))
  assert sorted(first) == sorted(second) and not np.array_equal(first, second)

  # A run stopped after 4 batches (mid-epoch) resumes at its step: the rest of epoch 1 and all of
  # epoch 2 as the straight run saw them.
  resumed = pipeline.DevicePrefetch(iter(_stream(src, 7, start_batch=4)), identity, size=2)
  for e in expected[4:]:
    _same(e, next(resumed))


@pytest.mark.parametrize(
    'layout, start',
    [
        ([(0,), (1,)], 0),
        ([(0,), (1,), (2,), (3,)], 3),
        ([(0, 2), (1, 3)], 2),  # interleaved shards: assembled from per-shard rows
    ])
def test_the_global_batches_do_not_depend_on_the_process_count(tiny_dir, layout, start):
  """The hosts' rows of a global batch, put in shard order (as the mesh places them), are the
  one-process batch: the same examples, crops, flips and colour shifts, from any step."""
  src = catalog.open_record_directory(tiny_dir, 'train')
  one = iter(_stream(src, 7, start_batch=start))
  shards = sum(len(h) for h in layout)
  hosts = [iter(_stream(src, 7, start_batch=start, shards=shards, host_shards=h)) for h in layout]
  per_shard = 8 // shards
  for _ in range(8):  # across the epoch border
    parts = {}
    for host, it in zip(layout, hosts):
      batch = next(it)
      for j, i in enumerate(host):
        parts[i] = {k: v[j * per_shard:(j + 1) * per_shard] for k, v in batch.items()}
    _same(next(one), {k: np.concatenate([parts[i][k] for i in range(shards)]) for k in parts[0]})


# ---------------------------------------------------------------------------
# The recipe end to end, and its configuration errors
# ---------------------------------------------------------------------------


def test_paper_recipe_trains_and_evaluates_ten_views(tmp_path):
  c = tiny_config(data=2, model=2)
  c.dataset.update(name='builtin_shapes', data_dir=str(tmp_path), **TINY)
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=0, resize_to=None,
                 mean_image=True, pca_lighting_std=0.1, eval_views='ten')
  c.num_epochs = 1
  c.log_every_steps = 1
  c.checkpoint.async_save = False
  val = train.train_and_evaluate(c, str(tmp_path / 'work'))
  assert val['examples'] == 20 and np.isfinite(val['loss'])
  directory = builtin.builtin_directory(str(tmp_path), **TINY)
  stats = statistics.load(os.path.join(directory, statistics.FILENAME))
  assert stats.mean_image.shape == (72, 72, 3) and stats.num_images == 48

  src = catalog.open_record_directory(directory, 'train')
  c.input.resize_to = 32
  with pytest.raises(ValueError, match='smaller than the 67px crops'):
    inputs.input_statistics(c, src)
  tfds_like = sources.ImageSource(sources.DatasetInfo('x', 'train', 1, 2, ('a', 'b')))
  c.input.resize_to = None
  with pytest.raises(ValueError, match='resize_to=256'):
    inputs.input_statistics(c, tfds_like)
