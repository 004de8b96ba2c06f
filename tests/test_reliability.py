"""A run is never lost and never reports a wrong number: divergence, damaged checkpoints,
retention across restarts, signals, and the data position across process counts."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import checkpointing, preemption, program, sharding, train
from alexnet_jax.errors import CheckpointError, ConfigError, DivergedError

from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **kw):
  c = tiny_config(data=1, model=2)
  c.dataset.update(name='builtin_shapes', data_dir=str(data_dir), num_train=64, num_val=24,
                   image_size=72)
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=0)
  c.log_every_steps = 2
  c.checkpoint.update(async_save=False, keep_epochs=())
  c.update(kw)
  return c


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def _restore(workdir, c, step=None):
  prog = program.build_program(c, steps_per_epoch=4)
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), c.checkpoint)
  try:
    if step is None:
      return checkpointing.restore_latest(manager, prog.abstract_state)
    return checkpointing.restore(manager, step, prog.abstract_state)
  finally:
    manager.close()


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory):
  """A tiny run trained for two epochs (checkpoints at steps 4 and 8), never modified: tests
  copy it."""
  root = tmp_path_factory.mktemp('reliability')
  c = _config(root / 'data', num_epochs=2)
  workdir = str(root / 'work')
  val = train.train_and_evaluate(c, workdir)
  return c, workdir, val


def _copy(workdir, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(workdir, target)
  return target


# -- 1. divergence ------------------------------------------------------------------------------


def test_non_finite_scores_count_as_errors_in_every_metric(two_epochs):
  c, workdir, _ = two_epochs
  prog = program.build_program(c, steps_per_epoch=4)
  state = _restore(workdir, c).state
  rng = np.random.default_rng(0)
  batch = dict(image=rng.integers(0, 256, (16, 67, 67, 3), dtype=np.uint8),
               label=rng.integers(0, 10, 16).astype(np.int32))
  eval_batch = sharding.put_batch(dict(batch, mask=np.ones(16, np.float32)), prog.mesh)
  good = jax.device_get(prog.eval_step(state.params, state.batch_stats, eval_batch))
  assert good['top1_errors'] < 16  # a trained net gets some right
  nan_params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params)
  bad = jax.device_get(prog.eval_step(nan_params, state.batch_stats, eval_batch))
  assert bad['top1_errors'] == bad['top5_errors'] == bad['count'] == 16
  # Ten views: the averaged softmax of NaN scores is NaN, an error too. (Training's error rates
  # come from the same rank as the single view's.)
  views = np.repeat(batch['image'][:, None], 10, axis=1)
  ten = sharding.put_batch(dict(batch, image=views, mask=np.ones(16, np.float32)), prog.mesh)
  bad = jax.device_get(prog.eval_step(nan_params, state.batch_stats, ten))
  assert bad['top1_errors'] == bad['top5_errors'] == 16


def test_a_diverging_run_stops_and_keeps_its_good_checkpoints(two_epochs, tmp_path):
  c, workdir, _ = two_epochs
  workdir = _copy(workdir, tmp_path)
  before = _restore(workdir, c)
  c = _config(c.dataset.data_dir, num_epochs=4)
  c.optim.learning_rate = 1e6
  with pytest.raises(DivergedError) as e:
    train.train_and_evaluate(c, workdir)
  message = str(e.value)
  assert 'diverged at step' in message and 'checkpoint 8 is intact' in message, message
  assert 'learning_rate' in message
  bad_step = int(message.split('diverged at step ')[1].split(':')[0])
  assert 8 < bad_step <= 16
  assert _steps(workdir) == [4, 8]  # nothing saved after the divergence, nothing deleted
  after = _restore(workdir, c)
  assert after.step == 8
  for x, y in zip(jax.tree.leaves(jax.device_get(before.state)),
                  jax.tree.leaves(jax.device_get(after.state))):
    np.testing.assert_array_equal(x, y)


def test_a_non_finite_state_is_never_saved(two_epochs, tmp_path):
  c, workdir, _ = two_epochs
  state = _restore(workdir, c).state
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'), c.checkpoint)
  bad = state.replace(opt_state=jax.tree.map(lambda x: x * jnp.inf
                                             if x.dtype == jnp.float32 else x, state.opt_state))
  with pytest.raises(checkpointing.NonFiniteState):
    checkpointing.save(manager, 9, bad, dict(epoch=2), metrics={checkpointing.BEST_METRIC: 0.0})
  assert manager.all_steps() == []
  manager.close()


# -- 2. damaged checkpoints ---------------------------------------------------------------------


def _array_files(step_dir):
  files = []
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    files += [os.path.join(root, n) for n in names if '/d/' in os.path.join(root, n) + '/']
  return sorted(files, key=os.path.getsize)


def _flip_bytes(path, count=64, seed=0):
  data = bytearray(open(path, 'rb').read())
  rng = np.random.default_rng(seed)
  middle = len(data) // 2
  for i in rng.choice(np.arange(middle - 4096, middle + 4096), count, replace=False):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def test_a_bit_flipped_checkpoint_is_caught_and_the_run_falls_back(two_epochs, tmp_path):
  c, workdir, _ = two_epochs
  original = _restore(workdir, c)
  workdir = _copy(workdir, tmp_path)
  step8 = os.path.join(workdir, 'checkpoints', '8')
  _flip_bytes(_array_files(step8)[-1])  # the largest array file: the parameters
  # Flipped bits in raw array data pass orbax unnoticed and are caught by the checksums; in a
  # compressed chunk the reader fails first. Either way the checkpoint is reported as damaged.
  with pytest.raises(CheckpointError, match='checkpoints/8: '):
    _restore(workdir, c, step=8)

  c3 = _config(c.dataset.data_dir, num_epochs=3)
  train.train_and_evaluate(c3, workdir)
  # Step 8 was moved aside (not deleted) and trained again from step 4: bit-identical to the
  # original step 8, as an uninterrupted run's.
  assert os.listdir(os.path.join(workdir, 'damaged_checkpoints')) == ['8']
  assert _steps(workdir) == [4, 8, 12]
  again = _restore(workdir, c, step=8)
  for x, y in zip(jax.tree.leaves(jax.device_get(original.state)),
                  jax.tree.leaves(jax.device_get(again.state))):
    np.testing.assert_array_equal(x, y)


def test_a_changed_value_does_not_match_its_checksum(two_epochs):
  """The checksum path itself, deterministically: one value of one array changed after saving."""
  c, workdir, _ = two_epochs
  state = _restore(workdir, c).state
  sd = checkpointing._state_dict(state)  # pylint: disable=protected-access
  sums, _ = checkpointing.fingerprint(sd)
  checkpointing._verify(sd, dict(checksums=sums), 'ok')  # pylint: disable=protected-access
  kernel = sd['params']['fc8']['kernel']
  changed = np.array(jax.device_get(kernel))
  changed.flat[0] += 1e-3
  sd['params']['fc8']['kernel'] = jax.device_put(changed, kernel.sharding)
  with pytest.raises(checkpointing.DamagedCheckpoint, match='fc8.*does not match its checksum'):
    checkpointing._verify(sd, dict(checksums=sums), 'changed')  # pylint: disable=protected-access


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'bad json'])
def test_other_damage_falls_back_too(two_epochs, tmp_path, damage):
  c, workdir, _ = two_epochs
  workdir = _copy(workdir, tmp_path)
  step8 = os.path.join(workdir, 'checkpoints', '8')
  if damage == 'truncate':
    for path in _array_files(step8):
      os.truncate(path, os.path.getsize(path) // 3)
  elif damage == 'delete':
    os.remove(_array_files(step8)[-1])
  else:
    with open(os.path.join(step8, 'meta', 'metadata'), 'w') as f:
      f.write('{"epoch": 2, "ste')
  prog = program.build_program(c, steps_per_epoch=4)
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), c.checkpoint)
  restored = checkpointing.restore_latest(manager, prog.abstract_state)
  assert restored.step == 4 and manager.all_steps() == [4]
  manager.close()
  assert os.listdir(os.path.join(workdir, 'damaged_checkpoints')) == ['8']


def test_when_no_checkpoint_is_intact_nothing_is_moved(two_epochs, tmp_path):
  c, workdir, _ = two_epochs
  workdir = _copy(workdir, tmp_path)
  for step in (4, 8):
    for path in _array_files(os.path.join(workdir, 'checkpoints', str(step))):
      os.truncate(path, os.path.getsize(path) // 3)
  listing = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  with pytest.raises(CheckpointError, match='checkpoints/8: .* the 1 older ones are damaged too'):
    _restore(workdir, c)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == listing
  assert not os.path.exists(os.path.join(workdir, 'damaged_checkpoints'))


# -- 4. retention across restarts ---------------------------------------------------------------


def test_keep_best_is_the_same_with_or_without_restarts(two_epochs, tmp_path):
  """Validation errors 0.3, 0.1 (best), 0.5, 0.6, 0.7 at steps 1-5, keep=2 and the best: one
  manager throughout, or a new one (a restarted process) before every save."""
  c, workdir, _ = two_epochs
  state = _restore(workdir, c).state
  cfg = c.checkpoint
  cfg.keep = 2
  errors = [0.3, 0.1, 0.5, 0.6, 0.7]

  def run(directory, restart):
    manager = checkpointing.make_manager(directory, cfg)
    for step, error in enumerate(errors, 1):
      if restart:
        manager.close()
        manager = checkpointing.make_manager(directory, cfg)
      checkpointing.save(manager, step, state, dict(epoch=step),
                         metrics={checkpointing.BEST_METRIC: error})
    kept = manager.all_steps()
    manager.close()
    return sorted(kept)

  straight = run(str(tmp_path / 'straight'), restart=False)
  assert straight == [2, 4, 5]
  assert run(str(tmp_path / 'restarted'), restart=True) == straight


# -- 8. the data position -----------------------------------------------------------------------


@pytest.mark.parametrize('field, value', [('batch_size', 8), ('seed', 3)])
def test_what_cannot_carry_over_is_refused_truthfully(two_epochs, tmp_path, field, value):
  c, workdir, _ = two_epochs
  workdir = _copy(workdir, tmp_path)
  c = _config(c.dataset.data_dir, num_epochs=3)
  c[field] = value
  with pytest.raises(ConfigError, match=f'trained with {field}=.* cannot be carried over'):
    train.train_and_evaluate(c, workdir)
  assert _steps(workdir) == [4, 8]


# -- 3. signals ---------------------------------------------------------------------------------


def _start_main(data_dir, workdir, *extra):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  args = [
      '--config=configs/demo.py', f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
      '--config.dataset.num_train=64', '--config.dataset.num_val=24',
      '--config.dataset.image_size=72', '--config.model.image_size=67',
      '--config.model.width=0.0625', '--config.batch_size=16', '--config.eval_batch_size=16',
      '--config.num_epochs=200', '--config.input.workers=1', '--config.log_every_steps=1', *extra
  ]
  return subprocess.Popen([sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO, env=env,
                          stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _wait_for_training(proc, steps=3, timeout=240):
  """Reads stderr until the log shows ``steps`` training steps; returns what was read."""
  seen = []
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
      break
    seen.append(line)
    if f'step {steps}/' in line:
      return seen
  proc.kill()
  raise AssertionError('training did not start:\n' + ''.join(seen[-30:]))


def _descendants(pid):
  out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True)
  children = [int(p) for p in out.stdout.split()]
  return children + [d for c in children for d in _descendants(c)]


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_saves_at_the_next_step_and_exits_for_requeue(two_epochs, tmp_path, sig):
  c, _, _ = two_epochs
  workdir = str(tmp_path / 'work')
  proc = _start_main(c.dataset.data_dir, workdir)
  _wait_for_training(proc)
  workers = _descendants(proc.pid)
  assert workers, 'expected an input worker process'
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == preemption.REQUEUE_STATUS, err[-3000:]
  assert 'Traceback' not in err
  line = [l for l in err.splitlines() if 'checkpoint saved at step' in l]
  assert len(line) == 1, err[-3000:]
  step = int(line[0].split('checkpoint saved at step ')[1].split(';')[0])
  assert step >= 3 and _steps(workdir)[-1] == step
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]
  time.sleep(2)  # a worker notices its parent is gone within a second
  assert not [w for w in workers if _alive(w)]
  if sig != signal.SIGTERM:
    return
  # The same command resumes from that step.
  resumed = _start_main(c.dataset.data_dir, workdir)
  seen = _wait_for_training(resumed, steps=step + 1)
  resumed.kill()
  resumed.communicate()
  assert any(f'restored checkpoint at step {step}' in l for l in seen), ''.join(seen[-20:])


_SECOND_SIGNAL = """
import multiprocessing, os, signal, sys, time
from alexnet_jax import preemption

