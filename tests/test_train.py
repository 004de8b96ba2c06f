"""Training end to end on the built-in data: learning, resumption, the CLI and its errors."""

import hashlib
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from alexnet_jax import checkpointing, program, sharding, train

from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_config(data_dir, **mesh):
  c = tiny_config(**mesh)
  c.dataset.update(name='builtin_shapes', data_dir=str(data_dir), num_train=64, num_val=24,
                   image_size=72)
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=0)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.log_every_steps = 2
  c.checkpoint.async_save = False
  return c


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
  c = tiny_config(data=2, model=2)
  c.model.update(dropout=0.0, width=0.125, init='he')
  c.optim.learning_rate = 0.01
  prog = program.build_program(c, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = sharding.put_batch(
      dict(image=rng.integers(0, 256, (16, 67, 67, 3), dtype=np.uint8),
           label=rng.integers(0, 10, 16).astype(np.int32)), prog.mesh)
  state = prog.init_state()
  losses = []
  for _ in range(30):
    state, m = prog.train_step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0] and losses[-1] < np.log(10), losses


def _restore(workdir, prog):
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), prog.config.checkpoint)
  return checkpointing.restore_latest(manager, prog.abstract_state)


def test_save_and_resume_is_bit_identical(tmp_path):
  """2 epochs straight == 1 epoch, stop, resume for the 2nd (same batches, same dropout)."""
  c = _data_config(tmp_path / 'data', data=1, model=2)
  c.num_epochs = 2
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(c, straight)
  resumed = str(tmp_path / 'resumed')
  c.num_epochs = 1
  train.train_and_evaluate(c, resumed)
  c.num_epochs = 2
  train.train_and_evaluate(c, resumed)

  prog = program.build_program(c, steps_per_epoch=4)
  a, b = _restore(straight, prog), _restore(resumed, prog)
  assert a.step == b.step == 8
  for x, y in zip(jax.tree.leaves(jax.device_get(a.state)),
                  jax.tree.leaves(jax.device_get(b.state))):
    np.testing.assert_array_equal(x, y)
  assert a.meta['val'] == b.meta['val']


def test_batch_norm_model_trains_resumes_on_another_mesh_and_evaluates(tmp_path):
  """A zoo model through the whole training program: ResNet's batch statistics move in training,
  are checkpointed, survive a resume on a different data-parallel mesh, and serve evaluation."""
  c = _data_config(tmp_path / 'data', data=2, model=1)
  c.model = ml_collections.ConfigDict(
      dict(name='resnet', depth=18, num_classes=10, image_size=32, width=0.0625))
  c.num_epochs = 1
  workdir = str(tmp_path / 'work')
  first = train.train_and_evaluate(c, workdir)
  prog = program.build_program(c, steps_per_epoch=4)
  fresh = jax.device_get(prog.init_state().batch_stats)
  after_one = jax.device_get(_restore(workdir, prog).state.batch_stats)
  assert jax.tree.structure(after_one) == jax.tree.structure(fresh)
  assert all(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_one), jax.tree.leaves(fresh)))
  c.mesh.data, c.num_epochs = 1, 2
  second = train.train_and_evaluate(c, workdir)
  restored = _restore(workdir, program.build_program(c, steps_per_epoch=4))
  assert restored.step == 8 and np.isfinite(first['loss']) and np.isfinite(second['loss'])
  assert all(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(jax.device_get(restored.state.batch_stats)), jax.tree.leaves(after_one)))


def _run_main(args, env_extra=None, timeout=300):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  env.update(env_extra or {})
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _tiny_args(data_dir, workdir):
  return [
      '--config=configs/demo.py', f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
      '--config.dataset.num_train=64', '--config.dataset.num_val=24',
      '--config.dataset.image_size=72', '--config.model.image_size=67',
      '--config.model.width=0.0625', '--config.batch_size=16', '--config.eval_batch_size=16',
      '--config.num_epochs=2', '--config.input.workers=0', '--config.log_every_steps=2'
  ]


def _digest(directory):
  h = {}
  for root, _, files in os.walk(directory):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        h[os.path.relpath(os.path.join(root, f), directory)] = hashlib.sha256(fh.read()).hexdigest()
  return h


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('main')
  data, workdir = root / 'data', root / 'work'
  proc = _run_main(_tiny_args(data, workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return data, workdir, proc


def test_main_end_to_end(trained_workdir):
  _, workdir, proc = trained_workdir
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith('final validation: top-1 error') and 'top-5 error' in last
  assert (workdir / 'training_curves.png').stat().st_size > 10_000
  assert os.listdir(workdir / 'tensorboard')
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert any('"split": "val"' in l for l in lines) and any('images_per_second' in l for l in lines)
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())[-1] == 8
  assert 'img/s' in proc.stderr and 'ETA' in proc.stderr


@pytest.mark.parametrize('overrides, message', [
    (['--config.model.name=alexnett'], 'unknown model'),
    (['--config.dataset.name=no_such_set'], 'no_such_set'),
    (['--config.mesh.data=4', '--config.batch_size=18'], 'not divisible by the mesh data axis'),
    (['--config.mesh.data=9'], 'devices but only'),
])
def test_bad_input_is_one_clear_line(tmp_path, trained_workdir, overrides, message):
  data, workdir, _ = trained_workdir
  before = _digest(workdir)
  proc = _run_main(_tiny_args(data, workdir) + overrides)
  assert proc.returncode != 0
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert _digest(workdir) == before


def test_unreadable_checkpoint_is_reported_and_left_alone(tmp_path, trained_workdir):
  data, workdir, _ = trained_workdir
  broken = tmp_path / 'broken'
  subprocess.run(['cp', '-r', str(workdir), str(broken)], check=True)
  # Every checkpoint damaged (with an intact one the run falls back to it: test_reliability.py).
  for step in ('4', '8'):
    for root, _, files in os.walk(broken / 'checkpoints' / step / 'state'):
      for f in files:
        path = os.path.join(root, f)
        with open(path, 'r+b') as fh:
          fh.truncate(max(0, os.path.getsize(path) // 3))
  before = _digest(broken)
  proc = _run_main(_tiny_args(data, broken) + ['--config.num_epochs=3'])
  assert proc.returncode != 0
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(
      error_lines) == 1 and 'cannot restore the checkpoint' in error_lines[0], proc.stderr[-3000:]
  assert _digest(broken) == before


def test_bfloat16_compute_trains_with_float32_parameters():
  c = tiny_config(data=2, model=2)
  c.compute_dtype = 'bfloat16'
  c.model.init = 'he'
  prog = program.build_program(c, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = sharding.put_batch(
      dict(image=rng.integers(0, 256, (16, 67, 67, 3), dtype=np.uint8),
           label=rng.integers(0, 10, 16).astype(np.int32)), prog.mesh)
  state, metrics = prog.train_step(prog.init_state(), batch)
  assert np.isfinite(float(metrics['loss']))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
