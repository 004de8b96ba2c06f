"""ResNet (He et al. 2015), ResNet-50 by default (--config.model.depth=18/34/50/101/152).

The paper's recipe: batch 256, SGD momentum 0.9, weight decay 1e-4, no dropout, learning rate 0.1
divided by 10 when the validation error plateaus, about 90 epochs (60 x 10^4 iterations). Batch
norm's statistics are taken over the global batch (averaged over the data axis); the running
averages are checkpointed and used at evaluation. Data parallel over every device.

  python -m alexnet_jax.main --config=configs/resnet.py --workdir=runs/resnet50 \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

from alexnet_jax.configs import paper_recipe


def get_config():
  return paper_recipe('resnet')
