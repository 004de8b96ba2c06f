"""Runs a suite: every (variant, seed) an ordinary training run in its own workdir.

Layout of a suite's workdir::

  DIR/experiment.json                the suite, scale, seeds and --set overrides it was started with
  DIR/<variant>/seed_<k>/            an ordinary training workdir (checkpoints, metrics.jsonl, ...)
  DIR/<variant>/seed_<k>/experiment_run.json     the run's config and its training seconds so far
  DIR/<variant>/seed_<k>/experiment_result.json  written once the run has finished
  DIR/ensemble.json                  the reference variant's seeds as one ensemble (seeds >= 2)
  DIR/report.md, report.json, *.png  experiments.report

Tasks are ordered seed-major (every variant's seed 0, then every variant's seed 1, ...), so an
interrupted suite already has a whole table of one seed. A task whose result exists is skipped;
one that was interrupted resumes from its newest checkpoint (``train.train_and_evaluate``); a
SIGTERM or SIGINT stops the current run with a checkpoint (``preemption.Preempted``) and the same
command continues where it stopped. With ``task=`` one process trains one task: a SLURM job array's
element (``launch/slurm_experiments.sh``), with ``collect`` afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet_jax import configs, evaluate, metrics, storage, train
from alexnet_jax.errors import ConfigError, DivergedError
from alexnet_jax.experiments import suite as suite_lib

PLAN = 'experiment.json'
RUN = 'experiment_run.json'
RESULT = 'experiment_result.json'
ENSEMBLE = 'ensemble.json'


@dataclasses.dataclass(frozen=True)
class Task:
  index: int
  variant: str
  seed: int
  config: ml_collections.ConfigDict
  workdir: str


def plan(suite: suite_lib.Suite, scale: str, seeds: int, common: Mapping[str, Any],
         workdir: str) -> list[Task]:
  """Every (variant, seed) of the suite as a task, seed-major; every config built and checked
  (``suite.build_configs``) before anything trains."""
  built = suite_lib.build_configs(suite, scale, common, seeds)
  tasks = []
  for seed in range(seeds):
    for v in suite.variants:
      tasks.append(
          Task(len(tasks), v.name, seed, built[v.name, seed], run_directory(workdir, v.name, seed)))
  return tasks


def run_directory(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f'seed_{seed}')


def read_json(path: str):
  """The JSON object in ``path``, or None where there is none (a missing file; the writes are
  atomic, so a half-written one is a damaged one, also None)."""
  if not storage.path(path).exists():
    return None
  try:
    value = json.loads(storage.read_text(path))
  except ValueError:
    return None
  return value if isinstance(value, dict) else None


def write_json(path: str, value) -> None:
  """Writes ``value`` to ``path`` (a local path or a URL) whole or not at all."""
  storage.makedirs(os.path.dirname(path))
  storage.write_text(path, json.dumps(value, indent=1, sort_keys=True) + '\n', atomic=True)


def start(workdir: str, suite_arg: str, suite: suite_lib.Suite, scale: str, seeds: int,
          common: Mapping[str, Any]) -> dict:
  """Records what the suite's workdir was started with (``PLAN``), or checks that a workdir
  started before is being continued with the same suite, scale and overrides (more or fewer
  seeds are fine: the runs of each seed are the same runs). Returns the record."""
  record = dict(suite=suite.name, suite_argument=suite_arg, scale=scale, seeds=seeds,
                set={k: _jsonable(v) for k, v in dict(common).items()},
                variants=[v.name for v in suite.variants], reference=suite.reference)
  path = os.path.join(workdir, PLAN)
  if storage.path(path).exists():
    old = read_json(path)
    if old is None:
      raise ConfigError(f'{path} cannot be read as JSON: it is not a suite workdir this version '
                        'wrote; use a new --workdir')
    for key, flag in (('suite', 'SUITE'), ('scale', '--scale'), ('set', '--set')):
      if old.get(key) != record[key]:
        raise ConfigError(f'{workdir} holds suite {old.get("suite")!r} at scale '
                          f'{old.get("scale")!r} with --set {old.get("set")}; this command has '
                          f'{flag} {record[key]!r}: continue it with the same {flag}, or use a '
                          'new --workdir')
    record['seeds'] = max(seeds, int(old.get('seeds', seeds)))
  write_json(path, record)
  return record


def load_plan(workdir: str) -> dict:
  record = read_json(os.path.join(workdir, PLAN))
  if record is None:
    raise ConfigError(f'{workdir} holds no suite ({PLAN} is missing or unreadable): give the '
                      '--workdir of `python -m alexnet_jax.experiments run`')
  return record


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


def check_run_config(task: Task) -> None:
  """Refuses to continue a run that was started with another config (the suite file or --set
  changed since), naming the first field that differs."""
  record = read_json(os.path.join(task.workdir, RUN))
  if record is None:
    return
  old, new = _flat(record.get('config', {})), _flat(configs.to_dict(task.config))
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      raise ConfigError(
          f'{task.workdir} was started with config.{key}={old.get(key)!r} and the suite now '
          f'gives {new.get(key)!r}: the suite or --set changed since; put it back, delete that '
          'run folder to train it afresh, or use a new --workdir')


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def finished(task: Task) -> dict | None:
  """The task's result, where its run has finished."""
  return read_json(os.path.join(task.workdir, RESULT))


