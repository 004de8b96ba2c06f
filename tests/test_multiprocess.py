"""The local rehearsal of a multi-host run: ``launch/local_multiprocess.sh`` with real processes on
loopback, each with its own emulated CPU devices."""

import os
import signal
import subprocess
import sys
import time

import pytest

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
  return dict(env, TFDS_DATA_DIR=str(data_dir), PYTHON=sys.executable)


def _launch(tmp_path, workdir, *args, **kw):
  return subprocess.run(['bash', SCRIPT, '2', 'configs/demo.py',
                         str(workdir), *TINY, *args], cwd=REPO, env=_env(tmp_path / 'data'),
                        capture_output=True, text=True, timeout=400, **kw)


def test_the_rehearsal_trains_and_resumes_on_every_process(tmp_path):
  workdir = tmp_path / 'work'
  first = _launch(tmp_path, workdir, '--config.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  second = _launch(tmp_path, workdir, '--config.num_epochs=2')
  assert second.returncode == 0, second.stderr[-3000:]
  finals = [l for l in second.stdout.splitlines() if l.startswith('final validation')]
  assert len(finals) == 2 and finals[0] == finals[1]  # both processes, one result
  assert second.stderr.count('restored checkpoint at step 4') == 2
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()) == [4, 8]


def test_a_mesh_leaving_out_a_process_is_refused_on_every_process(tmp_path):
  proc = _launch(tmp_path, tmp_path / 'work', '--config.mesh.data=1', '--config.num_epochs=1')
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 2 and all('none of process 1' in e for e in errors), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr


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
    if proc.poll() is None:
      for pid in _training_processes(proc.pid):
        os.kill(pid, signal.SIGKILL)
      proc.kill()
  assert proc.returncode == 128 + signal.SIGKILL and time.time() - start < 30, err[-3000:]
  assert f'process {workers[1]} exited with status {128 + signal.SIGKILL}' in err
  time.sleep(11)  # the survivor gets SIGTERM, then SIGKILL 10 s later
  assert all(not os.path.exists(f'/proc/{w}') or open(f'/proc/{w}/stat').read().split()[2] == 'Z'
             for w in workers)
