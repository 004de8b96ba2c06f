"""Fine-tuning is training from another run's weights (``config.init``): the copy, the classifier,
frozen layers, the refusals of a source that does not fit, and the command line."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from alexnet_jax import checkpointing, configs, host, optim, program, train, trained, warm_start
from alexnet_jax.errors import CheckpointError, ConfigError
from alexnet_jax.steps import TrainState

from helpers import XLA_FAST_COMPILE, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **mesh):
  """The tiny two-tower AlexNet on a small built-in set, one epoch of 4 steps."""
  c = tiny_config(**mesh)
  c.dataset.update(name='builtin_shapes', data_dir=str(data_dir), num_train=64, num_val=24,
                   image_size=72)
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=0)
  c.num_epochs = 1
  c.log_every_steps = 2
  c.checkpoint.update(async_save=False, keep=1, keep_best=False, keep_epochs=(1,))
  return c


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """One trained source run: its data directory, workdir and parameters (on the host)."""
  root = tmp_path_factory.mktemp('finetune')
  config = _config(root / 'data')
  workdir = str(root / 'source')
  train.train_and_evaluate(config, workdir)
  net = trained.load(trained.config_for(workdir), workdir)
  return root / 'data', workdir, jax.device_get(net.params)


def _fine_tune_config(source, **mesh):
  data, workdir, _ = source
  c = _config(data, **mesh)
  c.init.checkpoint = workdir
  return c


def _fresh(prog, seed=1):
  """A new run's state on ``prog``'s shardings, with random values that no checkpoint holds (and
  without compiling the program's initialisation: what warm_start keeps of it is compared)."""
  rng = np.random.default_rng(seed)
  a = prog.abstract_state
  draw = lambda tree: jax.tree.map(lambda x: rng.normal(0, 1, x.shape).astype(x.dtype), tree)
  params = draw(a.params)
  state = TrainState(step=np.zeros((), np.int32), params=params, opt_state=prog.tx.init(params),
                     rng=np.zeros(a.rng.shape, a.rng.dtype), batch_stats=draw(a.batch_stats))
  return jax.device_put(state, prog.state_shardings)


def _flat(tree):
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  }


def _warm(config, fresh_seed=1):
  prog = program.build_program(config, steps_per_epoch=4)
  fresh = _fresh(prog, fresh_seed)
  fresh_host = jax.device_get(fresh)
  state, summary = warm_start.warm_start(config, prog, fresh)
  return prog, fresh_host, state, summary


def test_the_classifier_choices_are_those_warm_start_knows():
  assert configs.CHOICES['init.classifier'] == warm_start.CLASSIFIER_MODES


def test_freezing_maps_layers_onto_every_models_parameters():
  tiny = dict(width=0.0625, num_classes=10)
  cases = [
      (configs.model_config('alexnet',
                            **tiny), 'conv5', {'conv1', 'conv2', 'conv3', 'conv4', 'conv5'}),
      (configs.model_config('vgg', variant='A', batch_norm=True, image_size=32,
                            **tiny), 'conv2_1', {'conv1_1', 'conv1_1_bn', 'conv2_1', 'conv2_1_bn'}),
      (configs.model_config('resnet', depth=18, image_size=32,
                            **tiny), 'conv2_1', {'conv1', 'conv1_bn', 'conv2_1'}),
      (configs.model_config('googlenet', image_size=96,
                            **tiny), 'conv2', {'conv1', 'conv2_reduce', 'conv2'}),
  ]
  for model_cfg, through, expected in cases:
    layers, names = optim.frozen_layers(model_cfg, through)
    assert names == expected and layers[-1] == through, (model_cfg.name, names)
  googlenet = cases[-1][0]
  _, names = optim.frozen_layers(googlenet, 'inception5b')
  assert {'aux1', 'aux2', 'fc'}.isdisjoint(names) and 'inception5b' in names
  assert optim.frozen_layers(googlenet, None) == ((), frozenset())
  assert optim.frozen_layers(googlenet, '') == ((), frozenset())
  with pytest.raises(ConfigError) as raised:
    optim.frozen_layers(cases[0][0], 'conv9')
  assert "freeze_through='conv9' is not a layer of alexnet; its layers, in order: conv1, conv2, " \
      'conv3, conv4, conv5, fc6, fc7, fc8' in str(raised.value)
  with pytest.raises(ConfigError, match='leaving nothing to train'):
    optim.frozen_layers(cases[2][0], 'fc')


def test_the_classifier_is_the_last_layer_and_every_tensor_of_the_class_count():
  tiny = dict(width=0.0625, num_classes=10)
  assert warm_start.classifier_tensors(configs.model_config('alexnet',
                                                            **tiny)) == {'fc8.bias', 'fc8.kernel'}
  assert warm_start.classifier_tensors(configs.model_config('resnet', image_size=32,
                                                            **tiny)) == {'fc.bias', 'fc.kernel'}
  heads = {f'{m}.{t}' for m in ('fc', 'aux1.fc2', 'aux2.fc2') for t in ('bias', 'kernel')}
  assert warm_start.classifier_tensors(configs.model_config('googlenet', image_size=96,
                                                            **tiny)) == heads


