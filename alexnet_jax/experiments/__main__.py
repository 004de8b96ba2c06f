"""``python -m alexnet_jax.experiments COMMAND ...``: the papers' comparisons, one command each.

  run SUITE --workdir=DIR [--scale=demo|paper] [--seeds=N] [--set=PATH=VALUE ...] [--task=K]
      Trains every variant x seed of SUITE (a built-in suite or a suite file), one after another,
      each an ordinary training run in DIR/<variant>/seed_<k>; skips the finished ones, resumes an
      interrupted one, then writes the report. --task=K trains only task K (a job array element).
  report DIR      Writes DIR/report.md, report.json and the figures from the runs finished so far.
  collect DIR     After a job array: evaluates the reference's seeds as an ensemble, writes the
                  report, and fails listing the tasks that have not finished.
  list [SUITE]    The built-in suites, or SUITE's tasks (--count: only how many, for --array).
"""

from __future__ import annotations

import sys

from absl import app, flags

from alexnet_jax import cli, distributed, preemption
from alexnet_jax.errors import ConfigError
from alexnet_jax.experiments import papers, report, runner
from alexnet_jax.experiments import suite as suite_lib

COMMANDS = ('run', 'report', 'collect', 'list')


def _define_flags():
  flags.DEFINE_string('workdir', None, "run: the suite's folder (one sub-folder per run).")
  flags.DEFINE_enum(
      'scale', 'demo', suite_lib.SCALES,
      "'demo': the built-in data, scaled-down networks, minutes per run on a CPU; "
      "'paper': the papers' data and recipes.")
  flags.DEFINE_integer('seeds', 1, 'Runs per variant, with config.seed = 0 .. N-1.', lower_bound=1)
  flags.DEFINE_multi_string(
      'set', [], 'PATH=VALUE, a config override for every variant (repeatable), e.g. '
      '--set=dataset.data_dir=/data/tfds; the value is read as a Python literal.')
  flags.DEFINE_integer('task', None, 'run: train only this task (0-based; see `list SUITE`).',
                       lower_bound=0)
  flags.DEFINE_bool('count', False, 'list SUITE: print only the number of tasks.')
  cli.define_huge_pages_flag()


def _suite_and_tasks(suite_arg: str, scale: str, seeds: int, common: dict, workdir: str):
  suite = suite_lib.load(suite_arg, papers.SUITES)
  return suite, runner.plan(suite, scale, seeds, common, workdir)


def _from_workdir(workdir: str):
  record = runner.load_plan(workdir)
  suite, tasks = _suite_and_tasks(record['suite_argument'], record['scale'], int(record['seeds']),
                                  dict(record['set']), workdir)
  return record, suite, tasks


def _report(workdir, suite, scale, tasks) -> dict:
  summary = report.write(workdir, suite, scale, tasks)
  print(report.markdown(summary))
  print(f'wrote {workdir}/report.md, report.json and index.html', flush=True)
  return summary


def run_command(suite_arg: str) -> None:
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError('run needs --workdir, e.g. --workdir=/tmp/alexnet_ablations')
  common = suite_lib.parse_assignments(flags.FLAGS.set)
  scale, seeds = flags.FLAGS.scale, flags.FLAGS.seeds
  suite, tasks = _suite_and_tasks(suite_arg, scale, seeds, common, workdir)
  if flags.FLAGS.task is not None and flags.FLAGS.task >= len(tasks):
    raise ConfigError(f'--task={flags.FLAGS.task}, but suite {suite.name!r} has {len(tasks)} '
                      f'tasks at --seeds={seeds} (0 to {len(tasks) - 1})')
  cli.writable_directory(workdir, '--workdir')
  runner.start(workdir, suite_arg, suite, scale, seeds, common)
  distributed.initialize(tasks[0].config)
  runner.share_compilations(workdir)
  cli.quiet_orbax_info()
  chosen = tasks if flags.FLAGS.task is None else [tasks[flags.FLAGS.task]]
  try:
    runner.run(chosen, suite, scale, total=len(tasks))
  except preemption.Preempted as stopped:
    print(f'{stopped}; run the same command to continue the suite', file=sys.stderr, flush=True)
    sys.exit(preemption.REQUEUE_STATUS)
  if flags.FLAGS.task is None:
    runner.evaluate_ensemble(tasks, suite, workdir)
    _report(workdir, suite, scale, tasks)


def collect_command(workdir: str) -> None:
  record, suite, tasks = _from_workdir(workdir)
  left = runner.missing(tasks)
  if len(left) < len(tasks):
    distributed.initialize(tasks[0].config)
    runner.evaluate_ensemble(tasks, suite, workdir)
  _report(workdir, suite, record['scale'], tasks)
  if left:
    indices = ','.join(str(t.index) for t in left)
    print(
        f'error: {len(left)} of {len(tasks)} runs have not finished (tasks {indices}: ' +
        ', '.join(f'{t.variant} seed {t.seed}' for t in left) + '); train them with --task=K '
        f'or resubmit those array elements (sbatch --array={indices} ...)', file=sys.stderr,
        flush=True)
    sys.exit(1)


def list_command(suite_arg: str | None) -> None:
  if suite_arg is None:
    for name, make in papers.SUITES.items():
      s = make()
      print(f'{name:10s} {s.title} ({len(s.variants)} variants: '
            f'{", ".join(v.name for v in s.variants)})')
    return
  common = suite_lib.parse_assignments(flags.FLAGS.set)
  suite, tasks = _suite_and_tasks(suite_arg, flags.FLAGS.scale, flags.FLAGS.seeds, common,
                                  flags.FLAGS.workdir or 'WORKDIR')
  if flags.FLAGS.count:
    print(len(tasks))
    return
  for t in tasks:
    print(f'{t.index:4d}  {t.variant}  seed {t.seed}  {t.workdir}')


def main(argv):
  args = argv[1:]
  if not args or args[0] not in COMMANDS:
    raise app.UsageError(f'give a command: {", ".join(COMMANDS)} (see --helpshort)')
  command, rest = args[0], args[1:]
  if command == 'list':
    if len(rest) > 1:
      raise app.UsageError('list takes at most one SUITE')
    return list_command(rest[0] if rest else None)
  if len(rest) != 1:
    what = 'SUITE (a built-in suite or a suite file)' if command == 'run' else 'DIR'
    raise app.UsageError(f'{command} takes one {what}')
  if command == 'run':
    return run_command(rest[0])
  if flags.FLAGS.workdir:
    raise app.UsageError(f'{command} takes the suite folder as its argument, not --workdir')
  if command == 'report':
    record, suite, tasks = _from_workdir(rest[0])
    _report(rest[0], suite, record['scale'], tasks)
  else:
    collect_command(rest[0])


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
