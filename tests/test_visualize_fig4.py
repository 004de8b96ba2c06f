"""AlexNet's Fig. 4 (``visualize predictions`` and ``visualize neighbours``) on the tiny AlexNet,
freshly initialised and saved as training saves it: the devices' top-5 and streamed
nearest-neighbour search against NumPy, the figures, and the command line on a checkpoint that
stores its config (no ``--config``). Untrained weights suffice (and are quicker): random
convolutional features already tell images apart, where a few training steps can make the last
layers nearly constant."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, configs, program
from alexnet_jax.errors import ConfigError
from alexnet_jax.visualize import analyses, checkpoints, commands, network
from alexnet_jax.visualize import images as images_lib

from helpers import XLA_FAST_COMPILE, ListSource, visualize_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The tiny two-tower AlexNet (He initialisation) on 64 built-in training images, its initial
  state saved at step 0 with the meta training writes (the config among it)."""
  root = tmp_path_factory.mktemp('fig4')
  config = visualize_config(root / 'data')
  config.model.init = 'he'
  workdir = str(root / 'work')
  prog = program.build_program(config, steps_per_epoch=4)
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  checkpointing.save(manager, 0, prog.init_state(),
                     dict(epoch=0.0, step=0, config=configs.to_dict(config)))
  checkpointing.wait(manager)
  manager.close()
  net = checkpoints.load_network(config, workdir, functions=network.CompiledFunctions())
  return config, workdir, net


@pytest.fixture(scope='module')
def queries(trained):
  config, _, _ = trained
  return images_lib.load_images(config, 'dataset', 5)


@pytest.fixture(scope='module')
def training_set(trained):
  """The training split in evaluation's crop, and the network's vectors of it (brute force)."""
  config, _, net = trained
  source = images_lib.open_split(config, config.dataset.train_split)
  pixels, labels = images_lib.read_examples(config, source, range(len(source)))
  return source, pixels, labels


@pytest.fixture(scope='module')
def brute(trained, queries, training_set):
  """The network's logits of the queries and, per layer, the queries' and the training images'
  vectors in NumPy: every activation of a dense layer, a spatial one's averaged over positions
  (``net.features`` of all of them in one go: one compile)."""
  _, _, net = trained
  _, pixels, _ = training_set
  n = len(queries.pixels)
  logits, acts = net.features(np.concatenate([queries.pixels, pixels]))
  vectors = {}
  for layer in ('fc7', 'conv5'):
    a = acts[layer].astype(np.float64)
    a = a.mean(axis=(1, 2)) if a.ndim == 4 else a
    vectors[layer] = (a[:n], a[n:])
  return logits[:n], vectors


def _brute_force(query_vectors, train_vectors):
  diff = query_vectors[:, None, :] - train_vectors[None, :, :]
  return np.sqrt(np.sum(diff**2, axis=-1))  # (Q, N)


def _assert_nearest(indices, distances, brute, k=6, rtol=1e-4, atol=1e-4):
  """``indices``/``distances`` are the ``k`` nearest of ``brute`` ``(Q, N)``: the distances are
  the ``k`` smallest, each index has its distance, and where a distance is not (nearly) tied with
  another the index is the brute force's own; of near-ties any order is right."""
  order = np.argsort(brute, axis=1, kind='stable')[:, :k]
  expected = np.take_along_axis(brute, order, axis=1)
  np.testing.assert_allclose(distances, expected, rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.take_along_axis(brute, indices, axis=1), distances, rtol=rtol,
                             atol=atol)
  assert all(len(set(row)) == k for row in indices.tolist())  # k different images
  for q in range(len(brute)):
    sorted_d = np.sort(brute[q])
    for j in range(k):
      d = sorted_d[j]
      if np.sum(np.abs(brute[q] - d) <= atol + rtol * d) == 1:  # no near-tie
        assert indices[q, j] == order[q, j], (q, j)