if __name__ == '__main__':
  worker = multiprocessing.Process(target=time.sleep, args=(60,))
  worker.start()
  print(worker.pid, flush=True)
  with preemption.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    assert stop.requested(0) and stop.signal_name == 'SIGTERM'
    stop.saving()  # what the loop does once it starts writing the checkpoint
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
  print('not aborted', flush=True)
"""


def test_a_second_signal_aborts_at_once(tmp_path):
  script = tmp_path / 'second_signal.py'
  script.write_text(_SECOND_SIGNAL)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  start = time.time()
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
  assert time.time() - start < 25 and 'not aborted' not in proc.stdout
  assert 'SIGTERM received: saving a checkpoint' in proc.stderr
  assert 'SIGINT received again: aborting without a checkpoint' in proc.stderr
  worker = int(proc.stdout.split()[0])
  time.sleep(1)
  assert not _alive(worker)


# -- 5. a full disk -----------------------------------------------------------------------------

_FULL_DISK = """
mkdir -p "$ROOT" && mount -t tmpfs -o size=1M tmpfs "$ROOT" &&
head -c 700000 /dev/zero > "$ROOT/filler" && exec "$@"
"""


def _small_disk_root(tmp_path) -> str:
  """Where ``_FULL_DISK`` mounts its tmpfs; skips where this machine cannot mount one."""
  root = str(tmp_path / 'small_disk')
  probe = subprocess.run([
      'unshare', '-rm', 'sh', '-c', f'mkdir -p {root} && mount -t tmpfs '
      f'-o size=1M tmpfs {root}'
  ], capture_output=True)
  if probe.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {probe.stderr.decode().strip()}')
  return root


_METRICS_ON_A_FULL_DISK = """
import os, sys
from alexnet_jax import metrics
from alexnet_jax.errors import DirectoryError
run = os.path.join(os.environ['ROOT'], 'run')
writer = metrics.MetricWriter(run)
written = 0
try:
  while True:
    writer.write(written, 'train', dict(epoch=written / 7, loss=2.0 + written, top1_error=0.5))
    written += 1
