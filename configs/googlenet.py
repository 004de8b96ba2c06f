"""GoogLeNet (Szegedy et al. 2014) as the paper defines it: no batch norm, LRN in the stem, 5x5
branches, both auxiliary classifiers (loss weight 0.3, training only). The paper trained
asynchronously with momentum 0.9 and the learning rate cut by 4 % every 8 epochs; synchronous SGD
here, batch 256, learning rate 0.01 x 0.96 every 8 epochs ("step" schedule), weight decay 2e-4
(the reference Caffe solver). Data parallel over every device.

  python -m alexnet_jax.main --config=configs/googlenet.py --workdir=runs/googlenet \
      --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

from alexnet_jax.configs import paper_recipe


def get_config():
  return paper_recipe('googlenet')
