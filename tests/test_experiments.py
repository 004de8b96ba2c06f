"""The experiment suites (``python -m alexnet_jax.experiments``): suites checked before anything
trains, a micro suite run end to end as real processes, interrupted by a real SIGTERM and
resumed, its report's numbers equal to the runs' own, and the SLURM job array script driven by a
stand-in ``sbatch`` (SLURM itself does not install here: the stand-in runs the array's elements
one after another with the variables SLURM sets, then the collect job its dependency waits for).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from alexnet_jax import configs, host, metrics, trained
from alexnet_jax import report as report_lib
from alexnet_jax.errors import ConfigError
from alexnet_jax.experiments import papers, report, runner
from alexnet_jax.experiments import suite as suite_lib

from helpers import XLA_FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_SCRIPT = os.path.join(REPO, 'launch', 'slurm_experiments.sh')

# Two variants of a two-tower AlexNet at sizes that train in seconds: 4 steps an epoch, 2 epochs;
# the paper's input recipe (mean image, PCA lighting), which the ensemble's evaluation must take.
MICRO_SUITE = """
from alexnet_jax import configs
from alexnet_jax.experiments import papers
from alexnet_jax.experiments.suite import Suite, Variant


def base():
  c = papers.demo_base(configs.model_config('alexnet', width=0.0625, init='he'), image_size=72,
                   crop=67, epochs=2, batch=16, towers=2, pca=0.1)
  c.dataset.update(num_train=64, num_val=24)
  c.eval_batch_size = 24
  c.input.workers = 0
  return c


def get_suite():
  return Suite(
      name='micro', title='micro suite', source='none', reference='lrn',
      variants=(Variant('lrn', 'with LRN', paper=dict(top1=40.7, top5=18.2)),
                Variant('no_lrn', 'without LRN', {OVERRIDES}, paper=dict(d_top1=1.4))),
      bases=dict(demo=base), data=dict(demo='64 tiny images'), threshold=dict(demo=0.95))
