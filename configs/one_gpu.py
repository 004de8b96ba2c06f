"""The same widths as one dense tower (no groups: 62,378,344 parameters) on one device.

  python -m alexnet_jax.main --config=configs/one_gpu.py --workdir=runs/alexnet_one_gpu
"""

from alexnet_jax.configs import base_config


def get_config():
  c = base_config()
  c.model.towers = 1
  c.mesh.data, c.mesh.model = 1, 1
  return c
