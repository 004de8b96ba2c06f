"""The paper: two-tower AlexNet on ImageNet, one tower per GPU (mesh 1 x 2), batch 128, 90 epochs.

  python -m alexnet_jax.main --config=configs/two_gpu.py --workdir=runs/alexnet_two_gpu \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

from alexnet_jax.configs import paper_recipe


def get_config():
  return paper_recipe('alexnet')
