"""What several test files share: a tiny config, synthetic images, an in-memory source, and an
interruption for the tests of interrupted writes. Imported by the tests as ``helpers``."""

import numpy as np

from alexnet_jax.configs import IMAGENET_STD_RGB, base_config


def tiny_config(**mesh):
  """A two-tower AlexNet small enough to compile and train in seconds."""
  c = base_config()
  c.model.update(num_classes=10, image_size=67, width=0.0625)
  c.mesh.update(data=mesh.get('data', 1), model=mesh.get('model', 2))
  c.batch_size = 16
  c.eval_batch_size = 16
  # The small built-in images as they are, unit-variance inputs, centre-crop evaluation (the
  # paper's input recipe is tested in test_augment.py).
  c.input.update(std_rgb=IMAGENET_STD_RGB, resize_to=None, mean_image=False, pca_lighting_std=0.0,
                 eval_views='center')
  return c


# The paper's neuron counts of AlexNet's layers ("290,400 - 186,624 - ... - 1000").
PAPER_NEURONS = dict(conv1=290_400, conv2=186_624, conv3=64_896, conv4=64_896, conv5=43_264,
                     fc6=4096, fc7=4096, fc8=1000)


def visualize_config(data_dir):
  """The tiny AlexNet on a small built-in set, trained for two epochs with snapshots after each
  (the analyses' tests and their command-line test, which loads it from a config file)."""
  c = tiny_config()
  c.dataset.update(name='builtin_shapes', data_dir=str(data_dir), num_train=64, num_val=24,
                   image_size=72)
  c.input.update(mean_rgb=(127.5,) * 3, std_rgb=(64.0,) * 3, workers=0)
  c.log_every_steps = 2
  c.num_epochs = 2
  c.checkpoint.update(async_save=False, keep=1, keep_best=False, keep_epochs=(1,))
  c.visualize.update(every_epochs=1, images=2)
  return c


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


def conv_transpose(g, kernel, stride, pad, in_size):
  """The deconvnet's filtering with the transposed filters, in NumPy: every output's signal
  spread back over its window."""
  kh, kw, cin, _ = kernel.shape
  out = np.zeros((in_size + 2 * pad, in_size + 2 * pad, cin))
  for i in range(g.shape[0]):
    for j in range(g.shape[1]):
      out[i * stride:i * stride + kh, j * stride:j * stride + kw] += kernel @ g[i, j]
  return out[pad:pad + in_size, pad:pad + in_size]


# For tests that start real training processes: XLA's CPU backend without its expensive passes
# compiles the train step ~4x faster (same losses at these sizes), and the preset tunable spares
# each process its restart for huge pages (host.py).
XLA_FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
