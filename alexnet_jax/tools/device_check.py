"""One command that checks an accelerator: ``python -m alexnet_jax.tools.bench --suite=device``.

On whatever devices JAX finds (a GPU, a TPU chip, or only the CPU), in this order:

1. **Correctness.** A few training steps of a small two-tower AlexNet on the device against the
   same steps on the host CPU, from the same initial state and batch: the losses and the
   parameters after the steps must agree within a tolerance per dtype (``TOLERANCE``). float32 is
   compared at the highest matmul precision (GPUs otherwise run float32 convolutions in TF32,
   TPUs in bfloat16 passes, which is a choice of speed, not an error).
2. **Training throughput** of the two-tower AlexNet at batch 128 and at the largest batch that
   fits (doubling until the device runs out of memory), and of ZFNet, VGG-16 and ResNet-50 at one
   batch, in float32 and bfloat16: images/s, step time, the step's FLOPs from XLA's own cost
   analysis of the compiled step, model FLOP utilisation against the device's peak
   (``PEAK_TFLOPS``, or ``--peak_tflops``), and peak device memory.
3. **The host's input pipeline**: training images/s from the built-in data set through the grain
   pipeline with every host core as a worker, and the pipeline-fed step's images/s ÷ the same
   step fed one fixed batch (1.0: the device never waits for the host).

On a machine with only a CPU it runs the same code at tiny sizes (narrow layers, small images and
batches; ``device`` is then the CPU itself, so the correctness check compares the CPU with
itself), which keeps it working in CI. Prints a table; ``--json`` prints one JSON object and
``--out=FILE`` writes it. Timing only: no figure gates a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import numpy as np

from alexnet_jax import configs, program, sharding
from alexnet_jax.data import inputs
from alexnet_jax.data import prepare as data_prepare
from alexnet_jax.errors import ConfigError
from alexnet_jax.tools import bench_input

# Dense peak TFLOP/s per chip, by a substring of ``device_kind`` (the first that matches): (float32
# as XLA runs it by default: TF32 tensor cores on NVIDIA Ampere and later, bfloat16 passes on
# TPUs; bfloat16). From the vendors' data sheets (SXM parts for NVIDIA); --peak_tflops overrides.
PEAK_TFLOPS = {
    'H200': (494.0, 989.0),
    'H100': (494.0, 989.0),
    'A100': (156.0, 312.0),
    'L40S': (183.0, 362.0),
    'L4': (60.0, 121.0),
    'A10': (62.5, 125.0),
    'V100': (15.7, None),  # no bfloat16 tensor cores
    'TPU v6': (918.0, 918.0),
    'TPU v5p': (459.0, 459.0),
    'TPU v5': (197.0, 197.0),  # v5e ("v5 lite")
    'TPU v4': (275.0, 275.0),
}

# Largest |difference| allowed after the correctness steps, relative to the largest |value| (of
# the losses, of each parameter array). float32 at highest precision differs only by the order of
# the sums; bfloat16 by its 8-bit mantissa in every activation.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 5e-2}
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the suite trains: full size on an accelerator, tiny on a CPU."""
  width: float
  classes: int
  images: dict  # model → input side
  batch: int
  largest: int  # the largest batch tried for AlexNet
  steps: int
  check_width: float
  check_batch: int


FULL = Sizes(width=1.0, classes=1000, images=dict(alexnet=227, zfnet=224, vgg=224, resnet=224),
             batch=128, largest=8192, steps=10, check_width=0.25, check_batch=32)
TINY = Sizes(width=0.0625, classes=10, images=dict(alexnet=67, zfnet=67, vgg=32, resnet=32),
             batch=8, largest=16, steps=2, check_width=0.0625, check_batch=8)

# The networks timed, by the name --networks takes: what the table calls it, the model and its
# fields. 'alexnet' is also timed at the largest batch that fits.
NETWORKS = {
    'alexnet': ('alexnet (two towers)', 'alexnet', {}),
    'zfnet': ('zfnet', 'zfnet', {}),
    'vgg16': ('vgg16', 'vgg', dict(variant='D')),
    'resnet50': ('resnet50', 'resnet', dict(depth=50)),
}


def peak_for(device_kind: str, dtype: str, override: float = 0.0) -> float | None:
  if override:
    return override
  for key, peaks in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return peaks[DTYPES.index(dtype)]
  return None


def _config(model: str, sizes: Sizes, dtype: str, batch: int, width: float | None = None,
            **model_fields):
  """A training config on one device (the two towers of AlexNet in one array)."""
  c = configs.base_config()
  c.model = configs.model_config(model, **model_fields)
  c.model.update(num_classes=sizes.classes, image_size=sizes.images[model],
                 width=sizes.width if width is None else width)
  if model == 'alexnet':
    c.model.init = 'he' if c.model.width < 1 else 'paper'
  c.mesh.data, c.mesh.model = 1, 1
  c.input.update(mean_image=False, pca_lighting_std=0.0)
  c.batch_size = batch
  c.compute_dtype = dtype
  return c


