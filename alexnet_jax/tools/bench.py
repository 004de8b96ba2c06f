"""Training throughput of the framework's step against a bare ``jax.jit`` step (and PyTorch):

  python -m alexnet_jax.tools.bench --config=configs/two_gpu.py [--batch_size=64]
  python -m alexnet_jax.tools.bench --suite=device [--json] [--out=FILE] [--peak_tflops=X]

``--suite=device`` checks whatever accelerator is present instead (``tools.device_check``:
correctness against the host CPU, every network's images/s and FLOP utilisation in float32 and
bfloat16, peak memory, the host's input pipeline). Otherwise:


Measures, in one run and on the same synthetic batch:
  1. the framework's training step (``program.build_program``: shard_map over the configured mesh,
     optax chain with injected learning rate, metrics), fed with host uint8 batches;
  2. a bare ``jax.jit`` step of the same network on one device: the model's forward, softmax
     cross-entropy, gradients and a hand-written momentum update, nothing else around it;
  3. PyTorch eager on the same network and batch, when torch is installed (the ``bench`` extra).
and prints images/s, the ratios, and the model FLOP utilisation when ``--peak_tflops`` is given.
Timing only — the figures never gate a test.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from alexnet_jax import cli, distributed, models, program, sharding, storage
from alexnet_jax.steps import normalize
from alexnet_jax.tools import bench_torch, device_check


def _time_steps(step, state, batch, steps: int, warmup: int):
  for _ in range(warmup):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  return state, (time.perf_counter() - start) / steps


def bare_step(graphdef, config, dtype, batch_stats=None, aux_loss_weight: float = 0.0):
  """The same network trained with nothing around ``jax.jit``: one device, full logits (batch norm
  normalises with the batch's moments; its running averages are not carried)."""
  lr, mu, wd = config.optim.learning_rate, config.optim.momentum, config.optim.weight_decay

  def step(state, batch):
    params, velocity, key = state
    images = normalize(batch['image'], config.input.mean_rgb, config.input.std_rgb, dtype,
                       channel_order=config.input.channel_order)

    def loss_fn(p):
      model = nnx.merge(graphdef, p, batch_stats or {})
      out = model(images, train=True, dropout_key=key)
      ce = lambda l: optax.softmax_cross_entropy_with_integer_labels(l.astype(jnp.float32), batch[
          'label']).mean()
      return ce(out.logits) + sum(aux_loss_weight * ce(a) for a in out.aux_logits)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    velocity = jax.tree.map(lambda v, g, w: mu * v - lr * (g + wd * w), velocity, grads, params)
    params = jax.tree.map(lambda w, v: w + v, params, velocity)
    return (params, velocity, jax.random.fold_in(key, 1)), loss

  return jax.jit(step, donate_argnums=0)


def measure(config, *, batch_size: int, steps: int, warmup: int, repeats: int,
            with_torch: bool = False) -> dict:
  """Images/s of the framework's step, the bare step and (``with_torch`` and torch installed)
  PyTorch eager, measured in alternating rounds (drift on a noisy machine hits all alike), the
  best round of each kept."""
  config.batch_size = batch_size
  prog = program.build_program(config, steps_per_epoch=100)
  size = config.model.image_size
  rng = np.random.default_rng(0)
  host_batch = dict(image=rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
                    label=rng.integers(0, config.model.num_classes, batch_size).astype(np.int32))
  state = prog.init_state()
  batch = sharding.put_batch(host_batch, prog.mesh)
  compiled = prog.train_step.lower(state, batch).compile()
  flops = (compiled.cost_analysis() or {}).get('flops', 0.0)
  if isinstance(flops, (list, tuple)):
    flops = flops[0].get('flops', 0.0)
  flops *= prog.mesh.size  # cost_analysis counts one device's program

  dtype = program.COMPUTE_DTYPES[config.compute_dtype]
  bare = bare_step(prog.graphdef, config, dtype, jax.device_get(state.batch_stats),
                   prog.model.aux_loss_weight)
  device = prog.mesh.devices.flat[0]
  params = jax.device_put(jax.device_get(state.params), device)
  bare_state = (params, jax.tree.map(jnp.zeros_like, params), jax.random.key(0))
  bare_batch = jax.device_put(host_batch, device)

  trainer = _torch_trainer(config, batch_size) if with_torch else None
  if trainer is not None and warmup:
    trainer.time_steps(warmup)
  framework_s, bare_s, torch_s = [], [], []
  for _ in range(repeats):
    state, dt = _time_steps(prog.train_step, state, batch, steps, warmup)
    framework_s.append(dt)
    bare_state, dt = _time_steps(bare, bare_state, bare_batch, steps, warmup)
    bare_s.append(dt)
    if trainer is not None:
      torch_s.append(trainer.time_steps(steps))
  result = dict(model=config.model.name, towers=prog.model.spec.towers, batch_size=batch_size,
                image_size=size, dtype=config.compute_dtype, mesh=dict(prog.mesh.shape),
                device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                framework_images_per_second=batch_size / min(framework_s),
                bare_jit_images_per_second=batch_size / min(bare_s), step_gflops=flops / 1e9)
  result['framework_vs_bare_jit'] = result['framework_images_per_second'] / result[
      'bare_jit_images_per_second']
  if torch_s:
    result['torch_eager_images_per_second'] = batch_size / min(torch_s)
    result['framework_vs_torch_eager'] = (result['framework_images_per_second'] /
                                          result['torch_eager_images_per_second'])
    result['bare_jit_vs_torch_eager'] = (result['bare_jit_images_per_second'] /
                                         result['torch_eager_images_per_second'])
  return result


def _torch_trainer(config, batch_size: int):
  """PyTorch eager on the same network and batch, or None without torch (the ``bench`` extra)."""
  if importlib.util.find_spec('torch') is None:
    return None
  m = config.model
  return bench_torch.TorchTrainer(towers=models.spec_from_config(m).towers, batch_size=batch_size,
                                  image_size=m.image_size, num_classes=m.num_classes, width=m.width,
                                  dtype=config.compute_dtype)


def main(argv):
  del argv
  if flags.FLAGS.suite == 'device':
    return device_main()
  config = cli.config_or_usage_error()
  # The configured mesh, emulated on a CPU-only machine.
  config.emulate_cpu_devices = max(config.emulate_cpu_devices,
                                   max(1, config.mesh.data) * config.mesh.model)
  distributed.initialize(config)
  batch = flags.FLAGS.batch_size or config.batch_size
  result = measure(config, batch_size=batch, steps=flags.FLAGS.steps, warmup=flags.FLAGS.warmup,
                   repeats=flags.FLAGS.repeats, with_torch=flags.FLAGS.torch)
  if flags.FLAGS.peak_tflops:
    achieved = result['step_gflops'] * result['framework_images_per_second'] / batch / 1e3
    result['model_flop_utilisation'] = achieved / flags.FLAGS.peak_tflops
  if flags.FLAGS.json:
    print(json.dumps(result, indent=1))
    return
  print(f'{result["model"]} ({result["towers"]} towers), batch {batch}, {result["image_size"]}^2, '
        f'{result["dtype"]}, mesh {result["mesh"]}, {result["platform"]} ({result["device"]})')
  print(f'  framework step      {result["framework_images_per_second"]:9.1f} img/s')
  print(f'  bare jax.jit step   {result["bare_jit_images_per_second"]:9.1f} img/s   '
        f'ratio {result["framework_vs_bare_jit"]:.3f}')
  if 'torch_eager_images_per_second' in result:
    print(f'  PyTorch eager       {result["torch_eager_images_per_second"]:9.1f} img/s   '
          f'framework / torch {result["framework_vs_torch_eager"]:.3f}, '
          f'bare / torch {result["bare_jit_vs_torch_eager"]:.3f}')
  print(f'  {result["step_gflops"]:.1f} GFLOP per step')
  if 'model_flop_utilisation' in result:
    print(f'  model FLOP utilisation {100 * result["model_flop_utilisation"]:.1f}%')


def device_main():
  if flags.FLAGS.config is not None:
    raise app.UsageError('--suite=device chooses its own networks: drop --config')
  data_dir = flags.FLAGS.data_dir or tempfile.mkdtemp(prefix='device_check_')
  say = (lambda line: None) if flags.FLAGS.json else (lambda line: print(line, flush=True))
  try:
    result = device_check.run(data_dir=data_dir, peak_tflops=flags.FLAGS.peak_tflops,
                              networks=flags.FLAGS.networks, dtypes=flags.FLAGS.dtypes, say=say)
  finally:
    if not flags.FLAGS.data_dir:
      shutil.rmtree(data_dir, ignore_errors=True)
  if flags.FLAGS.out:
    storage.write_text(flags.FLAGS.out, json.dumps(result, indent=1) + '\n', atomic=True)
  if flags.FLAGS.json:
    print(json.dumps(result, indent=1))
  if not result['ok']:
    print(
        "error: the device's training steps disagree with the CPU's beyond the tolerance "
        '(see correctness above)', file=sys.stderr)
    sys.exit(1)


def _define_flags() -> None:
  cli.define_tool_flags('Print one JSON object.')
  cli.define_huge_pages_flag()
  # Bounds: absl refuses a value outside them in one line (cli._parse_flags).
  flags.DEFINE_integer('batch_size', None, "Global batch (default: the config's).", lower_bound=1)
  flags.DEFINE_integer('steps', 5, 'Timed steps per measurement.', lower_bound=1)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.', lower_bound=0)
  flags.DEFINE_integer('repeats', 3, 'Alternating measurement rounds; the best is kept.',
                       lower_bound=1)
  flags.DEFINE_bool('torch', True, 'Also time PyTorch eager when torch is installed.')
  flags.DEFINE_float(
      'peak_tflops', 0.0, 'Device peak TFLOP/s for the MFU figure (0: none; '
      '--suite=device: its table of common GPUs and TPUs).', lower_bound=0.0)
  flags.DEFINE_enum(
      'suite', 'framework', ('framework', 'device'),
      "'framework': --config's step against a bare jit step and PyTorch; 'device': "
      'check the accelerator present (tools.device_check).')
  flags.DEFINE_list('networks', list(device_check.NETWORKS),
                    '--suite=device: the networks to time.')
  flags.DEFINE_list('dtypes', list(device_check.DTYPES), '--suite=device: the compute dtypes.')
  flags.DEFINE_string('out', None, '--suite=device: also write the JSON to this file.')
  flags.DEFINE_string(
      'data_dir', None, '--suite=device: where to keep its prepared benchmark set '
      '(default: a temporary folder, deleted after).')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
