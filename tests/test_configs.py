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

from alexnet_jax import configs, models, program, steps
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