def test_frozen_parameters_get_no_update_no_decay_no_momentum():
  c = configs.base_config().optim
  c.update(weight_decay=0.5, filter_rms_clip=0.1)
  tx = optim.make_optimizer(c, steps_per_epoch=1, num_epochs=1, frozen=frozenset({'conv'}))
  # The frozen kernel's filters have an RMS far above the clip, the trained one's too.
  params = {
      'conv': {'kernel': np.full((1, 3, 3, 2, 2), 2.0, np.float32)},
      'fc': {'kernel': np.full((1, 2, 2), 2.0, np.float32), 'bias': np.ones((1, 2), np.float32)},
  }
  grads = jax.tree.map(np.ones_like, params)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['conv']['kernel'], 2.0)
  assert np.all(np.asarray(params['fc']['kernel']) < 2.0 - 0.01)  # decayed and stepped
  trace = next(s for s in state.inner_state if isinstance(s, optax.TraceState)).trace
  np.testing.assert_array_equal(trace['conv']['kernel'], 0.0)
  assert np.all(np.asarray(trace['fc']['kernel']) != 0.0)
  # The plateau controller's knob still works on the frozen chain.
  state = optim.with_lr_scale(state, 0.1)
  assert float(optim.current_learning_rate(state)) == pytest.approx(0.001)


@pytest.mark.parametrize('mesh',
                         [dict(data=1, model=2), dict(data=2, model=1)],
                         ids=['same_mesh', 'another_mesh'])
def test_a_warm_start_begins_at_exactly_the_sources_weights(source, mesh):
  _, _, source_params = source
  prog, fresh, state, summary = _warm(_fine_tune_config(source, **mesh))
  got, want, init = _flat(state.params), _flat(source_params), _flat(fresh.params)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(init[name], want[name]), name
  for leaf, sharding in zip(jax.tree.leaves(state.params),
                            jax.tree.leaves(prog.state_shardings.params)):
    assert leaf.sharding == sharding
  # The optimiser state (momentum, injected learning rate) and the step are the new run's own.
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state.opt_state)),
                  jax.tree.leaves(fresh.opt_state)):
    np.testing.assert_array_equal(a, b)
  assert summary.reset == () and summary.step == 4 and 'the classifier copied too' in summary.line()


def test_another_class_count_copies_all_but_the_classifier(source):
  _, _, source_params = source
  c = _fine_tune_config(source)
  c.model.num_classes = 6
  _, fresh, state, summary = _warm(c)
  got, want, init = _flat(state.params), _flat(source_params), _flat(fresh.params)
  for name in got:
    expected = init[name] if name.startswith("['fc8']") else want[name]
    np.testing.assert_array_equal(got[name], expected, err_msg=name)
  assert summary.reset == ('fc8',) and summary.copied[-1] == 'fc7'
  assert 'initialised afresh: fc8 (10 classes in the checkpoint, 6 here)' in summary.line()
  # 'reset' initialises the classifier afresh even where it fits.
  c = _fine_tune_config(source)
  c.init.classifier = 'reset'
  _, fresh, state, summary = _warm(c, fresh_seed=2)
  got, init = _flat(state.params), _flat(fresh.params)
  np.testing.assert_array_equal(got["['fc8']['kernel']"], init["['fc8']['kernel']"])
  np.testing.assert_array_equal(got["['fc7']['kernel']"], _flat(source_params)["['fc7']['kernel']"])
  assert summary.reset == ('fc8',)


def test_batch_norm_statistics_are_copied_from_another_mesh(tmp_path):
  """A ResNet checkpoint (written here from random values) of a 2 x 1 mesh, fine-tuned on a 4 x 1
  mesh for 5 classes: every parameter but ``fc`` and every running average is the source's."""

  def resnet(classes, data):
    c = tiny_config(data=data, model=1)
    c.model = configs.model_config('resnet', depth=18, num_classes=classes, image_size=32,
                                   width=0.0625)
    c.checkpoint.update(async_save=False, keep_best=False)
    return c

  source_config = resnet(10, 2)
  source_state = _fresh(program.build_program(source_config, steps_per_epoch=1), seed=3)
  manager = checkpointing.make_manager(str(tmp_path / 'src' / 'checkpoints'),
                                       source_config.checkpoint)
  checkpointing.save(manager, 7, source_state,
                     dict(epoch=1, step=7, config=configs.to_dict(source_config)))
  checkpointing.wait(manager)
  manager.close()

  c = resnet(5, 4)
  c.init.checkpoint = str(tmp_path / 'src')
  _, fresh, state, summary = _warm(c, fresh_seed=4)
  stats, want_stats = _flat(state.batch_stats), _flat(source_state.batch_stats)
  assert stats.keys() == want_stats.keys() and stats
  for name in stats:
    np.testing.assert_array_equal(stats[name], want_stats[name], err_msg=name)
  got, want, init = _flat(state.params), _flat(source_state.params), _flat(fresh.params)
  for name in got:
    np.testing.assert_array_equal(got[name],
                                  init[name] if name.startswith("['fc']") else want[name],
                                  err_msg=name)
  assert summary.reset == ('fc',) and summary.step == 7 and summary.copied[0] == 'conv1'