def test_merging_chunks_on_the_devices_equals_a_stable_sort(trained):
  """Integer vectors with exact ties, in chunks that split across the 8 devices, the last one
  padded: the same indices as a stable sort of all distances (ties: the lower index)."""
  _, _, net = trained
  rng = np.random.default_rng(0)
  base = rng.integers(-3, 4, size=(9, 5)).astype(np.float32)
  vectors = base[rng.integers(0, len(base), size=53)]  # many exact duplicates: exact ties
  queries = np.concatenate([base[:2], rng.integers(-3, 4, size=(2, 5)).astype(np.float32)])
  k = 6

  step = jax.jit(lambda params, q, best, v, index: jax.lax.with_sharding_constraint(
      analyses.merge_nearest(best, q, v, index), network.replicated()))

  def chunks(size):
    for start in range(0, len(vectors), size):
      v = vectors[start:start + size]
      index = np.arange(start, start + len(v), dtype=np.int32)
      pad = size - len(v)  # padding: any vector, at index -1
      v = np.concatenate([v, np.zeros((pad, 5), np.float32)])
      yield v, np.concatenate([index, np.full(pad, -1, np.int32)])

  d2 = np.sum((queries[:, None] - vectors[None])**2, axis=-1)
  order = np.argsort(d2, axis=1, kind='stable')[:, :k]
  for size in (8, 16, 64):
    start = (np.full((4, k), np.inf, np.float32), np.full((4, k), -1, np.int32))
    best_d, best_i = net.fold_batches(step, start, chunks(size), shared=(queries,))
    np.testing.assert_array_equal(best_i, order)
    np.testing.assert_array_equal(best_d, np.take_along_axis(d2, order, axis=1))


@pytest.mark.parametrize('count', [None, 50])
def test_neighbours_equal_a_brute_force_search(trained, queries, training_set, brute, count):
  """The 64 training images in chunks of 24 (the last one of 16, padded), and the first 50 (the
  last chunk of 2); fc7 (the default) and conv5 averaged over its positions."""
  config, _, net = trained
  source, pixels, _ = training_set
  count = count or len(source)
  assert analyses.feature_layer(net) == 'fc7'
  layers = ['fc7', 'conv5']
  found = analyses.nearest_neighbours(net, queries.pixels,
                                      images_lib.chunks(config, source, count, 24), layers)
  for layer in layers:
    indices, distances = found[layer]
    assert indices.shape == distances.shape == (len(queries.pixels), 6)
    query_vectors, train_vectors = brute[1][layer]
    _assert_nearest(indices, distances, _brute_force(query_vectors, train_vectors[:count]))


def test_neighbours_among_duplicates(trained, queries, training_set, brute):
  """A training set of repeated images (ties): still the brute force's nearest, with the
  duplicates of one image counted apart."""
  config, _, net = trained
  _, pixels, labels = training_set
  picks = np.random.default_rng(1).integers(0, 10, size=37)  # 10 images, each ~4 times
  source = ListSource([(pixels[i], labels[i]) for i in picks])
  found = analyses.nearest_neighbours(net, queries.pixels[:3],
                                      images_lib.chunks(config, source, len(source), 16), ['fc7'])
  indices, distances = found['fc7']
  query_vectors, train_vectors = brute[1]['fc7']
  _assert_nearest(indices, distances, _brute_force(query_vectors[:3], train_vectors[picks]))
  assert np.any(np.diff(distances, axis=1) < 1e-5)  # the duplicates are there, side by side


def test_chunks_read_the_split_in_evaluations_crop(trained, training_set):
  config, _, _ = trained
  source, pixels, _ = training_set
  got = list(images_lib.chunks(config, source, 50, 16))
  assert [c[0].shape for c in got] == [(16, 67, 67, 3)] * 4
  index = np.concatenate([c[1] for c in got])
  np.testing.assert_array_equal(index, np.r_[np.arange(50), np.full(14, -1)])
  np.testing.assert_array_equal(np.concatenate([c[0] for c in got])[:50], pixels[:50])


def test_predictions_equal_a_numpy_softmax(trained, queries, brute):
  _, _, net = trained
  result = analyses.top_predictions(net, queries.pixels)
  logits = brute[0]
  z = np.exp(logits - logits.max(-1, keepdims=True))
  p = z / z.sum(-1, keepdims=True)
  order = np.argsort(-p, axis=1, kind='stable')[:, :5]
  assert result['classes'].shape == result['probabilities'].shape == (5, 5)
  np.testing.assert_allclose(result['probabilities'], np.take_along_axis(p, order, axis=1),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.take_along_axis(p, result['classes'], axis=1),
                             result['probabilities'], rtol=1e-5, atol=1e-7)
  # Where the j-th probability is tied with neither neighbour, its class is NumPy's.
  gap = -np.diff(np.sort(p, axis=1)[:, ::-1][:, :6], axis=1) > 1e-6  # (N, 5): j vs j + 1
  alone = gap & np.concatenate([np.ones((len(p), 1), bool), gap[:, :4]], axis=1)
  assert alone.any()
  np.testing.assert_array_equal(result['classes'][alone], order[alone])


