"""The paper: two-tower AlexNet on ImageNet, one tower per GPU (mesh 1 x 2), batch 128, 90 epochs.

  python -m alexnet_jax.main --config=configs/two_gpu.py --workdir=runs/alexnet_two_gpu \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

from alexnet_jax.configs import base_config


def get_config():
  c = base_config()
  c.mesh.data, c.mesh.model = 1, 2
  return c
