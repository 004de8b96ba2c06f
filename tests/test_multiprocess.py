"""The local rehearsal of a multi-host run: ``launch/local_multiprocess.sh`` with real processes on
loopback, each with its own emulated CPU devices."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alexnet_jax import host

from helpers import XLA_FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'launch', 'local_multiprocess.sh')
TINY = [
    '--config.dataset.num_train=64', '--config.dataset.num_val=24',
    '--config.dataset.image_size=72', '--config.model.image_size=67', '--config.model.width=0.0625',
    '--config.batch_size=16', '--config.eval_batch_size=16', '--config.input.workers=0',
    '--config.log_every_steps=1'
]


def _env(data_dir):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PORT')}
  # The demo config emulates 2 devices per process; PYTHON: the interpreter running the tests.
  return dict(env, TFDS_DATA_DIR=str(data_dir), PYTHON=sys.executable, XLA_FLAGS=XLA_FAST_COMPILE,
              GLIBC_TUNABLES=host.HUGE_PAGES_TUNABLE)


def _launch(tmp_path, workdir, *args, processes=2, **kw):
  return subprocess.run(
      ['bash', SCRIPT,
       str(processes), 'configs/demo.py',
       str(workdir), *TINY, *args], cwd=REPO, env=_env(tmp_path / 'data'), capture_output=True,
      text=True, timeout=400, **kw)


def _one_process(tmp_path, workdir, *args):
  """The same global config in one process without jax.distributed: the reference."""
  env = dict(_env(tmp_path / 'data'), JAX_PLATFORMS='cpu')
  return subprocess.run([
      sys.executable, '-m', 'alexnet_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
      *TINY, *args
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope='module')
def rehearsal(tmp_path_factory):
  """The README's rehearsal at tiny sizes, one epoch: 2 processes of 2 devices, a 2x2 mesh (the
  data axis across the processes, the towers within each). Tests copy its workdir."""
  root = tmp_path_factory.mktemp('rehearsal')
  proc = _launch(root, root / 'work', '--config.num_epochs=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root, proc


def test_the_rehearsal_trains_and_resumes_on_every_process(rehearsal, tmp_path):
  """Resumed from the first epoch's checkpoint, stopped by SIGTERM to the script mid-epoch (every
  process saves the same step and the script exits 75), and resumed again to the end."""
  root, first = rehearsal
  assert 'mesh 2x2 (data x model) over 4 devices' in first.stderr
  for p in range(2):
    assert f'process {p} of 2: 2 local cpu device(s)' in first.stderr
  workdir = tmp_path / 'work'
  shutil.copytree(root / 'work', workdir)
  stopped = subprocess.Popen(
      ['bash', SCRIPT, '2', 'configs/demo.py',
       str(workdir), *TINY, '--config.num_epochs=100'], cwd=REPO, env=_env(root / 'data'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    seen = []
    while sum('step 6/' in l for l in seen) < 2:  # both processes are past the checkpoint
      line = stopped.stderr.readline()
      if not line:
        pytest.fail('the resumed run ended early:\n' + ''.join(seen[-30:]))
      seen.append(line)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
  finally:
    _kill_if_running(stopped)
  err = ''.join(seen) + err
  assert stopped.returncode == 75, err[-3000:]
  assert err.count('restored checkpoint at step 4') == 2
  saved = re.findall(r'stopped by SIGTERM: checkpoint saved at step (\d+)', err)
  assert len(saved) == 2 and saved[0] == saved[1] and int(saved[0]) >= 6, err[-3000:]
  epochs = int(saved[0]) // 4 + 1
  last = _launch(root, workdir, f'--config.num_epochs={epochs}')
  assert last.returncode == 0, last.stderr[-3000:]
  finals = [l for l in last.stdout.splitlines() if l.startswith('final validation')]
  assert len(finals) == 2 and finals[0] == finals[1]  # both processes, one result
  assert last.stderr.count(f'restored checkpoint at step {saved[0]}') == 2
  assert 4 * epochs in [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]


def _history(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  return [{k: v for k, v in r.items() if k != 'images_per_second'} for r in rows]


def _state(workdir, step):
  """A checkpoint's state as numpy arrays, read with orbax alone (no mesh, no config)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _assert_same_run(multi, single):
  """Same batches (the loss and errors of every step, the validation's example count) and the
  same parameters and momentum; a relative 1e-6 leaves room for another reduction order."""
  a, b = _history(multi), _history(single)
  assert [r['step'] for r in a] == [r['step'] for r in b] and len(a) == 5
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if isinstance(x[k], str):
        assert x[k] == y[k]
      else:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-6, err_msg=f'step {x["step"]} {k}')
  assert a[-1]['split'] == 'val' and a[-1]['examples'] == 24  # every example, counted once
  ours, theirs = _state(multi, 4), _state(single, 4)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_the_data_axis_across_processes_computes_what_one_process_computes(rehearsal, tmp_path):
  root, _ = rehearsal
  single = _one_process(root, tmp_path / 'one', '--config.num_epochs=1',
                        '--config.emulate_cpu_devices=4', '--config.mesh.data=2')
  assert single.returncode == 0, single.stderr[-3000:]
  _assert_same_run(root / 'work', tmp_path / 'one')


