"""evaluate and features on one tiny run (two epochs, its epoch-1 network the second member of
the ensembles): numbers against independent paths (training's own evaluation, the visualize
``Network`` running the towers in one array on crops cut here), the files they write, and every
command end to end, each with the config its checkpoint stores."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import evaluate, features, host, inference, train, trained
from alexnet_jax.data import augment, catalog
from alexnet_jax.data import inputs as inputs_lib
from alexnet_jax.visualize import checkpoints

from helpers import XLA_FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = """import sys
sys.path.insert(0, {tests!r})
from helpers import visualize_config
def get_config():
  c = visualize_config({data!r})
  c.visualize.every_epochs = 0
  c.model.init = 'he'  # not the paper's unit biases: outputs that depend on the window seen
  return c
"""
LAYERS = ('conv5', 'fc7')
SCALES = (72, 90)  # the descriptor's shorter sides, small: the images are 72 x 72


def _env():
  # Fast compiles, and the huge-pages tunable preset so that no process restarts (host.py).
  return dict(os.environ, JAX_PLATFORMS='cpu', GLIBC_TUNABLES=host.HUGE_PAGES_TUNABLE,
              XLA_FLAGS=f'--xla_force_host_platform_device_count=8 {XLA_FAST_COMPILE}')


def _start(module, args):
  return subprocess.Popen([sys.executable, '-m', f'alexnet_jax.{module}', *args], cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _copy_step(workdir, step, to, config_edit=None):
  """A workdir holding one step of another's checkpoints (a network of its own), its stored
  config changed by ``config_edit`` where given."""
  target = os.path.join(to, 'checkpoints', str(step))
  shutil.copytree(os.path.join(workdir, 'checkpoints', str(step)), target)
  if config_edit is not None:
    meta_file = os.path.join(target, 'meta', 'metadata')
    with open(meta_file) as f:
      meta = json.load(f)
    config_edit(meta['config'])
    with open(meta_file, 'w') as f:
      json.dump(meta, f)
  return str(to)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The tiny two-tower AlexNet trained for two epochs (8 steps) by the command line: ``a`` its
  final network, ``b`` its epoch-1 network on its own, ``classes5`` that one again claiming 5
  classes in its stored config."""
  root = tmp_path_factory.mktemp('evaluate')
  config_file = root / 'config.py'
  config_file.write_text(
      CONFIG_FILE.format(tests=os.path.join(REPO, 'tests'), data=str(root / 'data')))
  a = str(root / 'a')
  proc = _start('main', [f'--config={config_file}', f'--workdir={a}'])
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert trained.checkpoint_steps(a) == [4, 8]
  b = _copy_step(a, 4, root / 'b')
  classes5 = _copy_step(a, 4, root / 'classes5', lambda c: c['model'].update(num_classes=5))
  return dict(root=root, a=a, b=b, classes5=classes5)