"""


def _suite_file(path, overrides="{'model.lrn': False}"):
  path.write_text(MICRO_SUITE.replace('{OVERRIDES}', overrides))
  return str(path)


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """One data folder and one compilation cache for the module's processes (the same programs
  compile once)."""
  root = tmp_path_factory.mktemp('experiments')
  env = dict(os.environ)
  for k in ('XLA_FLAGS', 'JAX_PLATFORMS'):
    env.pop(k, None)
  env.update(TFDS_DATA_DIR=str(root / 'data'), XLA_FLAGS=XLA_FAST_COMPILE, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(root / 'jit'), GLIBC_TUNABLES=host.HUGE_PAGES_TUNABLE,
             PYTHONPATH=REPO + os.pathsep + env.get('PYTHONPATH', ''))
  return dict(root=root, env=env, suite=_suite_file(root / 'micro.py'))


def _command(*args):
  return [sys.executable, '-m', 'alexnet_jax.experiments', *args]


def _run(args, env, timeout=600):
  return subprocess.run(_command(*args), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _error_lines(proc):
  return [l for l in proc.stderr.splitlines() if l.startswith('error:')]


# ----------------------------------------------------------------------------------------------
# Suites as data, checked before anything trains.


@pytest.mark.parametrize('scale', suite_lib.SCALES)
def test_every_built_in_suite_builds_a_valid_config_for_every_variant(scale):
  for name, make in papers.SUITES.items():
    suite = make()
    built = suite_lib.build_configs(suite, scale, seeds=2)
    assert len(built) == 2 * len(suite.variants), name
    for (variant, seed), config in built.items():
      configs.check_fields(config)
      assert config.seed == seed
    # The reference row carries the paper's figure that the others are compared with.
    assert suite.variant(suite.reference).paper, name


def test_variants_override_what_they_say_and_nothing_else():
  suite = papers.alexnet_ablations()
  built = suite_lib.build_configs(suite, 'demo')
  ref = configs.to_dict(built['two_towers', 0])
  flat = lambda d, p='': {
      k2: v2 for k, v in d.items()
      for k2, v2 in (flat(v, f'{p}{k}.') if isinstance(v, dict) else {f'{p}{k}': v}).items()
  }
  for v in suite.variants:
    changed = {
        k for k, a in flat(configs.to_dict(built[v.name, 0])).items() if a != flat(ref).get(k)
    }
    expected = {k for k in v.overrides if flat(ref).get(k) != v.overrides[k]}
    assert changed == expected, v.name
  # model.name switches the network and keeps what the two specs share.
  zf = suite_lib.build_configs(papers.zfnet_table3(), 'demo')
  alexnet = zf['alexnet_remove_3_4', 0].model
  assert alexnet.name == 'alexnet' and alexnet.towers == 1 and tuple(alexnet.remove) == (3, 4)
  assert alexnet.width == zf['zfnet', 0].model.width == 0.25
  assert alexnet.image_size == zf['zfnet', 0].model.image_size


@pytest.mark.parametrize('overrides, message', [
    ("{'model.activaton': 'tanh'}", "variant 'no_lrn': model.activaton is not a config field"),
    ("{'optim.lr': 0.1}", 'optim.lr is not a config field'),
    ("{'optimizer.lr': 0.1}", 'no section config.optimizer'),
    ("{'model.lrn': 'no'}", "model.lrn='no' has the wrong type"),
    ("{'optim.momentum': 1.5}", 'config.optim.momentum=1.5 is out of range'),
    ("{'model.name': 'lenet'}", "unknown model 'lenet'"),
    ("{'optim': 0.1}", 'optim is a section of fields'),
])
def test_a_bad_override_is_refused_in_one_line_before_anything_trains(tmp_path, shared, overrides,
                                                                      message):
  suite = _suite_file(tmp_path / 'bad.py', overrides)
  workdir = tmp_path / 'w'
  proc = _run(['run', suite, f'--workdir={workdir}'], shared['env'])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = _error_lines(proc)
  assert len(lines) == 1 and message in lines[0] and "suite 'micro'" in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()  # nothing written, nothing trained


def test_malformed_suites_and_arguments_are_refused():
  base = papers.alexnet_ablations()
  v = base.variants
  cases = [
      (dict(reference='nope'), "its reference 'nope' is not one of its variants"),
      (dict(variants=v + (v[0],)), "names the variant 'two_towers' twice"),
      (dict(variants=(suite_lib.Variant('a b', 'x'),)), "variant name 'a b'"),
      (dict(variants=(suite_lib.Variant('two_towers', 'x', paper=dict(top_1=1.0)),)),
       "paper figure 'top_1'"),
  ]
  for change, message in cases:
    with pytest.raises(ConfigError, match=message):
      dataclasses.replace(base, **change).check()
  with pytest.raises(ConfigError, match="unknown suite 'alexnt'"):
    suite_lib.load('alexnt', papers.SUITES)
  with pytest.raises(ConfigError, match='has no variant'):
    base.variant('three_towers')
  with pytest.raises(ConfigError, match='must read PATH=VALUE'):
    suite_lib.parse_assignments(['dataset.data_dir'])
  assert suite_lib.parse_assignments(['model.width=0.5', 'dataset.data_dir=/data'
                                     ]) == {'model.width': 0.5, 'dataset.data_dir': '/data'}
  with pytest.raises(ConfigError, match=r'\(from --set\): model.widht is not a config field'):
    suite_lib.build_configs(base, 'demo', {'model.widht': 0.5})


def test_a_workdir_continues_only_with_the_suite_scale_and_overrides_it_started_with(tmp_path):
  suite = papers.alexnet_ablations()
  runner.start(str(tmp_path), 'alexnet', suite, 'demo', 3, {})
  runner.start(str(tmp_path), 'alexnet', suite, 'demo', 1, {})  # fewer seeds: the same runs
  assert runner.load_plan(str(tmp_path))['seeds'] == 3
  with pytest.raises(ConfigError, match='continue it with the same --scale'):
    runner.start(str(tmp_path), 'alexnet', suite, 'paper', 3, {})
  with pytest.raises(ConfigError, match='continue it with the same --set'):
    runner.start(str(tmp_path), 'alexnet', suite, 'demo', 3, {'model.width': 0.5})
  with pytest.raises(ConfigError, match='continue it with the same SUITE'):
    runner.start(str(tmp_path), 'vgg', papers.vgg_depth(), 'demo', 3, {})


# ----------------------------------------------------------------------------------------------
# The report's arithmetic, on constructed results.


def _result(variant, seed, val1, val5, train1, curve):
  return dict(variant=variant, seed=seed, val_top1_error=val1, val_top5_error=val5,
              train_top1_error=train1, seconds=10.0 + seed,
              curve=[dict(epoch=i + 1, top1_error=e) for i, e in enumerate(curve)])


def test_report_gives_mean_std_differences_their_spread_and_the_papers_direction():
  suite = papers.alexnet_ablations()
  results = [
      _result('two_towers', 0, 0.30, 0.10, 0.20, [0.9, 0.6, 0.4]),
      _result('two_towers', 1, 0.32, 0.12, 0.22, [0.9, 0.5, 0.3]),
      # no_lrn: worse by 5 points, far beyond the spread: the paper's direction (+1.4).
      _result('no_lrn', 0, 0.35, 0.14, 0.21, [0.9, 0.7, 0.45]),
      _result('no_lrn', 1, 0.37, 0.16, 0.23, [0.9, 0.6, 0.55]),
      # plain pooling: better by 0.5 points, within the spread of 1.4 points.
      _result('plain_pooling', 0, 0.30, 0.10, 0.2, [0.9, 0.8, 0.7]),
      _result('plain_pooling', 1, 0.31, 0.11, 0.2, [0.9, 0.8, 0.6]),
      # one tower: better by 10 points, the opposite of the paper's +1.7.
      _result('one_tower_half', 0, 0.21, 0.05, 0.1, [0.5, 0.4, 0.3]),
      _result('one_tower_half', 1, 0.21, 0.05, 0.1, [0.5, 0.4, 0.3]),
  ]
  s = report.summarize(suite, 'demo', results)
  rows = {r['variant']: r for r in s['rows']}
  ref, no_lrn = rows['two_towers'], rows['no_lrn']
  assert ref['val_top1_error']['mean'] == pytest.approx(0.31)
  assert ref['val_top1_error']['std'] == pytest.approx(math.sqrt(2) * 0.01)
  assert no_lrn['delta_top1']['value'] == pytest.approx(5.0)
  assert no_lrn['delta_top1']['spread'] == pytest.approx(2.0)  # √(1.414² + 1.414²)
  assert not no_lrn['delta_top1']['within_spread'] and no_lrn['direction'] == 'as the paper'
  assert no_lrn['paper_delta_top1'] == 1.4 and no_lrn['paper_delta_top5'] == 1.2
  assert rows['plain_pooling']['delta_top1']['within_spread']
  assert rows['plain_pooling']['direction'] == 'within the spread'
  assert rows['one_tower_half']['direction'] == 'opposite'
  assert ref['direction'] == 'reference' and ref['paper']['top1'] == 40.7
  # Variants without runs are rows without numbers, not errors.
  assert rows['tanh']['val_top1_error']['mean'] is None and rows['tanh']['direction'] == '—'
  # Epochs to the demo threshold (50 %): seed 0 at epoch 3, seed 1 at epoch 2.
  assert ref['epochs_to_threshold']['values'] == [3, 2]
  assert rows['plain_pooling']['epochs_to_threshold']['values'] == [None, None]
  assert ref['curve'] == [
      dict(epoch=1, top1_error=0.9),
      dict(epoch=2, top1_error=0.55),
      dict(epoch=3, top1_error=pytest.approx(0.35))
  ]
  text = report.markdown(s)
  assert '| no_lrn | 2 | 22.0 ± 1.4 | 36.0 ± 1.4 | 15.0 ± 1.4 | +5.0 | +4.0 |' in text
  assert '| plain_pooling | 2 |' in text and '-0.5†' in text
  assert '| two_towers | 2 | 21.0 ± 1.4 | 31.0 ± 1.4 | 11.0 ± 1.4 | ref. | ref. | — | 40.7 | 18.2' \
      in text
  assert '2 of 2 never' in text and 'as the paper' in text and 'opposite' in text


def test_the_paper_difference_comes_from_its_rows_where_it_gives_absolute_figures():
  s = report.summarize(papers.zfnet_table3(), 'demo', [])
  rows = {r['variant']: r for r in s['rows']}
  assert rows['alexnet_remove_3_4']['paper_delta_top1'] == pytest.approx(45.4 - 40.5)
  assert rows['zfnet']['paper_delta_top5'] == pytest.approx(16.5 - 18.1)
  assert rows['alexnet']['paper_delta_top1'] is None


# ----------------------------------------------------------------------------------------------
# The micro suite end to end: real processes, a real SIGTERM.


def _wait_for(predicate, proc, what, timeout=300):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f'the suite ended before {what}:\n{proc.stderr.read()[-3000:]}')
    if time.monotonic() > deadline:
      pytest.fail(f'no {what} within {timeout} s')
    time.sleep(0.2)


def _steps_saved(run_dir):
  path = run_dir / 'checkpoints'
  return [p for p in path.iterdir() if p.name.isdigit()] if path.exists() else []


def test_micro_suite_interrupted_and_resumed_reports_the_runs_own_final_metrics(tmp_path, shared):
  workdir = tmp_path / 'suite'
  args = ['run', shared['suite'], f'--workdir={workdir}']
  proc = subprocess.Popen(_command(*args), cwd=REPO, env=shared['env'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    second = workdir / 'no_lrn' / 'seed_0'
    # The second run stopped in its second epoch, after its first checkpoint.
    _wait_for(lambda: _steps_saved(second), proc, 'checkpoint of the second run')
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
  assert proc.returncode == 75, err[-3000:]
  assert 'stopped by SIGTERM' in err and 'run the same command to continue the suite' in err
  assert (workdir / 'lrn' / 'seed_0' / runner.RESULT).exists()
  assert not (second / runner.RESULT).exists()
  assert not (workdir / 'report.md').exists()

  again = _run(args, shared['env'])
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'lrn, seed 0: finished before' in again.stdout
  assert 'no_lrn, seed 0: training in' in again.stdout
  resumed = json.loads((second / runner.RESULT).read_text())
  assert resumed['sessions'] == 2
  # The resumed run went on from its checkpoint: its metrics hold the second epoch's only once
  # per step, and it ran its 8 steps in all.
  records = metrics.read_jsonl(str(second / metrics.JSONL))
  assert {r['step'] for r in records if r['split'] == 'train'} == {4, 8}

  summary = json.loads((workdir / 'report.json').read_text())
  assert summary['missing'] == []
  for row in summary['rows']:
    run_dir = workdir / row['variant'] / 'seed_0'
    final = [r for r in metrics.read_jsonl(str(run_dir / metrics.JSONL)) if r['split'] == 'val']
    meta = trained.read_meta(str(run_dir))
    assert row['val_top1_error']['values'] == [final[-1]['top1_error']
                                              ] == [meta['val']['top1_error']]
    assert row['val_top5_error']['values'] == [final[-1]['top5_error']]
    last_train = [
        r for r in metrics.read_jsonl(str(run_dir / metrics.JSONL)) if r['split'] == 'train'
    ][-1]
    assert row['train_top1_error']['values'] == [pytest.approx(last_train['top1_error'])]
    assert meta['step'] == 8 and meta['config']['model']['lrn'] == (row['variant'] == 'lrn')
  md = (workdir / 'report.md').read_text()
  for row in summary['rows']:
    assert f'| {row["variant"]} | 1 | ' in md
    assert report_lib.percent(row['val_top1_error']['values'][0]) in md
  assert (workdir / 'training_error.png').stat().st_size > 1000
  assert (workdir / 'index.html').exists()
  # `report` alone writes the same table from the runs.
  alone = _run(['report', str(workdir)], shared['env'])
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert json.loads((workdir / 'report.json').read_text())['rows'] == summary['rows']


def test_a_variant_that_diverges_is_a_row_saying_so_and_the_suite_goes_on(tmp_path, shared):
  suite = _suite_file(tmp_path / 'diverging.py', "{'optim.learning_rate': 1e6}")
  workdir = tmp_path / 'suite'
  proc = _run(['run', suite, f'--workdir={workdir}'], shared['env'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'no_lrn, seed 0: diverged (training diverged at step' in proc.stdout
  summary = json.loads((workdir / 'report.json').read_text())
  rows = {r['variant']: r for r in summary['rows']}
  assert rows['no_lrn']['diverged'] == [0] and rows['no_lrn']['seeds'] == []
  assert rows['no_lrn']['val_top1_error']['mean'] is None
  assert rows['lrn']['seeds'] == [0] and rows['lrn']['val_top1_error']['mean'] is not None
  assert '| no_lrn | 0 (+1 diverged) |' in (workdir / 'report.md').read_text()
  # Finished, as far as the suite is concerned: the same command trains nothing again.
  again = _run(['run', suite, f'--workdir={workdir}'], shared['env'])
  assert again.returncode == 0 and 'no_lrn, seed 0: finished before (diverged' in again.stdout


SBATCH = r"""#!/usr/bin/env python3
# A stand-in for sbatch: records its arguments; runs an --array's elements one after another with
# the variables SLURM gives them, and a job with --export=ALL,NAME=VALUE with that variable; prints
# the job id as --parsable does. Jobs run at submission, in order, so a dependency has ended.
import os, subprocess, sys
args = sys.argv[1:]
log = os.environ['SBATCH_LOG']
with open(log, 'a') as f:
  f.write(' '.join(args) + '\n')