def test_the_towers_across_processes_compute_what_one_process_computes(tmp_path):
  """One device per process, the 1x2 mesh: each tower on another host, both fed the same rows."""
  multi = _launch(tmp_path, tmp_path / 'two', '--config.num_epochs=1',
                  '--config.emulate_cpu_devices=1', '--config.mesh.data=1')
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert multi.stderr.count('mesh 1x2 (data x model) over 2 devices') == 2
  single = _one_process(tmp_path, tmp_path / 'one', '--config.num_epochs=1')
  assert single.returncode == 0, single.stderr[-3000:]
  _assert_same_run(tmp_path / 'two', tmp_path / 'one')


def test_a_mesh_leaving_out_a_process_is_refused_on_every_process(tmp_path):
  proc = _launch(tmp_path, tmp_path / 'work', '--config.mesh.data=1', '--config.num_epochs=1')
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 2 and all('none of process 1' in e for e in errors), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr


def _kill_if_running(launch):
  """A launch a test leaves running (it failed midway) ends with its training processes."""
  if launch.poll() is None:
    for pid in _training_processes(launch.pid):
      os.kill(pid, signal.SIGKILL)
    launch.kill()


def _training_processes(pid):
  """The ``alexnet_jax.main`` processes among ``pid``'s descendants."""
  out = subprocess.run(['ps', '-eo', 'pid=,ppid=,args='], capture_output=True, text=True).stdout
  rows = [l.split(None, 2) for l in out.splitlines() if l.strip()]
  children = {}
  for child, parent, args in rows:
    children.setdefault(int(parent), []).append((int(child), args))
  found, todo = [], [pid]
  while todo:
    for child, args in children.get(todo.pop(), []):
      todo.append(child)
      if 'alexnet_jax.main' in args:
        found.append(child)
  return found


def test_a_process_that_dies_ends_the_others(tmp_path):
  proc = subprocess.Popen([
      'bash', SCRIPT, '2', 'configs/demo.py',
      str(tmp_path / 'work'), *TINY, '--config.num_epochs=500'
  ], cwd=REPO, env=_env(tmp_path / 'data'), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  try:
    seen = []
    while not any('step 2/' in l for l in seen):
      line = proc.stderr.readline()
      if not line:
        pytest.fail('the run did not start:\n' + ''.join(seen[-30:]))
      seen.append(line)
    workers = _training_processes(proc.pid)
    assert len(workers) == 2, subprocess.run(['ps', '-eo', 'pid,ppid,args'], capture_output=True,
                                             text=True).stdout[-3000:]
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    _, err = proc.communicate(timeout=60)
  finally:
    _kill_if_running(proc)
  assert proc.returncode == 128 + signal.SIGKILL and time.time() - start < 30, err[-3000:]
  assert f'process {workers[1]} exited with status {128 + signal.SIGKILL}' in err
  time.sleep(11)  # the survivor gets SIGTERM, then SIGKILL 10 s later
  assert all(not os.path.exists(f'/proc/{w}') or open(f'/proc/{w}/stat').read().split()[2] == 'Z'
             for w in workers)
