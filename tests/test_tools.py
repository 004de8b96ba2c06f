"""The command-line tools: summary (counts from eval_shape) and bench (runs, prints figures)."""

import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import configs, program
from alexnet_jax.configs import base_config
from alexnet_jax.models import describe
from alexnet_jax.tools import device_check, summary

from helpers import PAPER_NEURONS, XLA_FAST_COMPILE

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


def _run_tool(module, *args, env=None):
  env = {
      **os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu',
      **(env or {})
  }
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _tool(module, *args, env=None):
  proc = _run_tool(module, *args, env=env)
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


def test_device_suite_checks_the_device_and_reports_every_figure(tmp_path):
  """``bench --suite=device`` on this CPU-only machine: the same code at tiny sizes (the CPU is
  then the device, so the correctness check must find no difference at all)."""
  out_file = tmp_path / 'device.json'
  out = json.loads(
      _tool('alexnet_jax.tools.bench', '--suite=device', '--json', f'--out={out_file}',
            f'--data_dir={tmp_path / "data"}', '--networks=alexnet',
            env={'XLA_FLAGS': XLA_FAST_COMPILE}))
  assert json.loads(out_file.read_text()) == out
  assert (out['platform'], out['sizes'], out['ok']) == ('cpu', 'tiny', True)
  assert [c['dtype'] for c in out['correctness']] == ['float32', 'bfloat16']
  for c in out['correctness']:
    assert c['ok'] and c['loss_relative_difference'] == 0.0 == c['param_relative_difference']
    assert len(c['device_losses']) == c['steps'] == 3 and all(map(math.isfinite, c['cpu_losses']))
  rows = {(r['network'], r['dtype']): r for r in out['training']}
  assert len(rows) == 4  # the two-tower AlexNet at batch 8 and 16, in both dtypes
  for dtype in ('float32', 'bfloat16'):
    for network in ('alexnet (two towers)', 'alexnet (two towers), largest batch'):
      r = rows[network, dtype]
      assert r['images_per_second'] == pytest.approx(r['batch'] / r['step_seconds'])
      assert r['step_gflops'] > 0 and r['parameters'] > 0
      assert r['peak_tflops'] is None and r['model_flop_utilisation'] is None  # no CPU peak
    assert rows['alexnet (two towers), largest batch', dtype]['batch'] == 16
  # The other networks (timed on an accelerator by default) are valid configs at both sizes.
  for sizes in (device_check.TINY, device_check.FULL):
    for _, model, fields in device_check.NETWORKS.values():
      configs.check_fields(device_check._config(model, sizes, 'bfloat16', 8, **fields))
  # The step's FLOPs are XLA's own count of the compiled step, as the framework suite's.
  config = device_check._config('alexnet', device_check.TINY, 'float32', 8)
  assert rows['alexnet (two towers)', 'float32']['step_gflops'] * 1e9 == pytest.approx(
      _step_flops(config), rel=1e-6)
  i = out['input']
  assert i['images_per_second'] > 0 and i['fed_vs_fixed'] > 0 and i['workers'] >= 1
  assert device_check.peak_for('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert device_check.peak_for('TPU v5 lite', 'float32') == 197.0
  assert device_check.peak_for('cpu', 'float32') is None
  assert device_check.peak_for('cpu', 'float32', override=2.5) == 2.5
  bad = _run_tool('alexnet_jax.tools.bench', '--suite=device', '--networks=lenet')
  assert bad.returncode == 2 and "error: 'lenet' is not a network" in bad.stderr
