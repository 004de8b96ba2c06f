"""Top-1 / top-5 error of a trained network, or of an ensemble of them (the paper's "5 CNNs":
the softmax averaged over the networks), on any split, with the centre or the ten views:

    python -m alexnet_jax.evaluate --checkpoint=WORKDIR[,WORKDIR2,...] --out=DIR \
        [--split=validation] [--views=ten] [--step=N] [--config.field=value ...]

Each checkpoint is used with the config it stores (``--config=file`` replaces it, for checkpoints
that store none); ``--config.field=value`` overrides apply to every member. Each network runs
sharded over its mesh as training's evaluation does (``inference.passes``). Writes
``results.json`` (overall, per member, per class, the confusion matrix), ``results.md`` (the
paper's numbers beside ours), ``per_class.png``, ``confusion.png`` and ``index.html``.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure

from alexnet_jax import cli, distributed, inference, paper, report, storage, trained
from alexnet_jax.data import catalog
from alexnet_jax.errors import ConfigError
from alexnet_jax.steps import NON_FINITE_RANK


def ranks(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The label's rank among the classes (0: top-1 correct); ``NON_FINITE_RANK`` where a score is
  NaN or infinite, so such an example is an error in every metric (as in training's
  evaluation)."""
  probs = np.asarray(probs, np.float32)
  label_prob = probs[np.arange(len(labels)), labels]
  rank = np.sum(probs > label_prob[:, None], axis=1).astype(np.int64)
  bad = ~np.all(np.isfinite(probs), axis=1)
  return np.where(bad, NON_FINITE_RANK, rank)


def metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """Top-1 / top-5 error, per-class top-1 accuracy and the confusion matrix (rows: true class,
  columns: the most probable class) of predicted probabilities."""
  labels = np.asarray(labels, np.int64)
  rank = ranks(probs, labels)
  predicted = np.where(np.all(np.isfinite(probs), axis=1),
                       np.argmax(np.nan_to_num(probs, nan=-1), axis=1), -1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  ok = predicted >= 0
  np.add.at(confusion, (labels[ok], predicted[ok]), 1)
  counts = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels[rank == 0], minlength=num_classes)
  per_class = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
  return dict(examples=int(len(labels)), top1_error=float(np.mean(rank >= 1)),
              top5_error=float(np.mean(rank >= 5)), per_class_accuracy=per_class.tolist(),
              class_counts=counts.tolist(), confusion=confusion.tolist())


def ensemble(member_probs: list[np.ndarray]) -> np.ndarray:
  """The members' softmax outputs averaged (probabilities, not logits: the paper's ensembles)."""
  return np.mean(np.stack(member_probs), axis=0)


def member_configs(paths: list[str], given, overrides: dict, step: int | None):
  """Each member's config: ``given`` (a config file) for all, else each checkpoint's own with
  the command line's ``overrides`` applied."""
  out = []
  for path in paths:
    config = trained.config_for(path, step, given)
    if given is None and overrides:
      config = config.copy_and_resolve_references()
      for field, value in overrides.items():
        _set(config, field, value)
    out.append(config)
  return out


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


def run(paths: list[str], configs_, *, split: str | None, views: str | None,
        step: int | None = None) -> dict:
  """Evaluates every member and their ensemble; returns the results (``metrics`` of the
  ensemble, and per member its own top-1 / top-5 error and images/s)."""
  classes = [int(c.model.num_classes) for c in configs_]
  for path, n in zip(paths, classes):
    if n != classes[0]:  # told before any member is evaluated, not after
      raise ConfigError(f'{path} has {n} classes and {paths[0]} {classes[0]}: ensemble members '
                        'must classify the same classes')
  members, member_probs, labels, class_names = [], [], None, None
  for path, config in zip(paths, configs_):
    config = config.copy_and_resolve_references()
    if views is not None:
      config.input.eval_views = views
    split_name = split or config.dataset.eval_split
    net = trained.load(config, path, step)
    source = catalog.open_source(config.dataset, split_name, min_side=config.input.resize_to,
                                 progress=jax.process_index() == 0)
    what = inference.Pass(views=config.input.eval_views)
    timing = {}
    start = time.perf_counter()
    out = inference.collect(net, source, what, timing=timing)
    seconds = time.perf_counter() - start - timing.get('compile_seconds', 0.0)
    if labels is None:
      labels, class_names = out['label'], tuple(source.class_names)
    elif len(out['label']) != len(labels) or not np.array_equal(out['label'], labels):
      raise ConfigError(f'{path} was evaluated on other examples than {paths[0]} '
                        f'({len(out["label"])} against {len(labels)}): ensemble members must '
                        'read the same split of the same data set')
    m = metrics(out['probs'], labels, out['probs'].shape[1])
    members.append(
        dict(checkpoint=path, step=net.step, epoch=net.epoch, model=config.model.name,
             release=net.meta.get('imported', {}).get('model'), dataset=config.dataset.name,
             split=source.info.split, views=config.input.eval_views, mesh=dict(net.mesh.shape),
             eval_batch_size=int(config.eval_batch_size), top1_error=m['top1_error'],
             top5_error=m['top5_error'], images_per_second=len(labels) / seconds,
             compile_seconds=timing.get('compile_seconds')))
    logging.info('%s: top-1 error %.4f, top-5 error %.4f (%d examples, %.1f images/s)', net.name,
                 m['top1_error'], m['top5_error'], len(labels),
                 len(labels) / seconds)
    member_probs.append(out['probs'])
    del net
  result = metrics(ensemble(member_probs), labels, member_probs[0].shape[1])
  result.update(members=members, class_names=list(class_names), networks=len(paths))
  return result