@pytest.fixture(scope='module')
def commands(runs):
  """Every command line of this module, started at once (each without --config: the checkpoint's
  stored config), so that they run beside the tests in this process; ``.communicate()`` each."""
  root, a, b = runs['root'], runs['a'], runs['b']
  started = dict(
      # Another mesh (4 x 2: every device), and overrides of the stored config.
      evaluate=_start('evaluate', [
          f'--checkpoint={a},{b}', f'--out={root}/evaluate', '--config.mesh.data=4',
          '--config.eval_batch_size=8', '--config.input.eval_views=ten'
      ]),
      features=_start(
          'features',
          [f'--checkpoint={a}', f'--out={root}/features', '--layers=fc7,conv5', '--pool=max']),
      bad_layer=_start('features', [f'--checkpoint={a}', f'--out={root}/x', '--layers=conv5,nope']),
      bad_classes=_start('evaluate', [f'--checkpoint={a},{runs["classes5"]}', f'--out={root}/x']),
      bad_checkpoint=_start('evaluate', [f'--checkpoint={root}/nothing', f'--out={root}/x']),
      bad_data=_start(
          'evaluate',
          [f'--checkpoint={a}', f'--out={root}/x', '--config.dataset.name=nonexistent']),
  )
  finished = {}

  def result(name):
    if name not in finished:
      proc = started[name]
      out, err = proc.communicate(timeout=600)
      finished[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return finished[name]

  yield result
  for proc in started.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


@pytest.fixture(scope='module')
def shared_compiles():
  """``inference.compile_pass`` once per pass for this module's networks (one architecture, mesh
  and normalisation): the passes of ``evaluate.run``, ``features.extract`` and the tests share
  them, as ``passes(compiled=)`` lets a caller share them."""
  real = inference.compile_pass
  cache = {}

  def compile_once(net, what):
    prog = net.program
    key = (what, prog.graphdef, prog.mesh, repr(prog.norm))
    if key not in cache:
      cache[key] = real(net, what)
    return cache[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(inference, 'compile_pass', compile_once)
    yield cache


@pytest.fixture(scope='module')
def nets(runs, commands, shared_compiles):
  """Both networks on the stored config's mesh (1 x 2: a tower a device), the split they are
  evaluated on, and its images."""
  del commands, shared_compiles  # started first: the command lines run beside these tests
  config = trained.config_for(runs['a'])
  assert (config.mesh.data, config.mesh.model) == (1, 2)
  a = trained.load(config, runs['a'])
  b = trained.load(trained.config_for(runs['b']), runs['b'])
  assert (a.step, a.epoch, b.step, b.epoch) == (8, 2, 4, 1)
  source = catalog.open_source(config.dataset, config.dataset.eval_split, progress=False)
  images = np.stack([source[i]['image'] for i in range(len(source))])
  assert images.shape == (24, 72, 72, 3)
  return dict(config=config, a=a, b=b, source=source, images=images,
              labels=np.asarray(source.labels()))


@pytest.fixture(scope='module')
def network(runs, nets):
  """The visualize path to the same checkpoint: towers in one array, split over local devices."""
  return checkpoints.load_network(nets['config'], runs['a'])


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ten_crops(image, size=67):
  """The paper's ten views, cut by hand: the corners and the centre, then their reflections."""
  h, w = image.shape[:2]
  b, r, ct, cl = h - size, w - size, (h - size) // 2, (w - size) // 2
  five = [image[t:t + size, l:l + size] for t, l in ((0, 0), (0, r), (b, 0), (b, r), (ct, cl))]
  return five + [c[:, ::-1] for c in five]


@pytest.fixture(scope='module')
def by_hand(nets, network):
  """The independent path's outputs, all crops in one ``Network.features`` call (one compile):
  per image its centre crop, its ten views, and the ten views at each descriptor scale."""
  images = nets['images']
  centre = [im[2:69, 2:69] for im in images]
  ten = [c for im in images for c in _ten_crops(im)]
  scaled = [
      c for im in images for q in SCALES for c in _ten_crops(augment.rescale_center_square(im, q))
  ]
  logits, acts = network.features(np.stack(centre + ten + scaled))
  n = len(images)
  parts = np.cumsum([0, n, 10 * n])
  split = lambda x: (x[:parts[1]], x[parts[1]:parts[2]], x[parts[2]:])
  out = {}
  for name, x in dict(logits=logits, **{k: acts[k] for k in LAYERS}).items():
    c, t, s = split(np.asarray(x, np.float64))
    out[name] = dict(centre=c, ten=t.reshape(n, 10, *t.shape[1:]),
                     scaled=s.reshape(n, 10 * len(SCALES), *s.shape[1:]))
  return out


def _probs(net, source, what=inference.Pass()):
  return inference.collect(net, source, what)


@pytest.fixture(scope='module')
def centre_probs(nets):
  return {k: _probs(nets[k], nets['source']) for k in ('a', 'b')}


RESULT_KEYS = ('examples', 'top1_error', 'top5_error', 'per_class_accuracy', 'class_counts',
               'confusion')


def test_an_ensemble_of_one_is_its_network_as_training_evaluated_it(runs, nets, centre_probs):
  a = nets['a']
  single = evaluate.run([runs['a']], [nets['config']], split=None, views=None)
  out = centre_probs['a']
  np.testing.assert_array_equal(out['label'], nets['labels'])
  own = evaluate.metrics(out['probs'], out['label'], 10)
  assert {k: single[k] for k in RESULT_KEYS} == {k: own[k] for k in RESULT_KEYS}
  (member,) = single['members']
  assert (member['top1_error'], member['top5_error']) == (own['top1_error'], own['top5_error'])
  assert member['step'] == 8 and member['views'] == 'center' and member['images_per_second'] > 0
  assert member['mesh'] == dict(data=1, model=2) and member['compile_seconds'] is not None
  assert single['networks'] == 1 and single['class_counts'] == np.bincount(
      nets['labels'], minlength=10).tolist()
  assert np.sum(single['confusion']) == 24
  np.testing.assert_allclose(out['probs'].sum(1), 1, rtol=1e-5)
  # Training's own evaluation (program.eval_step on the towers' logit slices, summed errors):
  # what it reported when it wrote the checkpoint, and again here on this process's program.
  reported = trained.read_meta(runs['a'])['val']
  again = train.evaluate(a.program, a, inputs_lib.eval_batches(a.config, nets['source'], a.mesh))
  for val in (reported, again):
    assert val['examples'] == 24
    assert single['top1_error'] == pytest.approx(val['top1_error'], abs=1e-9)
    assert single['top5_error'] == pytest.approx(val['top5_error'], abs=1e-9)
  # The cross-entropy of the probabilities is training's loss.
  loss = -np.mean(np.log(out['probs'][np.arange(24), out['label']]))
  assert loss == pytest.approx(again['loss'], rel=1e-5)


def test_the_ensemble_averages_the_members_probabilities(runs, nets, centre_probs):
  both = evaluate.run([runs['a'], runs['b']],
                      [nets['config'], trained.config_for(runs['b'])], split=None, views=None)
  pa, pb = centre_probs['a']['probs'], centre_probs['b']['probs']
  labels = nets['labels']
  expected = evaluate.metrics((pa + pb) / 2, labels, 10)
  assert {k: both[k] for k in RESULT_KEYS} == {k: expected[k] for k in RESULT_KEYS}
  for m, p in zip(both['members'], (pa, pb)):
    own = evaluate.metrics(p, labels, 10)
    assert (m['top1_error'], m['top5_error']) == (own['top1_error'], own['top5_error'])
  assert [m['step'] for m in both['members']] == [8, 4] and both['networks'] == 2
  assert not np.allclose(pa, pb, atol=1e-4)  # two different networks
  np.testing.assert_allclose(evaluate.ensemble([pa, pb]), (pa + pb) / 2, rtol=1e-6)


def test_probabilities_not_logits_are_averaged(runs, nets, monkeypatch):
  # Member a is sure of the label; member b is not, and leans to one other class. Their mean
  # probability ranks the label first; their mean logit ranks that other class above it.
  labels = nets['labels']
  other = (labels + 1) % 10
  logits = {8: np.zeros((24, 10)), 4: np.zeros((24, 10))}
  rows = np.arange(24)
  logits[8][rows, labels] = 4.0
  logits[4][rows, labels] = -4.0
  logits[4][rows, other] = 1.0
  probs = {step: _softmax(x).astype(np.float32) for step, x in logits.items()}
  monkeypatch.setattr(inference, 'collect',
                      lambda net, source, what, **kw: dict(probs=probs[net.step], label=labels))
  result = evaluate.run([runs['a'], runs['b']],
                        [nets['config'], trained.config_for(runs['b'])], split=None, views=None)
  by_logits = evaluate.metrics(_softmax((logits[8] + logits[4]) / 2), labels, 10)
  assert by_logits['top1_error'] == 1.0 and by_logits['top5_error'] == 0.0
  assert result['top1_error'] == 0.0 and result['top5_error'] == 0.0
  assert [m['top1_error'] for m in result['members']] == [0.0, 1.0]
  np.testing.assert_array_equal(result['per_class_accuracy'], 1.0)
  assert np.trace(result['confusion']) == 24


def test_ten_views_are_the_mean_of_the_ten_single_views(nets, by_hand):
  out = _probs(nets['a'], nets['source'], inference.Pass(views='ten', layers=LAYERS))
  np.testing.assert_array_equal(out['label'], nets['labels'])
  views = _softmax(by_hand['logits']['ten'])  # (24, 10 views, classes)
  np.testing.assert_allclose(out['probs'], views.mean(1), atol=1e-5)
  # Not the centre alone: the views do differ.
  assert np.abs(views - views[:, 4:5]).max() > 1e-4
  # The layers, averaged over the views likewise.
  for layer in LAYERS:
    per_view = by_hand[layer]['ten']
    expected = per_view.reshape(24, 10, -1).mean(1)
    np.testing.assert_allclose(out[layer], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _mean_pooled():
  return inference.Pass(layers=LAYERS, pool='mean', probabilities=False)


@pytest.fixture(scope='module')
def extracted(nets, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('features') / 'centre')
  meta = features.extract(nets['a'], nets['source'], _mean_pooled(), out)
  return out, meta


def test_mean_pooled_features_are_the_means_of_the_towers_maps(nets, by_hand, extracted):
  # The maps of the two towers, one a device, gathered: those of the towers run in one array.
  out, meta = extracted
  assert meta['count'] == 24 and meta['pool'] == 'mean' and meta['views'] == 'center'
  maps = by_hand['conv5']['centre']
  assert maps.shape == (24, 3, 3, 16)  # two towers of 8 maps, tower-major
  expected = dict(conv5=maps.mean((1, 2)), fc7=by_hand['fc7']['centre'])  # dense: not pooled
  for layer in LAYERS:
    stored = np.load(os.path.join(out, f'{layer}.npy'), mmap_mode='r')
    assert isinstance(stored, np.memmap) and stored.dtype == np.float32
    assert stored.shape == expected[layer].shape == (24, meta['layers'][layer]['width'])
    scale = np.abs(expected[layer]).max()
    assert scale > 0
    np.testing.assert_allclose(stored, expected[layer], rtol=1e-4, atol=1e-5 * scale)
  assert meta['images_per_second'] > 0 and meta['compile_seconds'] is not None


def test_a_feature_set_reads_back_whole_and_in_chunks(nets, extracted):
  out, meta = extracted
  fs = features.FeatureSet(out)
  np.testing.assert_array_equal(fs.labels, nets['labels'])
  np.testing.assert_array_equal(fs.index, np.arange(24))
  assert fs.meta == json.load(open(os.path.join(out, features.META))) == meta
  assert fs.meta['class_names'] == list(nets['source'].class_names)
  in_memory = inference.collect(nets['a'], nets['source'], _mean_pooled())
  np.testing.assert_array_equal(fs.labels, in_memory['label'])
  for layer in LAYERS:
    whole = np.load(os.path.join(out, f'{layer}.npy'))
    np.testing.assert_array_equal(whole, in_memory[layer])
    chunks = list(fs.chunks(layer, 5))  # 24 rows: 5, 5, 5, 5, 4
    assert [s for s, _ in chunks] == [0, 5, 10, 15, 20]
    assert [len(c) for _, c in chunks] == [5, 5, 5, 5, 4]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), whole)
    np.testing.assert_array_equal(fs.array(layer), whole)
  with pytest.raises(features.ConfigError, match='holds no layer'):
    fs.array('fc6')


def test_the_descriptor_is_the_normalised_mean_over_scales_and_views(nets, by_hand, tmp_path):
  net = nets['a']
  what = features.what_to_extract(net, (), pool='none', views='center', descriptor=True,
                                  scales=SCALES)
  assert what.layers == ('fc7',) and what.views == 'ten' and what.scales == SCALES
  meta = features.extract(net, nets['source'], what, str(tmp_path), descriptor=True)
  assert meta['descriptor'] and meta['scales'] == list(SCALES)
  stored = np.load(tmp_path / 'fc7.npy')
  np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, rtol=1e-5)
  mean = by_hand['fc7']['scaled'].mean(1)  # (24, 256): 20 views each
  expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
  np.testing.assert_allclose(stored, expected, atol=1e-5)
  # Not one scale's alone.
  first = by_hand['fc7']['scaled'][:, :10].mean(1)
  assert np.abs(first / np.linalg.norm(first, axis=1, keepdims=True) - expected).max() > 1e-4
  with pytest.raises(features.ConfigError, match='last hidden layer'):
    features.what_to_extract(net, ('conv5',), pool='none', views='center', descriptor=True,
                             scales=SCALES)


