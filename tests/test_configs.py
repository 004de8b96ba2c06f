"""Configs: one default per field, unknown fields refused, the paper's configs at the paper's scale,
and bad input told apart from bugs at the command line."""

import glob
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx

from alexnet_jax import configs, models, optim, program, steps
from alexnet_jax.data import augment, pipeline
from alexnet_jax.errors import ConfigError
from alexnet_jax.models import layers
from alexnet_jax.visualize.images import centre_square

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
PAPER_CONFIGS = ('two_gpu', 'one_gpu', 'pod', 'owt', 'zfnet')


def _load(name):
  return runpy.run_path(os.path.join(REPO, 'configs', f'{name}.py'))['get_config']()


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_has_exactly_the_known_fields(path):
  config = runpy.run_path(path)['get_config']()
  configs.check_fields(config)
  # config.model: the model's spec fields, each present (its default where the file keeps it).
  assert set(config.model.keys()) == {'name', *models.spec_defaults(config.model.name)}


def test_model_defaults_come_from_the_spec():
  for name in models.REGISTRY:
    section = configs.model_config(name)
    assert {k: section[k] for k in section.keys() if k != 'name'} == models.spec_defaults(name)
  assert configs.base_config().model.init == models.AlexNetSpec().init == 'paper'


def test_unknown_fields_are_refused():
  config = configs.base_config()
  config.optim.lerning_rate = 0.1
  with pytest.raises(ConfigError, match='config.optim.lerning_rate is not a config field'):
    configs.check_fields(config)
  config = configs.base_config()
  config.model.dropuot = 0.1
  with pytest.raises(ConfigError, match="config.model has no field 'dropuot'"):
    configs.check_fields(config)
  config = configs.base_config()
  del config.input['flip']
  with pytest.raises(ConfigError, match="config.input lacks the field 'flip'"):
    configs.check_fields(config)
  with pytest.raises(ConfigError, match="model 'vgg' has no field 'towers'"):
    configs.model_config('vgg', towers=2)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_has_values_in_range(path):
  configs.check_values(runpy.run_path(path)['get_config']())


def _with(path, value, model=None):
  config = configs.base_config()
  if model is not None:
    config.model = configs.model_config(model)
  *sections, key = path.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[key] = value
  return config


