"""PyTorch-eager AlexNet baseline for the throughput benchmark.

This is the reference point our JAX numbers are compared against: the paper's
AlexNet (two towers by default, see /work/shared/REFERENCE.md) written directly
in ``torch.nn`` and trained in plain eager mode (no ``torch.compile``) with the
paper's SGD settings.

torch is an optional dependency (the ``bench`` extra). It is imported lazily so
that importing this module without torch installed does not fail; the public
functions raise ``ImportError`` when they are called without torch.

Usage::

    python -m alexnet_jax.tools.bench_torch --batch_size=64 --image_size=227 --towers=2
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Dict, Optional

from absl import app, flags

from alexnet_jax import cli
from alexnet_jax.errors import ConfigError

__all__ = [
    'TorchTrainer',
    'build_torch_alexnet',
    'count_parameters',
    'torch_train_images_per_second',
]

# Memory format used for the conv activations/weights when the caller does not
# choose one. We chose the default NCHW ("contiguous") format because it was the
# FASTER of the two on our 2-core AMD EPYC CPU with torch 2.13.0+cpu (batch 64,
# 227x227, fp32). The test alternated NCHW and channels-last training steps in one
# process and kept only pairs where torch had both cores to itself. Channels-last
# was slower by a median 5.9 % with two towers and by 2.6-5.2 % with one, so
# picking NCHW keeps the comparison fair to torch.
# Pass ``channels_last=True`` (or ``--channels_last on``) to time the other format.
DEFAULT_CHANNELS_LAST = False

# Paper LRN constants: b = a / (k + alpha * sum_{n maps} a^2) ** beta.
_LRN_SIZE = 5
_LRN_K = 2.0
_LRN_ALPHA = 1e-4
_LRN_BETA = 0.75

_DTYPES = ('float32', 'bfloat16', 'float16')


def _torch():
  try:
    import torch  # noqa: F401, PLC0415  (optional: the bench extra)
  except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("alexnet_jax.tools.bench_torch needs PyTorch; install the 'bench' extra "
                      "(pip install 'alexnet_jax[bench]').") from e
  return torch


def _scaled(channels: int, width: float, towers: int) -> int:
  """``channels * width`` rounded to a positive multiple of ``towers``."""
  per_tower = max(1, int(round(channels * width / towers)))
  return per_tower * towers


def _feature_size(image_size: int) -> int:
  """Spatial size after conv1 (11/4/0) and the three 3/2 max-pools."""
  s = (image_size - 11) // 4 + 1  # conv1
  s = (s - 3) // 2 + 1  # pool1 (conv2 is 'same')
  s = (s - 3) // 2 + 1  # pool2 (conv3-5 are 'same')
  s = (s - 3) // 2 + 1  # pool5
  if s < 1:
    raise ConfigError(f'image_size={image_size} is too small for AlexNet')
  return s


def build_torch_alexnet(
    towers: int = 2,
    num_classes: int = 1000,
    width: float = 1.0,
    lrn: bool = True,
    dropout: float = 0.5,
    image_size: int = 227,
):
  """The paper's AlexNet as a ``torch.nn.Module`` (input NCHW, ``image_size``²).

    conv1 11/4/0 96 → ReLU → LRN → pool 3/2 → conv2 5/1/2 256 (own tower) →
    ReLU → LRN → pool → conv3 3/1/1 384 (both towers) → conv4 384 (own tower) →
    conv5 256 (own tower) → pool → fc6 4096 → fc7 4096 → fc8 ``num_classes``;
    ReLU after every conv and fc6/fc7, dropout on the fc6 and fc7 outputs.

    The towers are expressed as ``groups=towers`` on conv2, conv4 and conv5, and
    the LRN is applied per tower (each tower normalises over its own maps).
    ``width`` multiplies every conv/fc width (rounded to a multiple of
    ``towers``); fc8 stays at ``num_classes``. ``image_size`` only sets the
    input size of fc6 (227 gives the paper's 6×6×256).

    Parameter count with width 1 and 1000 classes: 60,965,224 for two towers,
    62,378,344 for one.
    """
  torch = _torch()
  nn = torch.nn

  if towers < 1:
    raise ConfigError(f'towers must be >= 1, got {towers}')
  if width <= 0:
    raise ConfigError(f'width must be > 0, got {width}')

  c1, c2, c3, c4, c5 = (_scaled(c, width, towers) for c in (96, 256, 384, 384, 256))
  f6, f7 = (_scaled(f, width, towers) for f in (4096, 4096))
  spatial = _feature_size(image_size)

  class TowerLRN(nn.Module):
    """Paper LRN applied separately to each tower's channel group.

        ``nn.LocalResponseNorm`` uses ``alpha / size`` per term and sums over
        all channels; the paper uses ``alpha`` per term and normalises within a
        tower, so we pass ``alpha * size`` and split the channels first.
        """

    def __init__(self, groups: int):
      super().__init__()
      self.groups = groups
      self.norm = nn.LocalResponseNorm(_LRN_SIZE, alpha=_LRN_ALPHA * _LRN_SIZE, beta=_LRN_BETA,
                                       k=_LRN_K)

    def forward(self, x):
      if self.groups == 1:
        return self.norm(x)
      return torch.cat([self.norm(t) for t in x.chunk(self.groups, dim=1)], dim=1)

    def extra_repr(self) -> str:
      return f'groups={self.groups}'

  def norm(groups: int):
    return TowerLRN(groups) if lrn else nn.Identity()

  features = nn.Sequential(
      nn.Conv2d(3, c1, 11, stride=4, padding=0),
      nn.ReLU(inplace=True),
      norm(towers),
      nn.MaxPool2d(3, 2),
      nn.Conv2d(c1, c2, 5, padding=2, groups=towers),
      nn.ReLU(inplace=True),
      norm(towers),
      nn.MaxPool2d(3, 2),
      nn.Conv2d(c2, c3, 3, padding=1),  # reads both towers
      nn.ReLU(inplace=True),
      nn.Conv2d(c3, c4, 3, padding=1, groups=towers),
      nn.ReLU(inplace=True),
      nn.Conv2d(c4, c5, 3, padding=1, groups=towers),
      nn.ReLU(inplace=True),
      nn.MaxPool2d(3, 2),
  )
  classifier = nn.Sequential(
      nn.Flatten(),
      nn.Linear(c5 * spatial * spatial, f6),
      nn.ReLU(inplace=True),
      nn.Dropout(dropout),
      nn.Linear(f6, f7),
      nn.ReLU(inplace=True),
      nn.Dropout(dropout),
      nn.Linear(f7, num_classes),
  )
  model = nn.Sequential()
  model.add_module('features', features)
  model.add_module('classifier', classifier)

  # Paper init: weights N(0, 0.01); biases 1 for conv2, conv4, conv5, fc6,
  # fc7 and 0 elsewhere.
  convs = [m for m in features if isinstance(m, nn.Conv2d)]
  fcs = [m for m in classifier if isinstance(m, nn.Linear)]
  ones = {id(convs[1]), id(convs[3]), id(convs[4]), id(fcs[0]), id(fcs[1])}
  with torch.no_grad():
    for m in convs + fcs:
      m.weight.normal_(0.0, 0.01)
      m.bias.fill_(1.0 if id(m) in ones else 0.0)
  return model


def count_parameters(module) -> int:
  """Number of scalar parameters in a torch module."""
  return sum(p.numel() for p in module.parameters())


class TorchTrainer:
  """One eager-mode training setup of :func:`build_torch_alexnet` on CPU, timed on demand.

    Trains on one fixed random batch with cross-entropy and
    ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``. ``time_steps(k)`` runs ``k``
    full steps (forward + backward + optimizer step) and returns the seconds per
    step, so a caller can interleave it with other measurements on a noisy machine.
    ``threads`` sets ``torch.set_num_threads`` while the trainer steps (restored after).
    ``channels_last=None`` uses :data:`DEFAULT_CHANNELS_LAST` (the faster format
    measured on our CPU).
    """

  def __init__(self, *, towers: int = 2, batch_size: int = 64, image_size: int = 227,
               num_classes: int = 1000, width: float = 1.0, threads: Optional[int] = None,
               dtype: str = 'float32', channels_last: Optional[bool] = None, seed: int = 0):
    torch = _torch()
    if dtype not in _DTYPES:
      raise ConfigError(f'dtype must be one of {_DTYPES}, got {dtype!r}')
    self.channels_last = DEFAULT_CHANNELS_LAST if channels_last is None else channels_last
    fmt = torch.channels_last if self.channels_last else torch.contiguous_format
    torch_dtype = getattr(torch, dtype)
    self.threads, self.batch_size = threads, batch_size
    torch.manual_seed(seed)
    model = build_torch_alexnet(towers=towers, num_classes=num_classes, width=width,
                                image_size=image_size)
    self.model = model.to(dtype=torch_dtype, memory_format=fmt)
    self.model.train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    self.x = x.to(dtype=torch_dtype).contiguous(memory_format=fmt)
    self.y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    self._cross_entropy = torch.nn.functional.cross_entropy
    self.loss = float('nan')
    self.used_threads = torch.get_num_threads()

  def _step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self._cross_entropy(self.model(self.x).float(), self.y)
    loss.backward()
    self.opt.step()
    return loss

  def time_steps(self, steps: int) -> float:
    """Runs ``steps`` training steps; returns the mean seconds per step."""
    torch = _torch()
    if steps < 1:
      raise ConfigError('need steps >= 1')
    old_threads = torch.get_num_threads()
    if self.threads is not None:
      torch.set_num_threads(int(self.threads))
    try:
      self.used_threads = torch.get_num_threads()
      t0 = time.perf_counter()
      for _ in range(steps):
        loss = self._step()
      self.loss = float(loss.detach())  # eager CPU: already synchronous
      return (time.perf_counter() - t0) / steps
    finally:
      torch.set_num_threads(old_threads)


def torch_train_images_per_second(
    *,
    towers: int = 2,
    batch_size: int = 64,
    image_size: int = 227,
    num_classes: int = 1000,
    width: float = 1.0,
    steps: int = 10,
    warmup: int = 2,
    threads: Optional[int] = None,
    dtype: str = 'float32',
    channels_last: Optional[bool] = None,
    seed: int = 0,
) -> Dict[str, Any]:
  """Eager-mode training throughput of a :class:`TorchTrainer`: ``warmup`` untimed steps,
    then ``steps`` timed ones.

    Returns ``images_per_second``, ``seconds_per_step``, ``torch_version`` and
    ``threads`` (the thread count used), plus ``loss`` (last step),
    ``channels_last``, ``dtype``, ``towers``, ``batch_size``, ``image_size``.
    """
  torch = _torch()
  if steps < 1 or warmup < 0:
    raise ConfigError('need steps >= 1 and warmup >= 0')
  trainer = TorchTrainer(towers=towers, batch_size=batch_size, image_size=image_size,
                         num_classes=num_classes, width=width, threads=threads, dtype=dtype,
                         channels_last=channels_last, seed=seed)
  if warmup:
    trainer.time_steps(warmup)
  seconds_per_step = trainer.time_steps(steps)
  return {
      'images_per_second': batch_size / seconds_per_step,
      'seconds_per_step': seconds_per_step,
      'torch_version': torch.__version__,
      'threads': trainer.used_threads,
      'loss': trainer.loss,
      'channels_last': bool(trainer.channels_last),
      'dtype': dtype,
      'towers': towers,
      'batch_size': batch_size,
      'image_size': image_size,
  }


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  result = torch_train_images_per_second(
      towers=f.towers,
      batch_size=f.batch_size,
      image_size=f.image_size,
      num_classes=f.num_classes,
      width=f.width,
      steps=f.steps,
      warmup=f.warmup,
      threads=f.threads,
      dtype=f.dtype,
      channels_last={'auto': None, 'on': True, 'off': False}[f.channels_last],
  )
  if f.json:
    print(json.dumps(result))
  else:
    fmt = 'channels_last' if result['channels_last'] else 'NCHW'
    print(f"torch {result['torch_version']} eager, towers={f.towers}, "
          f"batch={f.batch_size}, {f.image_size}x{f.image_size}, "
          f"{f.dtype}, {fmt}, threads={result['threads']}: "
          f"{result['images_per_second']:.2f} images/s "
          f"({result['seconds_per_step']:.3f} s/step, loss {result['loss']:.4f})")
  if not math.isfinite(result['loss']):
    raise SystemExit('non-finite loss')


def _define_flags() -> None:
  flags.DEFINE_integer('towers', 2, 'AlexNet towers (1: the dense network).')
  flags.DEFINE_integer('batch_size', 64, 'Training batch.')
  flags.DEFINE_integer('image_size', 227, 'Input side.')
  flags.DEFINE_integer('num_classes', 1000, 'Classes.')
  flags.DEFINE_float('width', 1.0, 'Width multiplier of every layer.')
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
  flags.DEFINE_integer('threads', None, "torch threads (default: torch's).")
  flags.DEFINE_enum('dtype', 'float32', _DTYPES, 'Compute dtype.')
  flags.DEFINE_enum('channels_last', 'auto', ('auto', 'on', 'off'),
                    "Memory format; 'auto' uses the measured-faster default.")
  flags.DEFINE_bool('json', False, 'Print the result as JSON.')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