def paper_row(result: dict) -> dict | None:
  models = {(m['model'], m.get('release')) for m in result['members']}
  if len(models) != 1:
    return None
  model, release = models.pop()
  return paper.evaluation_row(model, result['networks'], release)


def markdown(result: dict) -> str:
  """The results table: each member, then the ensemble, with the paper's numbers beside."""
  header = ['', 'networks', 'views', 'top-1 error %', 'top-5 error %', 'paper top-1', 'paper top-5']
  rows = []
  m0 = result['members'][0]
  singles = paper.evaluation_row(m0['model'], 1, m0.get('release'))
  for m in result['members']:
    p = paper.evaluation_row(m['model'], 1, m.get('release')) or {}
    rows.append([
        f'{m["checkpoint"]} (step {m["step"]})', 1, m['views'],
        report.percent(m['top1_error'], 2),
        report.percent(m['top5_error'], 2),
        p.get('top1'),
        p.get('top5')
    ])
  if result['networks'] > 1:
    p = paper_row(result) or {}
    rows.append([
        'ensemble (softmax averaged)', result['networks'], result['members'][0]['views'],
        report.percent(result['top1_error'], 2),
        report.percent(result['top5_error'], 2),
        p.get('top1'),
        p.get('top5')
    ])
  views = '' if m0.get('release') else ', 10 views'
  note = (f'Ours: {m0["dataset"]} / {m0["split"]}, {result["examples"]} examples. Paper: '
          f'{paper.EVALUATION_DATA}' +
          (f' ({singles["row"]}{views})' if singles else ' (no published figure for this '
           'model)') + '.')
  return report.markdown_table(header, rows) + '\n\n' + note


def write(result: dict, out_dir: str) -> str:
  """results.json, results.md, the figures and index.html in ``out_dir``; returns the index."""
  rep = report.Report(out_dir, 'alexnet_jax: evaluation')
  rep.json('results.json', result)
  rep.table('Top-1 and top-5 error', markdown(result))
  names = result['class_names']
  per_class = np.asarray(result['per_class_accuracy'], np.float64)
  fig = Figure(figsize=(max(6, 0.25 * len(names)), 3.5))
  ax = fig.subplots()
  ax.bar(np.arange(len(names)), 100 * np.nan_to_num(per_class), color='#4472c4')
  ax.set_xticks(np.arange(len(names)), names if len(names) <= 60 else None,
                rotation=90 if len(names) > 10 else 0, fontsize=7)
  ax.set_ylabel('top-1 accuracy %')
  ax.set_ylim(0, 100)
  rep.figure(fig, 'per_class.png', f'Top-1 accuracy per class ({result["examples"]} examples).')
  confusion = np.asarray(result['confusion'], np.float64)
  rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  fig = Figure(figsize=(6.5, 5.5))
  ax = fig.subplots()
  image = ax.imshow(rows, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, label='fraction of the true class')
  if len(names) <= 30:
    ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(len(names)), names, fontsize=7)
  ax.set_xlabel('most probable class')
  ax.set_ylabel('true class')
  rep.figure(fig, 'confusion.png', 'Confusion matrix, each row normalised to its true class.')
  return rep.finish()


# -- command line ---------------------------------------------------------------------------------


def _define_flags():
  cli.define_config_flag_from_checkpoint()
  cli.define_huge_pages_flag()
  flags.DEFINE_list(
      'checkpoint', None, 'Training workdir(s): one network, or several whose softmax '
      'outputs are averaged (an ensemble); local paths or gs:// URLs.')
  flags.DEFINE_string('out', None, 'Output folder for results.json/.md, the figures, index.html.')
  flags.DEFINE_string('split', None, 'The split to evaluate (default: config.dataset.eval_split).')
  flags.DEFINE_enum('views', None, ['center', 'ten'],
                    'centre crop or the ten views (default: config.input.eval_views).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', lower_bound=0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f.checkpoint or not f.out:
    raise app.UsageError('--checkpoint=the training workdir(s) and --out=a folder are required')
  given = None if cli.config_from_checkpoint() else f.config  # None: each stores its own
  cli.writable_directory(f.out, '--out')
  for path in f.checkpoint:
    if not storage.is_local(path):
      storage.check_url(path, '--checkpoint')
  configs_ = member_configs(f.checkpoint, given, cli.override_values(), f.step)
  distributed.initialize(configs_[0])
  cli.quiet_orbax_info()
  result = run(f.checkpoint, configs_, split=f.split, views=f.views, step=f.step)
  if jax.process_index() == 0:
    index = write(result, f.out)
    print(markdown(result), flush=True)
    print(f'index: {index}', flush=True)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