# (field, bad value, the model it belongs to if not AlexNet, what the error line says)
OUT_OF_RANGE = [
    ('seed', -1, None, 'config.seed=-1 is out of range: must be in [0, 4294967295]'),
    ('mesh.data', 0, None, 'config.mesh.data=0 is out of range: must be -1 or >= 1'),
    ('mesh.data', -2, None, 'must be -1 or >= 1'),
    ('mesh.model', 0, None, 'config.mesh.model=0 is out of range: must be >= 1'),
    ('emulate_cpu_devices', -1, None, 'must be >= 0'),
    ('dataset.num_train', 0, None, 'config.dataset.num_train=0'),
    ('dataset.num_val', 0, None, 'config.dataset.num_val=0'),
    ('dataset.image_size', 0, None, 'config.dataset.image_size=0'),
    ('dataset.seed', 2**32, None, 'config.dataset.seed=4294967296'),
    ('dataset.max_bad_fraction', 1.5, None, 'must be in [0, 1]'),
    ('dataset.max_bad_fraction', -0.1, None, 'must be in [0, 1]'),
    ('input.mean_rgb', (120.0, 110.0), None, 'must be 3 values, each a finite number'),
    ('input.mean_rgb', (120.0, float('nan'), 100.0), None, 'config.input.mean_rgb=(120.0, nan'),
    ('input.std_rgb', (1.0, 0.0, 1.0), None, 'must be 3 values, each > 0'),
    ('input.std_rgb', (1.0, -1.0, 1.0), None, 'must be 3 values, each > 0'),
    ('input.workers', -1, None, 'config.input.workers=-1 is out of range: must be >= 0'),
    ('input.prefetch_batches', -1, None, 'must be >= 0'),
    ('input.resize_to', 0, None, 'config.input.resize_to=0 is out of range: must be None or >= 1'),
    ('input.pca_lighting_std', -0.1, None, 'must be >= 0'),
    ('batch_size', 0, None, 'config.batch_size=0 is out of range: must be >= 1'),
    ('batch_size', True, None, 'config.batch_size=True is out of range'),
    ('eval_batch_size', -8, None, 'config.eval_batch_size=-8'),
    ('num_epochs', 0, None, 'config.num_epochs=0 is out of range: must be >= 1'),
    ('num_epochs', -1, None, 'config.num_epochs=-1 is out of range: must be >= 1'),
    ('optim.learning_rate', 0.0, None,
     'config.optim.learning_rate=0.0 is out of range: must be > 0'),
    ('optim.learning_rate', float('nan'), None, 'config.optim.learning_rate=nan'),
    ('optim.learning_rate', float('inf'), None, 'config.optim.learning_rate=inf'),
    ('optim.momentum', 1.5, None, 'config.optim.momentum=1.5 is out of range: must be in [0, 1)'),
    ('optim.momentum', 1.0, None, 'must be in [0, 1)'),
    ('optim.momentum', -0.1, None, 'must be in [0, 1)'),
    ('optim.weight_decay', -1e-4, None, 'must be >= 0'),
    ('optim.plateau_factor', 0.0, None, 'must be in (0, 1]'),
    ('optim.plateau_factor', 2.0, None, 'must be in (0, 1]'),
    ('optim.plateau_patience', -1, None, 'must be >= 0'),
    ('optim.plateau_threshold', -1e-3, None, 'must be >= 0'),
    ('optim.max_drops', -1, None, 'must be >= 0'),
    ('optim.step_epochs', (30, 20), None, 'must be increasing values, each >= 0'),
    ('optim.step_epochs', (30, 30), None, 'must be increasing values, each >= 0'),
    ('optim.step_epochs', (-1, 30), None, 'must be increasing values, each >= 0'),
    ('optim.step_factor', 0.0, None, 'must be in (0, 1]'),
    ('optim.warmup_epochs', -1, None, 'must be >= 0'),
    ('optim.filter_rms_clip', -0.1, None, 'must be >= 0'),
    ('log_every_steps', 0, None, 'config.log_every_steps=0'),
    ('eval_every_epochs', 0, None, 'config.eval_every_epochs=0'),
    ('checkpoint.every_epochs', 0, None, 'config.checkpoint.every_epochs=0'),
    ('checkpoint.keep', 0, None, 'config.checkpoint.keep=0'),
    ('checkpoint.keep_epochs', (1, -2), None, 'must be values, each >= 0'),
    ('visualize.every_epochs', -1, None, 'config.visualize.every_epochs=-1'),
    ('visualize.images', 0, None, 'config.visualize.images=0'),
    ('model.num_classes', 0, None, 'config.model.num_classes=0 is out of range: must be >= 1'),
    ('model.width', 0.0, None, 'config.model.width=0.0 is out of range: must be > 0'),
    ('model.dropout', 1.0, None, 'config.model.dropout=1.0 is out of range: must be in [0, 1)'),
    ('model.weight_std', -0.01, None, 'config.model.weight_std=-0.01'),
    ('model.conv_widths', (384, 0, 256), 'zfnet', 'must be 3 values, each >= 1'),
    ('model.fc_width', 0, 'zfnet', 'config.model.fc_width=0'),
    ('model.aux_loss_weight', -0.3, 'googlenet', 'config.model.aux_loss_weight=-0.3'),
    ('model.aux_dropout', 1.0, 'googlenet', 'config.model.aux_dropout=1.0'),
    ('model.bn_momentum', 1.0, 'resnet', 'config.model.bn_momentum=1.0'),
    ('model.dropout', -0.5, 'vgg', 'config.model.dropout=-0.5'),
    ('compute_dtype', 'float16', None,
     "config.compute_dtype='float16' is not one of: 'float32', 'bfloat16'"),
    ('optim.schedule', 'linear', None, "config.optim.schedule='linear' is not one of"),
    ('input.eval_views', 'five', None, "config.input.eval_views='five' is not one of"),
    ('input.worker_priority', 'high', None, "config.input.worker_priority='high' is not one of"),
]


