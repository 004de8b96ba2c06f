"""8 emulated CPU devices, set before JAX starts (the CI machine has no accelerator)."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