def _refused(config, error=ConfigError):
  with pytest.raises(error) as raised:
    _warm(config)
  message = str(raised.value)
  assert '\n' not in message
  return message


def test_a_source_that_does_not_fit_is_refused_in_one_line(source):
  wider = _fine_tune_config(source)
  wider.model.width = 0.125
  message = _refused(wider)
  assert "its conv1.bias has shape (2, 3) where this run's alexnet needs (2, 6)" in message
  assert 'model.width=0.0625 (this run: 0.125)' in message

  other = _fine_tune_config(source, data=1, model=1)
  other.model = configs.model_config('resnet', depth=18, num_classes=10, image_size=32,
                                     width=0.0625)
  message = _refused(other)
  assert 'its conv1.kernel has shape (2, 11, 11, 3, 3)' in message
  assert "model.name='alexnet' and this run trains model.name='resnet'" in message

  copy = _fine_tune_config(source)
  copy.model.num_classes = 6
  copy.init.classifier = 'copy'
  message = _refused(copy)
  assert 'its fc8.bias has shape (2, 5) where this run needs (2, 3)' in message
  assert '--config.init.classifier=auto' in message and '--config.model.num_classes=10' in message


def test_a_missing_source_or_step_is_refused_in_one_line(source, tmp_path):
  missing = _fine_tune_config(source)
  missing.init.checkpoint = str(tmp_path / 'nothing')
  assert 'is no checkpoint directory' in _refused(missing, CheckpointError)
  step = _fine_tune_config(source)
  step.init.step = 3
  assert 'no checkpoint at step 3' in _refused(step, CheckpointError)


def _main(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', GLIBC_TUNABLES=host.HUGE_PAGES_TUNABLE,
             XLA_FLAGS=f'--xla_force_host_platform_device_count=8 {XLA_FAST_COMPILE}')
  return subprocess.run([sys.executable, '-m', 'alexnet_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _args(data, workdir, source_dir):
  # configs/demo.py at the fixture's sizes: the same tensors as its tiny AlexNet.
  return [
      '--config=configs/demo.py', f'--workdir={workdir}', f'--config.dataset.data_dir={data}',
      '--config.dataset.num_train=64', '--config.dataset.num_val=24',
      '--config.dataset.image_size=72', '--config.model.image_size=67',
      '--config.model.width=0.0625', '--config.batch_size=16', '--config.eval_batch_size=16',
      '--config.num_epochs=1', '--config.input.workers=0', '--config.log_every_steps=2',
      f'--config.init.checkpoint={source_dir}'
  ]


def test_main_fine_tunes_with_frozen_layers(source, tmp_path):
  data, source_dir, source_params = source
  workdir = tmp_path / 'ft'
  proc = _main(
      _args(data, workdir, source_dir) +
      ['--config.init.freeze_through=conv5', '--config.optim.weight_decay=0.01'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'fine-tuning from' in proc.stderr and 'frozen: conv1..conv5' in proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith('final validation')

  config = trained.config_for(str(workdir))
  assert config.init.freeze_through == 'conv5' and config.init.checkpoint == source_dir
  prog = program.build_program(trained.inference_config(config), steps_per_epoch=1)
  with trained.read_only_manager(str(workdir)) as manager:
    restored = checkpointing.restore(manager, 4, prog.abstract_state)
  params = jax.device_get(restored.state.params)
  for layer in source_params:
    for leaf in ('kernel', 'bias'):
      same = np.array_equal(params[layer][leaf], source_params[layer][leaf])
      assert same == layer.startswith('conv'), (layer, leaf)  # frozen: no step, no decay
  trace = next(
      s for s in restored.state.opt_state.inner_state if isinstance(s, optax.TraceState)).trace
  trace = jax.device_get(trace)
  assert all(not np.any(trace[f'conv{i}']['kernel']) for i in range(1, 6))
  assert np.any(trace['fc6']['kernel'])

  # A source that does not fit: one line, status 2, no traceback, nothing trained.
  bad = _main(_args(data, tmp_path / 'bad', source_dir) + ['--config.model.width=0.125'])
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert 'Traceback' not in bad.stderr
  errors = [line for line in bad.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'its conv1.bias has shape (2, 3)' in errors[0], bad.stderr[-3000:]
  assert not (tmp_path / 'bad' / 'checkpoints').exists() or not any(
      p.name.isdigit() for p in (tmp_path / 'bad' / 'checkpoints').iterdir())
