"""Zeiler & Fergus's transfer protocol (``transfer``) on the built-in set: a tiny two-tower AlexNet
pretrained on four of its classes, its features probed on the other six; the probes' numbers
against a direct computation; the seeded splits; the baselines (training runs in workdirs of
their own, resumed); the multi-label path on a tiny TFDS set; the outputs; and bad input, one line
each, through the command line."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.metrics import average_precision_score, balanced_accuracy_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from alexnet_jax import host, inference, probes, train, trained, transfer
from alexnet_jax.data import builtin, catalog

from helpers import XLA_FAST_COMPILE, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = (0, 1, 2, 3)  # disc, square, triangle, star
TRANSFER = (4, 5, 6, 7, 8, 9)  # cross, ring, hexagon, arrow, stripes, checkerboard
SPLITS = ['train', 'validation']
PER_CLASS = [5, 20]
NUM_SPLITS = 3
LAYERS = ['conv5', 'fc7']
DATA = dict(name='builtin_shapes', num_train=600, num_val=200, image_size=72)


def _config(data_dir):
  c = tiny_config()
  c.dataset.update(data_dir=str(data_dir), classes=PRETRAIN, **DATA)
  c.model.update(num_classes=len(PRETRAIN), width=0.125, init='he', dropout=0.0)
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=0)
  c.batch_size = 16
  c.eval_batch_size = 48
  c.num_epochs = 10
  c.log_every_steps = 1000
  c.optim.update(learning_rate=0.01, schedule='cosine', warmup_epochs=1)
  c.checkpoint.update(async_save=False, keep=1, keep_best=False, keep_epochs=())
  return c


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('transfer')
  builtin.ensure_builtin(str(root / 'data'), progress=False, num_workers=0,
                         **{k: v for k, v in DATA.items() if k != 'name'})
  return root


@pytest.fixture(scope='module')
def pretrained(root):
  """The tiny AlexNet trained on the four pretraining classes; its checkpoint stores its config."""
  config = _config(root / 'data')
  workdir = str(root / 'pretrained')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _run(config, workdir, out_dir, **overrides):
  kwargs = dict(data=None, data_dir=None, splits=SPLITS, classes=TRANSFER, per_class=PER_CLASS,
                num_splits=NUM_SPLITS, max_test_per_class=None, layers=LAYERS, pool='max',
                classifiers=['softmax',
                             'svm'], baselines=[], baseline_epochs=1, out_dir=str(out_dir), seed=0)
  kwargs.update(overrides)
  return transfer.run(workdir, config, **kwargs)


@pytest.fixture(scope='module')
def results(root, pretrained):
  """The protocol on the pretrained network."""
  return dict(pretrained=_run(*pretrained, root / 'out_pretrained'))


def _accuracies(result, layer='fc7', kind='softmax', n=PER_CLASS[-1]):
  return np.asarray(result['probes'][layer][kind]['by_n'][str(n)]['accuracies'])


def _pool(config):
  return transfer.Pool(transfer.transfer_dataset(config, None, None), SPLITS, TRANSFER,
                       min_side=config.input.resize_to)


def test_probe_numbers_equal_a_direct_computation(results, pretrained):
  config, workdir = pretrained
  net = trained.load(config, workdir)
  pool = _pool(config)
  feats = inference.collect(
      net, pool.source,
      inference.Pass(views='center', layers=tuple(LAYERS), pool='max', probabilities=False))
  labels = feats['label'].astype(np.int64)
  np.testing.assert_array_equal(labels, pool.labels)
  result = results['pretrained']
  for n in PER_CLASS:
    splits = probes.draw_splits(labels, n, NUM_SPLITS, 0)
    for layer in LAYERS:
      x = feats[layer]
      softmax = probes.evaluate_splits(x, labels, splits, 'softmax', 6, l2=1e-3)
      np.testing.assert_array_equal(_accuracies(result, layer, 'softmax', n), softmax.accuracies)
      # The SVM by scikit-learn itself: standardised on the training split, LinearSVC(C=1), the
      # mean per-class accuracy as its balanced accuracy.
      direct = []
      for split in splits:
        scaler = StandardScaler().fit(x[split.train].astype(np.float64))
        svc = LinearSVC(C=1.0, max_iter=10_000, tol=1e-4, random_state=0)
        svc.fit(scaler.transform(x[split.train]).astype(np.float32), labels[split.train])
        pred = svc.predict(scaler.transform(x[split.test]).astype(np.float32))
        direct.append(balanced_accuracy_score(labels[split.test], pred))
      np.testing.assert_allclose(_accuracies(result, layer, 'svm', n), direct, atol=1e-12)
      by_n = result['probes'][layer]['softmax']['by_n'][str(n)]
      assert by_n['mean'] == pytest.approx(softmax.mean)
      assert by_n['std'] == pytest.approx(np.std(softmax.accuracies, ddof=1))


def test_splits_are_disjoint_class_balanced_and_seeded(results, pretrained, root):
  config, _ = pretrained
  labels = _pool(config).labels
  for n in PER_CLASS:
    splits = probes.draw_splits(labels, n, NUM_SPLITS, 0)
    for split in splits:
      assert not np.intersect1d(split.train, split.test).size
      np.testing.assert_array_equal(np.bincount(labels[split.train], minlength=6), [n] * 6)
      np.testing.assert_array_equal(np.bincount(labels[split.test], minlength=6), [80 - n] * 6)
    assert len({tuple(s.train) for s in splits}) == NUM_SPLITS  # the splits differ
  # Another seed, other splits, other accuracies; the same seed, the same.
  other = _run(*pretrained, root / 'out_seed1', seed=1, layers=['fc7'], classifiers=['softmax'],
               per_class=[PER_CLASS[-1]])
  assert not np.array_equal(_accuracies(other), _accuracies(results['pretrained']))
  again = _run(*pretrained, root / 'out_seed0', layers=['fc7'], classifiers=['softmax'],
               per_class=[PER_CLASS[-1]])
  np.testing.assert_array_equal(_accuracies(again), _accuracies(results['pretrained']))


# A network that learns within a test's budget: the tiny AlexNet wider, on ten times the images
# for 8 epochs (about 19,000 seen; the module's network above sees 6,000 and stays near chance).
LEARNED_DATA = dict(name='builtin_shapes', num_train=6000, num_val=800, image_size=72)


@pytest.fixture(scope='module')
def learned(tmp_path_factory):
  root = tmp_path_factory.mktemp('learned')
  builtin.ensure_builtin(str(root / 'data'), progress=False, num_workers=2,
                         **{k: v for k, v in LEARNED_DATA.items() if k != 'name'})
  config = _config(root / 'data')
  config.dataset.update(**LEARNED_DATA)
  config.model.width = 0.125
  config.batch_size = 32
  config.eval_batch_size = 80
  config.num_epochs = 8
  config.optim.learning_rate = 0.02
  val = train.train_and_evaluate(config, str(root / 'pretrained'))
  return config, str(root / 'pretrained'), root, val


def test_trained_features_beat_the_same_networks_random_init_features(learned):
  """The point of pretraining: under the same probe, on classes the network never saw, its
  features beat those of its own random initialisation (the ``random`` baseline) on every split."""
  config, workdir, root, val = learned
  assert val['top1_error'] < 0.5  # it learned its four classes (chance: 75 %)
  result = transfer.run(workdir, config, data=None, data_dir=None, splits=['validation'],
                        classes=TRANSFER, per_class=[20], num_splits=NUM_SPLITS,
                        max_test_per_class=None, layers=['fc7'], pool='max',
                        classifiers=['softmax'], baselines=['random'], baseline_epochs=1,
                        out_dir=str(root / 'out'), seed=0)
  pretrained = _accuracies(result, n=20)
  random_init = np.asarray(result['random_init']['fc7']['softmax']['by_n']['20']['accuracies'])
  assert (pretrained > random_init + 0.05).all(), (pretrained, random_init)
  assert pretrained.mean() > random_init.mean() + 0.1, (pretrained, random_init)
  assert result['random_seed'] == config.seed
  md = transfer.markdown(result)
  assert '| ours: random init, softmax on fc7 |' in md


def _env(fast=False):
  flags = '--xla_force_host_platform_device_count=8' + (f' {XLA_FAST_COMPILE}' if fast else '')
  return dict(host.environ_with_huge_pages(os.environ), JAX_PLATFORMS='cpu', XLA_FLAGS=flags)


def _cli(args, fast=True, timeout=600):
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.transfer', *args], cwd=REPO,
                        env=_env(fast), capture_output=True, text=True, timeout=timeout)


def _one_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def _common(workdir, out):
  return [
      f'--checkpoint={workdir}', f'--out={out}', '--splits=train,validation',
      f'--classes={",".join(map(str, TRANSFER))}'
  ]


def test_command_line_writes_the_tables_and_reproduces_the_run(results, pretrained, tmp_path):
  _, workdir = pretrained
  out = tmp_path / 'out'
  proc = _cli(
      _common(workdir, out) + [
          f'--per_class={",".join(map(str, PER_CLASS))}', f'--num_splits={NUM_SPLITS}',
          f'--layers={",".join(LAYERS)}', '--pool=max', '--classifiers=softmax,svm',
          '--max_test_per_class=0', '--seed=0', '--baselines=random'
      ], fast=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ('results.json', 'results.md', 'accuracy_vs_n.png', 'index.html'):
    assert os.path.getsize(out / name) > 0, name
  result = json.loads((out / 'results.json').read_text())
  for layer in LAYERS:
    for kind in ('softmax', 'svm'):
      for n in PER_CLASS:
        np.testing.assert_array_equal(_accuracies(result, layer, kind, n),
                                      _accuracies(results['pretrained'], layer, kind, n))
  md = (out / 'results.md').read_text()
  assert '| | 5/class | 20/class |' in md.replace('|  |', '| |')
  assert '| ours: pretrained, softmax on fc7 |' in md
  assert '| ours: pretrained, linear SVM on fc7 |' in md
  assert '| ours: random init, softmax on fc7 |' in md
  assert '| layer | ours: softmax | ours: svm | ours: random init, softmax | ours: random init, ' \
         'svm |' in md
  assert result['random_init']['conv5']['svm']['by_n']['5']['accuracies']
  assert '| conv5 |' in md and '| fc7 |' in md
  assert 'no published figure for this data set' in md
  assert 'paper:' not in md.split('Mean per-class')[0]  # no paper rows for the built-in set
  with Image.open(out / 'accuracy_vs_n.png') as im:
    assert im.size[0] > 100
  index = (out / 'index.html').read_text()
  assert 'accuracy_vs_n.png' in index
  assert 'index: ' in proc.stdout


def test_too_many_images_per_class_is_one_line_naming_the_class(pretrained, tmp_path):
  _, workdir = pretrained
  proc = _cli(_common(workdir, tmp_path / 'out') + ['--per_class=5,80', '--layers=fc7'])
  line = _one_error(proc, 'per_class=80')
  assert any(builtin.CLASS_NAMES[c] in line for c in TRANSFER), line
  assert not os.path.exists(tmp_path / 'out' / 'baselines')
  assert not os.path.exists(tmp_path / 'out' / 'results.json')


def test_baselines_train_in_their_own_workdirs_and_resume(pretrained, tmp_path):
  _, workdir = pretrained
  out = tmp_path / 'out'
  args = _common(workdir, out) + [
      '--per_class=5', '--num_splits=1', '--layers=fc7', '--baselines=scratch,finetune',
      '--baseline_epochs=1'
  ]
  first = _cli(args)
  assert first.returncode == 0, first.stderr[-3000:]
  result = json.loads((out / 'results.json').read_text())
  labels = None
  for kind in ('scratch', 'finetune'):
    run_dir = out / 'baselines' / kind / 'n5' / 'split0'
    config = trained.stored_config(str(run_dir))
    assert config is not None and config.model.num_classes == 6
    assert tuple(config.dataset.classes) == TRANSFER and config.num_epochs == 1
    assert config.dataset.subset_file == str(run_dir / 'subset.json')
    subset = json.loads((run_dir / 'subset.json').read_text())
    assert set(subset) == {'train', 'test'}
    # Disjoint records; 5 training images of each class.
    for split in SPLITS:
      assert not set(subset['train'].get(split, [])) & set(subset['test'].get(split, []))
    train_records = sum(len(v) for v in subset['train'].values())
    assert train_records == 5 * 6
    if labels is None:
      labels = subset
    else:
      assert subset == labels  # both baselines on the same split
    accuracy = result['baselines'][kind]['5']['accuracies']
    assert len(accuracy) == 1 and 0 <= accuracy[0] <= 1
  finetune = trained.stored_config(str(out / 'baselines' / 'finetune' / 'n5' / 'split0'))
  assert finetune.init.checkpoint == workdir
  assert not trained.stored_config(str(
      out / 'baselines' / 'scratch' / 'n5' / 'split0')).init.checkpoint
  assert f'fine-tuning from {trained.checkpoint_directory(workdir)}' in first.stderr
  md = (out / 'results.md').read_text()
  assert '| ours: trained from scratch on the splits |' in md
  assert '| ours: fine-tuned from the checkpoint |' in md
  # Rerun: the finished baselines are resumed, not trained again; the same numbers.
  steps = {
      k: trained.checkpoint_steps(str(out / 'baselines' / k / 'n5' / 'split0'))
      for k in ('scratch', 'finetune')
  }
  second = _cli(args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stderr.count('already trained') == 2, second.stderr[-3000:]
  assert 'fine-tuning from' not in second.stderr
  assert steps == {
      k: trained.checkpoint_steps(str(out / 'baselines' / k / 'n5' / 'split0'))
      for k in ('scratch', 'finetune')
  }
  assert json.loads((out / 'results.json').read_text())['baselines'] == result['baselines']


# -- multi-label -----------------------------------------------------------------------------------

LABELS = ['disc', 'square', 'triangle']


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


class _MultiLabelTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Two built-in shapes side by side: the labels are the classes of the shapes shown."""
  name = 'alexnet_jax_transfer_multilabel_test_set'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'labels': tfds.features.Sequence(tfds.features.ClassLabel(names=LABELS))
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(36, 0), 'validation': self._generate_examples(24, 1)}

  def _generate_examples(self, n, split_id):
    for i in range(n):
      rng = np.random.default_rng([split_id, i])
      present = sorted(rng.choice(len(LABELS), size=int(rng.integers(1, 3)), replace=False))
      halves = [
          builtin.generate_example(0, split_id, 10 * (2 * i + k) + int(present[k % len(present)]),
                                   36)[0] for k in range(2)
      ]
      yield f'{split_id}-{i}', {
          'image': _png(np.concatenate(halves, axis=1)), 'labels': [int(c) for c in present]
      }


