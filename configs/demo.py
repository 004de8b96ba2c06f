"""A few minutes on a laptop: the two-tower AlexNet, scaled down, on the built-in shapes data set.

Emulates the two devices of the paper's split on a CPU-only machine, generates the data on first
use, and reaches a validation error far below chance (90 %).

  python -m alexnet_jax.main --config=configs/demo.py --workdir=/tmp/alexnet_demo
"""

from alexnet_jax.configs import base_config


def get_config():
  c = base_config()
  c.emulate_cpu_devices = 2
  c.mesh.data, c.mesh.model = 1, 2
  c.model.update(num_classes=10, image_size=99, width=0.25, init='he')
  c.dataset.update(name='builtin_shapes', num_train=10000, num_val=2000, image_size=112)
  # Quick settings: the built-in 112px images as they are, per-channel normalisation, no colour
  # shifts, centre-crop evaluation (the paper's recipe is the base config's).
  c.input.update(
      mean_rgb=(127.5,) * 3,
      std_rgb=(64.0,) * 3,
      workers=1,
      resize_to=None,
      mean_image=False,
      pca_lighting_std=0.0,
      eval_views='center',
      # The emulated devices are this CPU's cores: the input worker takes only the
      # cycles the training steps leave idle, so it does not slow them down.
      worker_priority='idle')
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 12
  c.optim.update(learning_rate=0.02, schedule='cosine', warmup_epochs=1)
  c.log_every_steps = 20
  return c