@pytest.mark.parametrize('path, value, model, message', OUT_OF_RANGE,
                         ids=[f'{p}={v!r}' for p, v, _, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_is_refused_in_one_line(path, value, model, message):
  config = _with(path, value, model)
  with pytest.raises(ConfigError) as raised:
    configs.check_values(config)
  assert message in str(raised.value) and '\n' not in str(raised.value)
  with pytest.raises(ConfigError, match='out of range|is not one of'):
    configs.check_fields(config)  # what every entry point and train_and_evaluate call


@pytest.mark.parametrize('path, value', [('mesh.data', -1), ('input.resize_to', None),
                                         ('optim.momentum', 0.0), ('optim.step_epochs', ()),
                                         ('dataset.max_bad_fraction', 1.0),
                                         ('optim.plateau_factor', 1.0), ('model.dropout', 0.0),
                                         ('checkpoint.keep_epochs', ())])
def test_the_edges_of_the_ranges_are_accepted(path, value):
  configs.check_values(_with(path, value))


def _leaves(config, prefix=''):
  for key in config.keys():
    value = config[key]
    if hasattr(value, 'keys'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _numeric(value) -> bool:
  values = value if isinstance(value, tuple) else (value,)
  return bool(values) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def test_every_numeric_field_has_a_declared_range():
  """A field added without a range (or a range left for a field that is gone) fails here."""
  fields = dict(_leaves(configs.base_config()))
  numeric = {p for p, v in fields.items() if not p.startswith('model.') and _numeric(v)}
  numeric |= {'input.resize_to', 'optim.step_epochs', 'checkpoint.keep_epochs'}  # None, () too
  assert numeric == set(configs.VALUE_RANGES)
  free_text = {'dataset.name', 'dataset.data_dir', 'dataset.train_split', 'dataset.eval_split'}
  strings = {p for p, v in fields.items() if not p.startswith('model.') and isinstance(v, str)}
  assert strings - free_text == set(configs.CHOICES)
  model_fields = {
      k for name in models.REGISTRY for k, v in models.spec_defaults(name).items() if _numeric(v)
  }
  model_fields.add('remove')  # ZFNet's ablations: () by default
  assert model_fields == set(configs.MODEL_RANGES)


def test_the_choices_are_those_their_owners_accept():
  assert configs.CHOICES['compute_dtype'] == tuple(program.COMPUTE_DTYPES)
  assert configs.CHOICES['input.worker_priority'] == tuple(pipeline.WORKER_PRIORITIES)
  for views in configs.CHOICES['input.eval_views']:
    augment.view_windows(256, 256, 227, views)
  for schedule in configs.CHOICES['optim.schedule']:
    optim.learning_rate_schedule(_with('optim.schedule', schedule).optim, 10, 90)
  with pytest.raises(ConfigError):
    optim.learning_rate_schedule(_with('optim.schedule', 'linear').optim, 10, 90)


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_the_papers_configs_feed_raw_pixels_minus_the_mean_image(name):
  inp = _load(name).input
  assert tuple(inp.std_rgb) == configs.RAW_PIXEL_SCALE and inp.mean_image


def test_lrn_acts_at_initialisation_under_the_papers_config():
  """With the paper's N(0, 0.01) weights, LRN's k = 2 and α = 1e-4 only matter for inputs on the
  raw 0-255 scale: there LRN damps conv1's response by a few percent beyond its constant k^-β
  factor; on unit-variance inputs (dividing by the ImageNet standard deviation) by ~1e-5."""
  config = _load('two_gpu')
  # The network's own conv1 at initialisation (jit drops the other layers' unused parameters).
  conv1_relu = jax.jit(
      lambda x: jax.nn.relu(models.create_model(config.model, nnx.Rngs(config.seed)).conv1(x)))
  photos = np.stack(
      [centre_square(getattr(skimage.data, n)(), 227) for n in ('chelsea', 'astronaut', 'coffee')])
  mean_image = program.input_constants(config)['mean_image']  # the mean colour, before training

  def damping(std_rgb):
    x = steps.normalize(photos, config.input.mean_rgb, std_rgb, jnp.float32, mean_image=mean_image)
    a = conv1_relu(x)
    return float(1 - jnp.sum(layers.local_response_norm(a)) / jnp.sum(a * 2.0**-0.75))

  paper = damping(config.input.std_rgb)
  unit_variance = damping(configs.IMAGENET_STD_RGB)
  assert paper > 0.01, paper
  assert unit_variance < 1e-4 and paper > 100 * unit_variance, (paper, unit_variance)


def _run(args, code=None):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  command = ['-c', code] if code else ['-m', 'alexnet_jax.tools.summary']
  return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _one_error_line(proc, message):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_a_misspelt_override_or_config_field_is_one_line(tmp_path):
  _one_error_line(_run(['--config=configs/two_gpu.py', '--config.optim.lerning_rate=0.1']),
                  "--config.optim.lerning_rate: config.optim has no field 'lerning_rate'")
  _one_error_line(_run(['--config=configs/vgg.py', '--config.model.towers=2']),
                  "config.model has no field 'towers'")
  config_file = tmp_path / 'typo.py'
  config_file.write_text('from alexnet_jax.configs import base_config\n'
                         'def get_config():\n  c = base_config()\n  c.batchsize = 64\n  return c\n')
  _one_error_line(_run([f'--config={config_file}']), 'config.batchsize is not a config field')


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback():
  """A bad value ends in one ``error:`` line with status 2; an internal error — here a ValueError
  from inside the program, as a shape bug would raise — keeps its traceback and is not reported as
  bad input."""
  _one_error_line(_run(['--config=configs/two_gpu.py', '--config.model.init=glorot']),
                  "model.init must be 'paper' or 'he'")
  inject = ('import sys\n'
            'from absl import flags\n'
            'from alexnet_jax import cli, models\n'
            'from alexnet_jax.tools import summary\n'
            'def broken(*args, **kwargs):\n'
            '  raise ValueError("injected: a shape bug inside the model")\n'
            'summary.layer_table = broken\n'
            'cli.define_tool_flags()\n'
            'cli.run(summary.main)\n')
  proc = _run(['--config=configs/two_gpu.py'], code=inject)
  assert proc.returncode == 1
  assert 'Traceback' in proc.stderr and 'ValueError: injected: a shape bug' in proc.stderr
  assert not any(line.startswith('error: ') for line in proc.stderr.splitlines())