# sbatch's own options come before the script; what follows it is the script's.
first = next(i for i, a in enumerate(args) if not a.startswith('--'))
options, script = args[:first], args[first:]
job = str(1000 + sum(1 for _ in open(log)))
env = dict(os.environ, SLURM_JOB_ID=job)
for o in options:
  if o.startswith('--export=ALL,'):
    name, value = o[len('--export=ALL,'):].split('=', 1)
    env[name] = value
indices = [None]
for o in options:
  if o.startswith('--array='):
    first, last = o[len('--array='):].split('-')
    indices = range(int(first), int(last) + 1)
for i in indices:
  if i is not None:
    env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(i))
  with open(os.path.join(os.environ['SBATCH_OUT'], f'{job}_{i}.out'), 'w') as out:
    subprocess.run(['bash', *script], env=env, stdout=out, stderr=subprocess.STDOUT)
print(job)
"""


def test_slurm_job_array_trains_every_task_and_the_collect_job_writes_the_report(tmp_path, shared):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  sbatch = bin_dir / 'sbatch'
  sbatch.write_text(SBATCH)
  sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
  logs = tmp_path / 'logs'
  logs.mkdir()
  env = dict(shared['env'], PATH=f'{bin_dir}:{shared["env"]["PATH"]}', PYTHON=sys.executable,
             SBATCH_LOG=str(tmp_path / 'sbatch.log'), SBATCH_OUT=str(logs), GPUS='1')
  for k in [k for k in env if k.startswith('SLURM_')]:
    del env[k]
  workdir = tmp_path / 'suite'
  proc = subprocess.run(['bash', SLURM_SCRIPT, shared['suite'],
                         str(workdir), '--seeds=2'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  outputs = '\n'.join(f'{p.name}:\n{p.read_text()[-1500:]}' for p in sorted(logs.iterdir()))
  assert proc.returncode == 0, proc.stderr + outputs
  assert 'submitted 4 runs as job array 1001 and the report as job 1002' in proc.stdout
  submitted = (tmp_path / 'sbatch.log').read_text().splitlines()
  assert submitted[0].startswith('--parsable --array=0-3 --gpus=1 ')
  assert '--dependency=afterany:1001' in submitted[1]
  for variant in ('lrn', 'no_lrn'):
    for seed in (0, 1):
      assert (workdir / variant / f'seed_{seed}' / runner.RESULT).exists(), outputs
  summary = json.loads((workdir / 'report.json').read_text())
  assert [len(r['seeds']) for r in summary['rows']] == [2, 2] and summary['missing'] == []
  # collect evaluated the reference's two seeds as one ensemble.
  assert summary['ensemble']['seeds'] == [0, 1] and summary['ensemble']['networks'] == 2
  assert 'Ensemble of the `lrn` seeds [0, 1]' in (workdir / 'report.md').read_text()

  # A task that did not finish: collect says which array indices to resubmit, exit 1.
  (workdir / 'no_lrn' / 'seed_1' / runner.RESULT).unlink()
  collect = _run(['collect', str(workdir)], shared['env'])
  assert collect.returncode == 1
  assert 'error: 1 of 4 runs have not finished (tasks 3: no_lrn seed 1)' in collect.stderr
  assert 'sbatch --array=3' in collect.stderr
  # Its array element trains it again, alone.
  one = _run(['run', shared['suite'], f'--workdir={workdir}', '--seeds=2', '--task=3'],
             shared['env'])
  assert one.returncode == 0, one.stderr[-2000:]
  assert '[task 4 of 4] no_lrn, seed 1' in one.stdout
  assert _run(['collect', str(workdir)], shared['env']).returncode == 0