def run_task(task: Task, suite_name: str, scale: str) -> dict:
  """Trains (or resumes) one task and writes its result; returns the result."""
  check_run_config(task)
  run_path = os.path.join(task.workdir, RUN)
  record = read_json(run_path) or dict(suite=suite_name, variant=task.variant, seed=task.seed,
                                       scale=scale, config=configs.to_dict(
                                           task.config), seconds=0.0, sessions=0)
  record['sessions'] += 1
  write_json(run_path, record)
  began = time.perf_counter()
  diverged = None
  try:
    final = train.train_and_evaluate(task.config, task.workdir)
  except DivergedError as e:
    # A variant that diverges is a result of the comparison (tanh at the paper's learning rate,
    # a plain 34-layer net): its row says so, and the suite goes on with the other runs. Training
    # is deterministic, so running it again would diverge again: it counts as finished.
    final, diverged = None, str(e)
  finally:
    record['seconds'] += time.perf_counter() - began
    write_json(run_path, record)
  result = summarize(task, suite_name, scale, final, record, diverged=diverged)
  write_json(os.path.join(task.workdir, RESULT), result)
  return result


def summarize(task: Task, suite_name: str, scale: str, final: Mapping[str, float] | None,
              record: Mapping[str, Any], diverged: str | None = None) -> dict:
  """The run's figures for the report: the final validation metrics (what training itself
  reported; None where it ``diverged``, with its message) and its training error by epoch from
  ``metrics.jsonl``."""
  curve = train_curve(task.workdir)
  last = curve[-1] if curve and diverged is None else {}
  value = lambda key: None if final is None else float(final[key])
  return dict(suite=suite_name, variant=task.variant, seed=task.seed, scale=scale,
              diverged=diverged, val_top1_error=value('top1_error'),
              val_top5_error=value('top5_error'), val_loss=value('loss'),
              train_top1_error=last.get('top1_error'), train_top5_error=last.get('top5_error'),
              train_loss=last.get('loss'), epochs=int(task.config.num_epochs), curve=curve,
              images_per_second=_mean_or_none([c['images_per_second'] for c in curve]),
              seconds=float(record['seconds']), sessions=int(record['sessions']))


def train_curve(workdir: str) -> list[dict]:
  """Per epoch, the training metrics averaged over its logged windows, each weighted by the steps
  it covers; a resumed run's repeated records count once (the last one written)."""
  by_step = {}
  path = os.path.join(workdir, metrics.JSONL)
  records = metrics.read_jsonl(path) if storage.path(path).exists() else []
  for rec in records:
    if rec.get('split') == 'train':
      by_step[int(rec['step'])] = rec
  epochs: dict[int, list] = {}
  previous = 0
  for step in sorted(by_step):
    rec = by_step[step]
    epoch = int(np.ceil(float(rec['epoch']) - 1e-9))
    epochs.setdefault(epoch, []).append((step - previous, rec))
    previous = step
  curve = []
  for epoch in sorted(epochs):
    weights = np.array([w for w, _ in epochs[epoch]], float)
    row = dict(epoch=epoch)
    for key in ('top1_error', 'top5_error', 'loss', 'images_per_second'):
      values = np.array([float(r[key]) for _, r in epochs[epoch]])
      row[key] = float(np.sum(weights * values) / np.sum(weights))
    curve.append(row)
  return curve


def _mean_or_none(values):
  return float(np.mean(values)) if values else None


def run(tasks: list[Task], suite: suite_lib.Suite, scale: str, *, total: int | None = None,
        say: Callable[[str], None] = print) -> list[dict]:
  """Runs every task of ``tasks`` (of ``total`` in the suite) without a result, in order;
  returns every task's result."""
  results = []
  for task in tasks:
    done = finished(task)
    tag = f'[task {task.index + 1} of {total or len(tasks)}] {task.variant}, seed {task.seed}'
    if done is not None:
      say(f'{tag}: finished before ({_outcome(done)})')
      results.append(done)
      continue
    say(f'{tag}: training in {task.workdir}')
    result = run_task(task, suite.name, scale)
    say(f'{tag}: {_outcome(result)}, {result["seconds"]:.0f} s')
    results.append(result)
  return results


def share_compilations(workdir: str) -> None:
  """Keeps the compiled steps in ``workdir/compilation_cache`` (JAX's persistent cache), so that
  the seeds of a variant, the tasks of a job array and a resumed suite compile each distinct
  program once. Local workdirs only (a bucket would be a slow cache); a cache the environment
  names (``JAX_COMPILATION_CACHE_DIR``) is kept."""
  if not storage.is_local(workdir) or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _outcome(result: Mapping) -> str:
  if result.get('diverged'):
    return f'diverged ({result["diverged"]})'
  return (f'val top-1 error {100 * result["val_top1_error"]:.2f}%, top-5 '
          f'{100 * result["val_top5_error"]:.2f}%')


def missing(tasks: list[Task]) -> list[Task]:
  return [t for t in tasks if finished(t) is None]


def evaluate_ensemble(tasks: list[Task], suite: suite_lib.Suite, workdir: str) -> dict | None:
  """The reference variant's finished seeds as one ensemble (softmax averaged, as the papers'
  ensembles), evaluated once and kept in ``ENSEMBLE``; None with fewer than two seeds."""
  members = [
      t for t in tasks
      if t.variant == suite.reference and (finished(t) or {}).get('val_top1_error') is not None
  ]
  if len(members) < 2:
    return None
  path = os.path.join(workdir, ENSEMBLE)
  seeds = sorted(t.seed for t in members)
  kept = read_json(path)
  if kept is not None and kept.get('seeds') == seeds:
    return kept
  result = evaluate.run([t.workdir for t in members], [t.config for t in members], split=None,
                        views=None)
  value = dict(
      variant=suite.reference, seeds=seeds, networks=len(members),
      top1_error=float(result['top1_error']), top5_error=float(result['top5_error']), members=[
          dict(seed=t.seed, top1_error=m['top1_error'], top5_error=m['top5_error'])
          for t, m in zip(members, result['members'])
      ])
  write_json(path, value)
  return value
