"""Bad input at every entry point: one ``error:`` line and status 2, never a traceback, and nothing
already on disk changed. A table of cases, each run as the real command in its own process; the
processes run side by side (each spends seconds importing jax), then each case is checked."""

import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest

from alexnet_jax import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command of each entry point, before the case's arguments; {out} is the directory the
# command would write (a fresh path, unless the case names one).
ENTRY_POINTS = {
    'main': ['alexnet_jax.main', '--workdir={out}'],
    'summary': ['alexnet_jax.tools.summary'],
    'comm_map': ['alexnet_jax.tools.comm_map'],
    'bench': ['alexnet_jax.tools.bench'],
    'bench_input': ['alexnet_jax.tools.bench_input', '--overlap'],
    'visualize': ['alexnet_jax.visualize', 'filters', '--checkpoint={tmp}/no_run', '--out={out}'],
}

BROKEN_CONFIG = ('from alexnet_jax.configs import base_config\n'
                 'def get_config():\n'
                 '  c = base_config(\n'
                 '  return c\n')
BUGGY_CONFIG = ('def get_config():\n'
                "  raise ValueError('a bug in the config code')\n")
REFUSED_MODEL_CONFIG = ('from alexnet_jax.configs import base_config, model_config\n'
                        'def get_config():\n'
                        '  c = base_config()\n'
                        "  c.model = model_config('vgg', towers=2)\n"
                        '  return c\n')


@dataclasses.dataclass(frozen=True)
class Case:
  entry: str
  name: str
  args: tuple
  message: str | tuple  # in the error line (each part of a tuple)
  out: str = ''  # where the command would write ({tmp}/...); default a fresh path
  read_only: bool = False  # run where permission bits bind (root: without CAP_DAC_OVERRIDE)

  @property
  def id(self):
    return f'{self.entry}-{self.name}'


# Every entry point that trains or compiles: the config file and its overrides. (bench_input reads
# --config only with --overlap, through the same cli.run: two cases below.)
CONFIG_CASES = [
    ('config_file_missing', ('--config={tmp}/no_such_config.py',), 'cannot read the config file'),
    ('config_file_syntax_error', ('--config={tmp}/written/broken.py',),
     ('broken.py: the config file does not compile: ', '(line 3')),
    ('unknown_field', ('--config=configs/demo.py', '--config.nope=1'),
     "config has no field 'nope'"),
    ('overrides_without_config', ('--config.dataset.data_dir=/data',), '--config is required'),
]
DEMO = '--config=configs/demo.py'
CASES = [Case(e, *case) for e in ENTRY_POINTS if e != 'bench_input' for case in CONFIG_CASES] + [
    Case('main', 'workdir_is_a_file', (DEMO,), 'is not a directory', out='{tmp}/written/file.txt'),
    Case('main', 'workdir_under_a_file', (DEMO,), 'lies under', out='{tmp}/written/file.txt/run'),
    Case('main', 'workdir_read_only',
         (DEMO,), 'not writable', out='{tmp}/written/read_only', read_only=True),
    Case('main', 'num_epochs_negative',
         (DEMO, '--config.num_epochs=-1'), 'config.num_epochs=-1 is out of range: must be >= 1'),
    Case('visualize', 'out_is_a_file', (DEMO,), 'is not a directory', out='{tmp}/written/file.txt'),
    Case('summary', 'config_file_raises_config_error',
         ('--config={tmp}/written/vgg_towers.py',), "model 'vgg' has no field 'towers'"),
    Case('summary', 'config_file_without_get_config',
         ('--config={tmp}/written/no_get_config.py',), 'defines no get_config()'),
    Case('summary', 'override_of_the_wrong_type',
         (DEMO, '--config.batch_size=many'), 'flag --config.batch_size=many'),
    Case('bench', 'no_timed_steps', (DEMO, '--steps=0'), 'flag --steps=0'),
    Case('bench_input', 'no_timed_batches', (DEMO, '--batches=0'), 'flag --batches=0'),
    Case('bench_input', 'unknown_field', (DEMO, '--config.nope=1'), "config has no field 'nope'"),
]

# Not bad input: a config file (or our code under it) that fails is a bug and keeps its traceback.
BUG_CASES = [
    Case('summary', 'config_file_raises_a_bug', ('--config={tmp}/written/buggy.py',),
         'ValueError: a bug in the config code'),
]


def _digest(root):
  h = hashlib.sha256()
  for directory, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    h.update(f'{directory} {os.stat(directory).st_mode}'.encode())
    for name in sorted(files):
      with open(os.path.join(directory, name), 'rb') as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


def _unprivileged(read_only_dir):
  """A command prefix under which ``read_only_dir`` cannot be written, or None: root writes
  anywhere unless it gives up CAP_DAC_OVERRIDE (``setpriv``, util-linux)."""
  if not os.access(read_only_dir, os.W_OK):
    return []
  if shutil.which('setpriv') is None:
    return None
  prefix = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--inh-caps=-all']
  probe = subprocess.run([*prefix, 'test', '-w', str(read_only_dir)], capture_output=True)
  return prefix if probe.returncode == 1 else None


def _run(case, tmp, unprivileged):
  out = (case.out or f'{{tmp}}/out/{case.id}').format(tmp=tmp)
  module, *head = ENTRY_POINTS[case.entry]
  args = [a.format(tmp=tmp, out=out) for a in (*head, *case.args)]
  prefix = unprivileged if case.read_only else []
  # The environment the entry points' restart for huge pages would give: no restart per case.
  env = dict(host.environ_with_huge_pages(os.environ), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([*prefix, sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  return proc, out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every case's process and its output directory, and whether what was on disk before is
  unchanged after them all."""
  tmp = tmp_path_factory.mktemp('entry_points')
  written = tmp / 'written'
  written.mkdir()
  (written / 'file.txt').write_text('a file the user keeps\n')
  (written / 'broken.py').write_text(BROKEN_CONFIG)
  (written / 'vgg_towers.py').write_text(REFUSED_MODEL_CONFIG)
  (written / 'buggy.py').write_text(BUGGY_CONFIG)
  (written / 'no_get_config.py').write_text('from alexnet_jax.configs import base_config\n')
  read_only = written / 'read_only'
  read_only.mkdir()
  (read_only / 'kept.txt').write_text('kept\n')
  read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
  unprivileged = _unprivileged(read_only)
  before = _digest(written)
  cases = [c for c in CASES + BUG_CASES if not (c.read_only and unprivileged is None)]
  try:
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
      results = pool.map(lambda c: _run(c, tmp, unprivileged), cases)
      results = dict(zip((c.id for c in cases), results))
    yield dict(results=results, unchanged=_digest(written) == before)
  finally:
    read_only.chmod(stat.S_IRWXU)


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_bad_input_is_one_error_line_and_status_2(runs, case):
  if case.id not in runs['results']:
    pytest.skip('root, and no setpriv to give up writing into read-only directories')
  proc, out = runs['results'][case.id]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  for part in (case.message,) if isinstance(case.message, str) else case.message:
    assert part in errors[0], errors[0]
  if not case.out:
    assert not os.path.exists(out), f'{out} was created'


@pytest.mark.parametrize('case', BUG_CASES, ids=lambda c: c.id)
def test_a_bug_keeps_its_traceback(runs, case):
  proc, _ = runs['results'][case.id]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' in proc.stderr and case.message in proc.stderr, proc.stderr[-3000:]
  assert not any(line.startswith('error: ') for line in proc.stderr.splitlines())


def test_what_was_written_before_is_unchanged(runs):
  assert runs['unchanged']
