"""The analyses on a checkpoint trained for a few steps: numbers against slow references, and every
command end to end, on the built-in data and on scikit-image's photographs."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import train
from alexnet_jax.data import catalog, statistics
from alexnet_jax.visualize import analyses, checkpoints, commands, network, snapshots
from alexnet_jax.visualize import images as images_lib

from helpers import visualize_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def functions():
  """The compiled functions of this module's network, shared by its analyses and commands (as one
  session of the command line shares them); tests that jit stand-ins make their own."""
  return network.CompiledFunctions()


@pytest.fixture(scope='module')
def trained(tmp_path_factory, functions):
  """Two epochs (8 steps) of the tiny two-tower AlexNet; checkpoints kept at epochs 1 and 2."""
  root = tmp_path_factory.mktemp('vis')
  config = visualize_config(root / 'data')
  workdir = str(root / 'work')
  snapshot = snapshots.every_epochs(config.visualize.every_epochs, config.visualize.images)
  train.train_and_evaluate(config, workdir, hooks=[snapshot])
  return config, workdir, checkpoints.load_network(config, workdir, functions=functions)


@pytest.fixture(scope='module')
def images(trained):
  config, _, _ = trained
  return images_lib.load_images(config, 'dataset', 4)


def test_checkpoints_are_kept_at_the_listed_epochs(trained):
  config, workdir, net = trained
  assert checkpoints.checkpoint_steps(config, workdir) == [4, 8]  # keep=1 alone would keep only 8
  assert net.step == 8 and net.epoch == 2


def test_networks_of_one_run_share_their_compiled_functions(trained):
  config, workdir, net = trained
  shared = network.CompiledFunctions()  # this test's own: nothing it jits reaches other tests
  later = checkpoints.load_network(config, workdir, functions=shared)
  earlier = checkpoints.load_network(config, workdir, 4, functions=shared)
  make = lambda: lambda params, x: x
  assert earlier.function('features', make) is later.function('features', make)
  assert earlier.function(('project', 'conv5'), make) is not later.function('features', make)
  # The fixture's network, loaded on its own, keeps its own functions: the identity jitted under
  # 'features' above never reaches it (or the tests that use it after this one).
  assert net.functions is not shared
  # Counts of examples padded to a few batch shapes: devices x powers of two, at most the cap.
  assert [network._bucket(n, 8, 64) for n in (1, 8, 9, 17, 26, 33, 64, 65, 500)
         ] == [8, 8, 16, 32, 32, 64, 64, 64, 64]
  assert [network._bucket(n, 1, 32) for n in (1, 3, 5, 32, 40)] == [1, 4, 8, 32, 32]


def test_a_mean_image_network_is_analysed_on_the_input_evaluation_gives_it(trained, images):
  # The same checkpoint, as if trained on pixels minus the mean image (the paper's recipe).
  config, workdir, net = trained
  paper = copy.deepcopy(config)
  paper.input.mean_image = True
  source = catalog.open_source(paper.dataset, paper.dataset.train_split)
  path = statistics.path_for(source)
  assert not os.path.exists(path)
  with pytest.raises(ValueError, match='mean_image=True.*does not exist'):
    checkpoints.load_network(paper, workdir)
  stats = statistics.ensure(source, 72, progress=False)
  try:
    with_mean = checkpoints.load_network(paper, workdir)
    np.testing.assert_array_equal(with_mean.mean_image, stats.mean_image)
    pixels = images.pixels[:, :67, :67]
    window = stats.mean_image[2:69, 2:69]  # the central 67 x 67 of the 72 x 72 mean image
    expected = (pixels.astype(np.float32) - window) / np.float32(64.0)
    np.testing.assert_allclose(np.asarray(with_mean.normalize(pixels)), expected, rtol=1e-5,
                               atol=1e-5)
    # Not the mean colour: the analyses would otherwise see shifted inputs.
    assert np.abs(np.asarray(net.normalize(pixels)) - expected).max() > 0.1
    # Compiled apart: the mean image is part of a function's key ('probe': a key no analysis
    # uses, so the identity jitted here never stands in for one).
    assert with_mean.function('probe', lambda: lambda p, x: x) is not net.function(
        'probe', lambda: lambda p, x: x)
  finally:
    os.remove(path)


def test_training_renders_filters_and_projections(trained):
  _, workdir, _ = trained
  for epoch in (1, 2):
    filters = _png(os.path.join(workdir, 'visualize', f'filters_epoch{epoch}.png'))
    assert filters.shape == (2 * 35 + 2, 3 * 35 + 2, 3)
    deconv = _png(os.path.join(workdir, 'visualize', f'deconv_epoch{epoch}.png'))
    assert deconv.shape == (2 * 136 + 2, 5 * 136 + 2, 3)  # 2 images, each + 4 projections
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))


def test_occlusion_equals_a_slow_loop(trained, images):
  _, _, net = trained
  image, label = images.pixels[0], int(images.labels[0])
  res = analyses.occlusion(net, image, label, 'conv5', size=20, stride=12)
  assert res['feature'].shape == (4, 4)  # corners 0, 12, 24, 36
  fill = np.asarray(net.config.input.mean_rgb, np.float32)
  for (r, c), feature, prob, pred in zip(res['corners'], res['feature'].ravel(),
                                         res['probability'].ravel(), res['predicted'].ravel()):
    occluded = image.astype(np.float32)
    occluded[r:r + 20, c:c + 20] = fill
    logits, acts = net.features(occluded[None])
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    assert feature == pytest.approx(acts['conv5'][0, ..., res['map']].sum(), rel=1e-4, abs=1e-5)
    assert prob == pytest.approx(p[label], rel=1e-4)
    assert pred == np.argmax(p)
  # The strongest map is the unoccluded image's strongest conv5 map.
  _, acts = net.features(image[None])
  assert res['map'] == np.argmax(acts['conv5'][0].reshape(-1, acts['conv5'].shape[-1]).max(0))


def test_identity_transforms_change_nothing(trained, images):
  _, _, net = trained
  fill = net.config.input.mean_rgb
  for kind, identity in (('translation', 0.0), ('scale', 1.0), ('rotation', 0.0)):
    np.testing.assert_array_equal(analyses.transform(images.pixels[1], kind, identity, fill),
                                  images.pixels[1])
  res = analyses.invariance(net, images.pixels[:2], images.labels[:2], ['conv1', 'fc7'],
                            {'translation': [0.0, 0.1], 'scale': [1.0], 'rotation': [0.0, 90.0]})
  for kind in res:
    for layer, d in res[kind]['distance'].items():
      assert np.all(d[:, 0] < 1e-4), (kind, layer, d)
  assert np.all(res['rotation']['distance']['conv1'][:, 1] > 1e-2)  # a real change is measured
  logits, _ = net.features(images.pixels[:2])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(res['scale']['probability'][:, 0], p[[0, 1], images.labels[:2]],
                             rtol=1e-5)


def test_sign_consistency_by_hand():
  eps = np.array([[1.0, -2.0, 0.0, 3.0], [2.0, -1.0, 0.0, -1.0], [-1.0, 0.0, 0.0, 5.0]])
  # signs: (+ - 0 +), (+ - 0 -), (- 0 0 +): H01 = 1/4, H02 = 2/4, H12 = 3/4; each pair twice.
  assert analyses.sign_consistency(eps) == pytest.approx(2 * (0.25 + 0.5 + 0.75))


def test_the_same_part_of_the_same_image_corresponds_perfectly(trained, images):
  _, _, net = trained
  same = np.repeat(images.pixels[:1], 3, axis=0)
  table = analyses.correspondence(net, same, {'box': [10, 20, 15, 15]}, ['conv5', 'fc7'],
                                  random_draws=2)
  assert table['box']['conv5']['part'] == 0.0 and table['box']['fc7']['part'] == 0.0
  mixed = analyses.correspondence(net, images.pixels[:3], {'box': [[10, 20, 15, 15]] * 3},
                                  ['conv5'], random_draws=2)
  assert mixed['box']['conv5']['part'] > 0
  with pytest.raises(ValueError, match='does not fit'):
    analyses.correspondence(net, same, {'box': [60, 60, 15, 15]}, ['conv5'])


def _png(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def test_every_command_writes_its_figures(trained, functions, tmp_path):
  config, workdir, _ = trained
  out = str(tmp_path / 'out')
  options = commands.Options(num_images=2, layers=['conv1', 'conv5'], num_maps=2, top=4,
                             occluder_size=20, occluder_stride=12, random_draws=2)
  written = {}
  for analysis in commands.ANALYSES:
    layers = dict(invariance=None, occlusion=None,
                  correspondence=None).get(analysis, options.layers)
    written[analysis] = commands.run(analysis, config, workdir,
                                     dataclasses.replace(options, layers=layers), out,
                                     functions=functions)
  f = _png(written['filters'][0])
  assert f.shape == (2 * 35 + 2, 3 * 35 + 2, 3)  # 6 filters of 11² zoomed to 33², 3 a row
  deconv = {os.path.basename(p): _png(p) for p in written['deconv']}
  assert set(deconv) == {'deconv_conv1.png', 'deconv_conv5.png'}
  assert deconv['deconv_conv5.png'].shape == (2 * 136 + 2, 5 * 136 + 2, 3)  # image + 4 maps, 2 rows
  assert len(written['top9']) == 2 and len(written['evolution']) == 2
  evolution = _png(os.path.join(out, 'evolution_conv1.png'))
  assert evolution.shape[1] == 2 * (66 + 2) + 2  # two checkpoints: epochs 1 and 2
  for path in written['invariance'] + written['occlusion'] + written['correspondence']:
    assert _png(path).std() > 0
  assert len(written['occlusion']) == 2
  index = open(os.path.join(out, 'index.html')).read()
  for files in written.values():
    for path in files:
      assert f'src="{os.path.basename(path)}"' in index
  with np.load(os.path.join(out, 'top9.npz')) as top9:
    assert top9['conv5/values'].shape == (2 * 2,)  # 2 maps x one activation in each of 2 images
    assert np.all(np.diff(top9['conv5/values'].reshape(2, 2), axis=1) <= 0)  # strongest first
  table = json.load(open(os.path.join(out, 'correspondence.json')))['table']
  assert set(table['centre']) == {'conv5', 'fc7'}


def test_commands_on_photographs(trained, functions, tmp_path):
  config, workdir, _ = trained
  out = str(tmp_path / 'photos')
  options = commands.Options(images='skimage', num_images=3, top=2, occluder_size=30,
                             occluder_stride=18, layers=['conv3'])
  for analysis in ('deconv', 'occlusion'):
    for path in commands.run(analysis, config, workdir, options, out, functions=functions):
      assert _png(path).std() > 0
  with np.load(os.path.join(out, 'deconv.npz')) as d:
    assert d['images'].shape == (3, 67, 67, 3)
    assert np.abs(d['conv3/projections']).max() > 0


def _cli(args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.visualize', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_command_line(trained, tmp_path):
  _, workdir, _ = trained
  config = tmp_path / 'config.py'
  config.write_text(f'import sys\nsys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
                    'from helpers import visualize_config\n'
                    f'def get_config():\n  return visualize_config({str(tmp_path / "unused")!r})\n')
  ok = _cli(['filters', f'--config={config}', f'--checkpoint={workdir}', f'--out={tmp_path}/o'])
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert os.path.exists(tmp_path / 'o' / 'filters.png') and 'index.html' in ok.stdout
  bad = _cli(['filters', f'--config={config}', f'--checkpoint={tmp_path}/nothing', '--out=x'])
  assert bad.returncode == 2 and 'no checkpoint directory' in bad.stderr
  assert not os.path.exists(tmp_path / 'nothing')
