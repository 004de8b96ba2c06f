"""The command-line tools: summary (counts from eval_shape) and bench (runs, prints figures)."""

import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import program
from alexnet_jax.configs import base_config
from alexnet_jax.models import describe
from alexnet_jax.tools import summary

from helpers import PAPER_NEURONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('towers, params', [(2, 60_965_224), (1, 62_378_344)])
def test_summary_table(towers, params):
  c = base_config()
  c.model.towers = towers
  c.mesh.model = towers
  table = describe.layer_table(c)
  assert table['total_parameters'] == params
  assert {r['layer']: r['neurons'] for r in table['layers']} == PAPER_NEURONS
  reads = {r['layer']: r['reads'] for r in table['layers']}
  assert reads['conv2'] == 'own tower' and reads['conv3'] == 'both towers'
  text = summary.format_table(table)
  assert f'{params:,}' in text and '290,400' in text
  if towers == 2:
    assert 'tower 1: model device 1' in table['layers'][0]['placement']


def _run_tool(module, *args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _tool(module, *args):
  proc = _run_tool(module, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize('module, args, message', [
    ('alexnet_jax.tools.summary', ['--config.model.name=lenet'], "unknown model 'lenet'"),
    ('alexnet_jax.tools.summary', ['--config.model.name=resnet'], "for model 'resnet'"),
    ('alexnet_jax.tools.comm_map', ['--config.mesh.model=3'], 'mesh'),
])
def test_tools_report_bad_input_in_one_line(module, args, message):
  proc = _run_tool(module, '--config=configs/two_gpu.py', *args)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_summary_cli_json():
  out = json.loads(_tool('alexnet_jax.tools.summary', '--config=configs/two_gpu.py', '--json'))
  assert out['total_parameters'] == 60_965_224 and out['input_neurons'] == 154_587


def test_comm_map_cli_json():
  out = json.loads(
      _tool('alexnet_jax.tools.comm_map', '--config=configs/demo.py', '--json',
            '--config.model.width=0.0625', '--config.model.image_size=67',
            '--config.batch_size=16'))
  model_layers = {r['layer'] for r in out['collectives'] if r['axis'] == 'model'}
  assert model_layers == {'conv3', 'fc6', 'fc7', 'fc8', 'loss'
                         } and out['mesh'] == {'data': 1, 'model': 2}


def _step_flops(config) -> float:
  """XLA's FLOP count of the compiled training step of ``config``, summed over its devices."""
  prog = program.build_program(config, steps_per_epoch=100)
  compiled = prog.train_step.lower(prog.abstract_state, prog.abstract_batch()).compile()
  return compiled.cost_analysis()['flops'] * prog.mesh.size


def _forward_matmul_flops_per_image(config) -> int:
  """2 x multiply-adds of every layer's weights at every output position (biases aside)."""
  flops = 0
  for row in describe.layer_table(config)['layers']:
    *spatial, maps = row['output_shape']
    flops += 2 * int(np.prod(spatial, dtype=np.int64)) * (row['parameters'] - maps)
  return flops


def test_bench_cli_prints_figures():
  out = json.loads(
      _tool('alexnet_jax.tools.bench', '--config=configs/demo.py', '--json', '--torch=false',
            '--config.model.width=0.0625', '--config.model.image_size=67', '--batch_size=8',
            '--steps=1', '--warmup=1', '--repeats=1'))
  assert (out['model'], out['towers'], out['batch_size'], out['image_size']) == ('alexnet', 2, 8,
                                                                                 67)
  assert out['mesh'] == {'data': 1, 'model': 2} and out['dtype'] == 'float32'
  assert out['framework_vs_bare_jit'] == pytest.approx(out['framework_images_per_second'] /
                                                       out['bare_jit_images_per_second'])
  # The FLOPs are those of the very step that trains, over both devices of the mesh (not one
  # device's program), and at least the forward and two backward products of the weights.
  config = runpy.run_path(os.path.join(REPO, 'configs', 'demo.py'))['get_config']()
  config.model.update(width=0.0625, image_size=67)
  config.batch_size = 8
  assert out['step_gflops'] * 1e9 == pytest.approx(_step_flops(config), rel=1e-6)
  assert out['step_gflops'] * 1e9 > 3 * 8 * _forward_matmul_flops_per_image(config)