def test_an_interrupted_extraction_leaves_only_partial_files(nets, tmp_path, monkeypatch):
  real = inference.passes

  def interrupted(*args, **kwargs):
    batches = real(*args, **kwargs)
    yield next(batches)
    raise KeyboardInterrupt('simulated interruption')

  monkeypatch.setattr(inference, 'passes', interrupted)
  out = tmp_path / 'out'
  with pytest.raises(KeyboardInterrupt):
    features.extract(nets['a'], nets['source'], _mean_pooled(), str(out))
  assert sorted(os.listdir(out)) == ['conv5.npy.partial', 'fc7.npy.partial']
  with pytest.raises(ValueError):  # its header promises 24 rows; 16 are there
    np.load(out / 'fc7.npy.partial')


def _lines(proc, prefix):
  return [line for line in proc.stderr.splitlines() if line.startswith(prefix)]


def _refused(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  (line,) = _lines(proc, 'error:')
  return line


def test_evaluate_on_another_mesh_with_overrides_gives_the_same_numbers(runs, nets, commands):
  proc = commands('evaluate')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = runs['root'] / 'evaluate'
  result = json.load(open(out / 'results.json'))
  # The stored config, with --config.mesh.data=4 --config.eval_batch_size=8
  # --config.input.eval_views=ten, for both members.
  assert [(m['mesh'], m['eval_batch_size'], m['views']) for m in result['members']
         ] == [(dict(data=4, model=2), 8, 'ten')] * 2
  # The numbers of this process's passes, on the 1 x 2 mesh in batches of another size.
  ten = inference.Pass(views='ten', layers=LAYERS)
  probs = [_probs(nets[k], nets['source'], ten)['probs'] for k in ('a', 'b')]
  expected = evaluate.metrics(evaluate.ensemble(probs), nets['labels'], 10)
  assert {k: result[k] for k in RESULT_KEYS} == {k: expected[k] for k in RESULT_KEYS}
  for m, p in zip(result['members'], probs):
    assert m['top1_error'] == evaluate.metrics(p, nets['labels'], 10)['top1_error']
  for name in ('results.json', 'results.md', 'per_class.png', 'confusion.png', 'index.html'):
    assert os.path.getsize(out / name) > 0
  # The table, printed: ours beside the paper's single AlexNet (40.7 / 18.2); no published
  # figure for an ensemble of two.
  table = proc.stdout
  assert '| top-1 error % | top-5 error % | paper top-1 | paper top-5 |' in table
  member = result['members'][0]
  row = next(line for line in table.splitlines() if line.startswith(f'| {runs["a"]} (step 8)'))
  assert row == (f'| {runs["a"]} (step 8) | 1 | ten | {100 * member["top1_error"]:.2f} | '
                 f'{100 * member["top5_error"]:.2f} | 40.7 | 18.2 |')
  assert (f'| ensemble (softmax averaged) | 2 | ten | {100 * expected["top1_error"]:.2f} | '
          f'{100 * expected["top5_error"]:.2f} | — | — |') in table
  assert 'ILSVRC-2012 validation' in table and 'index.html' in table
  index = open(out / 'index.html').read()
  assert 'src="per_class.png"' in index and 'src="confusion.png"' in index
  assert '<td>40.7</td>' in index
  assert open(out / 'results.md').read().count('| 40.7 | 18.2 |') == 2


def test_features_command_writes_its_files(runs, nets, by_hand, commands):
  proc = commands('features')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = runs['root'] / 'features'
  fs = features.FeatureSet(str(out))
  assert fs.meta['pool'] == 'max' and list(fs.meta['layers']) == ['fc7', 'conv5']
  assert fs.meta['images_per_second'] > 0 and 'images/s' in proc.stdout
  assert f'{out}/conv5.npy: 24 x 16 float32' in proc.stdout
  # Each map's spatial maximum; the dense layer as it is.
  maps = by_hand['conv5']['centre']
  for layer, expected in (('conv5', maps.max((1, 2))), ('fc7', by_hand['fc7']['centre'])):
    np.testing.assert_allclose(fs.array(layer), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
  np.testing.assert_array_equal(fs.labels, nets['labels'])
  np.testing.assert_array_equal(fs.index, np.arange(24))


def test_bad_input_ends_in_one_line(runs, commands):
  assert "has no layer 'nope'" in _refused(commands('bad_layer'))
  assert '5 classes' in _refused(commands('bad_classes'))
  assert 'restored checkpoint' not in commands('bad_classes').stderr  # told before any work
  assert 'no checkpoint directory' in _refused(commands('bad_checkpoint'))
  assert "data set 'nonexistent'" in _refused(commands('bad_data'))
  assert not os.path.exists(runs['root'] / 'x' / 'results.json')
