"""Zeiler & Fergus's transfer protocol (§5.2), one command:

    python -m alexnet_jax.transfer --checkpoint=PRETRAINED --data=caltech101 --splits=train,test \
        --out=DIR [--per_class=15,30] [--num_splits=5] [--layers=fc7] [--classifiers=softmax,svm] \
        [--baselines=random,scratch,finetune --baseline_epochs=N]

The pretrained network's layers up to the named one are kept fixed: their activations (features,
``inference``) for every image of the pooled ``--splits`` of the transfer data set are computed
once, and a new classifier is trained on top of each layer — a softmax (multinomial logistic
regression) or a linear SVM (``probes``) — with ``--per_class`` random training images per class and
the rest of each class (at most ``--max_test_per_class``) for testing, over ``--num_splits``
seeded splits: mean ± standard deviation over the splits of the mean per-class accuracy. The
papers' baselines are ordinary training runs of ``main`` on the same splits, each in its own
workdir under ``DIR/baselines`` (so an interrupted protocol resumes where it stopped): the same
network trained from scratch ("non-pretrained"), and fine-tuned from the checkpoint
(``config.init``). A third baseline costs no training: the same network at its random
initialisation, its features probed exactly as the pretrained ones (what pretraining added).
Writes ``results.json``, ``results.md`` (laid out like the paper's Tables 4, 5 and 7, its numbers
beside ours), ``accuracy_vs_n.png`` (the paper's Fig. 9) and ``index.html``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure

from alexnet_jax import cli, distributed, inference, paper, probes, report, storage, train, trained
from alexnet_jax.data import catalog, sources
from alexnet_jax.errors import ConfigError

# 'random' probes the untrained network's features; the others are training runs.
BASELINES = ('random', 'scratch', 'finetune')
TRAINED_BASELINES = ('scratch', 'finetune')


def transfer_dataset(config, name: str | None, data_dir: str | None):
  """The pretrained config's dataset section pointed at the transfer data set (all of it: the
  classes and examples are chosen here)."""
  data = config.dataset.copy_and_resolve_references()
  if name:
    data.name = name
  if data_dir:
    data.data_dir = data_dir
  data.classes = ()
  data.subset_file = None
  return data


class Pool:
  """The examples of the transfer data set: the records of several of its splits pooled (Caltech's
  TFDS ``train`` and ``test``), only the chosen classes, relabelled 0..k-1 in the order given."""

  def __init__(self, data_cfg, splits: list[str], classes: tuple[int, ...], *, min_side=None):
    self.data_cfg = data_cfg
    opened = [
        catalog.open_source(data_cfg, s, min_side=min_side, progress=jax.process_index() == 0)
        for s in splits
    ]
    num_classes = opened[0].num_classes
    for i, c in enumerate(classes):
      if not 0 <= c < num_classes:
        raise ConfigError(f'--classes: {c} is not a class of {data_cfg.name} (0..'
                          f'{num_classes - 1})')
      if c in classes[:i]:
        raise ConfigError(f'--classes names class {c} twice: give each class once')
    keep = np.asarray(classes if classes else range(num_classes), np.int64)
    self.records = []  # (split, record index) of each pooled example, in order
    parts = []
    for split, source in zip(splits, opened):
      kept = np.flatnonzero(np.isin(source.labels(), keep))
      parts.append((source, kept))
      self.records += [(split, int(i)) for i in kept]
    self.source = sources.select(parts, 'transfer', classes=tuple(int(c) for c in keep))
    self.labels = np.asarray(self.source.labels(), np.int64)
    self.num_classes = len(keep)
    self.class_names = tuple(self.source.class_names)
    self.splits = splits
    self.classes = tuple(int(c) for c in keep) if classes else ()

  def check_per_class(self, per_class: int) -> None:
    """Refuses (``ConfigError``) an N that leaves a class without a test image, naming the class
    as the data set does."""
    counts = np.bincount(self.labels, minlength=self.num_classes)
    short = [k for k in range(self.num_classes) if counts[k] <= per_class]
    if short:
      k = short[0]
      index = self.classes[k] if self.classes else k
      others = f' ({len(short) - 1} other classes too)' if len(short) > 1 else ''
      raise ConfigError(
          f'--per_class={per_class} leaves no test image of class {index} '
          f'({self.class_names[k]!r}), which has {counts[k]} images in '
          f'{"+".join(self.splits)}{others}: at most --per_class={int(counts.min()) - 1} works')

  def subset(self, indices) -> dict[str, list[int]]:
    """Pooled rows → ``{split of the data set: [record indices]}`` (``dataset.subset_file``)."""
    out: dict[str, list[int]] = {}
    for i in indices:
      split, record = self.records[int(i)]
      out.setdefault(split, []).append(record)
    return out


def probe_results(features: dict, labels, splits, classifiers, num_classes: int, *, l2: float,
                  svm_c: float) -> dict:
  """``{layer: {classifier: {'accuracies', 'mean', 'std'}}}`` over ``splits``."""
  out = {}
  for layer, x in features.items():
    out[layer] = {}
    for kind in classifiers:
      kwargs = dict(l2=l2) if kind == 'softmax' else dict(C=svm_c)
      start = time.perf_counter()
      r = probes.evaluate_splits(x, labels, splits, kind, num_classes, **kwargs)
      out[layer][kind] = dict(accuracies=r.accuracies.tolist(), mean=r.mean, std=r.std,
                              seconds=time.perf_counter() - start)
      logging.info('%s, %s: %.4f ± %.4f over %d splits', layer, kind, r.mean, r.std, len(splits))
  return out


def baseline_config(config, pool: Pool, kind: str, subset_file: str, checkpoint: str, epochs: int,
                    n_train: int, mesh_data: int):
  """A training config for a baseline: the pretrained network's, on the split's training and test
  records, trained from scratch or fine-tuned from ``checkpoint`` (all layers, a new classifier
  where the class count differs)."""
  c = config.copy_and_resolve_references()
  c.dataset = transfer_dataset(config, pool.data_cfg.name, pool.data_cfg.data_dir)
  c.dataset.update(classes=pool.classes, subset_file=subset_file, train_split='train',
                   eval_split='test')
  c.model.num_classes = pool.num_classes
  c.num_epochs = int(epochs)
  batch = max(mesh_data, min(int(config.batch_size), n_train) // mesh_data * mesh_data)
  c.batch_size = batch
  c.eval_batch_size = max(mesh_data, min(int(config.eval_batch_size), 256) // mesh_data * mesh_data)
  c.eval_every_epochs = c.num_epochs
  c.log_every_steps = 10**6
  c.checkpoint.update(keep=1, keep_best=False, keep_epochs=(), every_epochs=c.num_epochs)
  c.visualize.every_epochs = 0
  if kind == 'finetune':
    c.init.update(checkpoint=checkpoint, classifier='auto')
    c.optim.learning_rate = float(config.optim.learning_rate) / 10
  return c


def run_baseline(config, pool: Pool, kind: str, split: probes.Split, workdir: str, checkpoint: str,
                 epochs: int) -> float:
  """Trains (or resumes) one baseline run and returns its mean per-class test accuracy."""
  subset_file = os.path.join(workdir, 'subset.json')
  if jax.process_index() == 0 and not storage.path(subset_file).exists():
    storage.makedirs(workdir)
    storage.write_text(
        subset_file, json.dumps(dict(train=pool.subset(split.train), test=pool.subset(split.test))),
        atomic=True)
  mesh = inference_mesh_data(config)
  c = baseline_config(config, pool, kind, subset_file, checkpoint, epochs, len(split.train), mesh)
  train.train_and_evaluate(c, workdir)
  net = trained.load(c, workdir)
  test = catalog.open_source(c.dataset, 'test', min_side=c.input.resize_to, progress=False)
  out = inference.collect(net, test, inference.Pass(views='center'))
  return probes.mean_per_class_accuracy(out['label'], np.argmax(out['probs'], axis=1),
                                        pool.num_classes)


def inference_mesh_data(config) -> int:
  from_config = int(config.mesh.data)
  if from_config > 0:
    return from_config
  return max(1, jax.device_count() // int(config.mesh.model))


def baseline_results(config, pool: Pool, splits_by_n: dict, kinds, out_dir: str, checkpoint: str,
                     epochs: int) -> dict:
  """``{kind: {N: {'accuracies', 'mean', 'std'}}}``."""
  out = {}
  for kind in kinds:
    out[kind] = {}
    for n, splits in splits_by_n.items():
      accs = []
      for s, split in enumerate(splits):
        workdir = os.path.join(out_dir, 'baselines', kind, f'n{n}', f'split{s}')
        accs.append(run_baseline(config, pool, kind, split, workdir, checkpoint, epochs))
        logging.info('baseline %s, %d per class, split %d: %.4f', kind, n, s, accs[-1])
      mean, std = probes.mean_and_std(accs)
      out[kind][n] = dict(accuracies=accs, mean=mean, std=std)
  return out


def _cell(r: dict | None) -> str | None:
  if r is None:
    return None
  return report.mean_std(r['accuracies'])


def _paper_cell(entry) -> str | None:
  if entry is None:
    return None
  mean, std = entry
  return f'{mean:.1f}' if std is None else f'{mean:.1f} ± {std:.1f}'


def markdown(result: dict) -> str:
  """The main table (the paper's Tables 4 / 5: methods × training images per class), then the
  per-layer table (Table 7) when several layers were probed."""
  ns = result['per_class']
  main_layer = result['main_layer']
  header = ['', *[f'{n}/class' for n in ns]]
  rows = []
  for kind, r in result['probes'][main_layer].items():
    name = 'softmax' if kind == 'softmax' else 'linear SVM'
    rows.append([f'ours: pretrained, {name} on {main_layer}'] +
                [_cell(r['by_n'].get(str(n))) for n in ns])
  for kind, r in (result.get('random_init') or {}).get(main_layer, {}).items():
    name = 'softmax' if kind == 'softmax' else 'linear SVM'
    rows.append([f'ours: random init, {name} on {main_layer}'] +
                [_cell(r['by_n'].get(str(n))) for n in ns])
  names = dict(scratch='ours: trained from scratch on the splits',
               finetune='ours: fine-tuned from the checkpoint')
  for kind, by_n in result['baselines'].items():
    rows.append([names[kind]] + [_cell(by_n.get(str(n))) for n in ns])
  table = paper.transfer_table(result['dataset'])
  if table:
    rows.append(['paper: ImageNet-pretrained, softmax on layer 7'] +
                [_paper_cell(table['pretrained'].get(n)) for n in ns])
    rows.append(['paper: non-pretrained'] + [_paper_cell(table['scratch'].get(n)) for n in ns])
    rows.append(['paper: best previous'] + [_paper_cell(table['best_previous'].get(n)) for n in ns])
  text = [
      report.markdown_table(header, rows),
      f'Mean per-class accuracy (%), mean ± std over {result["num_splits"]} splits; ours: '
      f'{result["dataset"]} ({result["num_classes"]} classes, splits '
      f'{"+".join(result["splits"])}), the network of {result["checkpoint"]} (step '
      f'{result["step"]}); paper: ' + (table['title'] if table else 'no published figure for '
                                       'this data set') + '.'
  ]
  if len(result['probes']) > 1:
    n = ns[-1]
    kinds = list(next(iter(result['probes'].values())))
    random_init = result.get('random_init') or {}
    header = ['layer', *[f'ours: {k}' for k in kinds]]
    if random_init:
      header += [f'ours: random init, {k}' for k in kinds]
    paper_n = {'caltech101': 30, 'caltech256': 60}
    key = result['dataset'].lower().replace('_', '').replace('-', '').split('/')[0]
    column = paper.PER_LAYER_DATA.index(key) if key in paper.PER_LAYER_DATA else None
    if column is not None:
      header += [f'paper: {k} ({paper_n[key]}/class)' for k in kinds]
    rows = []
    for layer, by_kind in result['probes'].items():
      row = [layer] + [_cell(by_kind[k]['by_n'].get(str(n))) for k in kinds]
      if random_init:
        row += [_cell(random_init[layer][k]['by_n'].get(str(n))) for k in kinds]
      if column is not None:
        number = paper.layer_number(layer)
        row += [(paper.PER_LAYER.get((k, number)) or (None, None))[column] for k in kinds]
      rows.append(row)
    text += [
        report.markdown_table(header, rows),
        f"One line per layer (the paper's Table 7), {n} training images per class."
    ]
  return '\n\n'.join(text)


def plot(result: dict) -> Figure:
  """Accuracy against training images per class (the paper's Fig. 9)."""
  ns = result['per_class']
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  layer = result['main_layer']
  series = [(f'pretrained, {k} on {layer}', r['by_n']) for k, r in result['probes'][layer].items()]
  series += [(f'random init, {k} on {layer}', r['by_n'])
             for k, r in (result.get('random_init') or {}).get(layer, {}).items()]
  series += [(kind, by_n) for kind, by_n in result['baselines'].items()]
  for label, by_n in series:
    xs = [n for n in ns if str(n) in by_n]
    means = [100 * by_n[str(n)]['mean'] for n in xs]
    stds = [100 * np.nan_to_num(by_n[str(n)]['std']) for n in xs]
    ax.errorbar(xs, means, yerr=stds, marker='o', capsize=3, label=f'ours: {label}')
  table = paper.transfer_table(result['dataset'])
  if table:
    for key, style in (('pretrained', 'k--'), ('scratch', 'k:')):
      pts = sorted(table[key].items())
      ax.plot([n for n, _ in pts], [m for _, (m, _) in pts], style, marker='s',
              label=f'paper: {key}')
  ax.set_xlabel('training images per class')
  ax.set_ylabel('mean per-class accuracy %')
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


def write(result: dict, out_dir: str) -> str:
  rep = report.Report(out_dir, f'alexnet_jax: transfer to {result["dataset"]}')
  rep.json('results.json', result)
  rep.table('Transfer (Zeiler & Fergus §5.2)', markdown(result))
  rep.figure(plot(result), 'accuracy_vs_n.png',
             "Mean per-class accuracy against training images per class (the paper's Fig. 9).")
  return rep.finish()


def probe_network(net: trained.Trained, pool_: Pool, splits_by_n: dict, layers: list[str],
                  pool: str, classifiers: list[str], *, l2: float, svm_c: float):
  """Every classifier on every layer's features of ``net``, for every N and split:
  ``({layer: {kind: {'by_n': {N: result}}}}, labels, seconds the features took)``."""
  start = time.perf_counter()
  feats = inference.collect(
      net, pool_.source,
      inference.Pass(views='center', layers=tuple(layers), pool=pool, probabilities=False))
  feature_seconds = time.perf_counter() - start
  labels = feats.pop('label').astype(np.int64)
  if not np.array_equal(labels, pool_.labels):
    raise RuntimeError('the features came back in another order than the pool')
  per_layer = {}
  for n, splits_n in splits_by_n.items():
    r = probe_results(feats, labels, splits_n, classifiers, pool_.num_classes, l2=l2, svm_c=svm_c)
    for layer, by_kind in r.items():
      for kind, value in by_kind.items():
        per_layer.setdefault(layer, {}).setdefault(kind, dict(by_n={}))['by_n'][str(n)] = value
  return per_layer, labels, feature_seconds


def _network_and_layers(checkpoint: str, config, step, classifiers, layers):
  """The pretrained network and the layers to probe (default: its last hidden one), the
  classifiers' names checked first (before anything is loaded)."""
  for kind in classifiers:
    if kind not in probes.CLASSIFIERS:
      raise ConfigError(f'--classifiers: unknown classifier {kind!r}; choose from '
                        f'{", ".join(probes.CLASSIFIERS)}')
  net = trained.load(config, checkpoint, step)
  layers = list(layers) or [inference.penultimate_layer(net.program.model)]
  inference.check_layers(net.program.model, layers)
  return net, layers


def run(checkpoint: str, config, *, data: str | None, data_dir: str | None, splits: list[str],
        classes: tuple[int, ...], per_class: list[int], num_splits: int,
        max_test_per_class: int | None, layers: list[str], pool: str, classifiers: list[str],
        baselines: list[str], baseline_epochs: int, out_dir: str, seed: int = 0, l2: float = 1e-3,
        svm_c: float = 1.0, step: int | None = None) -> dict:
  """The whole protocol; returns the results (also what ``write`` writes)."""
  for kind in baselines:
    if kind not in BASELINES:
      raise ConfigError(f'--baselines: unknown baseline {kind!r}; choose from '
                        f'{", ".join(BASELINES)}')
  net, layers = _network_and_layers(checkpoint, config, step, classifiers, layers)
  pool_ = Pool(transfer_dataset(config, data, data_dir), splits, classes,
               min_side=config.input.resize_to)
  # Every split is drawn before anything is computed: an N too large for a class ends here.
  for n in per_class:
    pool_.check_per_class(n)
  draw = lambda n: probes.draw_splits(pool_.labels, n, num_splits, seed, max_test_per_class)
  splits_by_n = {n: draw(n) for n in per_class}
  per_layer, labels, feature_seconds = probe_network(net, pool_, splits_by_n, layers, pool,
                                                     classifiers, l2=l2, svm_c=svm_c)
  random_init = None
  if 'random' in baselines:
    random_init, _, _ = probe_network(trained.random_init(config, mesh=net.mesh), pool_,
                                      splits_by_n, layers, pool, classifiers, l2=l2, svm_c=svm_c)
  base = baseline_results(config, pool_, splits_by_n,
                          [k for k in baselines if k in TRAINED_BASELINES], out_dir, checkpoint,
                          baseline_epochs)
  return dict(checkpoint=checkpoint, step=net.step, model=config.model.name,
              dataset=pool_.data_cfg.name, splits=splits, classes=list(pool_.classes),
              class_names=list(pool_.class_names), num_classes=pool_.num_classes,
              examples=len(labels), per_class=list(per_class), num_splits=num_splits,
              max_test_per_class=max_test_per_class, seed=seed, layers=layers, pool=pool,
              main_layer=layers[-1], l2=l2, svm_c=svm_c, probes=per_layer, random_init=random_init,
              random_seed=config.seed if random_init else None,
              baselines={k: {str(n): v for n, v in by_n.items()} for k, by_n in base.items()
                        }, feature_seconds=feature_seconds,
              feature_images_per_second=len(labels) / feature_seconds)


# -- multi-label: PASCAL VOC -----------------------------------------------------------------------


def run_multilabel(checkpoint: str, config, *, data: str | None, data_dir: str | None,
                   splits: list[str], test_split: str, layers: list[str], pool: str,
                   classifiers: list[str], l2: float = 1e-3, svm_c: float = 1.0,
                   step: int | None = None) -> dict:
  """PASCAL VOC's protocol (Zeiler & Fergus Table 6): one binary classifier per class on the
  fixed features of the images of ``splits``, the average precision of each class on
  ``test_split`` (VOC 2012's test labels are not public: its validation split), and their
  mean."""
  net, layers = _network_and_layers(checkpoint, config, step, classifiers, layers)
  data_cfg = transfer_dataset(config, data, data_dir)
  opened = [catalog.open_multilabel(data_cfg, s, min_side=config.input.resize_to) for s in splits]
  test = catalog.open_multilabel(data_cfg, test_split, min_side=config.input.resize_to)
  train_source = sources.select([(s, np.arange(len(s))) for s in opened], 'transfer')
  train_targets = np.concatenate([s.label_matrix() for s in opened])
  test_targets = test.label_matrix()
  what = inference.Pass(views='center', layers=tuple(layers), pool=pool, probabilities=False)
  start = time.perf_counter()
  train_feats = inference.collect(net, train_source, what)
  test_feats = inference.collect(net, test, what)
  feature_seconds = time.perf_counter() - start
  results = {}
  for layer in layers:
    for kind in classifiers:
      probe = probes.train_one_vs_rest(train_feats[layer], train_targets, kind, C=svm_c, l2=l2)
      ap = probes.average_precision(test_targets, probe.scores(test_feats[layer]))
      results.setdefault(layer, {})[kind] = dict(
          average_precision=np.asarray(ap).tolist(),
          mean_average_precision=probes.mean_average_precision(test_targets,
                                                               probe.scores(test_feats[layer])))
      logging.info('%s, %s: mean AP %.4f', layer, kind,
                   results[layer][kind]['mean_average_precision'])
  return dict(multilabel=True, checkpoint=checkpoint, step=net.step, model=config.model.name,
              dataset=data_cfg.name, splits=splits, test_split=test.info.split,
              class_names=list(test.class_names), num_classes=test.num_classes,
              train_examples=len(train_targets), test_examples=len(test_targets), layers=layers,
              pool=pool, main_layer=layers[-1], l2=l2, svm_c=svm_c, probes=results,
              feature_seconds=feature_seconds)


def markdown_multilabel(result: dict) -> str:
  """Average precision per class and its mean (the paper's Table 6 layout), per layer and
  classifier, the paper's mean beside ours."""
  columns = [(layer, kind) for layer, by_kind in result['probes'].items() for kind in by_kind]
  header = ['class', *[f'ours: {kind} on {layer}' for layer, kind in columns]]
  rows = []
  for c, name in enumerate(result['class_names']):
    rows.append([name] + [
        report.percent(result['probes'][layer][kind]['average_precision'][c])
        for layer, kind in columns
    ])
  rows.append(['**mean**'] + [
      report.percent(result['probes'][layer][kind]['mean_average_precision'])
      for layer, kind in columns
  ])
  voc = 'voc' in result['dataset'].lower()
  if voc:
    rows.append(['paper: mean (softmax on layer 7)', paper.VOC_MEAN_AP['pretrained']] + [None] *
                (len(columns) - 1))
    rows.append(['paper: best previous, mean', paper.VOC_MEAN_AP['best_previous']] + [None] *
                (len(columns) - 1))
  note = (f'Average precision (%) on {result["dataset"]}/{result["test_split"]} '
          f'({result["test_examples"]} images), classifiers trained on '
          f'{"+".join(result["splits"])} ({result["train_examples"]} images); paper: ' +
          ('PASCAL VOC 2012 (Zeiler & Fergus Table 6)' if voc else 'no published figure') + '.')
  return report.markdown_table(header, rows) + '\n\n' + note


def write_multilabel(result: dict, out_dir: str) -> str:
  rep = report.Report(out_dir, f'alexnet_jax: transfer to {result["dataset"]} (multi-label)')
  rep.json('results.json', result)
  rep.table('Average precision per class (Zeiler & Fergus Table 6)', markdown_multilabel(result))
  layer = result['main_layer']
  kind, r = next(iter(result['probes'][layer].items()))
  fig = Figure(figsize=(max(6, 0.35 * len(result['class_names'])), 3.5))
  ax = fig.subplots()
  ax.bar(np.arange(len(result['class_names'])), 100 * np.nan_to_num(r['average_precision']))
  ax.set_xticks(np.arange(len(result['class_names'])), result['class_names'], rotation=90,
                fontsize=7)
  ax.set_ylabel('average precision %')
  ax.set_ylim(0, 100)
  rep.figure(fig, 'average_precision.png', f'Average precision per class, {kind} on {layer}.')
  return rep.finish()


# -- command line ---------------------------------------------------------------------------------


def _define_flags():
  cli.define_config_flag_from_checkpoint()
  cli.define_huge_pages_flag()
  flags.DEFINE_string('checkpoint', None, 'The pretrained network: its training workdir.')
  flags.DEFINE_string('out', None, "Output folder (results, figures, the baselines' workdirs).")
  flags.DEFINE_string(
      'data', None, 'The transfer data set: a TFDS name (caltech101), a prepared '
      "folder's name, or builtin_shapes (default: the checkpoint's).")
  flags.DEFINE_string('data_dir', None, "Where it is (default: the checkpoint's data_dir).")
  flags.DEFINE_list(
      'splits', ['train'], 'Splits of the data set pooled into the examples the '
      'protocol draws from (Caltech-101 in TFDS: train,test).')
  flags.DEFINE_list('classes', None, 'Class indices to use (default: all).')
  flags.DEFINE_list('per_class', ['15', '30'], 'Training images per class (N).')
  flags.DEFINE_integer('num_splits', 5, 'Random splits per N.', lower_bound=1)
  flags.DEFINE_integer('max_test_per_class', 50, 'Test images per class at most (0: all the '
                       'rest).', lower_bound=0)
  flags.DEFINE_list(
      'layers', None, 'Layers whose features are probed (default: the last hidden '
      'layer; several: the per-layer table).')
  flags.DEFINE_enum('pool', 'none', list(inference.POOLS), 'Conv maps: flattened (none) or their '
                    'spatial max / mean per map.')
  flags.DEFINE_list('classifiers', ['softmax'], 'softmax and/or svm (needs scikit-learn).')
  flags.DEFINE_list(
      'baselines', [], "random (the untrained network's features, same probes), scratch "
      'and/or finetune (training runs on the same splits).')
  flags.DEFINE_integer('baseline_epochs', 30, 'Epochs of each baseline run.', lower_bound=1)
  flags.DEFINE_float('l2', 1e-3, "The softmax's L2 penalty (mean loss + l2/2 |W|²).", lower_bound=0)
  flags.DEFINE_float('svm_c', 1.0, "The SVM's C.", lower_bound=0)
  flags.DEFINE_integer('seed', 0, 'Seed of the splits.', lower_bound=0)
  flags.DEFINE_bool(
      'multilabel', False, "PASCAL VOC's protocol: a multi-label TFDS set (its "
      '"labels" feature), one classifier per class trained on --splits, average '
      'precision on --test_split.')
  flags.DEFINE_string('test_split', 'validation', '--multilabel: the split tested on.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', lower_bound=0)


def _integers(values, flag: str) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ConfigError(f'{flag}={",".join(values)}: write comma-separated integers') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f.checkpoint or not f.out:
    raise app.UsageError('--checkpoint=the pretrained workdir and --out=a folder are required')
  config = cli.checkpoint_config(f.checkpoint, f.step)
  cli.writable_directory(f.out, '--out')
  distributed.initialize(config)
  cli.quiet_orbax_info()
  per_class = _integers(f.per_class, '--per_class')
  if any(n < 1 for n in per_class):
    raise ConfigError(f'--per_class={",".join(f.per_class)}: every N must be at least 1')
  if f.multilabel:
    result = run_multilabel(f.checkpoint, config, data=f.data, data_dir=f.data_dir,
                            splits=list(f.splits), test_split=f.test_split,
                            layers=list(f.layers or []), pool=f.pool,
                            classifiers=list(f.classifiers), l2=f.l2, svm_c=f.svm_c, step=f.step)
    if jax.process_index() == 0:
      index = write_multilabel(result, f.out)
      print(markdown_multilabel(result), flush=True)
      print(f'index: {index}', flush=True)
    return
  result = run(f.checkpoint, config, data=f.data, data_dir=f.data_dir, splits=list(f.splits),
               classes=tuple(_integers(f.classes or [], '--classes')), per_class=per_class,
               num_splits=f.num_splits, max_test_per_class=f.max_test_per_class or None,
               layers=list(f.layers or []), pool=f.pool, classifiers=list(f.classifiers),
               baselines=list(f.baselines), baseline_epochs=f.baseline_epochs, out_dir=f.out,
               seed=f.seed, l2=f.l2, svm_c=f.svm_c, step=f.step)
  if jax.process_index() == 0:
    index = write(result, f.out)
    print(markdown(result), flush=True)
    print(f'index: {index}', flush=True)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
