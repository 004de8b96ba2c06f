"""8 emulated CPU devices, set before JAX starts (the CI machine has no accelerator)."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from alexnet_jax.configs import base_config  # noqa: E402


def tiny_config(**mesh):
  """A two-tower AlexNet small enough to compile and train in seconds."""
  c = base_config()
  c.model.update(num_classes=10, image_size=67, width=0.0625)
  c.mesh.update(data=mesh.get('data', 1), model=mesh.get('model', 2))
  c.batch_size = 16
  c.eval_batch_size = 16
  # The small built-in images as they are, centre-crop evaluation (the paper's input recipe is
  # tested in test_augment.py).
  c.input.update(resize_to=None, mean_image=False, pca_lighting_std=0.0, eval_views='center')
  return c


@pytest.fixture
def tiny():
  return tiny_config()


# Pixel step of `gradient_image`: rows and columns up to 255 // 5 = 51 stay distinguishable.
GRADIENT_STEP = 5


def gradient_image(h, w):
  """R encodes the row, G the column, so any crop, window or reflection can be located exactly."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([y * GRADIENT_STEP, x * GRADIENT_STEP, np.full_like(y, 7)], -1).astype(np.uint8)


class ListSource:
  """In-memory random-access source ``[(image, label), ...]`` for pipeline tests."""

  def __init__(self, items):
    self.items = items

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    image, label = self.items[i]
    return {'image': image, 'label': np.int32(label)}


def interrupt_on_call(monkeypatch, module, name: str, n: int) -> None:
  """Replaces ``module.name`` with a wrapper that raises KeyboardInterrupt on its ``n``-th call
  (a user's Ctrl-C in the middle of writing a data set)."""
  real = getattr(module, name)
  calls = [0]

  def flaky(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
      raise KeyboardInterrupt('simulated interruption')
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, flaky)
