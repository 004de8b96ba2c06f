"""VGG (Simonyan & Zisserman): configuration D (VGG-16) by default; A, A-LRN, B, C, E and batch norm
by override. The paper's recipe: batch 256, momentum 0.9, weight decay 5e-4, dropout 0.5 on fc6-7,
learning rate 0.01 divided by 10 when the validation accuracy stops improving (three times, 74
epochs). Glorot initialisation, which the paper notes trains every configuration from scratch (its
N(0, 0.01) is --config.model.init=paper). Data parallel over every device.

  python -m alexnet_jax.main --config=configs/vgg.py --workdir=runs/vgg16 \
      --config.dataset.data_dir=/path/to/tensorflow_datasets --config.model.variant=D
  # configuration E with batch norm:  --config.model.variant=E --config.model.batch_norm=True
"""

from alexnet_jax.configs import paper_recipe


def get_config():
  return paper_recipe('vgg')