except DirectoryError as e:
  print('refused:', e)
writer.close()
rows = metrics.read_jsonl(os.path.join(run, 'metrics.jsonl'))  # every line whole
print('rows', len(rows), 'written', written, 'last', rows[-1]['step'])
"""


def test_metrics_on_a_full_disk_end_in_one_line_and_keep_whole_lines(tmp_path):
  """The writer fills the same real tmpfs to the last byte: the write the disk refuses is one
  ``DirectoryError``, the lines before it stay whole and the writer closes cleanly."""
  root = _small_disk_root(tmp_path)
  env = dict(os.environ, JAX_PLATFORMS='cpu', ROOT=root)
  proc = subprocess.run([
      'unshare', '-rm', 'sh', '-c', _FULL_DISK, 'sh', sys.executable, '-c', _METRICS_ON_A_FULL_DISK
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  refused, counts = proc.stdout.splitlines()
  assert refused.startswith('refused: cannot write the metrics in ') and refused.endswith(
      'No space left on device — free space (or fix the storage) and rerun the same command: it '
      'resumes from the newest checkpoint'), refused
  _, rows, _, written, _, last = counts.split()
  # The refused line is the jsonl's (nothing of it kept) or the events' (the line is kept).
  assert int(rows) in (int(written), int(written) + 1) and int(last) == int(rows) - 1, counts
  assert int(rows) > 100  # the disk had room for many lines before it filled
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


def test_a_full_disk_ends_in_one_line(two_epochs, tmp_path):
  """A real full disk: a 1 MiB tmpfs, mounted in a private mount namespace (``unshare``, as an
  unprivileged user too where user namespaces are allowed), nearly filled before the run starts."""
  c, _, _ = two_epochs
  root = _small_disk_root(tmp_path)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             ROOT=root)
  args = [
      '--config=configs/demo.py', f'--workdir={root}/work',
      f'--config.dataset.data_dir={c.dataset.data_dir}', '--config.dataset.num_train=64',
      '--config.dataset.num_val=24', '--config.dataset.image_size=72',
      '--config.model.image_size=67', '--config.model.width=0.0625', '--config.batch_size=16',
      '--config.eval_batch_size=16', '--config.num_epochs=2', '--config.input.workers=0'
  ]
  proc = subprocess.run([
      'unshare', '-rm', 'sh', '-c', _FULL_DISK, 'sh', sys.executable, '-m', 'alexnet_jax.main',
      *args
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'No space left on device' in errors[0], proc.stderr[-3000:]
  assert 'no checkpoint has been written yet' in errors[0]
  assert 'Traceback' not in proc.stderr and 'Exception ignored' not in proc.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sigterm_to_one_process_stops_all_at_the_same_step(two_epochs, tmp_path):
  """Two real processes on loopback (a 2 x 2 mesh over their 2 + 2 emulated devices): SIGTERM to
  process 0 alone, and both save the same step (JAX's preemption service agrees on it) and exit
  75."""
  c, _, _ = two_epochs
  workdir = str(tmp_path / 'work')
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i))
    env.pop('XLA_FLAGS', None)  # the demo config emulates 2 devices per process
    procs.append(
        subprocess.Popen([
            sys.executable, '-m', 'alexnet_jax.main', '--config=configs/demo.py',
            f'--workdir={workdir}', '--config.mesh.data=2',
            f'--config.dataset.data_dir={c.dataset.data_dir}', '--config.dataset.num_train=64',
            '--config.dataset.num_val=24', '--config.dataset.image_size=72',
            '--config.model.image_size=67', '--config.model.width=0.0625', '--config.batch_size=16',
            '--config.eval_batch_size=16', '--config.num_epochs=200', '--config.input.workers=0',
            '--config.log_every_steps=1'
        ], cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
  try:
    _wait_for_training(procs[0])
    procs[0].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  saved = []
  for p, err in zip(procs, errs):
    assert p.returncode == preemption.REQUEUE_STATUS, err[-3000:]
    (line,) = [l for l in err.splitlines() if 'checkpoint saved at step' in l]
    saved.append(int(line.split('checkpoint saved at step ')[1].split(';')[0]))
  assert saved[0] == saved[1] >= 3 and _steps(workdir)[-1] == saved[0]