def _batch(config, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  n, size = config.batch_size, config.model.image_size
  return dict(image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
              label=rng.integers(0, config.model.num_classes, n).astype(np.int32))


def _relative_difference(a, b) -> float:
  """max |a - b| / max |a| over every array of two pytrees of the same structure."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(x))), 1e-12)
    worst = max(worst, float(np.max(np.abs(x - y))) / scale)
  return worst


def check_correctness(device, sizes: Sizes, dtype: str, steps: int = 3) -> dict:
  """The same ``steps`` training steps on ``device`` and on the host CPU (see the module doc)."""
  config = _config('alexnet', sizes, dtype, sizes.check_batch, width=sizes.check_width)
  cpu = jax.devices('cpu')[0]
  precision = jax.default_matmul_precision('highest') if dtype == 'float32' else (
      contextlib.nullcontext())
  runs, prog = {}, None
  with precision:
    for name, dev in (('cpu', cpu), ('device', device)):
      if prog is None or dev != cpu:  # the CPU as the device: the same program, compiled once
        prog = program.build_program(config, steps_per_epoch=100,
                                     mesh=program.make_mesh(config, devices=[dev]))
      if name == 'cpu':
        start = jax.device_get(prog.init_state())
      state = jax.device_put(start, prog.state_shardings)
      batch = sharding.put_batch(_batch(config), prog.mesh)
      losses = []
      for _ in range(steps):
        state, out = prog.train_step(state, batch)
        losses.append(float(jax.device_get(out['loss'])))
      runs[name] = dict(losses=losses, params=jax.device_get(state.params))
  loss_diff = _relative_difference(runs['cpu']['losses'], runs['device']['losses'])
  param_diff = _relative_difference(runs['cpu']['params'], runs['device']['params'])
  tol = TOLERANCE[dtype]
  return dict(dtype=dtype, steps=steps, cpu_losses=runs['cpu']['losses'],
              device_losses=runs['device']['losses'], loss_relative_difference=loss_diff,
              param_relative_difference=param_diff, tolerance=tol, ok=bool(loss_diff <= tol and
                                                                           param_diff <= tol))


def _peak_memory(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 (backends without memory statistics raise various errors)
    return None
  return None if not stats else stats.get('peak_bytes_in_use')


def time_training(config, device, steps: int, warmup: int = 2) -> dict:
  """Images/s, step time, FLOPs (XLA's cost analysis of the compiled step) and peak memory of
  ``config``'s training step on ``device``, fed one fixed device batch."""
  prog = program.build_program(config, steps_per_epoch=100,
                               mesh=program.make_mesh(config, devices=[device]))
  state = prog.init_state()
  batch = sharding.put_batch(_batch(config), prog.mesh)
  compiled = prog.train_step.lower(state, batch).compile()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  for _ in range(warmup):
    state, out = prog.train_step(state, batch)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = prog.train_step(state, batch)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  return dict(batch=config.batch_size, step_seconds=seconds,
              images_per_second=config.batch_size / seconds,
              step_gflops=float(cost.get('flops', 0.0)) / 1e9,
              peak_memory_bytes=_peak_memory(device), parameters=prog.param_count)


def _out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def largest_batch(device, sizes: Sizes, dtype: str, steps: int) -> dict | None:
  """The two-tower AlexNet at the largest power-of-two batch (from ``sizes.batch`` up to
  ``sizes.largest``) whose step fits in the device's memory, timed."""
  best, batch = None, sizes.batch * 2
  while batch <= sizes.largest:
    try:
      best = time_training(_config('alexnet', sizes, dtype, batch), device, steps)
    except Exception as e:  # noqa: BLE001 (XLA reports running out of memory as several types)
      if not _out_of_memory(e):
        raise
      break
    batch *= 2
  return best


def prepared_set(directory: str, images: int) -> str:
  """A prepared set of ImageNet-like photos (``bench_input.make_folder``: crops of scikit-image's
  photographs, 300-600 px, as 256 px JPEGs), made once in ``directory``; returns its name."""
  name = f'device_check_{images}'
  folder = os.path.join(directory, f'{name}_jpeg')
  if not os.path.isdir(folder):
    bench_input.make_folder(folder, images)
  data_prepare.prepare(folder, name, data_dir=directory, val_fraction=0.1, progress=False)
  return name


def measure_input(sizes: Sizes, *, images: int, batches: int, data_dir: str) -> dict:
  """The grain pipeline's training images/s on a prepared set with every host core as a worker,
  and the pipeline-fed step ÷ the fixed-batch step (``bench_input.measure_overlap``)."""
  workers = os.cpu_count() or 1
  name = prepared_set(data_dir, images)
  config = _config('alexnet', sizes, 'float32', sizes.batch)
  config.dataset.update(name=name, data_dir=data_dir)
  config.input.update(workers=workers, worker_priority='normal')
  data = inputs.open_inputs(config)  # once, for both measurements
  make_iter = bench_input.grain_iterator(data.train_source, batch_size=config.batch_size,
                                         crop=config.model.image_size, workers=workers)
  per_second = bench_input.time_iterator(make_iter, config.batch_size, batches, warmup=3)
  overlap = bench_input.measure_overlap(config, steps=batches, warmup=3, repeats=1, data=data)
  return dict(workers=workers, images=images, images_per_second=per_second,
              images_per_second_per_core=per_second / workers, fed_vs_fixed=overlap['overlap'],
              fixed_batch_images_per_second=overlap['fixed_batch_images_per_second'],
              pipeline_images_per_second=overlap['pipeline_images_per_second'])


def run(*, data_dir: str, peak_tflops: float = 0.0, networks=tuple(NETWORKS), dtypes=DTYPES,
        input_images: int | None = None, input_batches: int = 20, tiny: bool | None = None,
        say=print) -> dict:
  """The whole check (see the module doc) for ``networks`` (names of ``NETWORKS``) in ``dtypes``;
  returns its results."""
  unknown = sorted(set(networks) - set(NETWORKS)) + sorted(set(dtypes) - set(DTYPES))
  if unknown:
    raise ConfigError(f'{unknown[0]!r} is not a network or dtype of the device check; networks: '
                      f'{", ".join(NETWORKS)}; dtypes: {", ".join(DTYPES)}')
  device = jax.devices()[0]
  accelerator = device.platform != 'cpu'
  sizes = (TINY if not accelerator else FULL) if tiny is None else (TINY if tiny else FULL)
  result = dict(platform=device.platform, device=device.device_kind, devices=jax.device_count(),
                sizes='full' if sizes is FULL else 'tiny', correctness=[], training=[])
  say(f'device: {device.device_kind} ({device.platform}, {jax.device_count()} devices), '
      f'{result["sizes"]} sizes')
  for dtype in dtypes:
    c = check_correctness(device, sizes, dtype)
    result['correctness'].append(c)
    say(f'correctness {dtype:9s} device vs CPU after {c["steps"]} steps: loss '
        f'{c["loss_relative_difference"]:.2e}, parameters {c["param_relative_difference"]:.2e} '
        f'(tolerance {c["tolerance"]:g}): {"ok" if c["ok"] else "FAILED"}')
  for dtype in dtypes:
    peak = peak_for(device.device_kind, dtype, peak_tflops)
    for key in networks:
      name, model, fields = NETWORKS[key]
      r = time_training(_config(model, sizes, dtype, sizes.batch, **fields), device, sizes.steps)
      result['training'].append(_with_mfu(dict(network=name, dtype=dtype, **r), peak))
    big = largest_batch(device, sizes, dtype, sizes.steps) if 'alexnet' in networks else None
    if big is not None:
      result['training'].append(
          _with_mfu(dict(network='alexnet (two towers), largest batch', dtype=dtype, **big), peak))
  for r in result['training']:
    say(_training_line(r))
  result['input'] = measure_input(sizes, images=input_images or (2048 if sizes is FULL else 160),
                                  batches=input_batches, data_dir=data_dir)
  i = result['input']
  say(f'input pipeline: {i["images_per_second"]:.0f} images/s with {i["workers"]} workers '
      f'({i["images_per_second_per_core"]:.0f} per core); pipeline-fed step / fixed-batch step '
      f'{i["fed_vs_fixed"]:.3f}')
  result['ok'] = all(c['ok'] for c in result['correctness'])
  return result


def _with_mfu(row: dict, peak: float | None) -> dict:
  row['peak_tflops'] = peak
  achieved = row['step_gflops'] * row['images_per_second'] / row['batch'] / 1e3
  row['achieved_tflops'] = achieved
  row['model_flop_utilisation'] = None if not peak else achieved / peak
  return row


def _training_line(r: dict) -> str:
  mfu = '—' if r['model_flop_utilisation'] is None else f'{100 * r["model_flop_utilisation"]:.1f}%'
  memory = '—' if r['peak_memory_bytes'] is None else f'{r["peak_memory_bytes"] / 2**30:.2f} GiB'
  return (f'{r["network"]:38s} {r["dtype"]:9s} batch {r["batch"]:5d}  '
          f'{r["images_per_second"]:10.1f} img/s  step {1e3 * r["step_seconds"]:8.2f} ms  '
          f'{r["step_gflops"]:9.3g} GFLOP  {r["achieved_tflops"]:7.2f} TFLOP/s  MFU {mfu:>6s}  '
          f'peak memory {memory}')