@pytest.fixture(scope='module')
def multilabel_dir(root):
  directory = str(root / 'tfds')
  _MultiLabelTfds(data_dir=directory, file_format='array_record').download_and_prepare()
  return directory


def test_multilabel_average_precisions_equal_a_direct_computation(pretrained, multilabel_dir,
                                                                  tmp_path):
  config, workdir = pretrained
  result = transfer.run_multilabel(workdir, config, data=_MultiLabelTfds.name,
                                   data_dir=multilabel_dir, splits=['train'],
                                   test_split='validation', layers=['fc7'], pool='max',
                                   classifiers=['svm', 'softmax'])
  assert result['class_names'] == LABELS and result['test_examples'] == 24
  data_cfg = transfer.transfer_dataset(config, _MultiLabelTfds.name, multilabel_dir)
  net = trained.load(config, workdir)
  what = inference.Pass(views='center', layers=('fc7',), pool='max', probabilities=False)
  sets = {}
  for split in ('train', 'validation'):
    source = catalog.open_multilabel(data_cfg, split)
    sets[split] = (inference.collect(net, source, what)['fc7'], source.label_matrix())
  (x, t), (x_test, t_test) = sets['train'], sets['validation']
  assert t.shape == (36, 3) and t.sum(axis=1).min() >= 1
  for kind in ('svm', 'softmax'):
    probe = probes.train_one_vs_rest(x, t, kind)
    scores = probe.scores(x_test)
    ap = probes.average_precision(t_test, scores)
    np.testing.assert_array_equal(result['probes']['fc7'][kind]['average_precision'], ap)
    np.testing.assert_allclose(ap, average_precision_score(t_test, scores, average=None))
    assert result['probes']['fc7'][kind]['mean_average_precision'] == pytest.approx(np.mean(ap))
  transfer.write_multilabel(result, str(tmp_path / 'out'))
  md = (tmp_path / 'out' / 'results.md').read_text()
  assert '| class | ours: svm on fc7 | ours: softmax on fc7 |' in md
  for name in LABELS + ['**mean**']:
    assert f'| {name} |' in md
  assert os.path.getsize(tmp_path / 'out' / 'average_precision.png') > 0