def _png(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def test_commands_write_figures_arrays_and_index(trained, tmp_path):
  config, workdir, net = trained
  out = str(tmp_path / 'out')
  options = commands.Options(num_images=3, num_train=40, chunk_size=16)
  written = commands.run('predictions', config, workdir, options, out, functions=net.functions)
  written += commands.run('neighbours', config, workdir, options, out, functions=net.functions)
  assert [os.path.basename(p) for p in written] == ['predictions_0.png', 'neighbours_fc7.png']
  for path in written:
    assert _png(path).std() > 0
  index = open(os.path.join(out, 'index.html')).read()
  for name in ('predictions_0.png', 'neighbours_fc7.png', 'predictions.npz', 'neighbours.npz'):
    assert name in index
  with np.load(os.path.join(out, 'predictions.npz')) as d:
    assert d['images'].shape == (3, 67, 67, 3) and d['classes'].shape == (3, 5)
    assert d['labels'].shape == (3,) and np.all(np.diff(d['probabilities'], axis=1) <= 0)
  with np.load(os.path.join(out, 'neighbours.npz')) as d:
    assert d['fc7/images'].shape == (3, 6, 67, 67, 3) and d['num_train'] == 40
    assert np.all(d['fc7/indices'] < 40) and np.all(np.diff(d['fc7/distances'], axis=1) >= 0)
    source = images_lib.open_split(config, config.dataset.train_split)
    pixels, labels = images_lib.read_examples(config, source, d['fc7/indices'][1])
    np.testing.assert_array_equal(d['fc7/images'][1], pixels)
    np.testing.assert_array_equal(d['fc7/labels'][1], labels)
  # Photographs: predictions named by the data set's classes, no true class.
  photos = commands.run('predictions', config, workdir,
                        commands.Options(images='skimage', num_images=2), str(tmp_path / 'p'),
                        functions=net.functions)
  assert _png(photos[0]).std() > 0
  for bad, match in ((dict(layers=['nope']), 'unknown layer'),
                     (dict(num_train=65), 'holds 64 images'), (dict(num_train=5), 'at least 6')):
    with pytest.raises(ConfigError, match=match):
      commands.run('neighbours', config, workdir, commands.Options(**bad), out,
                   functions=net.functions)


def _cli(args):
  # Two devices (the config's mesh), quick compiles, no restart for huge pages (helpers.py).
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=2 {XLA_FAST_COMPILE}',
             JAX_PLATFORMS='cpu', GLIBC_TUNABLES='glibc.malloc.hugetlb=1')
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.visualize', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_command_line_without_config(trained, tmp_path):
  _, workdir, _ = trained
  out = tmp_path / 'cli'
  ok = _cli(['predictions', f'--checkpoint={workdir}', f'--out={out}', '--num_images=4'])
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert os.path.exists(out / 'predictions_0.png') and 'index.html' in ok.stdout
  # An override of the stored config: queries from the training split, each its own nearest.
  ok = _cli([
      'neighbours', f'--checkpoint={workdir}', f'--out={out}', '--num_images=2', '--chunk_size=16',
      '--config.dataset.eval_split=train'
  ])
  assert ok.returncode == 0, ok.stderr[-3000:]
  with np.load(out / 'neighbours.npz') as d:
    own = [int(name.split('[')[1].rstrip(']')) for name in d['query_names']]
    assert list(d['query_names']) == [f'train[{i}]' for i in own]
    np.testing.assert_array_equal(d['fc7/indices'][:, 0], own)
    assert np.all(d['fc7/distances'][:, 0] < 1e-3 * d['fc7/distances'][:, 1])
  assert 'neighbours_fc7.png' in open(out / 'index.html').read()
  bad = _cli(['neighbours', f'--checkpoint={workdir}', f'--out={out}', '--layers=fc9'])
  assert bad.returncode == 2, bad.stderr[-3000:]
  errors = [line for line in bad.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and "unknown layer 'fc9'" in errors[0], bad.stderr[-3000:]
  assert 'Traceback' not in bad.stderr
