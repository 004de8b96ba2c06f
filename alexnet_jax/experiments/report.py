"""A suite's table: per variant, train / val top-1 / val top-5 error as mean ± std over its seeds,
the difference to the reference row, and the paper's figures beside them.

A difference is marked † where it is smaller than the spread over seeds, √(s_v² + s_r²) with s the
standard deviation (ddof 1) of the variant's and of the reference's seeds: such a difference says
nothing about the direction of the effect. ``direction`` compares our difference with the paper's:
'as the paper', 'opposite', 'within the spread', or '—' where the paper gives no figure or there is
one seed only. The figures: training error against epochs (mean over seeds, the epoch at which each
variant first reaches the suite's threshold marked), and validation top-1 error per variant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from alexnet_jax import report as report_lib
from alexnet_jax.experiments import runner
from alexnet_jax.experiments import suite as suite_lib

DAGGER = '†'


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  mean = float(np.mean(values))
  return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def epochs_to(curve: Sequence[Mapping], threshold: float) -> int | None:
  """The first epoch whose training top-1 error is at or below ``threshold``, or None."""
  return next((int(c['epoch']) for c in curve if c['top1_error'] <= threshold), None)


def summarize(suite: suite_lib.Suite, scale: str, results: Sequence[Mapping],
              ensemble: Mapping | None = None) -> dict:
  """The table's numbers, from the runs' results (``runner.summarize``), as JSON."""
  by_variant = {v.name: [] for v in suite.variants}
  for r in results:
    if r['variant'] in by_variant:
      by_variant[r['variant']].append(r)
  threshold = suite.threshold.get(scale)
  rows = []
  for v in suite.variants:
    runs = sorted(by_variant[v.name], key=lambda r: r['seed'])
    diverged = [r['seed'] for r in runs if r.get('diverged')]
    runs = [r for r in runs if not r.get('diverged')]
    row = dict(variant=v.name, description=v.description, overrides=dict(v.overrides),
               seeds=[r['seed'] for r in runs], diverged=diverged, paper=dict(v.paper),
               claim=v.claim)
    for key in ('train_top1_error', 'val_top1_error', 'val_top5_error'):
      values = [r[key] for r in runs if r.get(key) is not None]
      row[key] = dict(values=values, mean=_stats(values)[0], std=_stats(values)[1])
    row['seconds'] = _stats([r['seconds'] for r in runs])[0]
    if threshold is not None:
      reached = [epochs_to(r['curve'], threshold) for r in runs]
      row['epochs_to_threshold'] = dict(threshold=threshold, values=reached,
                                        mean=_stats([e for e in reached if e is not None])[0])
    row['curve'] = _mean_curve([r['curve'] for r in runs])
    rows.append(row)
  ref = next(r for r in rows if r['variant'] == suite.reference)
  ref_paper = suite.variant(suite.reference).paper
  for row in rows:
    for ours, theirs in (('val_top1_error', 'top1'), ('val_top5_error', 'top5')):
      row[f'delta_{theirs}'] = _delta(row, ref, ours)
      row[f'paper_delta_{theirs}'] = _paper_delta(row['paper'], ref_paper, theirs, row is ref)
    row['direction'] = ('reference'
                        if row is ref else _direction(row['delta_top1'], row['paper_delta_top1']))
  return dict(suite=suite.name, title=suite.title, source=suite.source, scale=scale,
              data=suite.data.get(scale), reference=suite.reference, rows=rows,
              ensemble=_ensemble(suite, ensemble, ref))


def _mean_curve(curves: Sequence[Sequence[Mapping]]) -> list[dict]:
  if not curves:
    return []
  epochs = sorted(set.intersection(*({c['epoch'] for c in curve} for curve in curves)))
  out = []
  for e in epochs:
    values = [c['top1_error'] for curve in curves for c in curve if c['epoch'] == e]
    out.append(dict(epoch=e, top1_error=float(np.mean(values))))
  return out


def _delta(row, ref, key) -> dict | None:
  """Our difference (percentage points) of the row's mean to the reference's, with the spread."""
  a, b = row[key], ref[key]
  if a['mean'] is None or b['mean'] is None:
    return None
  spread = None
  if a['std'] is not None and b['std'] is not None:
    spread = 100 * math.sqrt(a['std']**2 + b['std']**2)
  value = 100 * (a['mean'] - b['mean'])
  return dict(value=value, spread=spread,
              within_spread=None if spread is None else abs(value) <= spread)


def _paper_delta(figures, ref_figures, key, is_reference) -> float | None:
  if is_reference:
    return None
  if f'd_{key}' in figures:
    return float(figures[f'd_{key}'])
  if key in figures and key in ref_figures:
    return round(float(figures[key]) - float(ref_figures[key]), 2)
  return None


def _direction(ours: dict | None, theirs: float | None) -> str:
  if ours is None or theirs is None or ours['within_spread'] is None:
    return '—'
  if ours['within_spread']:
    return 'within the spread'
  return 'as the paper' if (ours['value'] > 0) == (theirs > 0) else 'opposite'


def _ensemble(suite, ensemble, ref) -> dict | None:
  if not ensemble:
    return None
  best_single = ref['val_top1_error']['mean']
  return dict(ensemble, paper=dict(suite.ensemble) or None,
              delta_top1_vs_mean_member=100 * (ensemble['top1_error'] - best_single))


def _pct(x) -> str | None:
  return report_lib.percent(x)


def _mean_std(stat) -> str | None:
  if stat['mean'] is None:
    return None
  return report_lib.mean_std(stat['values'])


def _delta_text(d) -> str | None:
  if d is None:
    return None
  return f'{d["value"]:+.1f}{DAGGER if d["within_spread"] else ""}'


def _figure(x) -> str | None:
  return None if x is None else f'{x:g}'


def markdown(summary: Mapping) -> str:
  rows = summary['rows']
  threshold = next(
      (r['epochs_to_threshold']['threshold'] for r in rows if 'epochs_to_threshold' in r), None)
  header = [
      'variant', 'seeds', 'train top-1', 'val top-1', 'val top-5', 'Δ top-1', 'Δ top-5',
      'paper train', 'paper top-1', 'paper top-5', 'paper Δ top-1', 'paper Δ top-5', 'direction'
  ]
  if threshold is not None:
    header.append(f'epochs to {100 * threshold:g} % train err.')
  header.append('s / run')
  table = []
  for r in rows:
    p = r['paper']
    line = [
        r['variant'],
        f'{len(r["seeds"])} (+{len(r["diverged"])} diverged)' if r['diverged'] else len(r['seeds']),
        _mean_std(r['train_top1_error']),
        _mean_std(r['val_top1_error']),
        _mean_std(r['val_top5_error']),
        'ref.' if r['variant'] == summary['reference'] else _delta_text(r['delta_top1']),
        'ref.' if r['variant'] == summary['reference'] else _delta_text(r['delta_top5']),
        _figure(p.get('train')),
        _figure(p.get('top1')),
        _figure(p.get('top5')),
        None if r['paper_delta_top1'] is None else f'{r["paper_delta_top1"]:+g}',
        None if r['paper_delta_top5'] is None else f'{r["paper_delta_top5"]:+g}',
        r['direction'],
    ]
    if threshold is not None:
      e = r['epochs_to_threshold']
      reached = [v for v in e['values'] if v is not None]
      line.append(None if not e['values'] else (
          f'{e["mean"]:.1f}' if len(reached) ==
          len(e['values']) else f'{len(e["values"]) - len(reached)} of {len(e["values"])} never'))
    line.append(None if r['seconds'] is None else f'{r["seconds"]:.0f}')
    table.append(line)
  parts = [
      f'Scale: **{summary["scale"]}**, data: {summary["data"]}. Paper: {summary["source"]}.',
      'Error rates in %, mean ± std over seeds; Δ: percentage points against the reference row '
      f'`{summary["reference"]}` (ours: mean against mean; the paper\'s: its rows\' difference). '
      f'{DAGGER}: smaller than the spread over seeds √(s_variant² + s_reference²). Training '
      "error: the last epoch's training batches (with augmentation and dropout).",
      report_lib.markdown_table(header, table),
  ]
  described = [
      f'- `{r["variant"]}`: {r["description"]}' +
      (f' — paper: {r["claim"]}' if r['claim'] else '') +
      (f' — diverged with seeds {r["diverged"]}' if r['diverged'] else '') for r in rows
  ]
  parts.append('\n'.join(described))
  ens = summary.get('ensemble')
  if ens:
    paper = ens.get('paper')
    text = (f'Ensemble of the `{ens["variant"]}` seeds {ens["seeds"]} (softmax averaged): val '
            f'top-1 {_pct(ens["top1_error"])} %, top-5 {_pct(ens["top5_error"])} % '
            f'({ens["delta_top1_vs_mean_member"]:+.1f} top-1 against its members\' mean).')
    if paper:
      ref = next(r for r in rows if r['variant'] == summary['reference'])['paper']
      text += (f' Paper, {paper["row"]}: {paper["top1"]} / {paper["top5"]} against 1 net '
               f'{ref.get("top1")} / {ref.get("top5")}.')
    parts.append(text)
  return '\n\n'.join(parts)


def plot_curves(summary: Mapping) -> Figure:
  fig = Figure(figsize=(8, 5))
  ax = fig.subplots()
  threshold = None
  for r in summary['rows']:
    curve = r['curve']
    if not curve:
      continue
    x = [c['epoch'] for c in curve]
    y = [100 * c['top1_error'] for c in curve]
    (line,) = ax.plot(x, y, 'o-', markersize=3, label=r['variant'])
    if 'epochs_to_threshold' in r:
      threshold = r['epochs_to_threshold']['threshold']
      reached = epochs_to(curve, threshold)
      if reached is not None:
        ax.axvline(reached, color=line.get_color(), linestyle=':', alpha=0.6)
  if threshold is not None:
    ax.axhline(100 * threshold, color='grey', linestyle='--', linewidth=1,
               label=f'{100 * threshold:g} % (epochs to it: dotted)')
  ax.set_xlabel('epoch')
  ax.set_ylabel('training top-1 error (%)')
  ax.set_title(f'{summary["title"]} ({summary["scale"]} scale, mean over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_errors(summary: Mapping) -> Figure:
  rows = [r for r in summary['rows'] if r['val_top1_error']['mean'] is not None]
  fig = Figure(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
  ax = fig.subplots()
  x = np.arange(len(rows))
  means = [100 * r['val_top1_error']['mean'] for r in rows]
  stds = [100 * (r['val_top1_error']['std'] or 0.0) for r in rows]
  ax.bar(x, means, yerr=stds, capsize=4, color='tab:blue', alpha=0.8)
  for i, r in enumerate(rows):
    for value in r['val_top1_error']['values']:
      ax.plot(i, 100 * value, 'k.', markersize=4)
  ax.set_xticks(x, [r['variant'] for r in rows], rotation=30, ha='right', fontsize=8)
  ax.set_ylabel('validation top-1 error (%)')
  ax.set_title('validation top-1 error: mean ± std, dots: seeds')
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  return fig


def write(workdir: str, suite: suite_lib.Suite, scale: str, tasks) -> dict:
  """Writes ``report.md``, ``report.json``, the figures and ``index.html`` into ``workdir`` from
  the tasks that have finished; returns the summary."""
  found = [(t, runner.finished(t)) for t in tasks]  # each result read once
  ensemble = runner.read_json(os.path.join(workdir, runner.ENSEMBLE))
  summary = summarize(suite, scale, [r for _, r in found if r is not None], ensemble)
  summary['missing'] = [
      dict(task=t.index, variant=t.variant, seed=t.seed) for t, r in found if r is None
  ]
  out = report_lib.Report(workdir, f'{suite.title} — {scale} scale')
  body = markdown(summary)
  if summary['missing']:
    body += (f'\n\nNot finished yet ({len(summary["missing"])} runs): ' +
             ', '.join(f'{m["variant"]} seed {m["seed"]}' for m in summary['missing']) + '.')
  out.table('Results', body)
  if any(r['curve'] for r in summary['rows']):
    out.figure(plot_curves(summary), 'training_error.png', 'training top-1 error against epochs')
    out.figure(plot_errors(summary), 'val_error.png', 'validation top-1 error per variant')
  out.json('report.json', summary)
  out.finish('report.md')
  return summary