def test_multilabel_command_line(pretrained, multilabel_dir, tmp_path):
  _, workdir = pretrained
  ok = _cli([
      f'--checkpoint={workdir}', f'--out={tmp_path}/out', '--multilabel',
      f'--data={_MultiLabelTfds.name}', f'--data_dir={multilabel_dir}', '--splits=train',
      '--test_split=validation', '--layers=fc7', '--pool=max'
  ])
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert json.loads((tmp_path / 'out' / 'results.json').read_text())['multilabel']
  assert '| **mean** |' in ok.stdout
  # A single-label set: one line saying so.
  bad = _cli([
      f'--checkpoint={workdir}', f'--out={tmp_path}/bad', '--multilabel', '--splits=train',
      '--test_split=validation', '--layers=fc7'
  ])
  _one_error(bad, 'multi-label')


# -- the tables ------------------------------------------------------------------------------------


def _by_n(*accuracies):
  return {
      str(n): dict(accuracies=list(a), mean=float(np.mean(a)), std=float(np.std(a, ddof=1)))
      for n, a in zip((15, 30), accuracies)
  }


def test_caltech_tables_put_the_papers_numbers_beside_ours():
  result = dict(
      dataset='caltech101', per_class=[15, 30], main_layer='fc7', num_splits=2, num_classes=102,
      splits=['train', 'test'], checkpoint='/ckpt', step=7, probes={
          'conv5': {
              'softmax': dict(by_n=_by_n([0.5, 0.6], [0.7, 0.8])),
              'svm': dict(by_n=_by_n([0.4, 0.4], [0.5, 0.5]))
          },
          'fc7': {
              'softmax': dict(by_n=_by_n([0.6, 0.6], [0.8, 0.9])),
              'svm': dict(by_n=_by_n([0.6, 0.7], [0.8, 0.8]))
          },
      }, baselines={'scratch': _by_n([0.1, 0.2], [0.3, 0.3])})
  md = transfer.markdown(result)
  assert '|  | 15/class | 30/class |' in md
  assert '| ours: pretrained, softmax on fc7 | 60.0 ± 0.0 | 85.0 ± 7.1 |' in md
  assert '| ours: trained from scratch on the splits | 15.0 ± 7.1 | 30.0 ± 0.0 |' in md
  assert '| paper: ImageNet-pretrained, softmax on layer 7 | 83.8 ± 0.5 | 86.5 ± 0.5 |' in md
  assert '| paper: non-pretrained | 22.8 ± 1.5 | 46.5 ± 1.7 |' in md
  assert '| paper: best previous | — | 81.4 |' in md
  assert 'Caltech-101 (Zeiler & Fergus Table 4)' in md
  # Table 7: the layers, the paper's column at 30 per class.
  assert (
      '| layer | ours: softmax | ours: svm | paper: softmax (30/class) | paper: svm (30/class) |'
      in md)
  assert '| conv5 | 75.0 ± 7.1 | 50.0 ± 0.0 | 82.9 | 86.2 |' in md
  assert '| fc7 | 85.0 ± 7.1 | 80.0 ± 0.0 | 85.4 | 85.5 |' in md
  fig = transfer.plot(result)
  assert len(fig.axes[0].lines) >= 2


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize('extra, fragments', [
    (['--layers=fc9'], ("no layer 'fc9'", 'conv5')),
    (['--data=no_such_set'], ('no_such_set',)),
    (['--classifiers=softmax,knn'], ("unknown classifier 'knn'",)),
    (['--baselines=scratch,imagenet'], ("unknown baseline 'imagenet'",)),
], ids=['layer', 'data', 'classifier', 'baseline'])
def test_bad_input_is_one_line(pretrained, tmp_path, extra, fragments):
  _, workdir = pretrained
  _one_error(_cli(_common(workdir, tmp_path / 'out') + extra), *fragments)
  assert not os.path.exists(tmp_path / 'out' / 'results.json')


def test_a_folder_without_checkpoints_is_one_line(tmp_path):
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  _one_error(_cli([f'--checkpoint={tmp_path}/empty', f'--out={tmp_path}/out']),
             'holds no checkpoint')
